"""What each kind of failure does to a key (the contract's failure table), on every store.

Failures are reported through ``lease.fail(...)`` as an ErrorKind, an HTTP status and an
SDK-shaped exception (duck-typed like the OpenAI/Anthropic SDKs' errors).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from keypool import ErrorKind, Failure, KeyPool, NoKeyAvailable, Provider

P = Provider.OPENAI
MakePool = Callable[..., KeyPool]

# --------------------------------------------------------------------------- fakes


class FakeResponse:
    """Shaped like an httpx.Response: a status and a headers mapping."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.headers = dict(headers or {})


class ProviderError(Exception):
    """Shaped like openai.APIStatusError / anthropic.APIStatusError."""

    def __init__(
        self,
        status_code: int,
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"Error code: {status_code} - sk-live-not-a-real-secret")
        self.status_code = status_code
        self.response = FakeResponse(status_code, headers)
        self.body = body


class APIConnectionError(Exception):
    """Shaped like openai.APIConnectionError: no status, no response."""


# --------------------------------------------------------------------------- helpers


def add_keys(pool: KeyPool, *ids: str, **limits: Any) -> None:
    for key_id in ids:
        pool.add_key(P, key_id, f"sk-secret-{key_id}-0123456789", **limits)


def cooldown_left(pool: KeyPool, key_id: str) -> float:
    """Seconds until the key's cooldown ends, as the stats say."""
    until = pool.stats(P, key_id).cooldown_until
    assert until is not None, f"{key_id} has no cooldown"
    return until - time.time()


def fail_once(pool: KeyPool, error: object, **kwargs: Any) -> Failure:
    lease = pool.acquire(P)
    return lease.fail(error, **kwargs)


def picks(pool: KeyPool, n: int, **kwargs: Any) -> list[str]:
    """Key ids of n acquires, each given back without an outcome."""
    out = []
    for _ in range(n):
        lease = pool.acquire(P, **kwargs)
        out.append(lease.key_id)
        lease.release()
    return out


def wait_until_available(pool: KeyPool, key_id: str, limit: float = 3.0) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pool.stats(P, key_id).status == "active":
            return
        time.sleep(0.02)
    raise AssertionError(f"{key_id} did not become available within {limit}s")


# --------------------------------------------------------------------------- RATE_LIMIT


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ErrorKind.RATE_LIMIT, ErrorKind.RATE_LIMIT),
        (429, ErrorKind.RATE_LIMIT),
        (ProviderError(429), ErrorKind.RATE_LIMIT),
    ],
    ids=["kind", "status", "exception"],
)
def test_rate_limit_with_explicit_retry_after_cools_the_key(
    pool: KeyPool, error: object, expected: ErrorKind
) -> None:
    add_keys(pool, "a")
    lease = pool.acquire(P)
    failure = lease.fail(error, retry_after=2)
    assert failure.kind is expected
    assert failure.retry_after == 2
    st = pool.stats(P, "a")
    assert st.status == "cooling"
    assert st.is_rate_limited is True
    assert 1.7 <= cooldown_left(pool, "a") <= 2.05
    assert st.errors_by_kind == {"rate_limit": 1}
    assert st.error_count == 1
    assert st.in_flight == 0
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P)
    assert info.value.retry_after is not None
    assert 1.7 <= info.value.retry_after <= 2.05


def _http_date_in(seconds: float) -> dict[str, str]:
    moment = datetime.fromtimestamp(time.time() + seconds, UTC)
    return {"Retry-After": format_datetime(moment, usegmt=True)}


def _anthropic_reset_in(seconds: float) -> dict[str, str]:
    moment = datetime.fromtimestamp(time.time() + seconds, UTC)
    return {
        "anthropic-ratelimit-requests-reset": moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "anthropic-ratelimit-requests-remaining": "0",
    }


HEADER_CASES: list[tuple[str, Callable[[], dict[str, str]], float, float]] = [
    ("retry-after-seconds", lambda: {"Retry-After": "2"}, 1.7, 2.05),
    ("retry-after-http-date", lambda: _http_date_in(3.5), 2.2, 3.6),
    ("retry-after-ms", lambda: {"retry-after-ms": "1500"}, 1.2, 1.55),
    ("openai-reset-requests", lambda: {"x-ratelimit-reset-requests": "1s"}, 0.7, 1.05),
    ("openai-reset-tokens", lambda: {"x-ratelimit-reset-tokens": "6m0s"}, 359.5, 360.05),
    ("anthropic-reset", lambda: _anthropic_reset_in(4.5), 3.2, 4.6),
]


@pytest.mark.parametrize("via", ["exception", "headers_arg"])
@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [case[1:] for case in HEADER_CASES],
    ids=[case[0] for case in HEADER_CASES],
)
def test_rate_limit_cooldown_comes_from_the_headers(
    make_pool: MakePool,
    via: str,
    headers: Callable[[], dict[str, str]],
    low: float,
    high: float,
) -> None:
    pool = make_pool(rate_limit_cooldown=100.0, rate_limit_max_cooldown=1000.0)
    add_keys(pool, "a")
    lease = pool.acquire(P)
    if via == "exception":
        failure = lease.fail(ProviderError(429, headers()))
    else:
        failure = lease.fail(429, headers=headers())
    assert failure.kind is ErrorKind.RATE_LIMIT
    st = pool.stats(P, "a")
    assert st.status == "cooling"
    assert st.is_rate_limited
    assert low <= cooldown_left(pool, "a") <= high


def test_explicit_retry_after_beats_the_headers(pool: KeyPool) -> None:
    add_keys(pool, "a")
    lease = pool.acquire(P)
    failure = lease.fail(ProviderError(429, {"Retry-After": "30"}), retry_after=2)
    assert failure.retry_after == 2
    assert 1.7 <= cooldown_left(pool, "a") <= 2.05


def test_rate_limit_without_hint_backs_off_exponentially_up_to_the_cap(
    make_pool: MakePool,
) -> None:
    pool = make_pool(rate_limit_cooldown=0.2, rate_limit_max_cooldown=0.5)
    add_keys(pool, "a")
    # a 429, the key comes back, another 429: each cooldown longer than the one before
    durations = []
    for _ in range(3):
        lease = pool.acquire(P)
        lease.fail(429)
        durations.append(cooldown_left(pool, "a"))
        wait_until_available(pool, "a")
    assert 0.1 <= durations[0] <= 0.21
    assert 0.3 <= durations[1] <= 0.41
    assert durations[1] > durations[0] * 1.5
    assert 0.4 <= durations[2] <= 0.51  # 0.8 s, capped at 0.5 s


def test_repeated_rate_limits_on_open_leases_escalate_and_respect_the_cap(
    make_pool: MakePool,
) -> None:
    pool = make_pool(rate_limit_cooldown=0.2, rate_limit_max_cooldown=0.5)
    add_keys(pool, "a")
    leases = [pool.acquire(P) for _ in range(4)]
    lefts = []
    for lease in leases:
        lease.fail(ErrorKind.RATE_LIMIT)
        lefts.append(cooldown_left(pool, "a"))
    assert 0.1 <= lefts[0] <= 0.21
    assert 0.3 <= lefts[1] <= 0.41
    assert 0.4 <= lefts[2] <= 0.51
    assert 0.4 <= lefts[3] <= 0.51


def test_a_cooldown_is_never_shortened(pool: KeyPool) -> None:
    add_keys(pool, "a")
    first, second = pool.acquire(P), pool.acquire(P)
    first.fail(429, retry_after=5)
    second.fail(429, retry_after=1)
    assert 4.7 <= cooldown_left(pool, "a") <= 5.05


def test_a_cooldown_is_extended_by_a_longer_one(pool: KeyPool) -> None:
    add_keys(pool, "a")
    first, second = pool.acquire(P), pool.acquire(P)
    first.fail(429, retry_after=1)
    second.fail(429, retry_after=5)
    assert 4.7 <= cooldown_left(pool, "a") <= 5.05


def test_a_cooling_key_is_skipped_and_comes_back(pool: KeyPool) -> None:
    add_keys(pool, "a", "b")
    lease = pool.acquire(P)
    cooled = lease.key_id
    other = "b" if cooled == "a" else "a"
    lease.fail(429, retry_after=0.3)
    assert picks(pool, 6) == [other] * 6
    time.sleep(0.35)
    assert pool.stats(P, cooled).status == "active"
    assert pool.stats(P, cooled).is_rate_limited is False
    assert pool.stats(P, cooled).cooldown_until is None
    assert cooled in picks(pool, 2)


# --------------------------------------------------------------------------- QUOTA


QUOTA_BODY = {"error": {"code": "insufficient_quota", "type": "insufficient_quota"}}


@pytest.mark.parametrize(
    "error",
    [ErrorKind.QUOTA, 402, ProviderError(429, body=QUOTA_BODY)],
    ids=["kind", "status-402", "insufficient_quota-429"],
)
def test_quota_without_reset_exhausts_for_the_default(make_pool: MakePool, error: object) -> None:
    pool = make_pool(quota_cooldown=50.0, rate_limit_cooldown=0.2)
    add_keys(pool, "a", "b")
    lease = pool.acquire(P)
    spent = lease.key_id
    failure = lease.fail(error)
    assert failure.kind is ErrorKind.QUOTA
    st = pool.stats(P, spent)
    assert st.status == "exhausted"
    assert st.is_rate_limited is True
    assert st.errors_by_kind == {"quota": 1}
    assert 48.0 <= cooldown_left(pool, spent) <= 50.05
    assert spent not in picks(pool, 4)


@pytest.mark.parametrize(
    "report",
    [
        lambda lease: lease.fail(402, retry_after=0.3),
        lambda lease: lease.fail(ProviderError(429, {"retry-after-ms": "300"}, QUOTA_BODY)),
    ],
    ids=["402-retry-after", "insufficient_quota-header"],
)
def test_quota_with_reset_exhausts_until_then(
    make_pool: MakePool, report: Callable[[Any], Failure]
) -> None:
    pool = make_pool(quota_cooldown=50.0)
    add_keys(pool, "a")
    failure = report(pool.acquire(P))
    assert failure.kind is ErrorKind.QUOTA
    assert pool.stats(P, "a").status == "exhausted"
    assert 0.15 <= cooldown_left(pool, "a") <= 0.31
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P)
    assert info.value.retry_after is not None
    assert 0.15 <= info.value.retry_after <= 0.31
    time.sleep(0.35)
    assert pool.stats(P, "a").status == "active"
    assert pool.acquire(P).key_id == "a"


# --------------------------------------------------------------------------- AUTH


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (ErrorKind.AUTH, None),
        (401, 401),
        (403, 403),
        (ProviderError(401), 401),
        (ProviderError(403), 403),
    ],
    ids=["kind", "401", "403", "exception-401", "exception-403"],
)
def test_auth_failure_disables_the_key(pool: KeyPool, error: object, status: int | None) -> None:
    add_keys(pool, "a", "b")
    lease = pool.acquire(P)
    bad = lease.key_id
    good = "b" if bad == "a" else "a"
    failure = lease.fail(error)
    assert failure.kind is ErrorKind.AUTH
    st = pool.stats(P, bad)
    assert st.status == "disabled"
    assert st.disabled_reason is not None
    assert "auth" in st.disabled_reason
    if status is not None:
        assert str(status) in st.disabled_reason
    assert "sk-live" not in st.disabled_reason
    assert st.errors_by_kind == {"auth": 1}
    assert picks(pool, 6) == [good] * 6


def test_auth_disabled_only_key_never_comes_back_by_itself(
    make_pool: MakePool,
) -> None:
    pool = make_pool(rate_limit_cooldown=0.1, circuit_cooldown=0.1, quota_cooldown=0.1)
    add_keys(pool, "a")
    pool.acquire(P).fail(401)
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P)
    assert info.value.retry_after is None
    time.sleep(0.2)  # longer than any configured cooldown
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P, wait=0.2)
    assert info.value.retry_after is None

    pool.reset_key(P, "a")
    assert pool.stats(P, "a").status == "disabled"
    with pytest.raises(NoKeyAvailable):
        pool.acquire(P)

    pool.enable_key(P, "a")
    st = pool.stats(P, "a")
    assert st.status == "active"
    assert st.disabled_reason is None
    with pool.acquire(P) as lease:
        assert lease.key_id == "a"


# --------------------------------------------------------------------------- circuit breaker

CIRCUIT_ERRORS = [
    (ErrorKind.SERVER, "server"),
    (500, "server"),
    (ProviderError(503), "server"),
    (ErrorKind.TIMEOUT, "timeout"),
    (504, "timeout"),
    (TimeoutError("read timed out"), "timeout"),
    (ErrorKind.CONNECTION, "connection"),
    (APIConnectionError("Connection error."), "connection"),
]


@pytest.mark.parametrize(
    ("error", "kind"),
    CIRCUIT_ERRORS,
    ids=[
        "server-kind",
        "500",
        "exception-503",
        "timeout-kind",
        "504",
        "TimeoutError",
        "connection-kind",
        "exception-connection",
    ],
)
def test_consecutive_failures_open_the_circuit(
    make_pool: MakePool, error: object, kind: str
) -> None:
    pool = make_pool(error_threshold=2, circuit_cooldown=5.0)
    add_keys(pool, "a")

    assert fail_once(pool, error).kind is ErrorKind(kind)
    st = pool.stats(P, "a")
    assert st.errors_by_kind == {kind: 1}
    assert st.consecutive_errors == 1
    assert st.status == "active"
    assert st.circuit == "closed"
    assert st.cooldown_until is None

    fail_once(pool, error)  # below the threshold the key still serves
    st = pool.stats(P, "a")
    assert st.errors_by_kind == {kind: 2}
    assert st.error_count == 2
    assert st.consecutive_errors == 2
    assert st.status == "cooling"
    assert st.circuit == "open"
    assert st.is_rate_limited is False
    assert 4.7 <= cooldown_left(pool, "a") <= 5.05
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P)
    assert info.value.retry_after is not None
    assert 4.7 <= info.value.retry_after <= 5.05


def test_circuit_admits_one_probe_and_success_closes_it(make_pool: MakePool) -> None:
    pool = make_pool(error_threshold=2, circuit_cooldown=0.3)
    add_keys(pool, "a")
    fail_once(pool, 500)
    fail_once(pool, 500)
    assert pool.stats(P, "a").circuit == "open"
    with pytest.raises(NoKeyAvailable):
        pool.acquire(P)

    time.sleep(0.35)
    probe = pool.acquire(P)
    assert probe.key_id == "a"
    assert pool.stats(P, "a").circuit == "half_open"
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P)  # the probe is in flight: nobody else gets the key
    assert info.value.retry_after is not None

    probe.success()
    st = pool.stats(P, "a")
    assert st.circuit == "closed"
    assert st.consecutive_errors == 0
    assert st.status == "active"
    assert st.cooldown_until is None
    both = [pool.acquire(P), pool.acquire(P)]  # back to normal service
    assert [lease.key_id for lease in both] == ["a", "a"]

    # closed again: the next opening starts over from the first cooldown
    for lease in both:
        lease.fail(500)
    assert pool.stats(P, "a").circuit == "open"
    assert 0.2 <= cooldown_left(pool, "a") <= 0.31


def test_a_released_probe_lets_another_probe_go(make_pool: MakePool) -> None:
    pool = make_pool(error_threshold=1, circuit_cooldown=0.2)
    add_keys(pool, "a")
    fail_once(pool, ErrorKind.CONNECTION)
    time.sleep(0.25)
    probe = pool.acquire(P)
    with pytest.raises(NoKeyAvailable):
        pool.acquire(P)
    probe.release()  # the call was never made: it proved nothing
    probe = pool.acquire(P)
    assert probe.key_id == "a"
    probe.success()
    assert pool.stats(P, "a").circuit == "closed"


def test_circuit_backoff_is_capped(make_pool: MakePool) -> None:
    pool = make_pool(error_threshold=1, circuit_cooldown=0.2, circuit_max_cooldown=0.3)
    add_keys(pool, "a")
    fail_once(pool, 503)
    assert 0.1 <= cooldown_left(pool, "a") <= 0.21
    time.sleep(0.25)
    fail_once(pool, 503)  # the probe fails: 0.4 s, capped at 0.3 s
    assert 0.2 <= cooldown_left(pool, "a") <= 0.31


def test_failed_probe_reopens_with_a_longer_cooldown(make_pool: MakePool) -> None:
    pool = make_pool(error_threshold=2, circuit_cooldown=0.3, circuit_max_cooldown=100.0)
    add_keys(pool, "a")
    fail_once(pool, ErrorKind.TIMEOUT)
    fail_once(pool, ErrorKind.TIMEOUT)
    first = cooldown_left(pool, "a")
    assert 0.2 <= first <= 0.31

    time.sleep(0.35)
    probe = pool.acquire(P)
    probe.fail(ErrorKind.TIMEOUT)  # one failure is enough to re-open a half-open circuit
    st = pool.stats(P, "a")
    assert st.circuit == "open"
    assert st.status == "cooling"
    second = cooldown_left(pool, "a")
    assert 0.5 <= second <= 0.61
    assert second > first * 1.5
    with pytest.raises(NoKeyAvailable):
        pool.acquire(P)

    time.sleep(0.65)
    probe = pool.acquire(P)
    probe.success()
    st = pool.stats(P, "a")
    assert st.circuit == "closed"
    assert st.consecutive_errors == 0


def test_other_keys_serve_while_a_circuit_is_open(make_pool: MakePool) -> None:
    pool = make_pool(error_threshold=2, circuit_cooldown=5.0)
    add_keys(pool, "a", "b")
    for _ in range(2):
        lease = pool.acquire(P)
        while lease.key_id != "a":
            lease.release()
            lease = pool.acquire(P)
        lease.fail(ErrorKind.SERVER)
    assert pool.stats(P, "a").circuit == "open"
    assert picks(pool, 5) == ["b"] * 5


# --------------------------------------------------------------------------- BAD_REQUEST


@pytest.mark.parametrize(
    "error",
    [ErrorKind.BAD_REQUEST, 400, 404, 422, ProviderError(400), ProviderError(422)],
    ids=["kind", "400", "404", "422", "exception-400", "exception-422"],
)
def test_bad_request_is_counted_but_never_penalises(make_pool: MakePool, error: object) -> None:
    pool = make_pool(error_threshold=2, circuit_cooldown=5.0)
    add_keys(pool, "a")
    fail_once(pool, ErrorKind.SERVER)  # one consecutive failure before
    for _ in range(4):
        assert fail_once(pool, error).kind is ErrorKind.BAD_REQUEST
    st = pool.stats(P, "a")
    assert st.errors_by_kind == {"server": 1, "bad_request": 4}
    assert st.error_count == 5
    assert st.consecutive_errors == 1
    assert st.status == "active"
    assert st.circuit == "closed"
    assert st.cooldown_until is None
    assert st.is_rate_limited is False
    assert picks(pool, 3) == ["a"] * 3


# --------------------------------------------------------------------------- success


def test_success_resets_consecutive_failures(make_pool: MakePool) -> None:
    pool = make_pool(error_threshold=3, circuit_cooldown=5.0)
    add_keys(pool, "a")
    fail_once(pool, 500)
    fail_once(pool, 502)
    assert pool.stats(P, "a").consecutive_errors == 2
    pool.acquire(P).success()
    st = pool.stats(P, "a")
    assert st.consecutive_errors == 0
    assert st.success_count == 1
    assert st.error_count == 2
    fail_once(pool, 500)
    fail_once(pool, 500)  # two after the success: still below the threshold of three
    st = pool.stats(P, "a")
    assert st.consecutive_errors == 2
    assert st.circuit == "closed"
    assert st.status == "active"


def test_success_resets_the_rate_limit_backoff(make_pool: MakePool) -> None:
    pool = make_pool(rate_limit_cooldown=0.2, rate_limit_max_cooldown=10.0)
    add_keys(pool, "a")
    fail_once(pool, 429)
    wait_until_available(pool, "a")
    fail_once(pool, 429)
    assert cooldown_left(pool, "a") > 0.3  # the second one backed off
    wait_until_available(pool, "a")
    pool.acquire(P).success()
    fail_once(pool, 429)
    assert 0.1 <= cooldown_left(pool, "a") <= 0.21  # back to the first step


# --------------------------------------------------------------------------- API shape


def test_fail_returns_the_classification(pool: KeyPool) -> None:
    add_keys(pool, "a")
    failure = pool.acquire(P).fail(ProviderError(429, {"retry-after": "3"}))
    assert isinstance(failure, Failure)
    assert failure.kind is ErrorKind.RATE_LIMIT
    assert failure.status == 429
    assert failure.retry_after == 3
    assert "sk-live" not in failure.detail

    pool.reset_key(P, "a")
    failure = pool.acquire(P).fail(404)
    assert failure.kind is ErrorKind.BAD_REQUEST
    assert failure.status == 404
    assert failure.retry_after is None


def test_a_second_report_is_a_no_op(pool: KeyPool) -> None:
    add_keys(pool, "a")
    lease = pool.acquire(P)
    lease.success()
    lease.fail(429, retry_after=30)
    st = pool.stats(P, "a")
    assert st.status == "active"
    assert st.success_count == 1
    assert st.error_count == 0


def test_exception_in_with_block_is_reraised_and_cools_the_key(pool: KeyPool) -> None:
    add_keys(pool, "a", "b")
    with pytest.raises(ProviderError) as info, pool.acquire(P) as lease:
        raise ProviderError(429, {"Retry-After": "2"})
    assert info.value.status_code == 429
    st = pool.stats(P, lease.key_id)
    assert lease.closed
    assert st.status == "cooling"
    assert st.errors_by_kind == {"rate_limit": 1}
    assert st.in_flight == 0
    assert 1.7 <= cooldown_left(pool, lease.key_id) <= 2.05
    assert lease.key_id not in picks(pool, 4)


def test_exception_without_status_in_with_block_is_classified(pool: KeyPool) -> None:
    add_keys(pool, "a")
    with pytest.raises(TimeoutError), pool.acquire(P):
        raise TimeoutError("read timed out")
    assert pool.stats(P, "a").errors_by_kind == {"timeout": 1}


# --------------------------------------------------------------------------- NoKeyAvailable


def _cool_two(pool: KeyPool, short: float, long: float) -> tuple[str, str]:
    add_keys(pool, "a", "b")
    first, second = pool.acquire(P), pool.acquire(P)
    assert {first.key_id, second.key_id} == {"a", "b"}
    first.fail(429, retry_after=short)
    second.fail(429, retry_after=long)
    return first.key_id, second.key_id


def test_retry_after_is_the_earliest_cooldown_end(pool: KeyPool) -> None:
    _cool_two(pool, 0.5, 1.0)
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P)
    assert info.value.retry_after is not None
    assert 0.35 <= info.value.retry_after <= 0.51


def test_acquire_with_wait_sleeps_until_the_earliest_key(pool: KeyPool) -> None:
    soon, _late = _cool_two(pool, 0.5, 1.0)
    started = time.monotonic()
    lease = pool.acquire(P, wait=2)
    elapsed = time.monotonic() - started
    assert lease.key_id == soon
    assert 0.4 <= elapsed <= 0.9


def test_acquire_with_short_wait_raises_promptly(pool: KeyPool) -> None:
    add_keys(pool, "a")
    pool.acquire(P).fail(429, retry_after=1.0)
    started = time.monotonic()
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P, wait=0.1)
    elapsed = time.monotonic() - started
    assert elapsed < 0.5
    assert info.value.retry_after is not None
    assert 0.7 <= info.value.retry_after <= 1.01


def test_keys_spread_again_after_cooldowns_end(pool: KeyPool) -> None:
    _cool_two(pool, 0.2, 0.2)
    time.sleep(0.25)
    counts = Counter(picks(pool, 10))
    assert counts == Counter({"a": 5, "b": 5})
