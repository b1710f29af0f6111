"""keypool: one pool of LLM-provider API keys shared by a whole fleet of processes.

The pool's state lives in Redis and every decision is one atomic Lua script, so a hundred
processes behave like one. See :class:`KeyPool`.
"""

from .aio import AsyncKeyPool
from .classify import Failure, classify
from .errors import (
    ConfigError,
    KeyPoolError,
    NoKeyAvailable,
    NoUsableKey,
    PoolUnavailable,
    SecretUnavailable,
    UnknownKey,
)
from .kinds import ErrorKind
from .lease import AsyncLease, Lease
from .pool import KeyPool
from .providers import LLMProvider, Provider
from .seed import EnhancedAPIKeyManager
from .settings import KeyPoolSettings
from .stats import KeyStats

__all__ = [
    "AsyncKeyPool",
    "AsyncLease",
    "ConfigError",
    "EnhancedAPIKeyManager",
    "ErrorKind",
    "Failure",
    "KeyPool",
    "KeyPoolError",
    "KeyPoolSettings",
    "KeyStats",
    "LLMProvider",
    "Lease",
    "NoKeyAvailable",
    "NoUsableKey",
    "PoolUnavailable",
    "Provider",
    "SecretUnavailable",
    "UnknownKey",
    "classify",
]

__version__ = "0.1.0"
