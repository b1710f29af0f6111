"""What every flow shares: settings, the process's local state, key names, logging and the
translation of store failures into the errors callers see."""

from __future__ import annotations

from typing import Any

from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import (
    ClusterError,
    NoPermissionError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import scripts
from ..errors import ConfigError, PoolUnavailable
from ..keyspace import ProviderKeys
from ..local import LocalState
from ..log import configure_logging, get_logger
from ..protocol import ScriptCall
from ..sealing import Sealer
from ..settings import KeyPoolSettings, load_settings
from ..store import parse_url, redact_url

__all__ = ["STORE_BUSY", "STORE_DOWN", "FlowBase"]

STORE_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
# a cluster that is down (CLUSTERDOWN, MASTERDOWN, its retries spent) or moving a slot
STORE_BUSY = (ClusterError, TryAgainError)


class FlowBase:
    """State shared by the flows of one pool."""

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
    ) -> None:
        settings = settings if settings is not None else load_settings()
        update: dict[str, Any] = {}
        if url is not None:
            parse_url(url)
            update["redis_url"] = url
        if namespace is not None:
            update["namespace"] = load_settings(
                namespace=namespace, redis_url=settings.redis_url
            ).namespace
        if update:
            settings = settings.model_copy(update=update)
        self.settings = settings
        self.namespace = settings.namespace
        self.url = settings.redis_url
        configure_logging(settings.log_format, settings.log_level)
        self._log = get_logger().bind(namespace=self.namespace)
        self._sealer: Sealer | None = None
        if settings.secret_key is not None:
            old = settings.old_secret_keys.get_secret_value() if settings.old_secret_keys else ""
            self._sealer = Sealer(
                settings.secret_key.get_secret_value(),
                tuple(k.strip() for k in old.split(",") if k.strip()),
            )
        self._state = LocalState()
        self._spaces: dict[str, ProviderKeys] = {}
        self._lease_ttl_ms = int(settings.lease_ttl * 1000)
        self._cooldowns = (
            int(settings.rate_limit_cooldown * 1000),
            int(settings.rate_limit_max_cooldown * 1000),
            int(settings.quota_cooldown * 1000),
            settings.error_threshold,
            int(settings.circuit_cooldown * 1000),
            int(settings.circuit_max_cooldown * 1000),
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={redact_url(self.url)!r}, namespace={self.namespace!r})"

    def _space(self, provider: str) -> ProviderKeys:
        space = self._spaces.get(provider)
        if space is None:
            space = self._spaces[provider] = ProviderKeys(self.namespace, provider)
        return space

    def _script_call(self, provider: str, call: ScriptCall) -> scripts.Call:
        """A protocol call as the drivers send it: the script, KEYS and the full ARGV (the
        provider's prefix first)."""
        space = self._space(provider)
        return call.script, space.keys, [space.prefix, *call.argv()]

    def _seal_context(self, provider: str, key_id: str) -> str:
        return f"{self.namespace}/{provider}/{key_id}"

    def _unavailable(self, exc: BaseException) -> PoolUnavailable:
        self._log.error("pool_unavailable", url=redact_url(self.url), error=type(exc).__name__)
        return PoolUnavailable(
            f"Redis at {redact_url(self.url)} is unreachable or timed out ({type(exc).__name__})"
        )

    def _translate(self, exc: BaseException) -> BaseException:
        """The error a caller should see for a failure of the store."""
        if isinstance(exc, RedisAuthenticationError):
            return ConfigError(
                f"Redis at {redact_url(self.url)}: authentication failed "
                "(check the user name and password in the store URL)"
            )
        if isinstance(exc, STORE_DOWN):
            return self._unavailable(exc)
        if isinstance(exc, RedisError):
            text = str(exc)
            if isinstance(exc, NoPermissionError) or "NOPERM" in text or "can't run" in text:
                return ConfigError(
                    f"the Redis user of {redact_url(self.url)} may not do what keypool needs "
                    f"in namespace {self.namespace!r}: see the README's ACL line "
                    f"({type(exc).__name__})"
                )
            if "db index is out of range" in text.lower() or "invalid db index" in text.lower():
                return ConfigError(
                    f"the store URL {redact_url(self.url)} names a database "
                    "the server does not have (DB index out of range)"
                )
            # redis-py strips the code from the messages of the errors it has classes for
            # (ClusterDownError, MasterDownError, TryAgainError): test the classes too
            if isinstance(exc, STORE_BUSY) or text.startswith(
                ("BUSY", "LOADING", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN")
            ):
                return self._unavailable(exc)
        if isinstance(exc, SlotNotCoveredError) or (
            # a slot nobody serves now, or no node of the cluster answering
            isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc)
        ):
            return self._unavailable(exc)
        return exc
