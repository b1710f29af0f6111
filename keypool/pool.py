"""KeyPool: the blocking facade. Every decision is one script call, one round trip."""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis

from . import scripts
from .classify import Failure
from .core import (
    Cmd,
    CmdMany,
    Flow,
    Invoke,
    Picked,
    PoolCore,
    Run,
    Sleep,
)
from .lane import Lane, Unconfirmed
from .lease import Lease
from .settings import KeyPoolSettings
from .stats import KeyStats
from .store import open_store

__all__ = ["KeyPool"]

# pools whose last reports' replies are read at interpreter exit
_live_pools: weakref.WeakSet[KeyPool] = weakref.WeakSet()


@atexit.register
def _settle_at_exit() -> None:
    for pool in list(_live_pools):
        pool._close_lanes()


def _forget_lanes_in_child() -> None:
    # A forked child must never read or write on its parent's lanes (their sockets and
    # unread replies are the parent's): it makes its own on first use.
    for pool in list(_live_pools):
        pool._local = threading.local()
        pool._lanes = weakref.WeakSet()
        for finalizer in pool._finalizers:
            finalizer.detach()
        pool._finalizers = []


os.register_at_fork(after_in_child=_forget_lanes_in_child)


def _close_orphan_lane(lane: Lane, pool_ref: weakref.ReferenceType[KeyPool]) -> None:
    """A thread with a lane has ended: read what its last reports answered, and close."""
    try:
        settled = lane.close()
    except Exception:  # closing: a broken connection is no news
        return
    pool = pool_ref()
    if pool is not None:
        pool._log_unconfirmed(settled)


T = TypeVar("T")


class KeyPool(PoolCore):
    """One pool of API keys shared by every process that points at the same store.

    ``url`` (default: ``KEYPOOL_REDIS_URL``, else ``memory://``) picks the store;
    ``namespace`` separates pools on one Redis; ``settings`` overrides the environment.
    Thread-safe; safe across ``fork`` (connections are reopened in the child).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
    ) -> None:
        super().__init__(url, namespace=namespace, settings=settings)
        self._client = open_store(
            self.settings.redis_url,
            socket_timeout=self.settings.socket_timeout,
            connect_timeout=self.settings.connect_timeout,
        )
        # the hot path's connections, one per thread: not on a Cluster (its client routes
        # each call), nor on the embedded store (it answers calls sent ahead out of order)
        self._lanes_possible = isinstance(self._client, redis.Redis) and not type(
            self._client
        ).__module__.startswith(("fakeredis", "keypool.embedded"))
        self._local = threading.local()
        self._lanes: weakref.WeakSet[Lane] = weakref.WeakSet()
        self._finalizers: list[weakref.finalize[Any, Any]] = []  # close lanes of ended threads
        _live_pools.add(self)

    # ------------------------------------------------------------------ running flows

    def _lane(self) -> Lane | None:
        """This thread's lane (made on first use; anew in a forked child)."""
        if not self._lanes_possible:
            return None
        lane: Lane | None = getattr(self._local, "lane", None)
        if lane is None:
            lane = Lane(self._client.connection_pool)
            self._local.lane = lane
            self._local.settled = []
            self._lanes.add(lane)
            if len(self._finalizers) >= 64:  # those of ended threads have run
                self._finalizers = [f for f in self._finalizers if f.alive]
            self._finalizers.append(
                weakref.finalize(
                    threading.current_thread(), _close_orphan_lane, lane, weakref.ref(self)
                )
            )
        return lane

    def _execute(self, op: Any) -> Any:
        client = self._client
        if type(op) is Run:
            space = self._space(op.provider)
            lane = self._lane()
            if lane is None:
                return op.script(client, space.keys, [space.prefix, *op.args])
            reply, settled = lane.run(op.script, space.keys, [space.prefix, *op.args])
            if settled:
                self._local.settled.extend(settled)
            return reply
        if type(op) is Sleep:
            time.sleep(op.seconds)
            return None
        lane = getattr(self._local, "lane", None)
        if lane is not None and lane.busy:
            # reports sent from this thread reach the store before anything read here
            self._local.settled.extend(lane.settle())
        if type(op) is Cmd:
            return getattr(client, op.name)(*op.args)
        if type(op) is CmdMany:
            pipe = client.pipeline(transaction=False)
            for name, args in op.cmds:
                getattr(pipe, name)(*args)
            return pipe.execute(raise_on_error=op.raise_on_error)
        if type(op) is Invoke:
            return self._invoke(op)
        raise TypeError(f"unknown operation {op!r}")

    def _invoke(self, op: Invoke) -> tuple[bool, Any]:
        lease = Lease(self, op.picked)
        try:
            result = op.fn(lease)
        except Exception as exc:
            return False, (exc, lease.fail(exc))
        except BaseException:  # interrupted: not the key's fault
            lease.release()
            raise
        lease.success()
        return True, result

    def _drive(self, flow: Flow) -> Any:
        try:
            return self._run_flow(flow)
        finally:
            if getattr(self._local, "settled", None):
                self._hand_on()

    def _run_flow(self, flow: Flow, reply: Any = None) -> Any:
        try:
            while True:
                op = flow.send(reply)
                try:
                    reply = self._execute(op)
                except Exception as exc:
                    translated = self._translate(exc)
                    if translated is exc:
                        raise
                    raise translated from None
        except StopIteration as stop:
            return stop.value

    def _report_lease(
        self,
        picked: Picked,
        outcome: str,
        tokens: int | None = None,
        latency: float | None = None,
    ) -> None:
        """A lease's success or release: the report is sent without waiting for its reply,
        which is read with this thread's next call (and only then, when it says more than
        OK, handed on: a key removed meanwhile, an event to log)."""
        lane = self._lane()
        if lane is None:
            self._drive(self._lease_report_flow(picked, outcome, tokens, latency))
            return
        provider, key_id = picked.provider, picked.key_id
        args = self._mark_args(key_id, picked.lease_id, outcome, picked.tokens, tokens, latency)
        space = self._space(provider)

        def then(reply: Any, error: BaseException | None) -> None:
            if error is not None:
                self._log.warning(
                    "report_unconfirmed",
                    provider=provider,
                    key_id=key_id,
                    outcome=outcome,
                    error=type(error).__name__,
                )
            elif reply[0] != "OK" or reply[1]:
                self._run_flow(
                    self._marked_flow(provider, key_id, outcome, picked.lease_id, None, args, reply)
                )

        call = Unconfirmed(scripts.REPORT, space.keys, [space.prefix, *args], then)
        try:
            settled = lane.send_unconfirmed(call)
        except Exception as exc:
            translated = self._translate(exc)
            if translated is exc:
                raise
            raise translated from None
        if settled:
            self._local.settled.extend(settled)
            self._hand_on()

    def _hand_on(self) -> None:
        """Hand the replies of earlier unconfirmed reports on to their flows (logging, a key
        removed meanwhile); a report's trouble is logged, never raised into another call."""
        local = self._local
        if getattr(local, "handing_on", False):
            return  # the outer loop takes what is added meanwhile
        local.handing_on = True
        try:
            while local.settled:
                call, reply, error = local.settled.pop(0)
                try:
                    call.then(reply, error)
                except Exception as exc:
                    self._log.warning("report_unconfirmed", error=type(exc).__name__)
        finally:
            local.handing_on = False

    def _close_lanes(self) -> None:
        """Settle and close every thread's lane; the settled reports are handed on here."""
        settled: list[Any] = []
        for lane in list(self._lanes):
            try:
                settled += lane.close()
            except Exception:  # closing: a broken connection is no news
                continue
        self._lanes.clear()
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()
        if settled:
            if not hasattr(self._local, "settled"):
                self._local.settled = []
            self._local.settled.extend(settled)
            self._hand_on()

    def _log_unconfirmed(self, settled: list[Any]) -> None:
        for call, _reply, error in settled:
            if error is not None:
                self._log.warning(
                    "report_unconfirmed",
                    key_id=call.args[1],
                    outcome=call.args[3],
                    error=type(error).__name__,
                )

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KeyPool:
        """A pool with every key found in the environment registered (see :meth:`load_env`)."""
        pool = cls(url, namespace=namespace, settings=settings)
        pool.load_env(environ)
        return pool

    def load_env(self, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        """Register the keys found in the environment (``OPENAI_API_KEY``,
        ``OPENAI_API_KEYS``, ``HF_<NAME>_KEY``, ...). Returns their (provider, key_id)."""
        entries, found = self._load_env_entries(environ)
        # keys from the environment keep any weight and limits set for them (by the CLI)
        self._drive(self._add_keys_flow(entries, 1.0, None, None, None, None, (), keep_config=True))
        return found

    def close(self) -> None:
        """Read the replies of reports still unread, then close the connections to the
        store."""
        self._close_lanes()
        self._client.close()

    def __enter__(self) -> KeyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ registration

    def add_key(
        self,
        provider: object,
        key_id: str,
        secret: str,
        *,
        weight: float = 1.0,
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        max_concurrency: int | None = None,
        models: Iterable[str] | str = (),
    ) -> None:
        """Register a key, or update it in place (idempotent upsert: its counters and state
        are kept). Limits: requests per minute, tokens per minute, requests per day, leases
        at once. ``models``: models this key serves (see :meth:`assign_model`)."""
        self._drive(
            self._add_keys_flow(
                [(provider, key_id, secret)], weight, rpm, tpm, rpd, max_concurrency, models
            )
        )

    def add_keys(
        self,
        entries: Iterable[tuple[object, str, str]],
        *,
        weight: float = 1.0,
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        max_concurrency: int | None = None,
        models: Iterable[str] | str = (),
    ) -> int:
        """Register many ``(provider, key_id, secret)`` at once, pipelined, with the same
        options; every entry is checked before anything is written. Returns the count."""
        return int(
            self._drive(
                self._add_keys_flow(entries, weight, rpm, tpm, rpd, max_concurrency, models)
            )
        )

    def remove_key(self, provider: object, key_id: str) -> None:
        """Forget a key: its state, leases and model assignments. ``UnknownKey`` if absent."""
        self._drive(self._remove_flow(provider, key_id))

    def assign_model(self, model: str, provider: object, key_id: str) -> None:
        """Let ``model`` be served by this key. Call it for every key of the model: a model
        with assigned keys is served only by them."""
        self._drive(self._assign_flow(model, provider, key_id, True))

    def unassign_model(self, model: str, provider: object, key_id: str) -> None:
        """Undo :meth:`assign_model` for one key."""
        self._drive(self._assign_flow(model, provider, key_id, False))

    # ------------------------------------------------------------------ operator actions

    def disable_key(self, provider: object, key_id: str, reason: str = "") -> None:
        """Take a key out of service until :meth:`enable_key`."""
        self._drive(self._disable_flow(provider, key_id, reason))

    def enable_key(self, provider: object, key_id: str) -> None:
        """Put a disabled key back in service."""
        self._drive(self._enable_flow(provider, key_id))

    def reset_key(self, provider: object, key_id: str) -> None:
        """Clear a key's cooldown, circuit, error and usage counters and budgets
        (a disabled key stays disabled)."""
        self._drive(self._reset_flow(provider, key_id))

    # ------------------------------------------------------------------ reading state

    def stats(self, provider: object, key_id: str) -> KeyStats:
        """One key's state as every process sees it. ``UnknownKey`` if absent."""
        result: KeyStats = self._drive(self._stats_flow(provider, key_id))
        return result

    def snapshot(self, provider: object | None = None) -> list[KeyStats]:
        """Every key's state, of one provider or of all, sorted by provider and key id."""
        result: list[KeyStats] = self._drive(self._snapshot_flow(provider))
        return result

    def providers(self) -> list[str]:
        """The providers that have keys in this namespace."""
        result: list[str] = self._drive(self._providers_flow())
        return result

    # ------------------------------------------------------------------ acquiring

    def acquire(
        self,
        provider: object | None = None,
        *,
        model: str | None = None,
        strategy: str | None = None,
        tokens: int = 0,
        wait: float | None = None,
    ) -> Lease:
        """Lease an available key: counts the request, reserves ``tokens`` on its budget and
        holds an in-flight lease until you report (or the lease TTL passes).

        ``provider`` may be omitted when ``model`` has assigned keys. Raises
        :class:`NoKeyAvailable` (with ``retry_after``) when no key can serve now; with
        ``wait=seconds`` it first sleeps until a key frees up, if that is soon enough.
        """
        picked = self._drive(self._acquire_flow(provider, model, strategy, tokens, wait, True))
        return Lease(self, picked)

    def mark_success(
        self,
        provider: object,
        key_id: str,
        *,
        tokens: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Report a successful call made with a key that was not leased."""
        self._drive(self._mark_success_flow(provider, key_id, tokens, latency))

    def mark_failure(
        self,
        provider: object,
        key_id: str,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure:
        """Report a failed call made with a key that was not leased (see :meth:`Lease.fail`)."""
        result: Failure = self._drive(
            self._mark_failure_flow(provider, key_id, error, retry_after, headers)
        )
        return result

    # ------------------------------------------------------------------ calling with retries

    def call(
        self,
        fn: Callable[[Lease], T],
        provider: object | None = None,
        *,
        model: str | None = None,
        fallbacks: Sequence[object] = (),
        max_attempts: int = 3,
        wait: float | None = None,
        strategy: str | None = None,
        tokens: int = 0,
    ) -> T:
        """Run ``fn(lease)`` with a key, moving to another key after a failure (never the one
        that just failed while another is available), then through ``fallbacks`` (providers
        or ``(provider, model)`` pairs); each target gets ``max_attempts`` tries. A
        ``BAD_REQUEST`` is raised at once. When all is spent: the last provider error, or
        ``NoKeyAvailable`` with the earliest ``retry_after``."""
        result: T = self._drive(
            self._call_flow(fn, provider, model, fallbacks, max_attempts, wait, strategy, tokens)
        )
        return result
