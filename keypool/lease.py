"""A key handed out by the pool for one call, and the report of how the call went."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .classify import Failure, classify

if TYPE_CHECKING:
    from .pool import KeyPool

__all__ = ["Lease"]


class Lease:
    """One key, leased for one call.

    Use it as a context manager (success on exit, failure on exception — re-raised), or
    call :meth:`success` / :meth:`fail` yourself. The first report closes the lease; later
    ones are no-ops. An unreported lease expires after the pool's lease TTL.
    """

    __slots__ = (
        "_closed",
        "_pool",
        "_secret",
        "_started",
        "key_id",
        "lease_id",
        "model",
        "provider",
        "tokens",
    )

    def __init__(
        self,
        pool: KeyPool,
        provider: str,
        key_id: str,
        secret: str,
        model: str | None,
        lease_id: str,
        tokens: int,
    ) -> None:
        self._pool = pool
        self.provider = provider
        self.key_id = key_id
        self._secret = secret
        self.model = model
        self.lease_id = lease_id
        self.tokens = tokens
        self._started = time.monotonic()
        self._closed = False

    @property
    def secret(self) -> str:
        """The API key itself. Never shown by ``repr`` or ``str``."""
        return self._secret

    @property
    def closed(self) -> bool:
        """True once the lease was reported (or released)."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Lease(provider={self.provider!r}, key_id={self.key_id!r}, "
            f"model={self.model!r}, {state})"
        )

    __str__ = __repr__

    def success(self, tokens: int | None = None, latency: float | None = None) -> None:
        """The call succeeded. ``tokens``: tokens actually used (reconciles the reservation);
        ``latency``: seconds the call took (default: the time since acquire)."""
        if self._closed:
            return
        if tokens is not None and (
            not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0
        ):
            raise ValueError(f"invalid tokens {tokens!r}: expected an int >= 0")
        if latency is None:
            latency = time.monotonic() - self._started
        elif not isinstance(latency, int | float) or latency < 0:
            raise ValueError(f"invalid latency {latency!r}: expected seconds >= 0")
        self._closed = True
        self._pool._report(self, "success", tokens=tokens, latency=latency)

    def fail(
        self,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure:
        """The call failed. ``error`` is an :class:`ErrorKind`, an HTTP status or the
        exception; ``retry_after`` (seconds) or the response ``headers`` say how long the
        provider wants the key left alone. Returns the classification."""
        failure = classify(error, retry_after=retry_after, headers=headers)
        if not self._closed:
            self._closed = True
            self._pool._report(self, failure.kind.value, failure=failure)
        return failure

    def release(self) -> None:
        """Give the key back without reporting an outcome (the call was not made)."""
        if self._closed:
            return
        self._closed = True
        self._pool._report(self, "release")

    def renew(self, ttl: float | None = None) -> bool:
        """Extend the lease (for long streams) by ``ttl`` seconds from now (default: the
        pool's lease TTL). False when the lease has already expired or was reported."""
        if self._closed:
            return False
        return self._pool._renew(self, ttl)

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
        else:  # KeyboardInterrupt, CancelledError, GeneratorExit: not the key's fault
            self.release()

    def _as_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "key_id": self.key_id, "model": self.model}
