"""Turn whatever a provider call failed with into an :class:`ErrorKind` and a retry delay.

:func:`classify` accepts an :class:`ErrorKind` (or its string value), an HTTP status or an
exception from any SDK. Exceptions are duck-typed (``status_code``, ``response``, ``body``,
``code``...), so no provider SDK is imported. :func:`retry_after_from_headers` reads the
delay a provider asks for from its response headers (``Retry-After``, OpenAI's and
Anthropic's rate-limit headers).

A :class:`Failure` never carries an exception's message, which may contain an API key: its
``detail`` is built only from class names, HTTP statuses and well-known error codes.
"""

from __future__ import annotations

import errno
import math
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, cast

from .kinds import ErrorKind
from .log import redact
from .validate import MAX_RETRY_AFTER

__all__ = [
    "Failure",
    "classify",
    "headers_of",
    "parse_duration",
    "retry_after_from_headers",
    "status_of",
]


@dataclass(frozen=True, slots=True)
class Failure:
    """A classified failure.

    ``status`` is the HTTP status when one is known, ``retry_after`` the number of seconds
    the provider asked to wait (``None`` when it did not say), ``detail`` a short description
    that is safe to log: class names, statuses and well-known error codes only, never an
    exception's message.
    """

    kind: ErrorKind
    status: int | None
    retry_after: float | None
    detail: str
    # the limit the provider says was hit, for a rate limit or quota: "model" (a limit of one
    # model), "account" (the organization's or project's, every model), None (not said)
    scope: str | None = None


HeadersLike = Mapping[str, str] | Iterable[tuple[str, str]]

_MAX_CAUSE_DEPTH = 4
_MAX_DETAIL = 200

# --------------------------------------------------------------------------- statuses


def _kind_for_status(status: int) -> ErrorKind:
    if status == 429:
        return ErrorKind.RATE_LIMIT
    if status in (401, 403):
        return ErrorKind.AUTH
    if status == 402:
        return ErrorKind.QUOTA
    if status in (408, 504):
        return ErrorKind.TIMEOUT
    if 400 <= status < 500:
        return ErrorKind.BAD_REQUEST
    if 500 <= status < 600:
        return ErrorKind.SERVER
    return ErrorKind.OTHER


def _as_status(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return int(value)
    return None


def _attr(obj: object, name: str) -> Any:
    """``getattr(obj, name, None)`` that also survives properties raising."""
    if obj is None:
        return None
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def status_of(exc: object) -> int | None:
    """The HTTP status an exception carries, or ``None``.

    Looks at ``exc.status_code`` (openai, anthropic, cohere...), ``exc.response.status_code``
    (httpx, requests), ``exc.status`` (aiohttp, urllib), ``exc.code`` (google-api-core) and
    ``exc.response.status``, keeping the first integer in 100..599.
    """
    status = _as_status(_attr(exc, "status_code"))
    if status is not None:
        return status
    response = _attr(exc, "response")
    status = _as_status(_attr(response, "status_code"))
    if status is not None:
        return status
    status = _as_status(_attr(exc, "status"))
    if status is not None:
        return status
    status = _as_status(_attr(exc, "code"))
    if status is not None:
        return status
    return _as_status(_attr(response, "status"))


def _as_headers(value: object) -> Mapping[str, str] | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        return cast(Mapping[str, str], value)
    items = _attr(value, "items")
    if not callable(items):
        return None
    table: dict[str, str] = {}
    try:
        for pair in items():
            try:
                name, text = pair
            except (TypeError, ValueError):
                continue
            if isinstance(name, str) and isinstance(text, str):
                table.setdefault(name, text)
    except Exception:
        return None
    return table


def headers_of(exc: object) -> Mapping[str, str] | None:
    """The response headers an exception carries (``exc.response.headers``, else
    ``exc.headers``), or ``None``. Objects that only offer ``.items()`` (such as an
    ``email.message.Message``) are copied into a dict."""
    headers = _as_headers(_attr(_attr(exc, "response"), "headers"))
    if headers is not None:
        return headers
    return _as_headers(_attr(exc, "headers"))


# --------------------------------------------------------------------------- error codes

_CODE_KINDS: dict[str, ErrorKind] = {
    # spent quota / billing
    "insufficient_quota": ErrorKind.QUOTA,
    "quota_exceeded": ErrorKind.QUOTA,
    "quotaexceeded": ErrorKind.QUOTA,
    "dailylimitexceeded": ErrorKind.QUOTA,
    "insufficient_balance": ErrorKind.QUOTA,
    # rate limits (RESOURCE_EXHAUSTED may be a daily quota too, but cannot be told apart)
    "rate_limit_exceeded": ErrorKind.RATE_LIMIT,
    "rate_limit_error": ErrorKind.RATE_LIMIT,
    "ratelimitexceeded": ErrorKind.RATE_LIMIT,
    "userratelimitexceeded": ErrorKind.RATE_LIMIT,
    "resource_exhausted": ErrorKind.RATE_LIMIT,
    "too_many_requests": ErrorKind.RATE_LIMIT,
    # credentials
    "authentication_error": ErrorKind.AUTH,
    "permission_error": ErrorKind.AUTH,
    "invalid_api_key": ErrorKind.AUTH,
    "api_key_invalid": ErrorKind.AUTH,  # Google: details[].reason
    "api_key_expired": ErrorKind.AUTH,
    "unauthenticated": ErrorKind.AUTH,
    "permission_denied": ErrorKind.AUTH,
    # provider side
    "overloaded_error": ErrorKind.SERVER,
    "api_error": ErrorKind.SERVER,
    "server_error": ErrorKind.SERVER,
    "internal": ErrorKind.SERVER,
    "internal_error": ErrorKind.SERVER,
    "unavailable": ErrorKind.SERVER,
    "service_unavailable": ErrorKind.SERVER,
    "deadline_exceeded": ErrorKind.TIMEOUT,
    # the request itself
    "invalid_request_error": ErrorKind.BAD_REQUEST,
    "not_found_error": ErrorKind.BAD_REQUEST,
    "invalid_argument": ErrorKind.BAD_REQUEST,
    "not_found": ErrorKind.BAD_REQUEST,
    "model_not_found": ErrorKind.BAD_REQUEST,
    "context_length_exceeded": ErrorKind.BAD_REQUEST,
    "request_too_large": ErrorKind.BAD_REQUEST,
}

_CODE_SEPARATORS = re.compile(r"[\s\-]+")
_SAFE_CODE = re.compile(r"[a-z0-9_]{1,48}")


def _code_kind(code: str) -> ErrorKind | None:
    kind = _CODE_KINDS.get(code)
    if kind is None and code.startswith("billing_") and _SAFE_CODE.fullmatch(code):
        kind = ErrorKind.QUOTA
    return kind


def _bodies(exc: object) -> list[Mapping[str, Any]]:
    """The parsed error bodies an SDK exception carries (``body``; google-genai ``details``)."""
    found = []
    for name in ("body", "details", "response_json"):
        value = _attr(exc, name)
        if isinstance(value, Mapping):
            found.append(value)
    return found


def _google_details(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    error = body.get("error")
    details = error.get("details") if isinstance(error, Mapping) else body.get("details")
    return [d for d in details if isinstance(d, Mapping)] if isinstance(details, list) else []


def _code_candidates(exc: object) -> list[str]:
    raw: list[object] = [_attr(exc, "code")]
    for body in _bodies(exc):
        error = body.get("error")
        if isinstance(error, Mapping):
            raw.extend(error.get(k) for k in ("code", "type", "status"))
        raw.extend(body.get(k) for k in ("code", "type", "status"))
        for detail in _google_details(body):
            raw.append(detail.get("reason"))
            violations = detail.get("violations")
            if isinstance(violations, list) and any(
                isinstance(v, Mapping) and "perday" in str(v.get("quotaId", "")).lower()
                for v in violations
            ):
                raw.append("quota_exceeded")  # a per-day quota is spent until its reset
    raw.extend(_attr(exc, k) for k in ("type", "status", "reason"))
    return [
        _CODE_SEPARATORS.sub("_", value.strip()).lower()
        for value in raw
        if isinstance(value, str) and value.strip()
    ]


def _known_code(exc: object) -> tuple[str, ErrorKind] | None:
    """The first well-known error code on ``exc``, preferring one that says quota is spent."""
    found: tuple[str, ErrorKind] | None = None
    auth: tuple[str, ErrorKind] | None = None
    for code in _code_candidates(exc):
        kind = _code_kind(code)
        if kind is ErrorKind.QUOTA:
            return code, kind
        if kind is ErrorKind.AUTH and auth is None:
            auth = code, kind
        if kind is not None and found is None:
            found = code, kind
    return auth or found


# --------------------------------------------------------------------------- class names

_TIMEOUT_NAMES = ("timeout", "timedout", "deadlineexceeded")
_NAME_KINDS: tuple[tuple[ErrorKind, tuple[str, ...]], ...] = (
    (ErrorKind.QUOTA, ("quota",)),
    (ErrorKind.RATE_LIMIT, ("ratelimit", "toomanyrequests", "resourceexhausted", "throttl")),
    (
        ErrorKind.AUTH,
        (
            "authentication",
            "unauthenticated",
            "unauthorized",
            "permissiondenied",
            "forbidden",
            "invalidapikey",
        ),
    ),
    (
        ErrorKind.BAD_REQUEST,
        ("badrequest", "notfound", "unprocessable", "invalidrequest", "invalidargument"),
    ),
    (
        ErrorKind.SERVER,
        ("internalserver", "serviceunavailable", "overloaded", "servererror", "badgateway"),
    ),
    (ErrorKind.CONNECTION, ("connect", "network", "remoteprotocol")),
)

_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,
    socket.gaierror,
    socket.herror,
    ssl.SSLError,
)
_NETWORK_ERRNOS = frozenset(
    code
    for code in (
        getattr(errno, name, None)
        for name in (
            "ECONNREFUSED",
            "ECONNRESET",
            "ECONNABORTED",
            "ENETUNREACH",
            "ENETDOWN",
            "ENETRESET",
            "EHOSTUNREACH",
            "EHOSTDOWN",
            "EPIPE",
            "ENOTCONN",
            "EADDRNOTAVAIL",
        )
    )
    if isinstance(code, int)
)


def _own_class_names(exc: BaseException) -> list[str]:
    """Lower-cased names along the MRO, skipping built-in classes (``FileNotFoundError`` is
    no "not found" answer from a provider; built-ins are handled by ``isinstance``)."""
    return [cls.__name__.lower() for cls in type(exc).__mro__ if cls.__module__ != "builtins"]


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno == errno.ETIMEDOUT:
        return True
    return any(part in name for name in _own_class_names(exc) for part in _TIMEOUT_NAMES)


def _kind_from_names(exc: BaseException) -> ErrorKind | None:
    for name in _own_class_names(exc):
        for kind, parts in _NAME_KINDS:
            if any(part in name for part in parts):
                return kind
    return None


def _is_network(exc: BaseException) -> bool:
    if isinstance(exc, _NETWORK_ERRORS):
        return True
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.]")


def _safe_name(exc: BaseException) -> str:
    name = getattr(type(exc), "__name__", "")
    return _UNSAFE_NAME_CHARS.sub("", name)[:64] or "Exception"


# --------------------------------------------------------------------------- classify


def _from_exception(
    exc: BaseException, depth: int = 0
) -> tuple[ErrorKind, int | None, str, BaseException]:
    """Kind, status, detail, and the exception the verdict came from (``exc`` or a cause)."""
    status = status_of(exc)
    code = _known_code(exc)
    parts = [f"HTTP {status}"] if status is not None else []
    if code is not None:
        parts.append(code[0])
    detail = _safe_name(exc) + (": " + ", ".join(parts) if parts else "")

    if status is not None and status >= 400:
        kind = _kind_for_status(status)
        if (
            code is not None
            and code[1] in (ErrorKind.QUOTA, ErrorKind.AUTH)
            and kind in (ErrorKind.RATE_LIMIT, ErrorKind.BAD_REQUEST)
            and (code[1] is ErrorKind.QUOTA or code[0].startswith("api_key"))
        ):
            kind = code[1]  # Google answers a bad key with 400 API_KEY_INVALID
        return kind, status, detail, exc

    if _is_timeout(exc):
        return ErrorKind.TIMEOUT, status, detail, exc
    if code is not None:
        return code[1], status, detail, exc
    by_name = _kind_from_names(exc)
    if by_name is not None:
        return by_name, status, detail, exc
    if _is_network(exc):
        return ErrorKind.CONNECTION, status, detail, exc

    if depth < _MAX_CAUSE_DEPTH:
        reason = _attr(exc, "reason")  # urllib.error.URLError wraps the socket error here
        for inner in (exc.__cause__, reason):
            if isinstance(inner, BaseException) and inner is not exc:
                kind, inner_status, inner_detail, source = _from_exception(inner, depth + 1)
                if kind is not ErrorKind.OTHER:
                    return kind, inner_status, f"{detail} <- {inner_detail}", source
    return ErrorKind.OTHER, status, detail, exc


def _check_retry_after(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"retry_after must be a number of seconds, not {type(value).__name__}")
    try:
        seconds = float(value)
    except OverflowError:
        raise ValueError("invalid retry_after: the number is too large") from None
    if not math.isfinite(seconds) or not 0 <= seconds <= MAX_RETRY_AFTER:
        raise ValueError(
            f"invalid retry_after {value!r}: expected seconds >= 0 and <= {MAX_RETRY_AFTER:.0e}"
        )
    return seconds


def _retry_after_attr(exc: object) -> float | None:
    for body in _bodies(exc):  # google.rpc.RetryInfo {"retryDelay": "37s"}
        for detail in _google_details(body):
            delay = detail.get("retryDelay")
            if isinstance(delay, str):
                seconds = parse_duration(delay)
                if seconds is not None and seconds >= 0:
                    return seconds
    value = _attr(exc, "retry_after")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def classify(
    what: object,
    *,
    retry_after: float | None = None,
    headers: Mapping[str, str] | None = None,
    now: float | None = None,
) -> Failure:
    """Classify a failed provider call.

    ``what`` is an :class:`ErrorKind` or its string value (``"rate_limit"``), an HTTP status
    (``int`` in 100..599) or an exception from any SDK. ``retry_after`` (seconds) overrides
    any delay found in ``headers`` or in the exception's response headers; ``now`` (epoch
    seconds) is used to turn absolute reset times into delays.

    Raises ``TypeError`` for any other kind of value (``bool`` included) and ``ValueError``
    for an unknown kind name, a status outside 100..599 or a negative/non-finite
    ``retry_after``.
    """
    delay = _check_retry_after(retry_after)
    kind: ErrorKind
    status: int | None
    detail: str
    sources: list[BaseException] = []
    if isinstance(what, bool):
        raise TypeError("classify() takes an HTTP status as int, not bool")
    if isinstance(what, ErrorKind):
        kind, status, detail = what, None, what.value
    elif isinstance(what, str):
        try:
            kind = ErrorKind(what.strip().lower())
        except ValueError:
            known = ", ".join(k.value for k in ErrorKind)
            shown = redact(what[:64])  # a message passed by mistake may hold a key
            raise ValueError(f"unknown error kind {shown!r} (known: {known})") from None
        status, detail = None, kind.value
    elif isinstance(what, int):
        if not 100 <= what <= 599:
            raise ValueError(f"HTTP status must be in 100..599, got {what}")
        kind, status, detail = _kind_for_status(what), int(what), f"HTTP {what}"
    elif isinstance(what, BaseException):
        kind, status, detail, source = _from_exception(what)
        sources = [what] if source is what else [what, source]
    else:
        raise TypeError(
            "classify() takes an ErrorKind, its string value, an HTTP status or an "
            f"exception, not {type(what).__name__}"
        )

    if delay is None:
        found = headers
        for exc in sources:
            if found is not None:
                break
            found = headers_of(exc)
        delay = retry_after_from_headers(found, now=now)
        for exc in sources:
            if delay is not None:
                break
            delay = _retry_after_attr(exc)
    scope = None
    if kind in (ErrorKind.RATE_LIMIT, ErrorKind.QUOTA):
        scope = scope_hint(sources, headers if headers is not None else _first_headers(sources))
    return Failure(
        kind=kind, status=status, retry_after=delay, detail=detail[:_MAX_DETAIL], scope=scope
    )


def _first_headers(sources: list[BaseException]) -> Mapping[str, str] | None:
    for exc in sources:
        found = headers_of(exc)
        if found is not None:
            return found
    return None


# "Rate limit reached for gpt-4o in organization org-… on tokens per min (TPM)"
_OPENAI_MODEL_LIMIT = re.compile(r"rate limit reached for \S+ in (?:organization|project)", re.I)
_PER_MODEL_REMAINING = (
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-output-tokens-remaining",
)


def scope_hint(sources: Iterable[BaseException], headers: HeadersLike | None = None) -> str | None:
    """Which limit a rate limit or quota failure names, where the provider says so:
    ``"model"`` for a limit of one model (OpenAI's "Rate limit reached for <model> in
    organization …" and its ``x-ratelimit-remaining-*: 0``, Anthropic's per-kind
    ``anthropic-ratelimit-*-remaining: 0``, a Google quota id ``…PerModel…``), ``"account"``
    for the organization's or project's own (``insufficient_quota``, a Google quota id per
    project for every model), else None. Never raises; reads no secret into the result."""
    try:
        for exc in sources:
            for body in _bodies(exc):
                for detail in _google_details(body):
                    for violation in detail.get("violations") or []:
                        quota = (
                            str(violation.get("quotaId", ""))
                            if isinstance(violation, Mapping)
                            else ""
                        )
                        if "permodel" in quota.lower():
                            return "model"
                        if "perproject" in quota.lower():
                            return "account"
            if "insufficient_quota" in _code_candidates(exc):
                return "account"
            for text in _messages(exc):
                if _OPENAI_MODEL_LIMIT.search(text):
                    return "model"
        table = _lower_headers(headers) if headers is not None else {}
        for name in _PER_MODEL_REMAINING:
            value = _number(table.get(name))
            if value is not None and value <= 0:
                return "model"
    except Exception:
        return None
    return None


def _messages(exc: object) -> list[str]:
    found: list[str] = []
    for body in _bodies(exc):
        error = body.get("error")
        for holder in (error, body):
            if isinstance(holder, Mapping) and isinstance(holder.get("message"), str):
                found.append(holder["message"])
    message = _attr(exc, "message")
    if isinstance(message, str):
        found.append(message)
    return found


# --------------------------------------------------------------------------- headers

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_UNIT = r"(?:ns|us|\u00b5s|\u03bcs|ms|h|m|s)"
_PLAIN_NUMBER = re.compile(_NUMBER)
_DURATION = re.compile(rf"(?:{_NUMBER}{_DURATION_UNIT})+")
_DURATION_PART = re.compile(rf"({_NUMBER})({_DURATION_UNIT})")
_UNIT_SECONDS = {
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 1e-3,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ns": 1e-9,
}


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration (``"6m0s"``, ``"250ms"``, ``"1h2m3.5s"``) or a plain
    number of seconds (``"1.5"``). An optional leading sign is honoured. Returns ``None``
    when ``text`` is not such a duration."""
    if not isinstance(text, str):
        return None
    value = text.strip()
    sign = 1.0
    if value[:1] in ("+", "-"):
        sign = -1.0 if value[0] == "-" else 1.0
        value = value[1:]
    if _PLAIN_NUMBER.fullmatch(value):
        seconds = float(value)
    elif _DURATION.fullmatch(value):
        seconds = sum(
            float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION_PART.findall(value)
        )
    else:
        return None
    return sign * seconds if math.isfinite(seconds) else None


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _lower_headers(headers: object) -> dict[str, str]:
    items = _attr(headers, "items")
    table: dict[str, str] = {}
    try:
        pairs: Any = items() if callable(items) else headers
        for pair in pairs:
            try:
                raw_name, raw_value = pair
            except (TypeError, ValueError):
                continue
            name, value = _text(raw_name), _text(raw_value)
            if name is not None and value is not None:
                table.setdefault(name.strip().lower(), value.strip())
    except Exception:
        return table
    return table


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _timestamp(text: str) -> float | None:
    """Epoch seconds of an RFC 3339 timestamp; naive ones are taken as UTC."""
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _http_date(text: str) -> float | None:
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _from_retry_after_ms(table: Mapping[str, str], now: float) -> float | None:
    value = _number(table.get("retry-after-ms"))
    return None if value is None else max(0.0, value / 1000.0)


def _from_retry_after(table: Mapping[str, str], now: float) -> float | None:
    raw = table.get("retry-after")
    if raw is None:
        return None
    value = _number(raw)
    if value is None:
        moment = _http_date(raw)
        if moment is None:
            return None
        value = moment - now
    return max(0.0, value)


def _pick_reset(
    table: Mapping[str, str],
    names: Iterable[tuple[str, str]],
    parse: Callable[[str], float | None],
) -> float | None:
    """The largest reset among the limits whose remaining count is 0, else among all."""
    spent: list[float] = []
    present: list[float] = []
    for reset_name, remaining_name in names:
        raw = table.get(reset_name)
        value = None if raw is None else parse(raw)
        if value is None or not math.isfinite(value):
            continue
        value = max(0.0, value)
        present.append(value)
        remaining = _number(table.get(remaining_name))
        if remaining is not None and remaining <= 0:
            spent.append(value)
    chosen = spent or present
    return max(chosen) if chosen else None


_OPENAI_RESETS = (
    ("x-ratelimit-reset-requests", "x-ratelimit-remaining-requests"),
    ("x-ratelimit-reset-tokens", "x-ratelimit-remaining-tokens"),
)
_ANTHROPIC_RESETS = tuple(
    (f"anthropic-ratelimit-{limit}-reset", f"anthropic-ratelimit-{limit}-remaining")
    for limit in ("requests", "tokens", "input-tokens", "output-tokens")
)


def _from_openai_reset(table: Mapping[str, str], now: float) -> float | None:
    return _pick_reset(table, _OPENAI_RESETS, parse_duration)


def _from_anthropic_reset(table: Mapping[str, str], now: float) -> float | None:
    def until(raw: str) -> float | None:
        moment = _timestamp(raw)
        return None if moment is None else moment - now

    return _pick_reset(table, _ANTHROPIC_RESETS, until)


def _from_ratelimit_reset(table: Mapping[str, str], now: float) -> float | None:
    value = _number(table.get("x-ratelimit-reset"))
    if value is None:
        return None
    if value > 1e12:  # epoch milliseconds (OpenRouter)
        value = value / 1000.0 - now
    elif value > 1e9:  # epoch seconds
        value -= now
    return max(0.0, value)


_HEADER_PARSERS: tuple[Callable[[Mapping[str, str], float], float | None], ...] = (
    _from_retry_after_ms,
    _from_retry_after,
    _from_openai_reset,
    _from_anthropic_reset,
    _from_ratelimit_reset,
)


def retry_after_from_headers(
    headers: HeadersLike | None, *, now: float | None = None
) -> float | None:
    """Seconds a provider asked to wait, read from its response headers, or ``None``.

    ``headers`` may be a dict, ``httpx.Headers``, a requests ``CaseInsensitiveDict`` or any
    iterable of ``(name, value)`` pairs; names are matched case-insensitively. ``now`` (epoch
    seconds, default :func:`time.time`) turns absolute dates into delays. The first of these
    that parses wins: ``retry-after-ms``, ``retry-after`` (seconds or HTTP-date), OpenAI's
    ``x-ratelimit-reset-requests``/``-tokens``, Anthropic's ``anthropic-ratelimit-*-reset``,
    and ``x-ratelimit-reset`` (seconds, or an epoch time). Among several reset headers the
    largest of those whose ``remaining`` counterpart is 0 is taken, else the largest of all.
    Unparseable values are ignored, negative delays become 0; this never raises.
    """
    if headers is None:
        return None
    table = _lower_headers(headers)
    if not table:
        return None
    current = time.time() if now is None else now
    for parse in _HEADER_PARSERS:
        try:
            value = parse(table, current)
        except (TypeError, ValueError, OverflowError):
            value = None
        if value is not None and math.isfinite(value):
            return value
    return None
