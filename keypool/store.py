"""Turning a store URL into a Redis client: the embedded store, one server, Cluster, Sentinel."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .errors import ConfigError

__all__ = [
    "LazyClient",
    "StoreSpec",
    "is_embedded",
    "open_store",
    "open_store_async",
    "parse_url",
    "redact_url",
]

_SCHEMES = ("memory", "redis", "rediss", "unix", "redis+cluster", "redis+sentinel")
_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class StoreSpec:
    """What a store URL asks for."""

    kind: str  # one of _SCHEMES
    url: str = field(repr=False)
    hosts: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    name: str = ""


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``: safe for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _hosts(netloc: str, url: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "6379" if "sentinel" not in url else "26379"
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"invalid host:port {item!r} in store URL {redact_url(url)!r}")
        hosts.append((host, int(port)))
    if not hosts:
        raise ConfigError(f"store URL {redact_url(url)!r} names no host")
    return tuple(hosts)


def parse_url(url: str) -> StoreSpec:
    """Check a store URL and say what it asks for; ``ConfigError`` names a bad one."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            f"invalid store URL {url!r}: expected e.g. memory:// or redis://host:6379/0"
        )
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ConfigError(
            f"invalid store URL {redact_url(url)!r}: the scheme must be one of "
            + ", ".join(s + "://" for s in _SCHEMES)
        )
    if scheme == "memory":
        return StoreSpec(kind="memory", url=url, name=rest.strip("/"))
    if scheme in ("redis", "rediss", "unix"):
        try:
            redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"invalid store URL {redact_url(url)!r}: {exc}") from None
        return StoreSpec(kind=scheme, url=url)
    # redis+cluster://[user:pass@]h:p,h:p[/]   redis+sentinel://[user:pass@]h:p,h:p/service[/db]
    auth, _, hostpart = rest.rpartition("@")
    netloc, _, path = hostpart.partition("/")
    path, _, _query = path.partition("?")
    username = password = None
    if auth:
        user, _, pw = auth.partition(":")
        username, password = unquote(user) or None, unquote(pw) or None
    hosts = _hosts(netloc, url)
    if scheme == "redis+cluster":
        return StoreSpec(kind=scheme, url=url, hosts=hosts, username=username, password=password)
    segments = [s for s in path.split("/") if s]
    if not segments:
        raise ConfigError(
            f"store URL {redact_url(url)!r} needs the Sentinel service name: "
            "redis+sentinel://host:port[,host:port]/service_name[/db]"
        )
    db = 0
    if len(segments) > 1:
        if not segments[1].isdigit():
            raise ConfigError(f"invalid db {segments[1]!r} in store URL {redact_url(url)!r}")
        db = int(segments[1])
    return StoreSpec(
        kind=scheme,
        url=url,
        hosts=hosts,
        service=segments[0],
        db=db,
        username=username,
        password=password,
    )


class LazyClient:
    """A client built on first use, for clients that connect when built (the sync Redis
    Cluster client reads the cluster's layout in its constructor): a pool created while
    the store is unreachable is created all the same, and its calls fail like any call to
    an unreachable store (``redis.ConnectionError``, shown to callers as
    ``PoolUnavailable``) until the store answers."""

    __slots__ = ("_client", "_connect", "_lock", "_where")

    def __init__(self, connect: Callable[[], Any], where: str) -> None:
        self._connect = connect
        self._where = where
        self._client: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._connect()
                    except RedisClusterException as exc:
                        raise redis.ConnectionError(
                            f"cannot connect to {self._where}: {exc}"
                        ) from exc
                client = self._client
        return client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._get(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __repr__(self) -> str:
        state = "connected" if self._client is not None else "not connected yet"
        return f"<LazyClient {self._where} ({state})>"


def _memory_server(name: str) -> Any:
    from .embedded import EmbeddedServer

    with _memory_lock:
        server = _memory_servers.get(name)
        if server is None:
            server = EmbeddedServer()
            _memory_servers[name] = server
    return server


def _memory_client(name: str) -> Any:
    from .embedded import client

    made = client(_memory_server(name), decode_responses=True)
    _embedded.add(made)
    return made


_embedded: weakref.WeakSet[Any] = weakref.WeakSet()


def is_embedded(client: Any) -> bool:
    """Whether ``client`` is one of the embedded store's (``memory://``)."""
    return client in _embedded


def open_store(url: str, *, socket_timeout: float, connect_timeout: float) -> Any:
    """A Redis client (sync) for the store URL. Thread-safe; after a fork, redis-py's
    connection pool opens new connections in the child."""
    spec = parse_url(url)
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    if spec.kind == "memory":
        return _memory_client(spec.name)
    # One retry, at once, after a dropped connection (a pooled connection to a server that
    # restarted, a Sentinel failover; on a cluster also after re-reading its layout). Not
    # after a timeout: a call to a hung server fails within socket_timeout, not twice that.
    retry = Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    if spec.kind in ("redis", "rediss", "unix"):
        return redis.Redis.from_url(spec.url, retry=retry, **common)
    if spec.kind == "redis+cluster":
        from redis.cluster import ClusterNode, RedisCluster

        def connect() -> Any:
            return RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in spec.hosts],  # type: ignore[no-untyped-call]
                username=spec.username,
                password=spec.password,
                retry=retry,
                **common,
            )

        return LazyClient(connect, redact_url(spec.url))
    from redis.sentinel import Sentinel

    query = parse_qs(urlsplit(spec.url).query)
    sentinel_password = query.get("sentinel_password", [None])[0]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(spec.hosts),
        sentinel_kwargs={
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "password": sentinel_password,
        },
        **common,
    )
    return sentinel.master_for(  # type: ignore[no-untyped-call]
        spec.service, db=spec.db, username=spec.username, password=spec.password, retry=retry
    )


# asyncio twin of open_store: the same URL kinds, built on redis.asyncio classes
def open_store_async(url: str, *, socket_timeout: float, connect_timeout: float) -> Any:
    """The ``redis.asyncio`` twin of :func:`open_store` (same stores, same state)."""
    spec = parse_url(url)
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
    }
    if spec.kind == "memory":
        from .embedded import async_client

        made = async_client(
            _memory_server(spec.name), decode_responses=True, max_connections=1_000_000
        )
        _embedded.add(made)
        return made
    import redis.asyncio as aredis
    from redis.asyncio.retry import Retry as AsyncRetry

    retry = AsyncRetry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))
    if spec.kind in ("redis", "rediss", "unix"):
        # Many tasks share a bounded set of connections: a task waits for a free one (up to
        # the socket timeout) rather than failing when a burst exceeds the pool.
        blocking = aredis.BlockingConnectionPool.from_url(
            spec.url, max_connections=64, timeout=socket_timeout, retry=retry, **common
        )
        return aredis.Redis(connection_pool=blocking)
    if spec.kind == "redis+cluster":
        from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
        from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(h, p) for h, p in spec.hosts],
            username=spec.username,
            password=spec.password,
            retry=retry,
            **common,
        )
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    query = parse_qs(urlsplit(spec.url).query)
    sentinel = AsyncSentinel(  # type: ignore[no-untyped-call]
        list(spec.hosts),
        sentinel_kwargs={
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "password": query.get("sentinel_password", [None])[0],
        },
        **common,
    )
    return sentinel.master_for(
        spec.service, db=spec.db, username=spec.username, password=spec.password, retry=retry
    )
