"""The gateway as an ASGI application: :func:`create_app`.

Routes: ``/{provider}/...`` (pass-through), ``/metrics``, ``/status``, ``/status.json``,
``/healthz`` and ``/readyz``. Every replica is one more process of the pool: run as many
as you like, on any machines, on one Redis.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import httpx2

from ..aio import AsyncKeyPool
from ..errors import ConfigError, KeyPoolError
from ..settings import KeyPoolSettings
from ..stats import KeyStats, ScopeStats
from ..store import redact_url
from .auth import TokenChecker, presented_tokens
from .http import BodyTooLarge, ClientGone, Receive, Scope, Send, error_response, read_body, respond
from .metrics import CONTENT_TYPE, GatewayMetrics
from .netio import make_transport
from .proxy import Exchange, Forwarder
from .routing import inspect_request
from .settings import GatewaySettings
from .status import render_status_html, status_document
from .upstreams import Upstream, load_upstreams

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger("keypool.server")
_SPECIAL = {b"/metrics", b"/status", b"/status.json", b"/healthz", b"/readyz"}


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


class Gateway:
    """The ASGI application. Build it with :func:`create_app`."""

    def __init__(
        self,
        settings: KeyPoolSettings,
        gateway: GatewaySettings,
        upstreams: Mapping[str, Upstream],
        *,
        pool: AsyncKeyPool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        tokens = gateway.tokens()
        if not tokens and not gateway.proxy_no_auth:
            raise ConfigError(
                "KEYPOOL_PROXY_TOKENS is empty: set client tokens (or KEYPOOL_PROXY_NO_AUTH=1 "
                "to serve loopback clients without one)"
            )
        self.settings = settings
        self.gateway = gateway
        self.upstreams = dict(upstreams)
        self.metrics = GatewayMetrics()
        self._tokens = TokenChecker(tokens)
        self._no_auth = not tokens
        self._environ = environ
        self._pool = pool
        self._own_pool = pool is None
        self._forwarder: Forwarder | None = None
        self._client: httpx2.AsyncClient | None = None
        self._start_lock: asyncio.Lock | None = None

    def __repr__(self) -> str:
        store = redact_url(self.settings.redis_url)
        return f"Gateway(providers={sorted(self.upstreams)}, store={store!r})"

    # ------------------------------------------------------------------ life cycle

    async def startup(self) -> None:
        """Open the pool (registering the keys of the environment) and the upstream client.
        Runs at the ASGI lifespan start, or at the first request."""
        if self._forwarder is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._forwarder is not None:
                return
            pool = self._pool
            if pool is None:
                pool = AsyncKeyPool(settings=self.settings)
                await pool.load_env(self._environ)
                self._pool = pool
            g = self.gateway
            limits = httpx2.Limits(
                max_connections=g.proxy_max_connections,
                max_keepalive_connections=g.proxy_max_connections,
                keepalive_expiry=30.0,
            )
            timeout = httpx2.Timeout(
                connect=g.proxy_connect_timeout,
                read=g.proxy_read_timeout,
                write=g.proxy_read_timeout,
                pool=g.proxy_connect_timeout,
            )
            self._client = httpx2.AsyncClient(
                transport=make_transport(limits),
                timeout=timeout,
                follow_redirects=False,
                trust_env=False,
            )
            self._forwarder = Forwarder(
                pool,
                self._client,
                self.metrics,
                max_attempts=g.proxy_max_attempts,
                wait=g.proxy_wait,
                total_timeout=g.proxy_total_timeout,
            )

    async def shutdown(self) -> None:
        """Close the upstream client and (if the gateway opened it) the pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self._forwarder = None
        if self._own_pool and self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def pool(self) -> AsyncKeyPool:
        """The pool (after :meth:`startup`)."""
        if self._pool is None:
            raise RuntimeError("the gateway has not started")
        return self._pool

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": _safe(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _authorized(self, scope: Scope) -> bool:
        if self._no_auth:
            client = scope.get("client")
            return _is_loopback(client[0] if client else None)
        return self._tokens.check(presented_tokens(scope["headers"], scope["query_string"]))

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if b"?" in raw_path:
            raw_path = raw_path.split(b"?", 1)[0]
        if raw_path in _SPECIAL:
            await self._special(raw_path, scope, send)
            return
        if self._forwarder is None:
            try:
                await self.startup()
            except KeyPoolError as exc:
                await error_response(send, 503, _safe(exc), "pool_unavailable")
                return
        forwarder = self._forwarder
        assert forwarder is not None
        if not self._authorized(scope):
            await error_response(
                send, 401, "a valid keypool proxy token is required", "invalid_proxy_token"
            )
            return
        _, _, rest = raw_path.partition(b"/")
        provider_raw, slash, tail = rest.partition(b"/")
        provider = provider_raw.decode("latin-1")
        upstream = self.upstreams.get(provider)
        if upstream is None:
            await error_response(
                send, 404, f"no upstream is configured for {provider[:64]!r}", "unknown_provider"
            )
            return
        try:
            target = upstream.target(slash + tail)
        except ValueError:
            await error_response(send, 400, "this path is not forwarded", "bad_path")
            return
        metrics = self.metrics
        started = time.perf_counter()
        metrics.in_flight.inc()
        status = 0
        try:
            headers: list[tuple[bytes, bytes]] = scope["headers"]
            declared: int | None = None
            content_type = b""
            for name, value in headers:
                if name == b"content-length":
                    declared = int(value) if value.isdigit() else None
                elif name == b"content-type":
                    content_type = value
            try:
                body = await read_body(receive, self.gateway.proxy_max_body, declared)
            except BodyTooLarge:
                status = 413
                await error_response(send, 413, "the request body is too large", "too_large")
                return
            except ClientGone:
                status = 499
                return
            exchange = Exchange(
                provider=provider,
                upstream=upstream,
                method=scope["method"],
                target=target,
                query=scope["query_string"],
                headers=headers,
                body=body,
                info=inspect_request(tail, body, content_type),
                started=started,
            )
            status = await forwarder.forward(exchange, receive, send)
        finally:
            metrics.in_flight.dec()
            if status:
                metrics.requests.labels(provider, str(status)).inc()
                metrics.duration.labels(provider).observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ the other routes

    async def _special(self, path: bytes, scope: Scope, send: Send) -> None:
        if scope["method"] not in ("GET", "HEAD"):
            await error_response(send, 405, "method not allowed", "method_not_allowed")
            return
        if path == b"/healthz":
            await respond(send, 200, b"ok\n", b"text/plain; charset=utf-8")
            return
        try:
            await self.startup()
            if path == b"/readyz":
                await self.pool.providers()
                await respond(send, 200, b"ready\n", b"text/plain; charset=utf-8")
                return
            if not self.gateway.status_public and not self._authorized(scope):
                await error_response(
                    send,
                    401,
                    "a valid keypool proxy token is required",
                    "invalid_proxy_token",
                    headers=[(b"www-authenticate", b'Basic realm="keypool"')],
                )
                return
            stats, scopes = await self._read_pool()
        except KeyPoolError as exc:
            await error_response(send, 503, _safe(exc), "pool_unavailable")
            return
        if path == b"/metrics":
            await respond(send, 200, self.metrics.render(stats, scopes), CONTENT_TYPE.encode())
        elif path == b"/status.json":
            doc = status_document(stats, self.upstreams, scopes=scopes)
            await respond(send, 200, json.dumps(doc).encode(), b"application/json")
        else:
            page = render_status_html(
                stats,
                self.upstreams,
                store=redact_url(self.settings.redis_url),
                namespace=self.settings.namespace,
                scopes=scopes,
            )
            await respond(
                send,
                200,
                page.encode(),
                b"text/html; charset=utf-8",
                [(b"cache-control", b"no-store")],
            )

    async def _read_pool(self) -> tuple[list[KeyStats], list[ScopeStats]]:
        """Every provider's keys and limit scopes, as every replica sees them."""
        pool = self.pool

        async def one(provider: str) -> tuple[list[KeyStats], list[ScopeStats]]:
            return await pool.snapshot(provider), await pool.scopes(provider)

        found = await asyncio.gather(*(one(p) for p in await pool.providers()))
        return [s for keys, _ in found for s in keys], [c for _, cs in found for c in cs]


def _safe(exc: BaseException) -> str:
    from ..log import redact

    return redact(f"{type(exc).__name__}: {exc}")[:300]


def create_app(
    settings: KeyPoolSettings | None = None,
    *,
    gateway: GatewaySettings | None = None,
    pool: AsyncKeyPool | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """The gateway's ASGI application.

    ``settings``: the pool's settings (default: from ``KEYPOOL_*`` variables). The keys are
    those of the environment (``OPENAI_API_KEYS``, ...; see :meth:`KeyPool.load_env`), or
    all of the pool's in sealed mode; ``pool`` uses a pool you built instead. ``gateway``:
    the gateway's settings (``KEYPOOL_PROXY_TOKENS``, ...). Upstreams: the official base URLs,
    overridden by ``KEYPOOL_UPSTREAM_<PROVIDER>``. ``environ`` replaces ``os.environ`` for
    keys and upstreams. Raises :class:`~keypool.ConfigError` when no token is configured
    and ``KEYPOOL_PROXY_NO_AUTH`` is not set.
    """
    settings = settings if settings is not None else KeyPoolSettings()
    gateway = gateway if gateway is not None else GatewaySettings()
    return Gateway(settings, gateway, load_upstreams(environ), pool=pool, environ=environ)
