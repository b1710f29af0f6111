"""AsyncKeyPool: the asyncio facade on ``redis.asyncio``, the same scripts and state."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from . import scripts
from .alane import ALanes, supported
from .classify import Failure
from .core import PoolCore
from .lease import AsyncLease
from .ops import Cmd, CmdMany, Flow, Invoke, Picked, Run, RunMany, Sleep
from .settings import KeyPoolSettings
from .stats import KeyStats, ScopeStats
from .store import is_embedded, open_store_async

__all__ = ["AcquireContext", "AsyncKeyPool"]

T = TypeVar("T")
MAX_IN_FLIGHT = 64


class AcquireContext:
    """What :meth:`AsyncKeyPool.acquire` returns: await it for an :class:`AsyncLease`, or
    use it directly as ``async with pool.acquire(...) as lease:``."""

    __slots__ = ("_flow", "_lease", "_pool")

    def __init__(self, pool: AsyncKeyPool, flow: Flow) -> None:
        self._pool = pool
        self._flow = flow
        self._lease: AsyncLease | None = None

    async def _get(self) -> AsyncLease:
        if self._lease is None:
            picked: Picked = await self._pool._adrive(self._flow)
            self._lease = AsyncLease(self._pool, picked)
        return self._lease

    def __await__(self) -> Generator[Any, None, AsyncLease]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncLease:
        return await self._get()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lease is not None:
            await self._lease.__aexit__(exc_type, exc, tb)


class AsyncKeyPool(PoolCore):
    """The asyncio twin of :class:`KeyPool`: every method is ``async def`` (``acquire`` is
    awaitable and an async context manager). Same store, same scripts, same state: sync and
    async processes share one pool.

    Each public method is the twin of :class:`KeyPool`'s method of the same name, on
    purpose: both run the same flow (:mod:`keypool.flows`), and differ only in ``await``."""

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
    ) -> None:
        super().__init__(url, namespace=namespace, settings=settings)
        self._client = open_store_async(
            self.settings.redis_url,
            socket_timeout=self.settings.socket_timeout,
            connect_timeout=self.settings.connect_timeout,
        )
        self._gates: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        # the script calls' own connections, one per event loop: on one server only (a
        # Cluster's client routes each call; Sentinel and the embedded store keep theirs)
        self._lanes: ALanes | None = None
        self._embedded = is_embedded(self._client)
        if supported(self._client):
            self._lanes = ALanes(self._client.connection_pool, self._log_late)

    # ------------------------------------------------------------------ running flows

    def _gate(self) -> asyncio.Semaphore:
        """At most MAX_IN_FLIGHT store operations of this pool at once (per event loop):
        a burst of tasks queues here instead of exhausting the connection pools."""
        loop = asyncio.get_running_loop()
        gate = self._gates.get(loop)
        if gate is None:
            if len(self._gates) > 8:  # forget loops that are gone (asyncio.run per test)
                self._gates = {lp: g for lp, g in self._gates.items() if not lp.is_closed()}
            gate = self._gates[loop] = asyncio.Semaphore(MAX_IN_FLIGHT)
        return gate

    async def _execute(self, op: Any) -> Any:
        lanes = self._lanes
        if type(op) is Run and lanes is not None:  # pipelined: no place at the gate
            script, keys, args = self._script_call(op.provider, op.call)
            lane = lanes.current()
            if not op.confirm and lane.send(script, keys, args, (op.provider, op.call)):
                return None
            return await lane.call(script, keys, args)
        if type(op) is Sleep:
            await asyncio.sleep(op.seconds)
            return None
        if type(op) is Invoke:  # the caller's own call: it holds no place at the gate
            return await self._invoke(op)
        if lanes is not None and (mine := lanes.existing()) is not None and mine.busy:
            # reports sent from this loop reach the store before anything read here
            await mine.settle()
        async with self._gate():
            return await self._execute_now(op)

    async def _execute_now(self, op: Any) -> Any:
        client = self._client
        if type(op) is Run:  # a Cluster, Sentinel, the embedded store: waits for its reply
            script, keys, args = self._script_call(op.provider, op.call)
            if self._embedded:  # its scripts run as a function library: state kept
                return await script.fcall_async(client, keys, args)
            return await script.call_async(client, keys, args)
        if type(op) is RunMany:
            calls = [self._script_call(p, call) for p, call in op.calls]
            return await scripts.run_many_async(client, calls)
        if type(op) is Cmd:
            return await getattr(client, op.name)(*op.args)
        if type(op) is CmdMany:
            pipe = client.pipeline(transaction=False)
            for name, cmd_args in op.cmds:
                getattr(pipe, name)(*cmd_args)
            return await pipe.execute()
        raise TypeError(f"unknown operation {op!r}")

    async def _invoke(self, op: Invoke) -> tuple[bool, Any]:
        lease = AsyncLease(self, op.picked)
        try:
            result = await op.fn(lease)
        except Exception as exc:
            return False, (exc, await lease.fail(exc))
        except BaseException:  # cancelled: not the key's fault
            await lease.release()
            raise
        await lease.success()
        return True, result

    async def _adrive(self, flow: Flow) -> Any:
        reply: Any = None
        try:
            while True:
                op = flow.send(reply)
                try:
                    reply = await self._execute(op)
                except Exception as exc:
                    translated = self._translate(exc)
                    if translated is exc:
                        raise
                    raise translated from None
        except StopIteration as stop:
            return stop.value

    # ------------------------------------------------------------------ construction

    @classmethod
    async def from_env(
        cls,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> AsyncKeyPool:
        """A pool with every key found in the environment registered."""
        pool = cls(url, namespace=namespace, settings=settings)
        await pool.load_env(environ)
        return pool

    async def load_env(self, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        """See :meth:`KeyPool.load_env`."""
        entries, found = self._load_env_entries(environ)
        # keys from the environment keep any weight and limits set for them (by the CLI)
        await self._adrive(
            self._add_keys_flow(entries, 1.0, None, None, None, None, (), keep_config=True)
        )
        return found

    async def close(self) -> None:
        """Wait for the replies of reports still unanswered, then close the connections to
        the store."""
        if self._lanes is not None:
            await self._lanes.close()
        await self._client.aclose()

    async def __aenter__(self) -> AsyncKeyPool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ registration

    async def add_key(
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
        """See :meth:`KeyPool.add_key`."""
        await self._adrive(
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

    async def add_keys(
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
        """See :meth:`KeyPool.add_keys`."""
        return int(
            await self._adrive(
                self._add_keys_flow(
                    entries, weight, rpm, tpm, rpd, max_concurrency, models, account=account
                )
            )
        )

    async def remove_key(self, provider: object, key_id: str) -> None:
        """See :meth:`KeyPool.remove_key`."""
        await self._adrive(self._remove_flow(provider, key_id))

    async def assign_model(self, model: str, provider: object, key_id: str) -> None:
        """See :meth:`KeyPool.assign_model`."""
        await self._adrive(self._assign_flow(model, provider, key_id, True))

    async def unassign_model(self, model: str, provider: object, key_id: str) -> None:
        """See :meth:`KeyPool.unassign_model`."""
        await self._adrive(self._assign_flow(model, provider, key_id, False))

    async def disable_key(self, provider: object, key_id: str, reason: str = "") -> None:
        """See :meth:`KeyPool.disable_key`."""
        await self._adrive(self._disable_flow(provider, key_id, reason))

    async def enable_key(self, provider: object, key_id: str) -> None:
        """See :meth:`KeyPool.enable_key`."""
        await self._adrive(self._enable_flow(provider, key_id))

    async def reset_key(self, provider: object, key_id: str) -> None:
        """See :meth:`KeyPool.reset_key`."""
        await self._adrive(self._reset_flow(provider, key_id))

    # ------------------------------------------------------------------ reading state

    async def stats(self, provider: object, key_id: str) -> KeyStats:
        """See :meth:`KeyPool.stats`."""
        result: KeyStats = await self._adrive(self._stats_flow(provider, key_id))
        return result

    async def snapshot(self, provider: object | None = None) -> list[KeyStats]:
        """See :meth:`KeyPool.snapshot`."""
        result: list[KeyStats] = await self._adrive(self._snapshot_flow(provider))
        return result

    async def providers(self) -> list[str]:
        """See :meth:`KeyPool.providers`."""
        result: list[str] = await self._adrive(self._providers_flow())
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
    ) -> AcquireContext:
        """See :meth:`KeyPool.acquire`. ``lease = await pool.acquire(...)`` or
        ``async with pool.acquire(...) as lease:``."""
        return AcquireContext(
            self,
            self._acquire_flow(
                provider,
                model,
                strategy,
                tokens,
                wait,
                True,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
            ),
        )

    async def next_key(
        self,
        provider: object | None = None,
        *,
        model: str | None = None,
        strategy: str | None = None,
    ) -> tuple[str, str]:
        """See :meth:`KeyPool.next_key`."""
        picked = await self._adrive(self._acquire_flow(provider, model, strategy, 0, None, False))
        return picked.key_id, picked.secret

    async def server_time(self) -> float:
        """See :meth:`KeyPool.server_time`."""
        result: float = await self._adrive(self._server_time_flow())
        return result

    async def set_limits(
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
        """See :meth:`KeyPool.set_limits`."""
        limits = {
            "rpm": rpm,
            "tpm": tpm,
            "rpd": rpd,
            "tpd": tpd,
            "itpm": itpm,
            "otpm": otpm,
            "max_concurrency": max_concurrency,
        }
        await self._adrive(self._set_limits_flow(provider, key_id, account, model, limits))

    async def scopes(self, provider: object) -> list[ScopeStats]:
        """See :meth:`KeyPool.scopes`."""
        result: list[ScopeStats] = await self._adrive(self._scopes_flow(provider))
        return result

    async def mark_success(
        self,
        provider: object,
        key_id: str,
        *,
        tokens: int | None = None,
        latency: float | None = None,
    ) -> None:
        """See :meth:`KeyPool.mark_success`."""
        await self._adrive(self._mark_success_flow(provider, key_id, tokens, latency))

    async def mark_failure(
        self,
        provider: object,
        key_id: str,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure:
        """See :meth:`KeyPool.mark_failure`."""
        result: Failure = await self._adrive(
            self._mark_failure_flow(provider, key_id, error, retry_after, headers)
        )
        return result

    async def call(
        self,
        fn: Callable[[AsyncLease], Awaitable[T]],
        provider: object | None = None,
        *,
        model: str | None = None,
        fallbacks: Sequence[object] = (),
        max_attempts: int = 3,
        wait: float | None = None,
        strategy: str | None = None,
        tokens: int = 0,
    ) -> T:
        """See :meth:`KeyPool.call`; ``fn`` is an async function of the lease."""
        result: T = await self._adrive(
            self._call_flow(fn, provider, model, fallbacks, max_attempts, wait, strategy, tokens)
        )
        return result
