"""Exceptions raised by keypool. All derive from :class:`KeyPoolError`."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "KeyPoolError",
    "NoKeyAvailable",
    "NoUsableKey",
    "PoolUnavailable",
    "SecretUnavailable",
    "UnknownKey",
]


class KeyPoolError(Exception):
    """Base class of every error keypool raises on its own account."""


class NoKeyAvailable(KeyPoolError):
    """No key can serve the request now.

    ``retry_after`` is the number of seconds until the earliest key could serve it, or
    ``None`` when no key ever will (none registered, all disabled, limits too small).
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        provider: str | None = None,
        model: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.provider = provider
        self.model = model


class UnknownKey(KeyPoolError, LookupError):
    """The named key (or provider) is not registered in the pool."""


class SecretUnavailable(KeyPoolError):
    """A key was picked whose secret this process cannot produce (not registered here,
    or sealed with another sealing key)."""


class PoolUnavailable(KeyPoolError):
    """Redis could not be reached, or did not answer within the configured timeout."""


class ConfigError(KeyPoolError, ValueError):
    """The configuration (settings, URL, environment) is invalid."""


class NoUsableKey(NoKeyAvailable, SecretUnavailable):
    """No key can serve that this process can use: the pool has keys, but their secrets are
    not registered here (or are sealed with another sealing key). Both a
    :class:`NoKeyAvailable` and a :class:`SecretUnavailable`."""
