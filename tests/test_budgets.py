"""Per-key budgets (rpm, tpm, rpd), concurrency limits, lease expiry and the strategies that
look at load and latency, on every store."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from keypool import KeyPool, Lease, NoKeyAvailable, Provider

P = Provider.OPENAI
MakePool = Callable[..., KeyPool]


def add_keys(pool: KeyPool, *ids: str, **limits: Any) -> None:
    for key_id in ids:
        pool.add_key(P, key_id, f"sk-secret-{key_id}-0123456789", **limits)


def no_key(pool: KeyPool, **kwargs: Any) -> NoKeyAvailable:
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(P, **kwargs)
    return info.value


# --------------------------------------------------------------------------- rpm


def test_rpm_admits_the_limit_at_once_then_says_when(pool: KeyPool) -> None:
    add_keys(pool, "a", rpm=5)
    leases = [pool.acquire(P) for _ in range(5)]
    assert [lease.key_id for lease in leases] == ["a"] * 5
    for lease in leases:
        lease.success()
    err = no_key(pool)
    assert err.retry_after is not None
    assert 11.0 <= err.retry_after <= 12.1  # one request refills every 60/5 s
    st = pool.stats(P, "a")
    assert st.rpm_left == 0
    assert st.status == "cooling"
    assert st.is_rate_limited is True
    assert st.total_requests == 5


def test_rpm_spent_key_is_skipped_while_another_has_room(pool: KeyPool) -> None:
    add_keys(pool, "small", rpm=5)
    add_keys(pool, "big", rpm=100)
    order = []
    for _ in range(30):
        lease = pool.acquire(P)
        order.append(lease.key_id)
        lease.success()
    counts = Counter(order)
    assert counts == Counter({"small": 5, "big": 25})
    last_small = max(i for i, key in enumerate(order) if key == "small")
    assert all(key == "big" for key in order[last_small + 1 :])
    assert pool.stats(P, "small").rpm_left == 0
    assert pool.stats(P, "big").rpm_left == 75


# --------------------------------------------------------------------------- tpm


def test_tpm_reserves_the_estimate(pool: KeyPool) -> None:
    add_keys(pool, "a", tpm=1000)
    first = pool.acquire(P, tokens=400)
    second = pool.acquire(P, tokens=400)
    left = pool.stats(P, "a").tpm_left
    assert left is not None
    assert 200 <= left <= 202
    err = no_key(pool, tokens=400)
    assert err.retry_after is not None
    assert 11.0 <= err.retry_after <= 12.1  # 200 more tokens refill in 12 s
    small = pool.acquire(P, tokens=200)  # what is left still fits
    small.success()
    first.success()
    second.success()


def test_tpm_success_gives_back_what_was_not_used(pool: KeyPool) -> None:
    add_keys(pool, "a", tpm=1000)
    first = pool.acquire(P, tokens=400)
    pool.acquire(P, tokens=400)
    no_key(pool, tokens=400)
    first.success(tokens=100)  # 300 of the 400 reserved come back
    left = pool.stats(P, "a").tpm_left
    assert left is not None
    assert 500 <= left <= 502
    third = pool.acquire(P, tokens=400)
    assert third.key_id == "a"
    left = pool.stats(P, "a").tpm_left
    assert left is not None
    assert 100 <= left <= 102
    assert pool.stats(P, "a").tokens_used == 100


def test_tpm_success_charges_the_overrun(pool: KeyPool) -> None:
    add_keys(pool, "a", tpm=1000)
    lease = pool.acquire(P, tokens=100)
    left = pool.stats(P, "a").tpm_left
    assert left is not None
    assert 900 <= left <= 902
    lease.success(tokens=900)
    left = pool.stats(P, "a").tpm_left
    assert left is not None
    assert 100 <= left <= 102
    assert pool.stats(P, "a").tokens_used == 900
    err = no_key(pool, tokens=200)
    assert err.retry_after is not None
    assert err.retry_after > 0
    pool.acquire(P, tokens=100).success(tokens=100)


def test_tokens_larger_than_tpm_can_never_fit(pool: KeyPool) -> None:
    add_keys(pool, "a", tpm=1000)
    err = no_key(pool, tokens=1001)
    assert err.retry_after is None
    st = pool.stats(P, "a")
    assert st.total_requests == 0
    assert st.tpm_left == 1000
    assert st.status == "active"  # smaller requests are still served
    pool.acquire(P, tokens=1000).success()


def test_tokens_larger_than_one_key_go_to_a_key_that_can_take_them(pool: KeyPool) -> None:
    add_keys(pool, "small", tpm=1000)
    add_keys(pool, "big", tpm=100_000)
    for _ in range(4):
        lease = pool.acquire(P, tokens=5000)
        assert lease.key_id == "big"
        lease.success()


# --------------------------------------------------------------------------- rpd


def test_rpd_exhausts_the_key_for_the_day(pool: KeyPool) -> None:
    add_keys(pool, "a", rpd=3)
    for _ in range(3):
        pool.acquire(P).success()
    st = pool.stats(P, "a")
    assert st.status == "exhausted"
    assert st.rpd_left == 0
    assert st.is_rate_limited is True
    err = no_key(pool)
    assert err.retry_after is not None
    assert 28_700 <= err.retry_after <= 28_800.1  # a day / 3


def test_rpd_spent_key_leaves_the_rotation(pool: KeyPool) -> None:
    add_keys(pool, "daily", rpd=2)
    add_keys(pool, "free")
    counts = Counter()
    for _ in range(10):
        lease = pool.acquire(P)
        counts[lease.key_id] += 1
        lease.success()
    assert counts == Counter({"daily": 2, "free": 8})


# --------------------------------------------------------------------------- budgets in stats


def test_budgets_left_in_stats_decrease(pool: KeyPool) -> None:
    add_keys(pool, "a", rpm=10, tpm=1000, rpd=100)
    add_keys(pool, "plain")
    st = pool.stats(P, "a")
    assert (st.rpm, st.tpm, st.rpd) == (10, 1000, 100)
    assert (st.rpm_left, st.tpm_left, st.rpd_left) == (10, 1000, 100)
    plain = pool.stats(P, "plain")
    assert (plain.rpm_left, plain.tpm_left, plain.rpd_left) == (None, None, None)

    leases = []
    for n in range(1, 4):
        lease = pool.acquire(P, tokens=250)
        while lease.key_id != "a":  # round robin alternates: put the other key's pick back
            lease.release()
            lease = pool.acquire(P, tokens=250)
        leases.append(lease)
        st = pool.stats(P, "a")
        assert st.rpm_left == 10 - n
        assert st.tpm_left is not None
        # the bucket refills ~17 tokens a second: allow for the test's own run time
        assert 1000 - 250 * n <= st.tpm_left <= 1000 - 250 * n + 5
        assert st.rpd_left == 100 - n
        assert st.in_flight == n
        assert st.status == "active"
    for lease in leases:
        lease.success()
    assert pool.stats(P, "a").in_flight == 0


# --------------------------------------------------------------------------- concurrency


def test_max_concurrency_limits_open_leases(make_pool: MakePool) -> None:
    pool = make_pool(lease_ttl=0.5)
    add_keys(pool, "a", max_concurrency=2)
    first, second = pool.acquire(P), pool.acquire(P)
    st = pool.stats(P, "a")
    assert st.in_flight == 2
    assert st.max_concurrency == 2
    err = no_key(pool)
    assert err.retry_after is not None
    assert 0.3 <= err.retry_after <= 0.51  # when the oldest lease would expire
    first.success()  # frees a slot at once
    third = pool.acquire(P)
    assert third.key_id == "a"
    no_key(pool)
    second.fail(500)
    third.release()
    assert pool.stats(P, "a").in_flight == 0
    assert [pool.acquire(P).key_id for _ in range(2)] == ["a", "a"]


def test_full_key_is_skipped_for_one_with_room(pool: KeyPool) -> None:
    add_keys(pool, "narrow", max_concurrency=1)
    add_keys(pool, "wide")
    held = [pool.acquire(P) for _ in range(6)]
    counts = Counter(lease.key_id for lease in held)
    assert counts == Counter({"narrow": 1, "wide": 5})


def test_unreported_lease_frees_after_the_ttl(make_pool: MakePool) -> None:
    pool = make_pool(lease_ttl=0.5)
    add_keys(pool, "a", max_concurrency=2)
    pool.acquire(P)
    pool.acquire(P)
    no_key(pool)
    time.sleep(0.55)
    assert pool.stats(P, "a").in_flight == 0
    assert pool.acquire(P).key_id == "a"
    assert pool.acquire(P).key_id == "a"
    no_key(pool)


def test_renew_extends_a_lease(make_pool: MakePool) -> None:
    pool = make_pool(lease_ttl=0.5)
    add_keys(pool, "a", max_concurrency=2)
    kept, dropped = pool.acquire(P), pool.acquire(P)
    time.sleep(0.3)
    assert kept.renew() is True  # now + 0.5 s
    time.sleep(0.3)  # `dropped` expired, `kept` did not
    assert pool.stats(P, "a").in_flight == 1
    newer = pool.acquire(P)
    err = no_key(pool)  # kept + newer
    assert err.retry_after is not None
    assert kept.renew(2.0) is True
    time.sleep(0.6)  # newer expired; kept lives on
    assert pool.stats(P, "a").in_flight == 1
    assert dropped.renew() is False  # it expired
    kept.success()
    assert kept.renew() is False  # reported
    assert pool.stats(P, "a").in_flight == 0
    newer.release()  # its lease expired: a no-op, nothing breaks
    assert pool.stats(P, "a").in_flight == 0


# --------------------------------------------------------------------------- strategies


def test_least_busy_picks_the_key_with_fewest_in_flight(pool: KeyPool) -> None:
    add_keys(pool, "a", "b", "c")
    held: dict[str, list[Lease]] = {"a": [], "b": [], "c": []}
    for _ in range(6):
        lease = pool.acquire(P)
        held[lease.key_id].append(lease)
    assert [len(held[k]) for k in "abc"] == [2, 2, 2]
    for lease in held["c"]:
        lease.success()
    held["b"][0].success()  # in flight now: a 2, b 1, c 0

    first = pool.acquire(P, strategy="least_busy")
    assert first.key_id == "c"
    second = pool.acquire(P, strategy="least_busy")
    third = pool.acquire(P, strategy="least_busy")
    assert {second.key_id, third.key_id} == {"b", "c"}
    assert [pool.stats(P, k).in_flight for k in "abc"] == [2, 2, 2]


def test_least_busy_follows_releases(pool: KeyPool) -> None:
    add_keys(pool, "a", "b")
    leases = []
    for _ in range(3):
        lease = pool.acquire(P, strategy="least_busy")
        leases.append(lease)
    # three leases over two keys by fewest in-flight: 2 on one key, 1 on the other
    counts = Counter(lease.key_id for lease in leases)
    assert sorted(counts.values()) == [1, 2]
    busier = counts.most_common(1)[0][0]
    for lease in leases:
        if lease.key_id == busier:
            lease.release()
    # the formerly busier key now has none in flight
    assert pool.acquire(P, strategy="least_busy").key_id == busier


def test_latency_prefers_the_lowest_moving_average(pool: KeyPool) -> None:
    add_keys(pool, "a", "b", "c")
    reported = {"a": 0.5, "b": 0.1, "c": 0.3}
    seen = set()
    while seen != set(reported):
        lease = pool.acquire(P)
        if lease.key_id in seen:
            lease.release()
            continue
        seen.add(lease.key_id)
        lease.success(latency=reported[lease.key_id])
    assert pool.stats(P, "b").latency_ms == pytest.approx(100.0, abs=0.01)

    chosen = []
    for _ in range(5):
        lease = pool.acquire(P, strategy="latency")
        chosen.append(lease.key_id)
        lease.release()
    assert chosen == ["b"] * 5

    lease = pool.acquire(P, strategy="latency")
    assert lease.key_id == "b"
    lease.success(latency=2.0)  # moving average of b: 0.1*0.8 + 2.0*0.2 = 0.48 s
    assert pool.stats(P, "b").latency_ms == pytest.approx(480.0, abs=0.01)
    lease = pool.acquire(P, strategy="latency")
    assert lease.key_id == "c"
    lease.release()


def test_latency_tries_keys_without_reports(pool: KeyPool) -> None:
    add_keys(pool, "a", "b")
    for key, seconds in (("a", 0.2), ("b", 0.4)):
        lease = pool.acquire(P)
        while lease.key_id != key:
            lease.release()
            lease = pool.acquire(P)
        lease.success(latency=seconds)
    add_keys(pool, "fresh")
    lease = pool.acquire(P, strategy="latency")
    assert lease.key_id == "fresh"  # never measured: it gets tried
    lease.success(latency=1.0)
    assert pool.stats(P, "fresh").latency_ms == pytest.approx(1000.0, abs=0.01)
    lease = pool.acquire(P, strategy="latency")
    assert lease.key_id == "a"
    lease.release()
