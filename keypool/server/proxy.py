"""The pass-through: one client request, forwarded with a leased key, retried on another
key when the upstream fails before anything was sent to the client, streamed back as it
arrives, and reported to the pool exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx2

from ..aio import AsyncKeyPool
from ..errors import NoKeyAvailable, PoolUnavailable
from ..integrations._usage import Usage, UsageMeter
from ..kinds import ErrorKind
from ..lease import AsyncLease
from ..log import redact
from .auth import CLIENT_CREDENTIAL_HEADERS, strip_key_param
from .http import Receive, Send, error_response, respond
from .metrics import GatewayMetrics
from .routing import RequestInfo
from .upstreams import Upstream

__all__ = ["Forwarder", "UpstreamError"]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_DROP = HOP_BY_HOP | CLIENT_CREDENTIAL_HEADERS | {b"host", b"content-length", b"expect"}
_RESPONSE_DROP = HOP_BY_HOP
_RETRY_KINDS = frozenset(
    {
        ErrorKind.RATE_LIMIT,
        ErrorKind.QUOTA,
        ErrorKind.AUTH,
        ErrorKind.SERVER,
        ErrorKind.TIMEOUT,
        ErrorKind.CONNECTION,
    }
)
_ERROR_BODY_MAX = 1024 * 1024
_DECODED_DROP = frozenset({b"content-length", b"content-encoding"})  # error bodies: decoded
KEY_ID_HEADER = b"x-keypool-key-id"


class UpstreamError(Exception):
    """An upstream's error answer, shaped for :func:`keypool.classify` (``status_code``,
    ``headers``, parsed ``body``). Its message holds the status only."""

    def __init__(self, status: int, headers: Mapping[str, str], body: Any) -> None:
        super().__init__(f"upstream answered HTTP {status}")
        self.status_code = status
        self.headers = headers
        self.body = body if isinstance(body, Mapping) else None


def _connection_listed(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    listed: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            listed.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return listed


def request_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones, its credentials, host and length."""
    listed = _connection_listed(headers)
    return [(n, v) for n, v in headers if n not in _REQUEST_DROP and n not in listed]


def response_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The upstream's headers minus hop-by-hop ones."""
    lowered = [(n.lower(), v) for n, v in headers]
    listed = _connection_listed(lowered)
    return [(n, v) for n, v in lowered if n not in _RESPONSE_DROP and n not in listed]


@dataclass(slots=True)
class Exchange:
    """One client request, as the forwarder needs it."""

    provider: str
    upstream: Upstream
    method: str
    target: bytes  # path on the upstream, percent-encoded
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    info: RequestInfo
    started: float = field(default_factory=time.perf_counter)


class _Renewer:
    """Keeps a lease alive while its call runs: renews it every third of the TTL."""

    __slots__ = ("_handle", "_interval", "_lease", "_loop", "_stopped", "_task")

    def __init__(self, lease: AsyncLease, ttl: float) -> None:
        self._lease = lease
        self._interval = max(ttl / 3, 0.05)
        self._loop = asyncio.get_running_loop()
        self._stopped = False
        self._task: asyncio.Task[None] | None = None  # held: a loop keeps only weak references
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(self._interval, self._fire)

    def _fire(self) -> None:
        if not self._stopped:
            self._task = self._loop.create_task(self._renew())

    async def _renew(self) -> None:
        try:
            alive = await self._lease.renew()
        except Exception:  # the store is unreachable: the next report will say so
            alive = True
        if alive and not self._stopped:
            self._handle = self._loop.call_later(self._interval, self._fire)

    def stop(self) -> None:
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()


class Forwarder:
    """Sends exchanges upstream on leased keys and answers the client."""

    def __init__(
        self,
        pool: AsyncKeyPool,
        client: httpx2.AsyncClient,
        metrics: GatewayMetrics,
        *,
        max_attempts: int,
        wait: float,
        total_timeout: float,
    ) -> None:
        self.pool = pool
        self.client = client
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.wait = wait or None
        self.total_timeout = total_timeout
        self.lease_ttl = pool.settings.lease_ttl

    async def forward(self, ex: Exchange, receive: Receive, send: Send) -> int:
        """Answer the client; returns the status sent."""
        up = ex.upstream
        query = strip_key_param(ex.query) if ex.query else b""
        url = httpx2.URL(
            scheme=up.scheme,
            host=up.host,
            port=up.port,
            raw_path=ex.target + (b"?" + query if query else b""),
        )
        base_headers = request_headers(ex.headers)
        present = {n for n, _ in base_headers}
        extra = [(n, v) for n, v in up.extra_headers if n not in present]
        last_error: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
        last_exc: BaseException | None = None
        metrics = self.metrics
        for attempt in range(self.max_attempts):
            try:
                lease = await self.pool.acquire(
                    ex.provider,
                    model=ex.info.model,
                    tokens=ex.info.tokens,
                    wait=self.wait,
                )
            except NoKeyAvailable as exc:
                if last_error is not None:
                    break  # a provider error is more telling than "no other key"
                return await self._no_key(send, ex, exc)
            except PoolUnavailable:
                await error_response(send, 503, "the key pool is unavailable", "pool_unavailable")
                return 503
            if attempt:
                metrics.retries.labels(ex.provider).inc()
            else:
                metrics.overhead.labels(ex.provider).observe(time.perf_counter() - ex.started)
            secret = (up.auth_prefix + lease.secret.encode("latin-1"),)
            headers = [*base_headers, *extra, (up.auth_header, secret[0])]
            request = httpx2.Request(ex.method, url, headers=headers, content=ex.body)
            renewer = _Renewer(lease, self.lease_ttl)
            sent_at = time.perf_counter()
            try:
                async with asyncio.timeout(self.total_timeout):
                    response = await self.client.send(request, stream=True)
            except (httpx2.HTTPError, TimeoutError, OSError) as exc:
                renewer.stop()
                failure = await self._fail(lease, exc)
                last_exc = exc
                metrics.upstream_failures.labels(ex.provider, failure.kind.value).inc()
                continue
            except BaseException:
                renewer.stop()
                await self._release(lease)
                raise
            metrics.upstream_latency.labels(ex.provider).observe(time.perf_counter() - sent_at)
            status = response.status_code
            if status < 400:
                try:
                    await self._stream(ex, lease, response, receive, send, sent_at)
                finally:
                    renewer.stop()
                return status
            try:
                body = await self._error_body(response)
            except (httpx2.HTTPError, OSError) as exc:
                renewer.stop()
                failure = await self._fail(lease, exc)
                last_exc = exc
                metrics.upstream_failures.labels(ex.provider, failure.kind.value).inc()
                continue
            finally:
                await response.aclose()
            renewer.stop()
            failure = await self._fail(lease, UpstreamError(status, response.headers, _json(body)))
            metrics.upstream_failures.labels(ex.provider, failure.kind.value).inc()
            out_headers = response_headers(response.headers.raw)
            out_headers = [(n, v) for n, v in out_headers if n not in _DECODED_DROP]
            out_headers.append((KEY_ID_HEADER, lease.key_id.encode()))
            last_error = (status, out_headers, body)
            if failure.kind not in _RETRY_KINDS:
                break
        if last_error is not None:
            status, out_headers, body = last_error
            await send({"type": "http.response.start", "status": status, "headers": out_headers})
            await send({"type": "http.response.body", "body": body})
            return status
        detail = type(last_exc).__name__ if last_exc is not None else "error"
        await error_response(
            send, 502, f"the upstream could not be reached ({detail})", "upstream_unreachable"
        )
        return 502

    async def _no_key(self, send: Send, ex: Exchange, exc: NoKeyAvailable) -> int:
        what = ex.provider + (f" model {ex.info.model}" if ex.info.model else "")
        if exc.retry_after is None:
            await error_response(send, 503, f"no key can serve {what}", "no_key_available")
            return 503
        await error_response(
            send,
            429,
            f"every key of {what} is busy, cooling down or out of budget",
            "no_key_available",
            retry_after=exc.retry_after,
        )
        return 429

    async def _fail(self, lease: AsyncLease, exc: BaseException) -> Any:
        """Report the failure; the pool infers what cools (the key for the request's model
        on a rate limit, its account on a quota, ...), as for any other lease."""
        try:
            return await lease.fail(exc)
        except Exception:  # the store went away: the lease expires after its TTL
            from ..classify import classify

            return classify(exc)

    async def _release(self, lease: AsyncLease) -> None:
        with contextlib.suppress(Exception):
            await asyncio.shield(lease.release())

    async def _error_body(self, response: httpx2.Response) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():  # decoded: we send it without encoding
            size += len(chunk)
            if size > _ERROR_BODY_MAX:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    async def _stream(
        self,
        ex: Exchange,
        lease: AsyncLease,
        response: httpx2.Response,
        receive: Receive,
        send: Send,
        sent_at: float,
    ) -> None:
        raw = response.headers.raw
        headers = response_headers(raw)
        headers.append((KEY_ID_HEADER, lease.key_id.encode()))
        has_length = any(n == b"content-length" for n, _ in headers)
        tap = UsageMeter(
            response.headers.get("content-type", ""), response.headers.get("content-encoding", "")
        )
        task = asyncio.current_task()
        assert task is not None
        state = [False, False]  # done, client gone

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not state[0]:
                        state[1] = True
                        task.cancel()
                    return

        watcher = None if has_length else asyncio.get_running_loop().create_task(watch())
        try:
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": headers}
            )
            async for chunk in response.aiter_raw():
                tap.feed(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            state[0] = True
            await send({"type": "http.response.body", "body": b""})
        except asyncio.CancelledError:
            if not state[1]:
                await self._release(lease)
                raise
            task.uncancel()
            await self._client_gone(ex, lease, tap)
            return
        except (httpx2.HTTPError, OSError) as exc:
            state[0] = True
            await self._fail(lease, exc)
            self.metrics.upstream_failures.labels(ex.provider, "stream_broken").inc()
            raise
        except BaseException:
            state[0] = True
            await self._release(lease)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            await response.aclose()
        usage = tap.usage() or Usage()
        await self._success(lease, usage.input_tokens, usage.output_tokens, usage.total, sent_at)

    async def _client_gone(self, ex: Exchange, lease: AsyncLease, tap: UsageMeter) -> None:
        """The client left mid-stream: the key did nothing wrong. Usage seen so far is
        reported as a success; with none seen, the lease is released."""
        usage = tap.usage()
        if usage is not None:
            await self._success(lease, usage.input_tokens, usage.output_tokens, usage.total, None)
        else:
            await self._release(lease)

    async def _success(
        self,
        lease: AsyncLease,
        input_tokens: int | None,
        output_tokens: int | None,
        total: int | None,
        sent_at: float | None,
    ) -> None:
        latency = None if sent_at is None else time.perf_counter() - sent_at
        try:
            if input_tokens is not None and output_tokens is not None:
                await lease.success(
                    latency=latency, input_tokens=input_tokens, output_tokens=output_tokens
                )
            else:
                await lease.success(total, latency)
        except Exception as exc:  # the store went away: the lease expires after its TTL
            _log_report_error(exc)


def _json(body: bytes) -> Any:
    if not body or body.lstrip()[:1] not in (b"{", b"["):
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def _log_report_error(exc: BaseException) -> None:
    import logging

    logging.getLogger("keypool.server").warning(
        "report_failed: %s", redact(f"{type(exc).__name__}: {exc}")
    )


async def send_simple(send: Send, status: int, text: str) -> None:
    """A short plain-text answer."""
    await respond(send, status, text.encode(), b"text/plain; charset=utf-8")
