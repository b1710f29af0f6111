"""What an HTTP request made with a pooled key goes through, without any I/O.

:func:`auth_flow` is a generator of operations (:class:`Acquire` a key, :class:`Send` the
request, :class:`Report` to the lease, :class:`Watch` a response body...). Two thin drivers
(:mod:`keypool.integrations._drivers`) run it, one blocking and one asyncio, the way
``httpx.Auth.auth_flow`` is driven by ``sync_auth_flow`` and ``async_auth_flow``; the
``httpx`` and ``httpx2`` modules bind those drivers to their library's classes. Whatever
the library, the decisions are made here once.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from ..errors import NoKeyAvailable
from ..kinds import ErrorKind
from ..providers import normalize_provider, validate_model
from ..settings import STRATEGIES
from ..validate import seconds_arg, tokens_arg
from ._keepalive import Hold
from ._usage import Usage, UsageMeter

__all__ = [
    "ANTHROPIC_VERSION",
    "KEY_ID_EXTENSION",
    "PROVIDER_EXTENSION",
    "Abandoned",
    "Acquire",
    "AuthConfig",
    "ErrorResponse",
    "ReadBody",
    "ReadRequest",
    "Report",
    "Send",
    "Watch",
    "auth_flow",
    "auth_header_for",
]

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
_SCHEME = re.compile(r"[A-Za-z0-9._~+/-]{0,64}")
_ERROR_BODY_MAX = 64 * 1024  # error bodies larger than this are not read for classifying

# failures another key may not have: re-sent with another key when retries are asked for
KEY_FAILURES = frozenset({ErrorKind.RATE_LIMIT, ErrorKind.QUOTA, ErrorKind.AUTH})


def auth_header_for(provider: object) -> tuple[str, str]:
    """The ``(header, scheme)`` a provider's key is sent in: ``("Authorization",
    "Bearer")``, or ``("x-goog-api-key", "")`` for gemini (an empty scheme: the key alone)."""
    return _HEADERS.get(normalize_provider(provider), _BEARER)


# --------------------------------------------------------------------------- failures


class ErrorResponse(Exception):
    """An error response, as :func:`keypool.classify` reads it: ``status_code``, ``headers``
    and the parsed JSON ``body`` (error codes such as ``insufficient_quota``, Google's
    ``RetryInfo`` and ``API_KEY_INVALID`` count). It is what the lease is failed with; it is
    never raised. Its ``str`` holds the status only."""

    def __init__(self, status_code: int, headers: Mapping[str, str], body: Mapping[str, Any]):
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers
        self.body = body


def failure_of(status: int, headers: Mapping[str, str], raw: bytes | None) -> object:
    """What to fail the lease with: the status alone, or an :class:`ErrorResponse` when
    the body is a JSON object (for the classifier to read its error codes)."""
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = None
    if not isinstance(body, Mapping):
        return status
    return ErrorResponse(status, headers, body)


def error_body_wanted(headers: Mapping[str, str]) -> bool:
    """True when an error body is small JSON, worth reading to classify the failure."""
    if "json" not in headers.get("content-type", "").lower():
        return False
    length = headers.get("content-length")
    if length is None:
        return True
    try:
        return int(length) <= _ERROR_BODY_MAX
    except ValueError:
        return False


# --------------------------------------------------------------------------- arguments


class AuthConfig:
    """The validated arguments of an auth: which keys, how they are sent, when to retry."""

    def __init__(
        self,
        provider: object,
        *,
        model: str | None,
        strategy: str | None,
        tokens: int,
        wait: float | None,
        retry_on_rate_limit: int,
        retries: int,
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
        for name, value in (("retry_on_rate_limit", retry_on_rate_limit), ("retries", retries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"invalid {name} {value!r}: expected an int >= 0")
        if retries and retry_on_rate_limit:
            raise ValueError("give retries or retry_on_rate_limit, not both")
        self.retry_on_rate_limit = retry_on_rate_limit
        self.retries = retries or retry_on_rate_limit
        self.retry_kinds = (
            KEY_FAILURES if retries else frozenset({ErrorKind.RATE_LIMIT, ErrorKind.QUOTA})
        )
        default_header, default_scheme = auth_header_for(self.provider)
        if header is not None:
            if not isinstance(header, str) or not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"invalid header name {header!r}")
            default_scheme = "Bearer" if header.lower() == "authorization" else ""
        self.header = header if header is not None else default_header
        if scheme is not None and (not isinstance(scheme, str) or not _SCHEME.fullmatch(scheme)):
            raise ValueError(f"invalid scheme {scheme!r}")
        self.scheme = scheme if scheme is not None else default_scheme
        self.extra_headers = _EXTRA_HEADERS.get(self.provider, ())
        # a request re-sent with another key must be replayable
        self.requires_request_body = self.retries > 0

    def acquire_args(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "strategy": self.strategy,
            "tokens": self.tokens,
            "wait": self.wait,
        }

    def apply(self, headers: Any, secret: str) -> None:
        """Put the key (and the provider's required headers) on the request's headers."""
        headers[self.header] = f"{self.scheme} {secret}" if self.scheme else secret
        for name, value in self.extra_headers:
            if name not in headers:
                headers[name] = value

    def describe(self) -> str:
        parts = [f"provider={self.provider!r}"]
        if self.model is not None:
            parts.append(f"model={self.model!r}")
        if self.strategy is not None:
            parts.append(f"strategy={self.strategy!r}")
        if self.retry_on_rate_limit:
            parts.append(f"retry_on_rate_limit={self.retry_on_rate_limit}")
        elif self.retries:
            parts.append(f"retries={self.retries}")
        parts.append(f"header={self.header!r}")
        return ", ".join(parts)


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Read the request body into memory (to send it again). Answer: None."""

    request: Any


@dataclass(frozen=True, slots=True)
class Acquire:
    """Lease a key and start keeping it alive. Answer: a :class:`Hold`, or
    :class:`~keypool.NoKeyAvailable` thrown in."""


@dataclass(frozen=True, slots=True)
class Send:
    """Hand the request to the HTTP client. Answer: the response, or :class:`Abandoned`."""

    request: Any


@dataclass(frozen=True, slots=True)
class Abandoned:
    """The client closed the flow before a response came. ``cause`` is the exception on its
    way to the caller (None: cancelled, interrupted, the client was dropped)."""

    cause: BaseException | None


@dataclass(frozen=True, slots=True)
class ReadBody:
    """Read an error response's body. Answer: the bytes (an error while reading is thrown
    in)."""

    response: Any


@dataclass(frozen=True, slots=True)
class Report:
    """Report the lease, if nobody has yet (``hold.claim()``). ``outcome``: ``"success"``
    (with ``usage``), ``"fail"`` (with ``error`` and ``headers``) or ``"release"``.
    Answer: the :class:`~keypool.Failure` of a failure, None otherwise or when the store
    could not be reached."""

    hold: Hold
    outcome: str
    usage: Usage | None = None
    error: object = None
    headers: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Watch:
    """The response body is still to be read: wrap its stream so that the usage is counted
    as it passes and the lease reported when the response is closed or collected."""

    response: Any
    hold: Hold


Op = ReadRequest | Acquire | Send | ReadBody | Report | Watch


def _tag(response: Any, hold: Hold) -> None:
    response.extensions[KEY_ID_EXTENSION] = hold.lease.key_id
    response.extensions[PROVIDER_EXTENSION] = hold.lease.provider


def auth_flow(
    config: AuthConfig, request: Any, content_of: Callable[[Any], bytes | None]
) -> Generator[Op, Any, None]:
    """One request's life with a pooled key (see the module). ``content_of(response)`` is
    the body when it was already read, else None."""
    if config.requires_request_body:
        yield ReadRequest(request)
    hold: Hold = yield Acquire()
    retries = config.retries
    while True:
        config.apply(request.headers, hold.lease.secret)
        started = time.monotonic()
        outcome = yield Send(request)
        if isinstance(outcome, Abandoned):
            if isinstance(outcome.cause, Exception):
                yield Report(hold, "fail", error=outcome.cause)
            else:
                yield Report(hold, "release")
            return
        response = outcome
        hold.latency = time.monotonic() - started
        _tag(response, hold)
        if response.status_code < 400:
            content = content_of(response)
            if content is None:
                yield Watch(response, hold)
            else:
                meter = UsageMeter(response.headers.get("content-type", ""))
                meter.feed(content)  # already decoded
                yield Report(hold, "success", usage=meter.usage())
            return
        raw: bytes | None = None
        read_error: Exception | None = None
        if error_body_wanted(response.headers):
            raw = content_of(response)
            if raw is None:
                try:
                    raw = yield ReadBody(response)
                except Exception as exc:
                    read_error = exc
        error = failure_of(response.status_code, response.headers, raw)
        failure = yield Report(hold, "fail", error=error, headers=response.headers)
        if read_error is not None:
            raise read_error
        if failure is None or failure.kind not in config.retry_kinds or retries <= 0:
            return
        retries -= 1
        try:
            hold = yield Acquire()
        except NoKeyAvailable:
            return  # no other key now: this response is the answer
