"""The kinds of failure a provider call can end in."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorKind"]


class ErrorKind(StrEnum):
    """What went wrong with a call, as far as the key is concerned.

    ``RATE_LIMIT`` cools the key down, ``QUOTA`` marks it exhausted until its reset,
    ``AUTH`` disables it, ``SERVER``/``TIMEOUT``/``CONNECTION``/``OTHER`` count towards
    its circuit breaker, ``BAD_REQUEST`` is counted but never penalises the key.
    """

    RATE_LIMIT = "rate_limit"
    QUOTA = "quota"
    AUTH = "auth"
    SERVER = "server"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    BAD_REQUEST = "bad_request"
    OTHER = "other"
