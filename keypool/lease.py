"""A key handed out by the pool for one call, and the report of how the call went."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .classify import Failure, classify
from .flows.report import scope_arg
from .ops import Picked
from .validate import seconds_arg, tokens_arg

if TYPE_CHECKING:
    from .aio import AsyncKeyPool
    from .pool import KeyPool

__all__ = ["AsyncLease", "Lease"]


class _LeaseBase:
    __slots__ = ("_closed", "_picked", "_started")

    def __init__(self, picked: Picked) -> None:
        self._picked = picked
        self._started = time.monotonic()
        self._closed = False

    @property
    def provider(self) -> str:
        return self._picked.provider

    @property
    def key_id(self) -> str:
        return self._picked.key_id

    @property
    def model(self) -> str | None:
        return self._picked.model

    @property
    def tokens(self) -> int:
        """Tokens reserved at acquire (the estimate)."""
        return self._picked.tokens

    @property
    def lease_id(self) -> str:
        return self._picked.lease_id

    @property
    def secret(self) -> str:
        """The API key itself. Never shown by ``repr`` or ``str``."""
        return self._picked.secret

    @property
    def closed(self) -> bool:
        """True once the lease was reported (or released)."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"{type(self).__name__}(provider={self.provider!r}, key_id={self.key_id!r}, "
            f"model={self.model!r}, {state})"
        )

    __str__ = __repr__

    def _success_args(
        self,
        tokens: int | None,
        latency: float | None,
        input_tokens: int | None,
        output_tokens: int | None,
    ) -> dict[str, Any]:
        """The checked figures of a success (tokens ``None``: as estimated)."""
        seconds = seconds_arg("latency", latency)
        return {
            "tokens": tokens_arg(tokens, allow_none=True),
            "input_tokens": tokens_arg(input_tokens, "input_tokens", allow_none=True),
            "output_tokens": tokens_arg(output_tokens, "output_tokens", allow_none=True),
            "latency": time.monotonic() - self._started if seconds is None else seconds,
        }


class Lease(_LeaseBase):
    """One key, leased for one call.

    Use it as a context manager (success on exit, failure on exception — re-raised), or
    call :meth:`success` / :meth:`fail` yourself. The first report closes the lease; later
    ones are no-ops. An unreported lease expires after the pool's lease TTL.
    """

    __slots__ = ("_pool",)

    def __init__(self, pool: KeyPool, picked: Picked) -> None:
        super().__init__(picked)
        self._pool = pool

    def success(
        self,
        tokens: int | None = None,
        latency: float | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """The call succeeded. ``tokens``: tokens actually used (reconciles the reservation;
        default: ``input_tokens + output_tokens`` when those are given); ``latency``: seconds
        the call took (default: the time since acquire)."""
        if self._closed:
            return
        figures = self._success_args(tokens, latency, input_tokens, output_tokens)
        self._closed = True
        self._pool._drive(self._pool._lease_report_flow(self._picked, "success", **figures))

    def fail(
        self,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        scope: str | None = None,
    ) -> Failure:
        """The call failed. ``error`` is an :class:`ErrorKind`, an HTTP status or the
        exception; ``retry_after`` (seconds) or the response ``headers`` say how long the
        provider wants the key left alone. ``scope`` says what a rate limit or quota cools:
        ``"model"`` (this key for the lease's model: the default for a rate limit on a lease
        for a model), ``"key"`` (the key for every model), ``"account"`` (every key of the
        key's account: the default for a quota). Returns the classification."""
        scope_arg(scope)
        failure = classify(error, retry_after=retry_after, headers=headers)
        if not self._closed:
            self._closed = True
            self._pool._drive(
                self._pool._lease_report_flow(
                    self._picked, failure.kind.value, failure=failure, scope=scope
                )
            )
        return failure

    def release(self) -> None:
        """Give the key back without reporting an outcome (the call was not made)."""
        if self._closed:
            return
        self._closed = True
        self._pool._drive(self._pool._lease_report_flow(self._picked, "release"))

    def renew(self, ttl: float | None = None) -> bool:
        """Extend the lease (for long streams) by ``ttl`` seconds from now (default: the
        pool's lease TTL). False when it has already expired or was reported."""
        if self._closed:
            return False
        return bool(self._pool._drive(self._pool._renew_flow(self._picked, ttl)))

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.success()
        elif isinstance(exc, Exception):
            self.fail(exc)
        else:  # KeyboardInterrupt, GeneratorExit: not the key's fault
            self.release()


# asyncio twin of Lease: each method differs from Lease's only in await (the checks and
# the report are shared, in _LeaseBase and the report flow)
class AsyncLease(_LeaseBase):
    """The asyncio twin of :class:`Lease`: ``await lease.success()``, ``async with``."""

    __slots__ = ("_pool",)

    def __init__(self, pool: AsyncKeyPool, picked: Picked) -> None:
        super().__init__(picked)
        self._pool = pool

    async def success(
        self,
        tokens: int | None = None,
        latency: float | None = None,
        *,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """See :meth:`Lease.success`."""
        if self._closed:
            return
        figures = self._success_args(tokens, latency, input_tokens, output_tokens)
        self._closed = True
        await self._pool._adrive(self._pool._lease_report_flow(self._picked, "success", **figures))

    async def fail(
        self,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
        scope: str | None = None,
    ) -> Failure:
        """See :meth:`Lease.fail`."""
        scope_arg(scope)
        failure = classify(error, retry_after=retry_after, headers=headers)
        if not self._closed:
            self._closed = True
            await self._pool._adrive(
                self._pool._lease_report_flow(
                    self._picked, failure.kind.value, failure=failure, scope=scope
                )
            )
        return failure

    async def release(self) -> None:
        """See :meth:`Lease.release`."""
        if self._closed:
            return
        self._closed = True
        await self._pool._adrive(self._pool._lease_report_flow(self._picked, "release"))

    async def renew(self, ttl: float | None = None) -> bool:
        """See :meth:`Lease.renew`."""
        if self._closed:
            return False
        return bool(await self._pool._adrive(self._pool._renew_flow(self._picked, ttl)))

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.success()
        elif isinstance(exc, Exception):
            await self.fail(exc)
        else:  # CancelledError, KeyboardInterrupt: not the key's fault
            await self.release()
