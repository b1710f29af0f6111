"""Provider-shaped limits: accounts, limit scopes (key, key·model, account, account·model),
input and output tokens, cooldowns scoped like the limit that was hit."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from keypool import KeyPool, NoKeyAvailable
from tests import scope_workers
from tests.scope_workers import ACCOUNT, KEYS, PROVIDER, secret_for
from tests.test_multiprocess import run_workers

CTX = multiprocessing.get_context("spawn")


def two_keys(pool: KeyPool) -> None:
    for key_id in KEYS:
        pool.add_key(PROVIDER, key_id, secret_for(key_id), account=ACCOUNT)


# ---------------------------------------------------------------------- on every store


def test_an_account_limit_is_shared_by_its_keys(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool()
    two_keys(pool)
    pool.set_limits(PROVIDER, account=ACCOUNT, rpm=4)
    admitted = Counter()
    for _ in range(10):
        try:
            with pool.acquire(PROVIDER) as lease:
                admitted[lease.key_id] += 1
        except NoKeyAvailable as exc:
            assert exc.retry_after is not None and 0 < exc.retry_after <= 15.01
    assert sum(admitted.values()) == 4, admitted  # not 4 per key
    assert set(admitted) == set(KEYS)  # still rotated
    [scope] = pool.scopes(PROVIDER)
    assert (scope.scope, scope.account, scope.limits, scope.left) == (
        "account",
        ACCOUNT,
        {"rpm": 4},
        {"rpm": 0},
    )
    assert pool.stats(PROVIDER, "k1").account == ACCOUNT


def test_an_account_model_limit_binds_that_model_only(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool()
    two_keys(pool)
    pool.set_limits(PROVIDER, account=ACCOUNT, model="gpt-4o", rpm=3)
    got = 0
    for _ in range(6):
        try:
            pool.acquire(PROVIDER, model="gpt-4o").success()
            got += 1
        except NoKeyAvailable:
            pass
    assert got == 3
    for _ in range(6):  # another model of the same account is not limited
        pool.acquire(PROVIDER, model="gpt-4o-mini").success()


def test_a_rate_limit_for_a_model_cools_the_key_for_that_model_only(
    make_pool: Callable[..., KeyPool],
) -> None:
    pool = make_pool()
    pool.add_key(PROVIDER, "only", secret_for("only"))
    lease = pool.acquire(PROVIDER, model="gpt-4o")
    lease.fail(429, retry_after=30)
    with pytest.raises(NoKeyAvailable) as none:
        pool.acquire(PROVIDER, model="gpt-4o")
    assert none.value.retry_after is not None and 25 < none.value.retry_after <= 30.01
    with pool.acquire(PROVIDER, model="gpt-4o-mini") as other:
        assert other.key_id == "only"
    with pool.acquire(PROVIDER) as any_model:
        assert any_model.key_id == "only"
    stats = pool.stats(PROVIDER, "only")
    assert stats.status == "active"
    assert set(stats.cooling_models) == {"gpt-4o"}
    assert stats.cooling_models["gpt-4o"] > time.time() + 25


def test_a_failure_naming_a_wider_scope_cools_it(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool()
    two_keys(pool)
    lease = pool.acquire(PROVIDER, model="gpt-4o")
    with pytest.raises(ValueError, match="galaxy"):
        lease.fail(429, retry_after=30, scope="galaxy")
    assert not lease.closed  # refused before anything was sent
    lease.fail(429, retry_after=30, scope="key")
    cooled = [s for s in pool.snapshot(PROVIDER) if s.status == "cooling"]
    assert len(cooled) == 1
    with pool.acquire(PROVIDER, model="gpt-4o-mini") as lease:
        assert lease.key_id != cooled[0].key_id
    pool.acquire(PROVIDER).fail(429, retry_after=30, scope="account")
    with pytest.raises(NoKeyAvailable):
        pool.acquire(PROVIDER)
    assert {s.status for s in pool.snapshot(PROVIDER)} == {"cooling"}


def test_a_quota_cools_the_whole_account(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool()
    two_keys(pool)
    pool.add_key(PROVIDER, "solo", secret_for("solo"))
    while True:  # a lease on a key of the account
        lease = pool.acquire(PROVIDER, model="gpt-4o")
        if lease.key_id in KEYS:
            break
        lease.success()
    lease.fail("quota", retry_after=600)
    by_id = {s.key_id: s for s in pool.snapshot(PROVIDER)}
    assert by_id["solo"].status == "active"
    assert by_id["k1"].status == by_id["k2"].status == "exhausted"
    for _ in range(3):
        with pool.acquire(PROVIDER) as other:
            assert other.key_id == "solo"


def test_input_and_output_token_limits_bind_independently(
    make_pool: Callable[..., KeyPool],
) -> None:
    pool = make_pool()
    pool.add_key(PROVIDER, "k", secret_for("k"))
    pool.set_limits(PROVIDER, key_id="k", itpm=1000, otpm=100)
    pool.acquire(PROVIDER, input_tokens=900, output_tokens=10).success(
        input_tokens=900, output_tokens=10
    )
    with pytest.raises(NoKeyAvailable) as no_input:  # input budget: 100 left
        pool.acquire(PROVIDER, input_tokens=200, output_tokens=10)
    assert no_input.value.retry_after is not None
    pool.acquire(PROVIDER, input_tokens=50, output_tokens=80).success()
    with pytest.raises(NoKeyAvailable):  # output budget: 10 left
        pool.acquire(PROVIDER, input_tokens=10, output_tokens=50)
    stats = pool.stats(PROVIDER, "k")
    assert (stats.itpm, stats.otpm) == (1000, 100)
    assert stats.itpm_left is not None and stats.itpm_left <= 60
    assert stats.otpm_left is not None and stats.otpm_left <= 12
    assert (stats.tokens_in, stats.tokens_out) == (950, 90)


def test_set_limits_rejects_bad_calls_with_nothing_written(
    make_pool: Callable[..., KeyPool],
) -> None:
    pool = make_pool()
    pool.add_key(PROVIDER, "k", secret_for("k"))
    for call in (
        lambda: pool.set_limits(PROVIDER, rpm=1),  # no scope
        lambda: pool.set_limits(PROVIDER, key_id="k", account="a", rpm=1),  # two scopes
        lambda: pool.set_limits(PROVIDER, key_id="k"),  # no limit
        lambda: pool.set_limits(PROVIDER, account="bad:name", rpm=1),
        lambda: pool.set_limits(PROVIDER, account="a", rpm=-1),
        lambda: pool.set_limits(PROVIDER, account="a", itpm=10**13),
        lambda: pool.set_limits(PROVIDER, account="a", model="", rpm=1),
    ):
        with pytest.raises((ValueError, TypeError)):
            call()
    assert pool.scopes(PROVIDER) == []
    with pytest.raises(Exception, match="no key"):
        pool.set_limits(PROVIDER, key_id="nope", rpm=1)


# ---------------------------------------------------------------------- a fleet


@pytest.fixture
def fleet(redis_url: str, namespace: str) -> Iterator[KeyPool]:
    pool = scope_workers.pool_with_keys(redis_url, namespace)
    yield pool
    pool.close()


def test_four_processes_share_an_account_model_budget(
    redis_url: str, namespace: str, fleet: KeyPool
) -> None:
    """Two keys of one account, an account rpm of 12 for gpt-4o: four processes together are
    admitted 12 (plus what refills meanwhile), not 12 per key."""
    fleet.set_limits(PROVIDER, account=ACCOUNT, model="gpt-4o", rpm=12)
    barrier = CTX.Barrier(4)
    results = run_workers(
        [(scope_workers.burst, (redis_url, namespace, barrier, "gpt-4o", 10, (0, 0)))] * 4
    )
    times = sorted(t for r in results for _, t in r["admitted"])
    keys = Counter(k for r in results for k, _ in r["admitted"])
    span = times[-1] - times[0]
    assert 12 <= len(times) <= 12 + 12 * span / 60 + 1e-9, (len(times), span)
    assert set(keys) == set(KEYS)
    [scope] = fleet.scopes(PROVIDER)
    assert scope.model == "gpt-4o" and scope.limits == {"rpm": 12}


def test_four_processes_keep_itpm_and_otpm_apart(
    redis_url: str, namespace: str, fleet: KeyPool
) -> None:
    """An account's ITPM of 4,000 and OTPM of 400: input-heavy requests stop at the input
    limit, output-heavy ones at the output limit, each by itself."""
    fleet.set_limits(PROVIDER, account=ACCOUNT, itpm=4000, otpm=400)
    barrier = CTX.Barrier(4)
    calls = [
        (scope_workers.burst, (redis_url, namespace, barrier, "claude", 10, (500, 10))),
        (scope_workers.burst, (redis_url, namespace, barrier, "claude", 10, (500, 10))),
        (scope_workers.burst, (redis_url, namespace, barrier, "claude", 10, (10, 50))),
        (scope_workers.burst, (redis_url, namespace, barrier, "claude", 10, (10, 50))),
    ]
    results = run_workers(calls)
    input_heavy = sum(len(r["admitted"]) for r in results[:2])
    output_heavy = sum(len(r["admitted"]) for r in results[2:])
    total_in = input_heavy * 500 + output_heavy * 10
    total_out = input_heavy * 10 + output_heavy * 50
    assert total_in <= 4000 + 4000 * 5 / 60, total_in  # a few seconds of refill at most
    assert total_out <= 400 + 400 * 5 / 60, total_out
    # each kind got its share, and one of the two budgets was what stopped them
    assert input_heavy >= 4 and output_heavy >= 4, (input_heavy, output_heavy)
    assert total_in >= 3500 or total_out >= 350, (total_in, total_out)
    [scope] = fleet.scopes(PROVIDER)
    assert scope.limits == {"itpm": 4000, "otpm": 400}


def test_a_429_for_one_model_leaves_the_key_serving_others_across_processes(
    redis_url: str, namespace: str, fleet: KeyPool
) -> None:
    barrier = CTX.Barrier(4)
    calls = [(scope_workers.cool_then_serve, (redis_url, namespace, barrier, "cooler"))] + [
        (scope_workers.cool_then_serve, (redis_url, namespace, barrier, "user"))
    ] * 3
    results = run_workers(calls)
    for seen in results[1:]:
        assert "k1" not in seen["gpt-4o"], seen  # cooled for gpt-4o in every process ...
    # ... and still serving gpt-4o-mini to the fleet (which process gets it is a race: the
    # three share one rotation)
    assert any("k1" in seen["gpt-4o-mini"] for seen in results[1:]), results
    assert set(fleet.stats(PROVIDER, "k1").cooling_models) == {"gpt-4o"}


class _ProjectLimit(Exception):
    """Shaped like google-genai's error for a per-project limit (every model)."""

    status_code = 429
    details = {"error": {"details": [{"violations": [{"quotaId": "RequestsPerMinutePerProject"}]}]}}


def test_a_limit_the_provider_names_cools_its_scope(make_pool: Callable[..., KeyPool]) -> None:
    """A 429 that says the project's limit (not the model's) was hit cools the account."""
    pool = make_pool()
    two_keys(pool)
    pool.acquire(PROVIDER, model="gemini-flash").fail(_ProjectLimit("quota"), retry_after=30)
    with pytest.raises(NoKeyAvailable):
        pool.acquire(PROVIDER, model="gemini-pro")  # another model: the account is cooling
    assert {s.status for s in pool.snapshot(PROVIDER)} == {"cooling"}
    [scope] = pool.scopes(PROVIDER)
    assert (scope.scope, scope.account, scope.unavailable_reason) == (
        "account",
        ACCOUNT,
        "rate_limit",
    )


def test_removing_a_key_with_open_leases_frees_its_account_slots(
    make_pool: Callable[..., KeyPool],
) -> None:
    pool = make_pool()
    two_keys(pool)
    pool.set_limits(PROVIDER, account=ACCOUNT, max_concurrency=2)
    held = [pool.acquire(PROVIDER), pool.acquire(PROVIDER)]
    with pytest.raises(NoKeyAvailable):
        pool.acquire(PROVIDER)  # the account's two slots are taken
    [scope] = pool.scopes(PROVIDER)
    assert scope.in_flight == 2
    pool.remove_key(PROVIDER, held[0].key_id)
    [scope] = pool.scopes(PROVIDER)
    assert scope.in_flight == 1  # the removed key's lease no longer holds a slot
    with pool.acquire(PROVIDER) as lease:
        assert lease.key_id == held[1].key_id
    assert [s.key_id for s in pool.snapshot(PROVIDER)] == [held[1].key_id]  # gone for good


def test_an_account_slot_given_back_serves_at_once(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool()
    two_keys(pool)
    pool.set_limits(PROVIDER, account=ACCOUNT, max_concurrency=1)
    pool.set_limits(PROVIDER, account=ACCOUNT, model="m", max_concurrency=1)
    for model in (None, "m"):
        first = pool.acquire(PROVIDER, model=model)
        with pytest.raises(NoKeyAvailable) as full:
            pool.acquire(PROVIDER, model=model)
        assert full.value.retry_after is not None  # when the lease would expire
        first.success()
        with pool.acquire(PROVIDER, model=model) as again:  # not at that expiry: now
            assert again.key_id in KEYS
