"""Tests of keypool.classify: statuses, SDK-shaped exceptions and retry-after headers."""

from __future__ import annotations

import email.message
import errno
import math
import socket
import urllib.error
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from keypool.classify import (
    Failure,
    classify,
    headers_of,
    parse_duration,
    retry_after_from_headers,
    status_of,
)
from keypool.kinds import ErrorKind

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC).timestamp()
SECRET = "sk-SECRET123"

# --------------------------------------------------------------------------- fakes


class FakeResponse:
    """Shaped like httpx.Response / requests.Response (falsy, like a failed requests one)."""

    def __init__(self, status_code: int, headers: Any = None) -> None:
        self.status_code = status_code
        self.headers = {} if headers is None else headers

    def __bool__(self) -> bool:
        return False


class CaseInsensitiveHeaders(Mapping[str, str]):
    """Shaped like requests' CaseInsensitiveDict / httpx.Headers."""

    def __init__(self, data: dict[str, str]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> str:
        for name, value in self._data.items():
            if name.lower() == key.lower():
                return value
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


class OnlyItems:
    """An object offering nothing but ``.items()``."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self._pairs = pairs

    def items(self) -> list[tuple[str, str]]:
        return list(self._pairs)


# openai / anthropic shapes
class APIError(Exception):
    def __init__(self, message: str, *, body: object = None) -> None:
        super().__init__(message)
        self.body = body
        self.code = body.get("code") if isinstance(body, dict) else None
        self.type = body.get("type") if isinstance(body, dict) else None


class APIStatusError(APIError):
    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        headers: dict[str, str] | None = None,
        body: object = None,
    ) -> None:
        super().__init__(message, body=body)
        self.status_code = status_code
        self.response = FakeResponse(status_code, headers)


class RateLimitError(APIStatusError):
    pass


class AuthenticationError(APIStatusError):
    pass


class InternalServerError(APIStatusError):
    pass


class APIConnectionError(APIError):
    pass


class APITimeoutError(APIConnectionError):
    pass


# httpx shapes
class HTTPStatusError(Exception):
    def __init__(self, message: str, *, response: FakeResponse) -> None:
        super().__init__(message)
        self.response = response


class TransportError(Exception):
    pass


class NetworkError(TransportError):
    pass


class ConnectError(NetworkError):
    pass


class TimeoutException(TransportError):
    pass


class ConnectTimeout(TimeoutException):
    pass


# requests shapes
class RequestException(OSError):
    def __init__(self, *args: object, response: FakeResponse | None = None) -> None:
        super().__init__(*args)
        self.response = response


class HTTPError(RequestException):
    pass


class RequestsConnectionError(RequestException):
    pass


RequestsConnectionError.__name__ = "ConnectionError"


class Timeout(RequestException):
    pass


# google-api-core shapes
class GoogleAPICallError(Exception):
    code: int | None = None


class ResourceExhausted(GoogleAPICallError):
    code = 429


class ServiceUnavailable(GoogleAPICallError):
    code = 503


# class-name only shapes (no status)
class BadRequestError(Exception):
    pass


class NotFoundError(Exception):
    pass


class UnprocessableEntityError(Exception):
    pass


class PermissionDeniedError(Exception):
    pass


class ServiceUnavailableError(Exception):
    pass


class OverloadedError(Exception):
    pass


# --------------------------------------------------------------------------- headers


def _http_date(seconds_after_now: float) -> str:
    return format_datetime(datetime.fromtimestamp(NOW + seconds_after_now, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "1500"}, 1.5, id="retry-after-ms"),
        pytest.param({"Retry-After-Ms": "250.5"}, 0.2505, id="retry-after-ms-case"),
        pytest.param({"retry-after-ms": "20", "retry-after": "9"}, 0.02, id="ms-wins"),
        pytest.param({"retry-after-ms": "junk", "retry-after": "9"}, 9.0, id="bad-ms-skipped"),
        pytest.param({"retry-after": "7"}, 7.0, id="retry-after-int"),
        pytest.param({"Retry-After": "2.5"}, 2.5, id="retry-after-float"),
        pytest.param({"RETRY-AFTER": "3"}, 3.0, id="retry-after-upper"),
        pytest.param({"retry-after": "-4"}, 0.0, id="retry-after-negative"),
        pytest.param({"retry-after": _http_date(30)}, 30.0, id="retry-after-http-date"),
        pytest.param({"retry-after": _http_date(-30)}, 0.0, id="retry-after-past-date"),
        pytest.param({"retry-after": "soon", "x-ratelimit-reset": "5"}, 5.0, id="garbage-date"),
        pytest.param({"retry-after": "nan"}, None, id="retry-after-nan"),
        pytest.param({"retry-after": "inf"}, None, id="retry-after-inf"),
        pytest.param({"x-ratelimit-reset-requests": "6m0s"}, 360.0, id="openai-requests"),
        pytest.param({"x-ratelimit-reset-tokens": "20ms"}, 0.02, id="openai-tokens"),
        pytest.param(
            {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"},
            360.0,
            id="openai-both-no-remaining-max",
        ),
        pytest.param(
            {
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "6m0s",
                "x-ratelimit-remaining-tokens": "5000",
            },
            1.0,
            id="openai-requests-spent",
        ),
        pytest.param(
            {
                "X-RateLimit-Reset-Requests": "1s",
                "X-RateLimit-Remaining-Requests": "12",
                "X-RateLimit-Reset-Tokens": "2m",
                "X-RateLimit-Remaining-Tokens": "0",
            },
            120.0,
            id="openai-tokens-spent-mixed-case",
        ),
        pytest.param(
            {
                "x-ratelimit-reset-requests": "3s",
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-tokens": "500ms",
                "x-ratelimit-remaining-tokens": "0",
            },
            3.0,
            id="openai-both-spent-max",
        ),
        pytest.param(
            {
                "x-ratelimit-reset-requests": "3s",
                "x-ratelimit-remaining-requests": "9",
                "x-ratelimit-reset-tokens": "500ms",
                "x-ratelimit-remaining-tokens": "9",
            },
            3.0,
            id="openai-none-spent-max",
        ),
        pytest.param(
            {"x-ratelimit-reset-requests": "bogus", "x-ratelimit-reset-tokens": "1.5"},
            1.5,
            id="openai-garbage-and-plain-number",
        ),
        pytest.param(
            {"anthropic-ratelimit-requests-reset": "2024-05-01T12:00:30Z"},
            30.0,
            id="anthropic-z",
        ),
        pytest.param(
            {"anthropic-ratelimit-tokens-reset": "2024-05-01T12:00:10.5+00:00"},
            10.5,
            id="anthropic-fraction-offset",
        ),
        pytest.param(
            {"anthropic-ratelimit-tokens-reset": "2024-05-01T14:00:05+02:00"},
            5.0,
            id="anthropic-other-offset",
        ),
        pytest.param(
            {"anthropic-ratelimit-requests-reset": "2024-05-01T11:59:00Z"},
            0.0,
            id="anthropic-past",
        ),
        pytest.param(
            {
                "anthropic-ratelimit-requests-reset": "2024-05-01T12:00:02Z",
                "anthropic-ratelimit-requests-remaining": "0",
                "anthropic-ratelimit-tokens-reset": "2024-05-01T12:01:00Z",
                "anthropic-ratelimit-tokens-remaining": "40000",
                "anthropic-ratelimit-input-tokens-reset": "2024-05-01T12:00:20Z",
                "anthropic-ratelimit-input-tokens-remaining": "0",
            },
            20.0,
            id="anthropic-spent-max",
        ),
        pytest.param(
            {
                "anthropic-ratelimit-requests-reset": "2024-05-01T12:00:02Z",
                "anthropic-ratelimit-output-tokens-reset": "2024-05-01T12:00:45Z",
            },
            45.0,
            id="anthropic-none-spent-max",
        ),
        pytest.param(
            {"anthropic-ratelimit-requests-reset": "tomorrow"}, None, id="anthropic-garbage"
        ),
        pytest.param({"x-ratelimit-reset": "12"}, 12.0, id="ratelimit-reset-seconds"),
        pytest.param({"x-ratelimit-reset": str(NOW + 42)}, 42.0, id="ratelimit-reset-epoch"),
        pytest.param(
            {"x-ratelimit-reset": str(int((NOW + 8) * 1000))}, 8.0, id="ratelimit-reset-epoch-ms"
        ),
        pytest.param({"x-ratelimit-reset": str(NOW - 42)}, 0.0, id="ratelimit-reset-past"),
        pytest.param(
            {"retry-after": "1", "x-ratelimit-reset-requests": "9s"}, 1.0, id="retry-after-first"
        ),
        pytest.param(
            {"x-ratelimit-reset-tokens": "2s", "anthropic-ratelimit-requests-reset": "x"},
            2.0,
            id="openai-before-anthropic",
        ),
        pytest.param({}, None, id="empty"),
        pytest.param({"content-type": "application/json"}, None, id="unrelated"),
        pytest.param({"retry-after": ""}, None, id="empty-value"),
    ],
)
def test_retry_after_from_headers(headers: dict[str, str], expected: float | None) -> None:
    got = retry_after_from_headers(headers, now=NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(CaseInsensitiveHeaders({"Retry-After": "4"}), id="mapping"),
        pytest.param([("Retry-After", "4")], id="pairs"),
        pytest.param(OnlyItems([("RETRY-AFTER", "4")]), id="items-only"),
        pytest.param({b"retry-after": b"4"}, id="bytes"),
    ],
)
def test_retry_after_header_shapes(headers: Any) -> None:
    assert retry_after_from_headers(headers, now=NOW) == 4.0


@pytest.mark.parametrize(
    "headers",
    [None, 42, "retry-after", [("only-one",)], [None], {"retry-after": None}],
)
def test_retry_after_from_headers_never_raises(headers: Any) -> None:
    assert retry_after_from_headers(headers, now=NOW) is None


def test_retry_after_default_now_uses_clock() -> None:
    got = retry_after_from_headers({"retry-after": _http_date(0)})
    # NOW is in the past, so the date is long gone
    assert got == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1s", 1.0),
        ("0.5s", 0.5),
        ("1h2m3.5s", 3723.5),
        ("250ms", 0.25),
        ("1m30s", 90.0),
        ("100us", 1e-4),
        ("100\u00b5s", 1e-4),
        ("5ns", 5e-9),
        ("7", 7.0),
        ("0", 0.0),
        ("2.25", 2.25),
        (" 3s ", 3.0),
        ("-2s", -2.0),
        ("", None),
        ("s", None),
        ("1x", None),
        ("1s2", None),
        ("abc", None),
        ("nan", None),
        ("1e3", None),
        ("1 s", None),
    ],
)
def test_parse_duration(text: str, expected: float | None) -> None:
    got = parse_duration(text)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


# --------------------------------------------------------------------------- statuses


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (429, ErrorKind.RATE_LIMIT),
        (401, ErrorKind.AUTH),
        (403, ErrorKind.AUTH),
        (402, ErrorKind.QUOTA),
        (400, ErrorKind.BAD_REQUEST),
        (404, ErrorKind.BAD_REQUEST),
        (409, ErrorKind.BAD_REQUEST),
        (413, ErrorKind.BAD_REQUEST),
        (422, ErrorKind.BAD_REQUEST),
        (418, ErrorKind.BAD_REQUEST),
        (499, ErrorKind.BAD_REQUEST),
        (408, ErrorKind.TIMEOUT),
        (500, ErrorKind.SERVER),
        (502, ErrorKind.SERVER),
        (503, ErrorKind.SERVER),
        (504, ErrorKind.TIMEOUT),
        (529, ErrorKind.SERVER),
        (599, ErrorKind.SERVER),
        (100, ErrorKind.OTHER),
        (200, ErrorKind.OTHER),
        (302, ErrorKind.OTHER),
    ],
)
def test_status_table(status: int, kind: ErrorKind) -> None:
    failure = classify(status)
    assert failure == Failure(kind=kind, status=status, retry_after=None, detail=f"HTTP {status}")


def test_status_with_headers_and_explicit_retry_after() -> None:
    assert classify(429, headers={"Retry-After": "3"}).retry_after == 3.0
    assert classify(503, headers={"Retry-After": "3"}, retry_after=0.5).retry_after == 0.5
    assert classify(503, retry_after=0).retry_after == 0.0


@pytest.mark.parametrize("kind", list(ErrorKind))
def test_error_kind_and_string_values(kind: ErrorKind) -> None:
    for what in (kind, kind.value, str(kind.value)):
        failure = classify(what)
        assert failure.kind is kind
        assert failure.status is None
        assert failure.retry_after is None
        assert failure.detail == kind.value
    assert classify(kind.value.upper()).kind is kind


def test_kind_with_retry_after() -> None:
    failure = classify(ErrorKind.RATE_LIMIT, retry_after=12)
    assert failure.retry_after == 12.0
    assert isinstance(failure.retry_after, float)


@pytest.mark.parametrize(
    ("what", "error", "named"),
    [
        (True, TypeError, "bool"),
        (False, TypeError, "bool"),
        (99, ValueError, "99"),
        (600, ValueError, "600"),
        (-429, ValueError, "-429"),
        ("nope", ValueError, "nope"),
        ("", ValueError, "''"),
        (object(), TypeError, "object"),
        (429.0, TypeError, "float"),
        (None, TypeError, "NoneType"),
        (b"rate_limit", TypeError, "bytes"),
        (TimeoutError, TypeError, "type"),
    ],
)
def test_bad_inputs(what: object, error: type[Exception], named: str) -> None:
    with pytest.raises(error) as info:
        classify(what)
    assert named in str(info.value)


@pytest.mark.parametrize("value", [-1, -0.001, math.inf, math.nan])
def test_bad_retry_after(value: float) -> None:
    with pytest.raises(ValueError) as info:
        classify(429, retry_after=value)
    assert repr(value) in str(info.value)


def test_retry_after_must_be_number() -> None:
    with pytest.raises(TypeError):
        classify(429, retry_after="5")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        classify(429, retry_after=True)


# --------------------------------------------------------------------------- exceptions


@pytest.mark.parametrize(
    ("exc", "kind", "status"),
    [
        pytest.param(RateLimitError("slow down", status_code=429), ErrorKind.RATE_LIMIT, 429),
        pytest.param(
            RateLimitError(
                "quota",
                status_code=429,
                body={"code": "insufficient_quota", "type": "insufficient_quota"},
            ),
            ErrorKind.QUOTA,
            429,
            id="openai-insufficient-quota-inner-body",
        ),
        pytest.param(
            RateLimitError(
                "quota", status_code=429, body={"error": {"code": "insufficient_quota"}}
            ),
            ErrorKind.QUOTA,
            429,
            id="openai-insufficient-quota-wrapped-body",
        ),
        pytest.param(
            APIStatusError(
                "limit", status_code=400, body={"error": {"code": "billing_hard_limit_reached"}}
            ),
            ErrorKind.QUOTA,
            400,
            id="billing-on-400",
        ),
        pytest.param(
            RateLimitError(
                "anthropic",
                status_code=429,
                body={"type": "error", "error": {"type": "rate_limit_error"}},
            ),
            ErrorKind.RATE_LIMIT,
            429,
            id="anthropic-rate-limit",
        ),
        pytest.param(
            APIStatusError(
                "overloaded",
                status_code=529,
                body={"type": "error", "error": {"type": "overloaded_error"}},
            ),
            ErrorKind.SERVER,
            529,
            id="anthropic-529",
        ),
        pytest.param(
            APIStatusError(
                "stream",
                status_code=200,
                body={"type": "error", "error": {"type": "overloaded_error"}},
            ),
            ErrorKind.SERVER,
            200,
            id="anthropic-mid-stream-error",
        ),
        pytest.param(
            APIStatusError(
                "denied", status_code=403, body={"error": {"code": "insufficient_quota"}}
            ),
            ErrorKind.AUTH,
            403,
            id="status-wins-over-quota-on-403",
        ),
        pytest.param(
            APIStatusError("bad", status_code=400, body={"error": {"code": "rate_limit_exceeded"}}),
            ErrorKind.BAD_REQUEST,
            400,
            id="status-wins",
        ),
        pytest.param(AuthenticationError("who", status_code=401), ErrorKind.AUTH, 401),
        pytest.param(InternalServerError("oops", status_code=500), ErrorKind.SERVER, 500),
        pytest.param(APIStatusError("gw", status_code=504), ErrorKind.TIMEOUT, 504),
        pytest.param(APIConnectionError("no route"), ErrorKind.CONNECTION, None),
        pytest.param(APITimeoutError("timed out"), ErrorKind.TIMEOUT, None),
        pytest.param(
            APIError("no status", body={"code": "insufficient_quota"}),
            ErrorKind.QUOTA,
            None,
            id="code-without-status",
        ),
        pytest.param(HTTPStatusError("429", response=FakeResponse(429)), ErrorKind.RATE_LIMIT, 429),
        pytest.param(HTTPStatusError("503", response=FakeResponse(503)), ErrorKind.SERVER, 503),
        pytest.param(ConnectError("refused"), ErrorKind.CONNECTION, None),
        pytest.param(ConnectTimeout("slow"), ErrorKind.TIMEOUT, None),
        pytest.param(TimeoutException("slow"), ErrorKind.TIMEOUT, None),
        pytest.param(HTTPError("401", response=FakeResponse(401)), ErrorKind.AUTH, 401),
        pytest.param(HTTPError("no response"), ErrorKind.OTHER, None, id="requests-no-response"),
        pytest.param(RequestsConnectionError("down"), ErrorKind.CONNECTION, None),
        pytest.param(Timeout("slow"), ErrorKind.TIMEOUT, None),
        pytest.param(ResourceExhausted("quota"), ErrorKind.RATE_LIMIT, 429),
        pytest.param(ServiceUnavailable("down"), ErrorKind.SERVER, 503),
        pytest.param(TimeoutError(), ErrorKind.TIMEOUT, None),
        pytest.param(ConnectionRefusedError(), ErrorKind.CONNECTION, None),
        pytest.param(BrokenPipeError(), ErrorKind.CONNECTION, None),
        pytest.param(socket.gaierror(-2, "name"), ErrorKind.CONNECTION, None),
        pytest.param(OSError(errno.ENETUNREACH, "net"), ErrorKind.CONNECTION, None),
        pytest.param(OSError(errno.ETIMEDOUT, "slow"), ErrorKind.TIMEOUT, None),
        pytest.param(FileNotFoundError("x"), ErrorKind.OTHER, None, id="builtin-not-found"),
        pytest.param(PermissionError("x"), ErrorKind.OTHER, None, id="builtin-permission"),
        pytest.param(BadRequestError("x"), ErrorKind.BAD_REQUEST, None),
        pytest.param(NotFoundError("x"), ErrorKind.BAD_REQUEST, None),
        pytest.param(UnprocessableEntityError("x"), ErrorKind.BAD_REQUEST, None),
        pytest.param(PermissionDeniedError("x"), ErrorKind.AUTH, None),
        pytest.param(ServiceUnavailableError("x"), ErrorKind.SERVER, None),
        pytest.param(OverloadedError("x"), ErrorKind.SERVER, None),
        pytest.param(type("RateLimitError", (Exception,), {})("x"), ErrorKind.RATE_LIMIT, None),
        pytest.param(type("AuthenticationError", (Exception,), {})("x"), ErrorKind.AUTH, None),
        pytest.param(type("InternalServerError", (Exception,), {})("x"), ErrorKind.SERVER, None),
        pytest.param(ValueError("x"), ErrorKind.OTHER, None),
        pytest.param(KeyboardInterrupt(), ErrorKind.OTHER, None),
    ],
)
def test_exceptions(exc: BaseException, kind: ErrorKind, status: int | None) -> None:
    failure = classify(exc)
    assert failure.kind is kind
    assert failure.status == status


def test_exception_status_from_other_attribute_shapes() -> None:
    class AiohttpLike(Exception):
        status = 429

    class StrStatus(Exception):
        status = "RESOURCE_EXHAUSTED"
        code = 429

    class BoolStatus(Exception):
        status_code = True

    assert classify(AiohttpLike()).kind is ErrorKind.RATE_LIMIT
    assert classify(StrStatus()).status == 429
    assert status_of(BoolStatus()) is None
    assert status_of(object()) is None


def test_urllib_http_error() -> None:
    headers = email.message.Message()
    headers["Retry-After"] = "11"
    exc = urllib.error.HTTPError("https://x", 429, "Too Many Requests", headers, None)
    failure = classify(exc)
    assert failure.kind is ErrorKind.RATE_LIMIT
    assert failure.status == 429
    assert failure.retry_after == 11.0


def test_urllib_url_error_reason() -> None:
    failure = classify(urllib.error.URLError(ConnectionRefusedError()))
    assert failure.kind is ErrorKind.CONNECTION


def test_cause_is_followed() -> None:
    class WrapperError(Exception):
        pass

    try:
        try:
            raise RateLimitError("inner", status_code=429, headers={"retry-after": "6"})
        except RateLimitError as inner:
            raise WrapperError("outer") from inner
    except WrapperError as outer:
        failure = classify(outer)
    assert failure.kind is ErrorKind.RATE_LIMIT
    assert failure.status == 429
    assert failure.retry_after == 6.0
    assert failure.detail == "WrapperError <- RateLimitError: HTTP 429"


def test_retry_after_from_exception_headers() -> None:
    exc = RateLimitError("slow", status_code=429, headers={"Retry-After": "17"})
    assert classify(exc).retry_after == 17.0
    assert classify(exc, headers={"retry-after": "2"}).retry_after == 2.0
    assert classify(exc, retry_after=1.25).retry_after == 1.25


def test_retry_after_from_anthropic_headers_with_now() -> None:
    exc = RateLimitError(
        "slow",
        status_code=429,
        headers={"anthropic-ratelimit-tokens-reset": "2024-05-01T12:00:09Z"},
    )
    assert classify(exc, now=NOW).retry_after == 9.0


def test_headers_of_shapes() -> None:
    class WithHeaders(Exception):
        headers = {"retry-after": "1"}

    class BrokenResponse(Exception):
        @property
        def response(self) -> object:
            raise RuntimeError("no response")

    with_response = HTTPStatusError("x", response=FakeResponse(429, {"a": "b"}))
    assert headers_of(with_response) == {"a": "b"}
    assert headers_of(WithHeaders()) == {"retry-after": "1"}
    assert headers_of(BrokenResponse()) is None
    assert headers_of(ValueError()) is None
    assert status_of(BrokenResponse()) is None
    assert classify(BrokenResponse()).kind is ErrorKind.OTHER


# --------------------------------------------------------------------------- secrets


@pytest.mark.parametrize(
    "exc",
    [
        RateLimitError(f"Incorrect API key provided: {SECRET}", status_code=429),
        AuthenticationError(
            f"Incorrect API key provided: {SECRET}",
            status_code=401,
            body={"error": {"message": f"key {SECRET}", "code": "invalid_api_key"}},
        ),
        APIError(f"bad {SECRET}", body={"code": SECRET, "type": f"billing_{SECRET}"}),
        APITimeoutError(f"timed out calling with {SECRET}"),
        ValueError(SECRET),
        HTTPError(SECRET, response=FakeResponse(500)),
        type("RateLimit", (Exception,), {"code": SECRET, "type": SECRET})(SECRET),
    ],
)
def test_detail_never_contains_message(exc: BaseException) -> None:
    failure = classify(exc)
    assert SECRET not in repr(failure)
    assert "SECRET" not in failure.detail


def test_detail_shapes() -> None:
    assert classify(TimeoutError("x")).detail == "TimeoutError"
    quota = RateLimitError("x", status_code=429, body={"error": {"code": "insufficient_quota"}})
    assert classify(quota).detail == "RateLimitError: HTTP 429, insufficient_quota"
    assert classify(429).detail == "HTTP 429"
    assert classify("quota").detail == "quota"


def test_failure_is_frozen() -> None:
    failure = classify(429)
    with pytest.raises(AttributeError):
        failure.kind = ErrorKind.AUTH  # type: ignore[misc]
    assert not hasattr(failure, "__dict__")


class _GoogleClientError(Exception):
    """The shape of google-genai's ClientError: ``code`` and the parsed body."""

    def __init__(self, code: int, body: dict[str, object]) -> None:
        super().__init__(f"{code} error")
        self.code = code
        self.details = body


def test_google_invalid_key_disables() -> None:
    body = {
        "error": {
            "code": 400,
            "status": "INVALID_ARGUMENT",
            "details": [{"reason": "API_KEY_INVALID"}],
        }
    }
    assert classify(_GoogleClientError(400, body)).kind is ErrorKind.AUTH


def test_google_daily_quota_and_retry_info() -> None:
    body = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [{"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"},
            ],
        }
    }
    failure = classify(_GoogleClientError(429, body))
    assert failure.kind is ErrorKind.QUOTA
    assert failure.retry_after == 37.0


def test_google_per_minute_limit_uses_retry_info() -> None:
    body = {
        "error": {
            "code": 429,
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}],
        }
    }
    failure = classify(_GoogleClientError(429, body))
    assert failure.kind is ErrorKind.RATE_LIMIT
    assert failure.retry_after == 7.0


# --------------------------------------------------------------------------- which limit


@pytest.mark.parametrize(
    ("error", "scope"),
    [
        (
            RateLimitError(
                "Error code: 429",
                status_code=429,
                body={
                    "message": "Rate limit reached for gpt-4o in organization org-x on tokens "
                    "per min (TPM): Limit 30000, Used 29990, Requested 500.",
                    "type": "tokens",
                    "code": "rate_limit_exceeded",
                },
            ),
            "model",
        ),
        (
            RateLimitError(
                "429", status_code=429, headers={"x-ratelimit-remaining-tokens": "0"}, body={}
            ),
            "model",
        ),
        (
            RateLimitError(
                "429",
                status_code=429,
                headers={"anthropic-ratelimit-output-tokens-remaining": "0"},
                body={"type": "error", "error": {"type": "rate_limit_error"}},
            ),
            "model",
        ),
        (
            RateLimitError(
                "quota",
                status_code=429,
                body={"code": "insufficient_quota", "type": "insufficient_quota"},
            ),
            "account",
        ),
        (
            RateLimitError(
                "429",
                status_code=429,
                body={
                    "error": {
                        "status": "RESOURCE_EXHAUSTED",
                        "details": [
                            {
                                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                                "violations": [
                                    {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel"}
                                ],
                            }
                        ],
                    }
                },
            ),
            "model",
        ),
        (
            RateLimitError(
                "429",
                status_code=429,
                body={
                    "error": {
                        "details": [{"violations": [{"quotaId": "RequestsPerMinutePerProject"}]}]
                    }
                },
            ),
            "account",
        ),
        (RateLimitError("429", status_code=429, headers={"retry-after": "3"}, body={}), None),
        (InternalServerError("500", status_code=500, body={}), None),
    ],
    ids=[
        "openai-msg",
        "openai-hdr",
        "anthropic-hdr",
        "quota",
        "gemini-model",
        "gemini-project",
        "unsaid",
        "not-a-limit",
    ],
)
def test_the_limit_a_provider_names_is_read(error: Exception, scope: str | None) -> None:
    assert classify(error).scope == scope
