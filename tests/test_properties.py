"""Any input to the public API is either accepted and harmless, or rejected with
``ValueError`` / ``TypeError`` and nothing written (contract sections 2, 9 and 12).

Property-based (Hypothesis) over ``KeyPool`` on the real Redis, in a namespace of the
test's own: before each call the namespace is dumped with a plain client (``SCAN
<namespace>:*`` and a read of each key by its type); a rejected call must leave the dump
unchanged. An accepted call must leave a pool that still works: ``stats()`` and
``snapshot()`` answer, every number they show is finite, a limit reads back as it was
given, a cooldown lasts at most a day (providers' hints are clamped). Reads never write.

The poison values of issue #11 are also spelled out one by one, so each shows up as a
test of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from keypool import (
    ErrorKind,
    KeyPool,
    KeyPoolSettings,
    KeyStats,
    NoKeyAvailable,
    UnknownKey,
)
from keypool.classify import retry_after_from_headers

pytestmark = [pytest.mark.redis]

PROVIDER = "openai"
DAY = 86_400.0
SLACK = 120.0  # seconds of clock and test time around "at most a day"

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    derandomize=True,  # the same examples on every run and machine
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

POISON: list[object] = [
    math.nan,
    math.inf,
    -math.inf,
    10**309,
    10**400,
    2**63,
    2**64,
    2**53 + 1,
    1e306,
    1e308,
    -1,
    -1e-9,
    -0.0,
    0,
    5e-324,
    True,
    "1",
    None,
]
numbers = st.one_of(
    st.sampled_from(POISON),
    st.integers(),
    st.floats(),
    st.integers(min_value=-(2**70), max_value=2**70),
)
# any code point, lone surrogates included
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=70)
names = st.one_of(
    any_text,
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}", fullmatch=True),
    st.sampled_from(["gpt-4o", "\ud800", "a\udfffb", "x" * 257, "", " ", "ok\x00", "é"]),
)


def secret(key_id: str) -> str:
    return f"sk-prop-{key_id}-0123456789abcdef"


def secret_of(provider: str, key_id: str) -> str:
    """A secret of its own for any (provider, key id), whatever characters they hold."""
    digest = hashlib.sha256(repr((provider, key_id)).encode("utf-8", "surrogatepass"))
    return "sk-prop-" + digest.hexdigest()[:32]


# ---------------------------------------------------------------------- the store, dumped


Dump = dict[bytes, tuple[bytes, object]]


def dump(client: redis.Redis, namespace: str) -> Dump:
    """Every key of the namespace and what it holds, read by type."""
    out: Dump = {}
    for name in sorted(client.scan_iter(match=f"{namespace}:*", count=1000)):
        kind = client.type(name)
        value: object
        if kind == b"string":
            value = client.get(name)
        elif kind == b"hash":
            value = sorted(client.hgetall(name).items())
        elif kind == b"set":
            value = sorted(client.smembers(name))
        elif kind == b"zset":
            value = client.zrange(name, 0, -1, withscores=True)
        elif kind == b"list":
            value = client.lrange(name, 0, -1)
        else:
            value = None
        out[name] = (kind, value)
    return out


def changed(before: Dump, after: Dump) -> list[bytes]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


class Rig:
    """A pool in the test's namespace and a plain client to look at what it wrote."""

    def __init__(self, url: str, namespace: str) -> None:
        self.namespace = namespace
        self.pool = KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=namespace))
        self.raw = redis.Redis.from_url(url)

    def dump(self) -> Dump:
        return dump(self.raw, self.namespace)

    def close(self) -> None:
        self.pool.close()
        self.raw.close()

    def settle(self) -> None:
        """Reports sent without waiting reach Redis before the next call of this thread."""
        self.pool.providers()
        self.pool.snapshot()

    def attempt(self, what: str, call: Callable[[], Any], names: tuple[str, ...] = ()) -> bool:
        """Run ``call``. Rejected (ValueError/TypeError): nothing was written, and the
        message names one of ``names``; returns False. Accepted: returns True."""
        self.settle()
        before = self.dump()
        try:
            call()
        except (ValueError, TypeError) as exc:
            after = self.dump()
            assert not changed(before, after), (
                f"{what} was rejected ({type(exc).__name__}: {exc}) but wrote "
                f"{changed(before, after)}"
            )
            if names:
                assert any(n in str(exc) for n in names), (
                    f"{what}: the error does not name {' or '.join(names)}: {exc}"
                )
            return False
        return True

    def assert_harmless(self, what: str) -> list[KeyStats]:
        """stats() and snapshot() answer, with finite numbers and cooldowns of at most a
        day (a quota's exhaustion: a year)."""
        try:
            everything = self.pool.snapshot()
            for s in everything:
                assert self.pool.stats(s.provider, s.key_id) is not None
        except Exception as exc:  # any failure here is the finding
            raise AssertionError(f"after {what}: stats/snapshot failed: {exc!r}") from exc
        now = time.time()
        for s in everything:
            for name, value in s.as_dict().items():
                if isinstance(value, float):
                    assert math.isfinite(value), f"after {what}: {s.key_id}.{name} = {value}"
                if isinstance(value, int) and not isinstance(value, bool):
                    assert value >= 0, f"after {what}: {s.key_id}.{name} = {value}"
            # a quota's reset may lie further ahead (a monthly quota); a year at most
            longest = 366 * DAY if s.status == "exhausted" else DAY
            for name in ("cooldown_until", "available_at"):
                until = getattr(s, name)
                if until is not None and s.status != "disabled":
                    assert until <= now + longest + SLACK, (
                        f"after {what}: {s.key_id} ({s.status}) unavailable for "
                        f"{until - now:.0f}s ({name}), more than {longest:.0f}s"
                    )
        return everything

    def fresh_lease(self) -> Any:
        """A lease on the key ``k1`` (reset first, so earlier examples do not block it)."""
        self.pool.reset_key(PROVIDER, "k1")
        return self.pool.acquire(PROVIDER)


@pytest.fixture
def rig(redis_url: str, namespace: str) -> Iterator[Rig]:
    running = Rig(redis_url, namespace)
    try:
        yield running
    finally:
        running.close()


# ---------------------------------------------------------------------- numbers


LIMITS = ("weight", "rpm", "tpm", "rpd", "max_concurrency")


@PROPERTY
@given(arg=st.sampled_from(LIMITS), value=numbers)
@example(arg="rpm", value=10**400)
@example(arg="rpm", value=2**53 + 1)
@example(arg="weight", value=1e308)
def test_add_key_stores_each_number_as_given_or_refuses_it(
    rig: Rig, arg: str, value: object
) -> None:
    what = f"add_key({arg}={value!r})"
    if not rig.attempt(
        what, lambda: rig.pool.add_key(PROVIDER, "k1", secret("k1"), **{arg: value}), (arg,)
    ):
        return
    stats = rig.assert_harmless(what)
    [k1] = [s for s in stats if s.key_id == "k1"]
    stored = k1.weight if arg == "weight" else getattr(k1, arg)
    expected = float(value) if arg == "weight" else value  # type: ignore[arg-type]
    assert stored == expected, f"{what} stored {arg}={stored!r}"
    with contextlib.suppress(NoKeyAvailable):  # the key still serves, or says when
        rig.pool.acquire(PROVIDER).release()
    rig.assert_harmless(what + " then acquire")


@PROPERTY
@given(tokens=numbers, wait=st.one_of(st.none(), numbers))
@example(tokens=10**309, wait=None)
@example(tokens=2**63, wait=None)
def test_acquire_takes_any_tokens_and_wait_harmlessly_or_refuses_them(
    rig: Rig, tokens: object, wait: object
) -> None:
    rig.pool.add_key(PROVIDER, "k1", secret("k1"), tpm=10_000)
    rig.pool.reset_key(PROVIDER, "k1")
    what = f"acquire(tokens={tokens!r}, wait={wait!r})"
    leases: list[Any] = []

    def call() -> None:
        with contextlib.suppress(NoKeyAvailable):
            leases.append(rig.pool.acquire(PROVIDER, tokens=tokens, wait=wait))  # type: ignore[arg-type]

    if rig.attempt(what, call, ("tokens", "wait")):
        rig.assert_harmless(what)
        for lease in leases:
            lease.release()
        rig.assert_harmless(what + " then release")


REPORTS: dict[str, Callable[[Any, Any, object], Any]] = {
    "success(tokens)": lambda pool, lease, v: lease.success(tokens=v),
    "success(latency)": lambda pool, lease, v: lease.success(latency=v),
    "success(input_tokens)": lambda pool, lease, v: lease.success(input_tokens=v),
    "success(output_tokens)": lambda pool, lease, v: lease.success(output_tokens=v),
    "fail(429, retry_after)": lambda pool, lease, v: lease.fail(429, retry_after=v),
    "fail(quota, retry_after)": lambda pool, lease, v: lease.fail(ErrorKind.QUOTA, retry_after=v),
    "fail(500, retry_after)": lambda pool, lease, v: lease.fail(500, retry_after=v),
    "renew(ttl)": lambda pool, lease, v: lease.renew(v),
    "mark_success(tokens)": lambda pool, lease, v: pool.mark_success(PROVIDER, "k1", tokens=v),
    "mark_success(latency)": lambda pool, lease, v: pool.mark_success(PROVIDER, "k1", latency=v),
    "mark_failure(retry_after)": lambda pool, lease, v: pool.mark_failure(
        PROVIDER, "k1", 429, retry_after=v
    ),
}
ARG_NAMES = {
    "success(tokens)": ("tokens",),
    "success(latency)": ("latency",),
    "success(input_tokens)": ("input_tokens", "tokens"),
    "success(output_tokens)": ("output_tokens", "tokens"),
    "renew(ttl)": ("ttl",),
    "mark_success(tokens)": ("tokens",),
    "mark_success(latency)": ("latency",),
}


@PROPERTY
@given(report=st.sampled_from(sorted(REPORTS)), value=numbers)
@example(report="success(latency)", value=math.nan)
@example(report="fail(429, retry_after)", value=1e306)
@example(report="renew(ttl)", value=1e306)
def test_reports_take_any_number_harmlessly_or_refuse_it(
    rig: Rig, report: str, value: object
) -> None:
    rig.pool.add_key(PROVIDER, "k1", secret("k1"))
    lease = rig.fresh_lease()
    what = f"{report} with {value!r}"
    accepted = rig.attempt(
        what,
        lambda: REPORTS[report](rig.pool, lease, value),
        ARG_NAMES.get(report, ("retry_after",)),
    )
    rig.assert_harmless(what)
    if not accepted:
        assert not lease.closed, f"{what} was refused but closed the lease"
    lease.release()
    rig.assert_harmless(what + " then release")


@PROPERTY
@given(
    header=st.sampled_from(["Retry-After", "retry-after-ms", "x-ratelimit-reset-requests"]),
    value=st.one_of(numbers.map(str), st.text(max_size=12)),
)
@example(header="Retry-After", value="1e308")
@example(header="Retry-After", value="99999999999")
def test_provider_cooldown_hints_are_clamped_to_a_day(rig: Rig, header: str, value: str) -> None:
    """A provider's header is not the caller's input: it never raises, and whatever it
    says, the key cools for at most a day."""
    rig.pool.add_key(PROVIDER, "k1", secret("k1"))
    lease = rig.fresh_lease()
    what = f"fail(429, headers={{{header!r}: {value!r}}})"
    try:
        lease.fail(429, headers={header: value})
    except Exception as exc:
        raise AssertionError(f"{what} raised {exc!r}") from exc
    [k1] = rig.assert_harmless(what)
    hint = retry_after_from_headers({header: value})
    if hint is None or hint >= 1:  # a hint of "now" (0, a past date) may leave it active
        assert k1.status == "cooling", f"{what}: the 429 did not cool the key ({k1.status})"


# ---------------------------------------------------------------------- text


@PROPERTY
@given(provider=names, key_id=names, model=names)
@example(provider="openai", key_id="k1", model="gpt\ud800")
@example(provider="openai", key_id="k\udfff", model="gpt-4o")
def test_names_are_accepted_whole_or_refused_with_nothing_written(
    rig: Rig, provider: str, key_id: str, model: str
) -> None:
    what = f"add_key({provider!r}, {key_id!r}, models=[{model!r}])"
    if rig.attempt(
        what,
        lambda: rig.pool.add_key(provider, key_id, secret_of(provider, key_id), models=[model]),
        ("provider", "key_id", "model"),
    ):
        rig.assert_harmless(what)
        assert model in rig.pool.stats(provider, key_id).models
        with contextlib.suppress(NoKeyAvailable):
            rig.pool.acquire(provider, model=model).release()
    if rig.attempt(
        f"assign_model({model!r})",
        lambda: rig.pool.assign_model(model, PROVIDER, "k1"),
        ("model",),
    ):
        rig.assert_harmless(f"assign_model({model!r})")

    def acquire_model() -> None:
        with contextlib.suppress(NoKeyAvailable):
            rig.pool.acquire(PROVIDER, model=model).release()

    rig.pool.add_key(PROVIDER, "k1", secret("k1"))
    if rig.attempt(f"acquire(model={model!r})", acquire_model, ("model",)):
        rig.assert_harmless(f"acquire(model={model!r})")


@PROPERTY
@given(provider=names, key_id=names)
@example(provider="nosuchprovider", key_id="k1")
def test_reading_stats_and_snapshots_never_writes(rig: Rig, provider: str, key_id: str) -> None:
    rig.pool.add_key(PROVIDER, "k1", secret("k1"))
    rig.settle()
    before = rig.dump()
    for read in (
        lambda: rig.pool.stats(provider, key_id),
        lambda: rig.pool.snapshot(provider),
        lambda: rig.pool.stats(PROVIDER, key_id),
    ):
        with contextlib.suppress(UnknownKey, ValueError, TypeError):
            read()
    after = rig.dump()
    assert not changed(before, after), (
        f"reading stats/snapshot of ({provider!r}, {key_id!r}) wrote {changed(before, after)}"
    )


# ---------------------------------------------------------------------- issue #11, one by one


POISON_CALLS: dict[str, tuple[Callable[[KeyPool, Any], Any], str]] = {
    "success(latency=nan)": (lambda pool, lease: lease.success(latency=math.nan), "latency"),
    "success(latency=inf)": (lambda pool, lease: lease.success(latency=math.inf), "latency"),
    "acquire(tokens=10**309)": (
        lambda pool, lease: pool.acquire(PROVIDER, tokens=10**309),
        "tokens",
    ),
    "add_key(rpm=10**400)": (
        lambda pool, lease: pool.add_key(PROVIDER, "k2", secret("k2"), rpm=10**400),
        "rpm",
    ),
    "renew(1e306)": (lambda pool, lease: lease.renew(1e306), "ttl"),
    "mark_failure(retry_after=nan)": (
        lambda pool, lease: pool.mark_failure(PROVIDER, "k1", 429, retry_after=math.nan),
        "retry_after",
    ),
}


@pytest.mark.parametrize("call", sorted(POISON_CALLS))
def test_poison_number_is_refused_naming_the_argument_with_nothing_written(
    rig: Rig, call: str
) -> None:
    rig.pool.add_key(PROVIDER, "k1", secret("k1"))
    lease = rig.pool.acquire(PROVIDER)
    fn, name = POISON_CALLS[call]
    rig.settle()
    before = rig.dump()
    with pytest.raises(ValueError, match=name):
        fn(rig.pool, lease)
    assert not changed(before, rig.dump())
    rig.assert_harmless(call)
    lease.release()


@pytest.mark.parametrize("retry_after", [1e306, 1e12, 99999999999.0])
def test_huge_retry_after_is_refused_or_clamped_to_a_day(rig: Rig, retry_after: float) -> None:
    """``fail(retry_after=...)``: a number out of range is either refused (ValueError
    naming retry_after, nothing written) or taken as the longest cooldown, one day."""
    rig.pool.add_key(PROVIDER, "k1", secret("k1"))
    lease = rig.pool.acquire(PROVIDER)
    what = f"fail(429, retry_after={retry_after!r})"
    if rig.attempt(what, lambda: lease.fail(429, retry_after=retry_after), ("retry_after",)):
        [k1] = rig.assert_harmless(what)
        assert k1.status == "cooling"
    else:
        lease.release()
        rig.assert_harmless(what)


def test_stats_of_an_unknown_provider_writes_nothing(rig: Rig) -> None:
    rig.pool.add_key(PROVIDER, "k1", secret("k1"))
    rig.settle()
    before = rig.dump()
    with pytest.raises(UnknownKey):
        rig.pool.stats("nosuchprovider", "k1")
    assert rig.pool.snapshot("nosuchprovider") == []
    assert not changed(before, rig.dump())


def test_a_model_name_with_a_lone_surrogate_registers_nothing(rig: Rig) -> None:
    rig.settle()
    before = rig.dump()
    with pytest.raises(ValueError, match="model"):
        rig.pool.add_key(PROVIDER, "k1", secret("k1"), models=["gpt-\ud800"])
    assert not changed(before, rig.dump()), "a refused key was half-registered"
