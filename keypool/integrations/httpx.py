"""``httpx`` authentication backed by a key pool: every request leases a key.

Install with ``pip install keypool[httpx]``; ``import keypool`` does not import httpx.

.. code-block:: python

    import httpx
    from keypool import KeyPool
    from keypool.integrations.httpx import KeyPoolAuth

    pool = KeyPool.from_env()                      # GEMINI_API_KEYS="k1,k2" ...
    with httpx.Client(auth=KeyPoolAuth(pool, "gemini"), timeout=60) as client:
        r = client.post(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
            json={"contents": [{"parts": [{"text": "Hello"}]}]},
        )

For every request the auth flow:

1. leases a key (``pool.acquire(provider, model=..., strategy=..., tokens=..., wait=...)``;
   :class:`~keypool.NoKeyAvailable` propagates from ``client.send`` when none is free);
2. puts the key in the provider's header (see :func:`auth_header_for`): ``Authorization:
   Bearer`` for openai, huggingface, openrouter, ollama, cohere and custom providers,
   ``x-api-key`` for anthropic (plus ``anthropic-version: 2023-06-01`` unless the request
   sets one), ``x-goog-api-key`` for gemini, ``api-key`` for azure_openai;
3. reports the outcome itself:

   - a status below 400: success, with the time to the response headers as latency and,
     once the body has been read, the tokens the provider reports (``usage.total_tokens``,
     Gemini's ``usageMetadata.totalTokenCount``, Ollama's ``prompt_eval_count +
     eval_count``, also from the last event of an SSE or NDJSON stream). The body is never
     read on your behalf: the lease stays in flight until the response is closed (which
     ``client.get``/``post`` do at once and ``client.stream`` does when its block ends), is
     renewed while a long stream is read, and is reported when the response closes;
   - any other status: failure, classified by :func:`keypool.classify` from the status, the
     response headers (``Retry-After``, ``x-ratelimit-reset-*``...) and a small JSON error
     body (OpenAI ``insufficient_quota`` means quota spent; Google's ``RetryInfo`` delay,
     per-day ``QuotaFailure`` and ``API_KEY_INVALID`` are understood too). The response is
     returned to you unchanged;
   - an exception while sending (connection refused, timeout, ...): failure with that
     exception, which httpx then raises as usual. A cancelled request gives its key back.

   A report never fails your HTTP call: if the store is unreachable at that moment the
   pool logs ``pool_unavailable`` and the lease expires after its TTL (the next acquire
   raises :class:`~keypool.PoolUnavailable`).

With ``retry_on_rate_limit=N`` a 429 is not returned at once: the request is sent again
with another key, up to N times, as long as the pool has another key to give (the 429
responses are in ``response.history``; the request body is buffered to be re-sent).

The response carries the key it used (never the secret) in ``response.extensions``:
``response.extensions["keypool_key_id"]`` and ``["keypool_provider"]``.

Mind that httpx strips only the ``Authorization`` header when a redirect leaves the origin:
with ``follow_redirects=True`` a key sent in another header (``x-goog-api-key``,
``x-api-key``, ``api-key``) would follow a redirect to another host. httpx follows no
redirects by default; keep it so for these providers.
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Mapping
from typing import Any, Protocol, TypeVar, cast

import anyio.to_thread
import httpx

from ..aio import AsyncKeyPool
from ..classify import Failure, parse_duration, retry_after_from_headers
from ..errors import KeyPoolError, NoKeyAvailable
from ..kinds import ErrorKind
from ..lease import Lease
from ..pool import KeyPool
from ..providers import normalize_provider, validate_model
from ..settings import STRATEGIES
from ..validate import seconds_arg, tokens_arg

__all__ = [
    "ANTHROPIC_VERSION",
    "KEY_ID_EXTENSION",
    "PROVIDER_EXTENSION",
    "AsyncKeyPoolAuth",
    "ErrorResponse",
    "KeyPoolAuth",
    "auth_header_for",
    "usage_tokens",
]

T = TypeVar("T")

ANTHROPIC_VERSION = "2023-06-01"
KEY_ID_EXTENSION = "keypool_key_id"
PROVIDER_EXTENSION = "keypool_provider"

_HEADERS: dict[str, tuple[str, str]] = {
    "anthropic": ("x-api-key", ""),
    "gemini": ("x-goog-api-key", ""),
    "azure_openai": ("api-key", ""),
}
_BEARER = ("Authorization", "Bearer")
_EXTRA_HEADERS: dict[str, tuple[tuple[str, str], ...]] = {
    "anthropic": (("anthropic-version", ANTHROPIC_VERSION),),
}
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")

_ERROR_BODY_MAX = 64 * 1024  # error bodies larger than this are not read for classifying
_JSON_BODY_MAX = 4 * 1024 * 1024  # JSON bodies (as received) kept to find the token usage
_STREAM_TAIL = 64 * 1024  # tail of an SSE/NDJSON stream kept to find the final usage


def auth_header_for(provider: object) -> tuple[str, str]:
    """The ``(header, scheme)`` a provider's key is sent in: ``("Authorization",
    "Bearer")``, or ``("x-goog-api-key", "")`` for gemini (an empty scheme: the key alone)."""
    return _HEADERS.get(normalize_provider(provider), _BEARER)


# --------------------------------------------------------------------------- token usage


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _pair(table: object, first: str, second: str) -> int | None:
    if not isinstance(table, Mapping):
        return None
    a, b = _count(table.get(first)), _count(table.get(second))
    return None if a is None or b is None else a + b


def usage_tokens(payload: object) -> int | None:
    """The total tokens a provider's JSON reply reports, or ``None``.

    Understands OpenAI-style ``usage.total_tokens`` (or ``prompt_tokens +
    completion_tokens``), Anthropic's ``usage.input_tokens + output_tokens``, Cohere's
    ``usage.tokens``/``usage.billed_units``, Gemini's ``usageMetadata.totalTokenCount`` and
    Ollama's ``prompt_eval_count + eval_count``.
    """
    if not isinstance(payload, Mapping):
        return None
    usage = payload.get("usage")
    if isinstance(usage, Mapping):
        total = _count(usage.get("total_tokens"))
        if total is not None:
            return total
        for first, second in (
            ("prompt_tokens", "completion_tokens"),
            ("input_tokens", "output_tokens"),
        ):
            found = _pair(usage, first, second)
            if found is not None:
                return found
        for nested in ("tokens", "billed_units"):
            found = _pair(usage.get(nested), "input_tokens", "output_tokens")
            if found is not None:
                return found
    meta = payload.get("usageMetadata")
    if isinstance(meta, Mapping):
        total = _count(meta.get("totalTokenCount"))
        if total is not None:
            return total
        found = _pair(meta, "promptTokenCount", "candidatesTokenCount")
        if found is not None:
            return found
    produced = _count(payload.get("eval_count"))
    if produced is not None:
        return produced + (_count(payload.get("prompt_eval_count")) or 0)
    return None


def _tokens_in(data: bytes) -> int | None:
    """Token usage in a JSON body, or in the last events of an SSE or NDJSON stream."""
    text = data.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        return usage_tokens(json.loads(text))
    except ValueError:
        pass
    for line in reversed(text.splitlines()[-32:]):
        line = line.strip()
        if line.startswith("data:"):
            line = line[5:].strip()
        if not line.startswith("{"):
            continue
        try:
            found = usage_tokens(json.loads(line))
        except ValueError:
            continue
        if found is not None:
            return found
    return None


class _BodyTap:
    """Watches a response body go by, holding on to a bounded amount of it, to find the
    token usage at its end. Never raises: on anything unexpected it gives up."""

    __slots__ = ("_buf", "_done", "_encoding", "_mode")

    def __init__(self, headers: httpx.Headers) -> None:
        ctype = headers.get("content-type", "").lower()
        if any(kind in ctype for kind in ("ndjson", "jsonl", "event-stream")):
            self._mode = "tail"
        elif "json" in ctype:
            self._mode = "whole"
        else:
            self._mode = ""
        encoding = headers.get("content-encoding", "").strip().lower()
        self._encoding = "" if encoding == "identity" else encoding
        self._buf = bytearray()
        self._done = False

    def feed(self, chunk: bytes) -> None:
        if not self._mode:
            return
        self._buf += chunk
        if self._mode == "tail" and not self._encoding:
            if len(self._buf) > 2 * _STREAM_TAIL:
                del self._buf[: len(self._buf) - _STREAM_TAIL]
        elif len(self._buf) > _JSON_BODY_MAX:
            self._mode = ""
            self._buf = bytearray()

    def finish(self) -> None:
        self._done = True

    def tokens(self) -> int | None:
        if not (self._mode and self._done):
            return None
        try:
            data = bytes(self._buf)
            if self._encoding:  # decoded the way httpx decodes (gzip, deflate, br, zstd)
                headers = {"content-encoding": self._encoding}
                data = httpx.Response(200, headers=headers, content=data).content
            return _tokens_in(data)
        except Exception:
            return None


# --------------------------------------------------------------------------- failures


class ErrorResponse(Exception):
    """An error response, as :func:`keypool.classify` reads it: ``status_code``, ``headers``
    and the parsed JSON ``body`` (error codes such as ``insufficient_quota`` count). It is
    what the lease is failed with; it is never raised. Its ``str`` holds the status only."""

    def __init__(
        self,
        status_code: int,
        headers: httpx.Headers,
        body: Mapping[str, Any],
        code: str | None = None,
    ) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body
        self.code = code


def _google_hints(body: Mapping[str, Any]) -> tuple[ErrorKind | None, float | None]:
    """What a Google API error's ``details`` say: an invalid key (AUTH), a spent per-day
    quota (QUOTA), and the delay of a ``RetryInfo``."""
    error = body.get("error")
    details = error.get("details") if isinstance(error, Mapping) else None
    if not isinstance(details, list):
        return None, None
    kind: ErrorKind | None = None
    delay: float | None = None
    for item in details:
        if not isinstance(item, Mapping):
            continue
        kind_name = str(item.get("@type", ""))
        if item.get("reason") == "API_KEY_INVALID":
            kind = ErrorKind.AUTH
        elif kind_name.endswith("google.rpc.RetryInfo"):
            raw = item.get("retryDelay")
            delay = parse_duration(raw) if isinstance(raw, str) else None
        elif kind_name.endswith("google.rpc.QuotaFailure") and kind is None:
            violations = item.get("violations")
            for violation in violations if isinstance(violations, list) else ():
                if isinstance(violation, Mapping) and "PerDay" in str(violation.get("quotaId")):
                    kind = ErrorKind.QUOTA
    if delay is not None and delay < 0:
        delay = None
    return kind, delay


def _failure_of(response: httpx.Response, raw: bytes | None) -> tuple[object, float | None]:
    """What to fail the lease with (an HTTP status, an :class:`ErrorKind` or an
    :class:`ErrorResponse`) and an explicit retry delay (``None``: the headers decide)."""
    status = response.status_code
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if not isinstance(body, Mapping):
        return status, None
    hint, delay = _google_hints(body)
    if hint is ErrorKind.AUTH:
        return ErrorKind.AUTH, None
    if hint is ErrorKind.QUOTA:
        return ErrorResponse(status, response.headers, body, code="quota_exceeded"), None
    if delay is not None and retry_after_from_headers(response.headers) is not None:
        delay = None  # a header the provider sent wins
    return ErrorResponse(status, response.headers, body), delay


def _error_body_wanted(response: httpx.Response) -> bool:
    if "json" not in response.headers.get("content-type", "").lower():
        return False
    length = response.headers.get("content-length")
    if length is None:
        return True
    try:
        return int(length) <= _ERROR_BODY_MAX
    except ValueError:
        return False


def _already_read(response: httpx.Response) -> bytes | None:
    try:
        return response.content
    except httpx.ResponseNotRead:
        return None


def _tag(response: httpx.Response, provider: str, key_id: str) -> None:
    response.extensions[KEY_ID_EXTENSION] = key_id
    response.extensions[PROVIDER_EXTENSION] = provider


def _failed_with() -> BaseException | None:
    """The exception that made httpx close the auth flow before a response came.

    httpx closes the flow in a ``finally`` block while that exception is on its way to the
    caller. Called in the flow after its ``except GeneratorExit`` block has ended, so that
    the flow itself handles no exception, ``sys.exc_info()`` shows the one the caller is
    handling (None when the flow was closed for another reason, e.g. garbage collection).
    """
    return sys.exc_info()[1]


# --------------------------------------------------------------------------- leases


class _LeaseLike(Protocol):
    @property
    def provider(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def secret(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def success(self, tokens: int | None = None, latency: float | None = None) -> None: ...
    def fail(
        self,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure: ...
    def release(self) -> None: ...
    def renew(self, ttl: float | None = None) -> bool: ...


class _AsyncLeaseLike(Protocol):
    @property
    def provider(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def secret(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    async def success(self, tokens: int | None = None, latency: float | None = None) -> None: ...
    async def fail(
        self,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure: ...
    async def release(self) -> None: ...
    async def renew(self, ttl: float | None = None) -> bool: ...


async def _in_thread(fn: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(fn)


class _ThreadedLease:
    """A blocking :class:`Lease` used from async code: each report runs in a worker thread."""

    __slots__ = ("_lease",)

    def __init__(self, lease: Lease) -> None:
        self._lease = lease

    @property
    def provider(self) -> str:
        return self._lease.provider

    @property
    def key_id(self) -> str:
        return self._lease.key_id

    @property
    def secret(self) -> str:
        return self._lease.secret

    @property
    def closed(self) -> bool:
        return self._lease.closed

    async def success(self, tokens: int | None = None, latency: float | None = None) -> None:
        await _in_thread(functools.partial(self._lease.success, tokens, latency))

    async def fail(
        self,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure:
        return await _in_thread(
            functools.partial(self._lease.fail, error, retry_after=retry_after, headers=headers)
        )

    async def release(self) -> None:
        await _in_thread(self._lease.release)

    async def renew(self, ttl: float | None = None) -> bool:
        return await _in_thread(functools.partial(self._lease.renew, ttl))

    def __repr__(self) -> str:
        return repr(self._lease)


def _quietly(report: Callable[[], object]) -> None:
    """Report to the pool without failing the HTTP call: the call is over, its response (or
    its exception) is what the caller is owed. When the store is unreachable the pool has
    logged ``pool_unavailable`` and the lease expires by itself; a key removed meanwhile
    has nothing left to record."""
    with contextlib.suppress(KeyPoolError):
        report()


async def _aquietly(report: Callable[[], Any]) -> None:
    with contextlib.suppress(KeyPoolError):
        await report()


# --------------------------------------------------------------------------- body watchers


class _SyncWatch(httpx.SyncByteStream):
    """Wraps a 2xx response's stream: the lease is reported when the response closes, with
    the tokens found in the body if it was read to the end; renewed during long reads."""

    def __init__(
        self,
        inner: httpx.SyncByteStream,
        lease: _LeaseLike,
        latency: float,
        tap: _BodyTap,
        renew_every: float,
    ) -> None:
        self._inner = inner
        self._lease = lease
        self._latency = latency
        self._tap = tap
        self._renew_every = renew_every

    def __iter__(self) -> Iterator[bytes]:
        renew_at = time.monotonic() + self._renew_every
        try:
            for chunk in self._inner:
                self._tap.feed(chunk)
                if time.monotonic() >= renew_at:
                    _quietly(self._lease.renew)
                    renew_at = time.monotonic() + self._renew_every
                yield chunk
        except Exception as exc:
            _quietly(functools.partial(self._lease.fail, exc))
            raise
        self._tap.finish()

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            if not self._lease.closed:
                tokens = self._tap.tokens()
                _quietly(functools.partial(self._lease.success, tokens, self._latency))


class _AsyncWatch(httpx.AsyncByteStream):
    """The asyncio twin of :class:`_SyncWatch`."""

    def __init__(
        self,
        inner: httpx.AsyncByteStream,
        lease: _AsyncLeaseLike,
        latency: float,
        tap: _BodyTap,
        renew_every: float,
    ) -> None:
        self._inner = inner
        self._lease = lease
        self._latency = latency
        self._tap = tap
        self._renew_every = renew_every

    async def __aiter__(self) -> AsyncIterator[bytes]:
        renew_at = time.monotonic() + self._renew_every
        try:
            async for chunk in self._inner:
                self._tap.feed(chunk)
                if time.monotonic() >= renew_at:
                    await _aquietly(self._lease.renew)
                    renew_at = time.monotonic() + self._renew_every
                yield chunk
        except Exception as exc:
            await _aquietly(functools.partial(self._lease.fail, exc))
            raise
        self._tap.finish()

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._lease.closed:
                tokens = self._tap.tokens()
                await _aquietly(functools.partial(self._lease.success, tokens, self._latency))


# --------------------------------------------------------------------------- auth classes


class _PoolAuth(httpx.Auth):
    """What both auth classes share: arguments, headers, and the asyncio flow."""

    def __init__(
        self,
        provider: object,
        *,
        model: str | None,
        strategy: str | None,
        tokens: int,
        wait: float | None,
        retry_on_rate_limit: int,
        header: str | None,
        scheme: str | None,
    ) -> None:
        self.provider = normalize_provider(provider)
        self.model = validate_model(model) if model is not None else None
        if strategy is not None and strategy not in STRATEGIES:
            raise ValueError(
                f"invalid strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}"
            )
        self.strategy = strategy
        self.tokens = cast(int, tokens_arg(tokens))
        self.wait = seconds_arg("wait", wait)
        if (
            isinstance(retry_on_rate_limit, bool)
            or not isinstance(retry_on_rate_limit, int)
            or retry_on_rate_limit < 0
        ):
            raise ValueError(
                f"invalid retry_on_rate_limit {retry_on_rate_limit!r}: expected an int >= 0"
            )
        self.retry_on_rate_limit = retry_on_rate_limit
        default_header, default_scheme = auth_header_for(self.provider)
        if header is not None:
            if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"invalid header name {header!r}")
            default_scheme = "Bearer" if header.lower() == "authorization" else ""
        self.header = header if header is not None else default_header
        if scheme is not None and (
            not isinstance(scheme, str) or not re.fullmatch(r"[A-Za-z0-9._~+/-]{0,64}", scheme)
        ):
            raise ValueError(f"invalid scheme {scheme!r}")
        self.scheme = scheme if scheme is not None else default_scheme
        self._extra = _EXTRA_HEADERS.get(self.provider, ())
        # a request re-sent with another key must be replayable
        self.requires_request_body = retry_on_rate_limit > 0

    def _apply(self, request: httpx.Request, secret: str) -> None:
        request.headers[self.header] = f"{self.scheme} {secret}" if self.scheme else secret
        for name, value in self._extra:
            if name not in request.headers:
                request.headers[name] = value

    def _describe(self) -> str:
        parts = [f"provider={self.provider!r}"]
        if self.model is not None:
            parts.append(f"model={self.model!r}")
        if self.strategy is not None:
            parts.append(f"strategy={self.strategy!r}")
        if self.retry_on_rate_limit:
            parts.append(f"retry_on_rate_limit={self.retry_on_rate_limit}")
        parts.append(f"header={self.header!r}")
        return ", ".join(parts)

    def _renew_every(self) -> float:
        raise NotImplementedError

    async def _aacquire(self) -> _AsyncLeaseLike:
        raise NotImplementedError

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if self.requires_request_body:
            await request.aread()
        lease = await self._aacquire()
        retries = self.retry_on_rate_limit
        while True:
            self._apply(request, lease.secret)
            started = time.monotonic()
            abandoned = False
            try:
                response = yield request
            except GeneratorExit:
                abandoned = True
            if abandoned:  # the request failed before a response came
                cause = _failed_with()
                if isinstance(cause, Exception):
                    await _aquietly(functools.partial(lease.fail, cause))
                else:  # cancelled, interrupted, or the client was dropped
                    await _aquietly(lease.release)
                return
            latency = time.monotonic() - started
            _tag(response, lease.provider, lease.key_id)
            if response.status_code < 400:
                content = _already_read(response)
                if content is None and isinstance(response.stream, httpx.AsyncByteStream):
                    tap = _BodyTap(response.headers)
                    response.stream = _AsyncWatch(
                        response.stream, lease, latency, tap, self._renew_every()
                    )
                    return
                tokens = _tokens_in(content) if content is not None else None
                await _aquietly(functools.partial(lease.success, tokens, latency))
                return
            raw: bytes | None = None
            read_error: Exception | None = None
            if _error_body_wanted(response):
                raw = _already_read(response)
                if raw is None:
                    try:
                        raw = await response.aread()
                    except Exception as exc:
                        read_error = exc
            what, retry_after = _failure_of(response, raw)
            report = functools.partial(
                lease.fail, what, retry_after=retry_after, headers=response.headers
            )
            await _aquietly(report)
            if read_error is not None:
                raise read_error
            if response.status_code != 429 or retries <= 0:
                return
            retries -= 1
            try:
                lease = await self._aacquire()
            except NoKeyAvailable:
                return  # no other key now: the 429 is the answer


class KeyPoolAuth(_PoolAuth):
    """``httpx.Auth`` leasing a key from a :class:`~keypool.KeyPool` for each request.

    ``provider`` picks the keys and the auth header; ``model``, ``strategy``, ``tokens``
    (the estimate reserved on the key's budget) and ``wait`` are passed to
    :meth:`KeyPool.acquire`. ``retry_on_rate_limit``: on a 429, re-send with another key up
    to that many times. ``header``/``scheme`` override where the key goes (e.g.
    ``header="X-Api-Token"``: the key alone in that header).

    Works with ``httpx.Client``; with ``httpx.AsyncClient`` too (the pool's calls then run in
    a worker thread), though :class:`AsyncKeyPoolAuth` is the natural fit there.
    """

    def __init__(
        self,
        pool: KeyPool,
        provider: object,
        *,
        model: str | None = None,
        strategy: str | None = None,
        tokens: int = 0,
        wait: float | None = None,
        retry_on_rate_limit: int = 0,
        header: str | None = None,
        scheme: str | None = None,
    ) -> None:
        if not isinstance(pool, KeyPool):
            raise TypeError(f"pool must be a KeyPool, not {type(pool).__name__}")
        super().__init__(
            provider,
            model=model,
            strategy=strategy,
            tokens=tokens,
            wait=wait,
            retry_on_rate_limit=retry_on_rate_limit,
            header=header,
            scheme=scheme,
        )
        self.pool = pool

    def __repr__(self) -> str:
        return f"KeyPoolAuth(pool={self.pool!r}, {self._describe()})"

    def _renew_every(self) -> float:
        return self.pool.settings.lease_ttl / 2

    def _acquire(self) -> Lease:
        return self.pool.acquire(
            self.provider,
            model=self.model,
            strategy=self.strategy,
            tokens=self.tokens,
            wait=self.wait,
        )

    async def _aacquire(self) -> _AsyncLeaseLike:
        return _ThreadedLease(await _in_thread(self._acquire))

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        if self.requires_request_body:
            request.read()
        lease = self._acquire()
        retries = self.retry_on_rate_limit
        while True:
            self._apply(request, lease.secret)
            started = time.monotonic()
            abandoned = False
            try:
                response = yield request
            except GeneratorExit:
                abandoned = True
            if abandoned:  # the request failed before a response came
                cause = _failed_with()
                if isinstance(cause, Exception):
                    _quietly(functools.partial(lease.fail, cause))
                else:  # interrupted, or the client was dropped
                    _quietly(lease.release)
                return
            latency = time.monotonic() - started
            _tag(response, lease.provider, lease.key_id)
            if response.status_code < 400:
                content = _already_read(response)
                if content is None and isinstance(response.stream, httpx.SyncByteStream):
                    tap = _BodyTap(response.headers)
                    response.stream = _SyncWatch(
                        response.stream, lease, latency, tap, self._renew_every()
                    )
                    return
                tokens = _tokens_in(content) if content is not None else None
                _quietly(functools.partial(lease.success, tokens, latency))
                return
            raw: bytes | None = None
            read_error: Exception | None = None
            if _error_body_wanted(response):
                raw = _already_read(response)
                if raw is None:
                    try:
                        raw = response.read()
                    except Exception as exc:
                        read_error = exc
            what, retry_after = _failure_of(response, raw)
            _quietly(
                functools.partial(
                    lease.fail, what, retry_after=retry_after, headers=response.headers
                )
            )
            if read_error is not None:
                raise read_error
            if response.status_code != 429 or retries <= 0:
                return
            retries -= 1
            try:
                lease = self._acquire()
            except NoKeyAvailable:
                return  # no other key now: the 429 is the answer


class AsyncKeyPoolAuth(_PoolAuth):
    """``httpx.Auth`` for ``httpx.AsyncClient`` leasing keys from an
    :class:`~keypool.AsyncKeyPool`; the same arguments and behaviour as
    :class:`KeyPoolAuth`."""

    def __init__(
        self,
        apool: AsyncKeyPool,
        provider: object,
        *,
        model: str | None = None,
        strategy: str | None = None,
        tokens: int = 0,
        wait: float | None = None,
        retry_on_rate_limit: int = 0,
        header: str | None = None,
        scheme: str | None = None,
    ) -> None:
        if not isinstance(apool, AsyncKeyPool):
            raise TypeError(f"apool must be an AsyncKeyPool, not {type(apool).__name__}")
        super().__init__(
            provider,
            model=model,
            strategy=strategy,
            tokens=tokens,
            wait=wait,
            retry_on_rate_limit=retry_on_rate_limit,
            header=header,
            scheme=scheme,
        )
        self.pool = apool

    def __repr__(self) -> str:
        return f"AsyncKeyPoolAuth(pool={self.pool!r}, {self._describe()})"

    def _renew_every(self) -> float:
        return self.pool.settings.lease_ttl / 2

    async def _aacquire(self) -> _AsyncLeaseLike:
        return await self.pool.acquire(
            self.provider,
            model=self.model,
            strategy=self.strategy,
            tokens=self.tokens,
            wait=self.wait,
        )

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise TypeError(
            "AsyncKeyPoolAuth works with httpx.AsyncClient; use KeyPoolAuth with httpx.Client"
        )
