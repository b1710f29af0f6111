"""KeyPool: the blocking facade. Every decision is one script call, one round trip."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import redis

from . import scripts
from .classify import Failure
from .core import PoolCore
from .lane import Lanes
from .lease import Lease
from .ops import Cmd, CmdMany, Flow, Invoke, Run, RunMany, Sleep
from .settings import KeyPoolSettings
from .stats import KeyStats, ScopeStats
from .store import is_embedded, open_store

__all__ = ["KeyPool"]

T = TypeVar("T")


class KeyPool(PoolCore):
    """One pool of API keys shared by every process that points at the same store.

    ``url`` (default: ``KEYPOOL_REDIS_URL``, else ``memory://``) picks the store;
    ``namespace`` separates pools on one Redis; ``settings`` overrides the environment.
    Thread-safe; safe across ``fork`` (connections are reopened in the child).

    Each public method runs one flow of :mod:`keypool.flows`; :class:`AsyncKeyPool` has the
    same methods, awaiting the same flows (twins on purpose: only ``await`` differs).
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
        # each call), nor on the embedded store
        self._lanes: Lanes | None = None
        self._embedded = is_embedded(self._client)
        if isinstance(self._client, redis.Redis) and not self._embedded:
            self._lanes = Lanes(self._client.connection_pool, self._log_late)

    # ------------------------------------------------------------------ running flows

    def _execute(self, op: Any) -> Any:
        client = self._client
        if type(op) is Run:
            script, keys, args = self._script_call(op.provider, op.call)
            if self._lanes is None:
                if self._embedded:  # its scripts run as a function library: state kept
                    return script.fcall(client, keys, args)
                return script(client, keys, args)
            lane = self._lanes.current()
            if op.confirm:
                reply, late = lane.call(script, keys, args)
            else:
                reply, late = None, lane.send(script, keys, args, (op.provider, op.call))
            if late:
                self._log_late(late)
            return reply
        if type(op) is Sleep:
            time.sleep(op.seconds)
            return None
        if type(op) is Invoke:
            return self._invoke(op)
        if self._lanes is not None and (mine := self._lanes.existing()) is not None and mine.busy:
            # reports sent from this thread reach the store before anything read here
            self._log_late(mine.settle())
        if type(op) is RunMany:
            calls = [self._script_call(p, call) for p, call in op.calls]
            return scripts.run_many(client, calls)
        if type(op) is Cmd:
            return getattr(client, op.name)(*op.args)
        if type(op) is CmdMany:
            pipe = client.pipeline(transaction=False)
            for name, cmd_args in op.cmds:
                getattr(pipe, name)(*cmd_args)
            return pipe.execute()
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
        reply: Any = None
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
        if self._lanes is not None:
            self._lanes.close()
        self._client.close()

    def server_time(self) -> float:
        """The store's clock (``TIME``), epoch seconds: the time every decision uses."""
        result: float = self._drive(self._server_time_flow())
        return result

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
        account: str | None = None,
    ) -> None:
        """Register a key, or update it in place (idempotent upsert: its counters and state
        are kept). Limits: requests per minute, tokens per minute, requests per day, leases
        at once. ``models``: models this key serves (see :meth:`assign_model`)."""
        self._drive(
            self._add_keys_flow(
                [(provider, key_id, secret)],
                weight,
                rpm,
                tpm,
                rpd,
                max_concurrency,
                models,
                account=account,
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
        account: str | None = None,
    ) -> int:
        """Register many ``(provider, key_id, secret)`` at once, pipelined, with the same
        options; every entry is checked before anything is written. Returns the count."""
        return int(
            self._drive(
                self._add_keys_flow(
                    entries, weight, rpm, tpm, rpd, max_concurrency, models, account=account
                )
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
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> Lease:
        """Lease an available key: counts the request, reserves ``tokens`` on its budget and
        holds an in-flight lease until you report (or the lease TTL passes).

        ``provider`` may be omitted when ``model`` has assigned keys. Raises
        :class:`NoKeyAvailable` (with ``retry_after``) when no key can serve now; with
        ``wait=seconds`` it first sleeps until a key frees up, if that is soon enough.
        """
        picked = self._drive(
            self._acquire_flow(
                provider,
                model,
                strategy,
                tokens,
                wait,
                True,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
            )
        )
        return Lease(self, picked)

    def next_key(
        self,
        provider: object | None = None,
        *,
        model: str | None = None,
        strategy: str | None = None,
    ) -> tuple[str, str]:
        """Pick a key and count one request, holding no lease (for callers that report
        with :meth:`mark_success` / :meth:`mark_failure`). Returns ``(key_id, secret)``;
        :class:`NoKeyAvailable` when none can serve now."""
        picked = self._drive(self._acquire_flow(provider, model, strategy, 0, None, False))
        return picked.key_id, picked.secret

    def set_limits(
        self,
        provider: object,
        *,
        key_id: str | None = None,
        account: str | None = None,
        model: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        tpd: int | None = None,
        itpm: int | None = None,
        otpm: int | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        """Set the limits of one scope: a key (``key_id``), a key for one model (``key_id``
        and ``model``), an account (``account``) or an account for one model. Every scope
        that applies must admit an acquire, and each is charged in the same script. A limit
        given as ``None`` is kept, 0 removes it."""
        limits = {
            "rpm": rpm,
            "tpm": tpm,
            "rpd": rpd,
            "tpd": tpd,
            "itpm": itpm,
            "otpm": otpm,
            "max_concurrency": max_concurrency,
        }
        self._drive(self._set_limits_flow(provider, key_id, account, model, limits))

    def scopes(self, provider: object) -> list[ScopeStats]:
        """The limit scopes of the provider (accounts, accounts for a model, keys for a model)
        and what each is doing."""
        result: list[ScopeStats] = self._drive(self._scopes_flow(provider))
        return result

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
