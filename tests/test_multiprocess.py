"""Several spawned processes share one pool on a real Redis and behave exactly like one.

Each worker (see ``tests/mp_workers.py``) builds its own ``KeyPool`` and registers the same
keys with the same secrets, as every process of a fleet does in the default mode. A start
barrier makes them contend at the same moment; results come back through a queue.
Wall-clock times recorded by the workers are only used as outer bounds of when things
happened in Redis (same machine, same clock), never to assert on speed.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from keypool import KeyPool, KeyPoolSettings, NoKeyAvailable
from tests import mp_workers
from tests.mp_workers import PROVIDER, secret_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CTX = multiprocessing.get_context("spawn")
RUN_TIMEOUT = 60.0  # seconds for a whole group of workers, start-up included


def run_workers(
    calls: list[tuple[Callable[..., Any], tuple[Any, ...]]], timeout: float = RUN_TIMEOUT
) -> list[Any]:
    """Run each ``fn(*args)`` in its own spawned process; return their results in order.
    Fails the test with the worker's traceback when one raises, or when time runs out."""
    out_q = CTX.Queue()
    procs = [
        CTX.Process(target=mp_workers.entry, args=(out_q, i, fn, args), daemon=True)
        for i, (fn, args) in enumerate(calls)
    ]
    results: dict[int, Any] = {}
    finished = False
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + timeout
        silent_dead: dict[int, int] = {}
        while len(results) < len(procs):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"workers did not finish within {timeout}s; got {sorted(results)}")
            try:
                index, status, value = out_q.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                for i, proc in enumerate(procs):
                    if i not in results and proc.exitcode is not None:
                        silent_dead[i] = silent_dead.get(i, 0) + 1
                        if silent_dead[i] >= 3:
                            pytest.fail(f"worker {i} died (exit code {proc.exitcode}) silently")
                continue
            if status == "error":
                pytest.fail(value, pytrace=False)
            results[index] = value
        finished = True
        return [results[i] for i in range(len(procs))]
    finally:
        for proc in procs:
            if finished:
                proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        out_q.close()
        out_q.join_thread()


@pytest.fixture
def parent_pool(redis_url: str, namespace: str) -> Iterator[KeyPool]:
    """The test's own view of the pool (it registers the same keys as the workers)."""
    pool = KeyPool(redis_url, namespace=namespace)
    yield pool
    pool.close()


def register(pool: KeyPool, key_ids: list[str], **options: Any) -> None:
    for key_id in key_ids:
        pool.add_key(PROVIDER, key_id, secret_for(key_id), **options)


# ---------------------------------------------------------------------- 1. round robin


@pytest.mark.parametrize("use_manager", [False, True], ids=["acquire", "get_next_key"])
def test_round_robin_is_exact_across_processes(
    redis_url: str, namespace: str, parent_pool: KeyPool, use_manager: bool
) -> None:
    keys = [f"key{i}" for i in range(5)]
    procs, per_proc = 4, 250
    register(parent_pool, keys)
    barrier = CTX.Barrier(procs)
    args = (redis_url, namespace, keys, per_proc, barrier, use_manager)
    results = run_workers([(mp_workers.round_robin, args)] * procs)

    seen: Counter[str] = Counter()
    for result in results:
        assert result["none"] == 0, "get_next_key returned (None, None) with keys available"
        assert result["wrong_secret"] == 0, "a pick came with another key's secret"
        assert sum(result["picks"].values()) == per_proc
        seen.update(result["picks"])
    # M = 1000 picks over K = 5 equally available keys: each gets exactly M/K = 200
    assert dict(seen) == {key_id: 200 for key_id in keys}
    for key_id in keys:
        stats = parent_pool.stats(PROVIDER, key_id)
        assert stats.total_requests == seen[key_id]
        assert stats.in_flight == 0
        if not use_manager:
            assert stats.success_count == seen[key_id]


# ---------------------------------------------------------------------- 2. a cooldown is shared


def test_rate_limit_in_one_process_is_seen_at_once_by_another(
    redis_url: str, namespace: str, parent_pool: KeyPool
) -> None:
    keys = ["alpha", "beta", "gamma"]
    register(parent_pool, keys)
    barrier, marked, handoff = CTX.Barrier(2), CTX.Event(), CTX.Queue()
    try:
        marker, observer = run_workers(
            [
                (
                    mp_workers.rate_limit_marker,
                    (redis_url, namespace, keys, barrier, marked, handoff),
                ),
                (
                    mp_workers.rate_limit_observer,
                    (redis_url, namespace, keys, barrier, marked, handoff, 50),
                ),
            ]
        )
    finally:
        handoff.close()
        handoff.join_thread()

    marked_id = marker["key_id"]
    assert observer["marked"] == marked_id
    assert marked_id not in observer["picks"], "a key cooling down after a 429 was handed out"
    others = [k for k in keys if k != marked_id]
    assert observer["picks"] == {k: 25 for k in others}
    assert observer["status"] == "cooling"
    assert observer["is_rate_limited"] is True
    assert observer["error_count"] == 1
    until = observer["cooldown_until"]
    assert until is not None
    assert marker["before"] + 30 - 0.25 <= until <= marker["after"] + 30 + 0.25

    # with the other keys out of service, the pool says when the marked key comes back
    for other in others:
        parent_pool.disable_key(PROVIDER, other)
    with pytest.raises(NoKeyAvailable) as info:
        parent_pool.acquire(PROVIDER)
    assert info.value.retry_after is not None
    assert until - time.time() - 0.25 <= info.value.retry_after <= 30


# ---------------------------------------------------------------------- 3. budgets


@pytest.mark.parametrize("budget", ["rpm", "tpm"])
def test_one_key_budget_is_never_exceeded_by_concurrent_processes(
    redis_url: str, namespace: str, parent_pool: KeyPool, budget: str
) -> None:
    """Contract section 6: admitted over any interval of length D <= limit + limit*D/period;
    and a fresh bucket admits its whole capacity."""
    if budget == "rpm":
        limit, options, tokens, unit = 60, {"rpm": 60}, 0, 1
    else:
        limit, options, tokens, unit = 6000, {"tpm": 6000}, 100, 100
    register(parent_pool, ["solo"], **options)
    procs, duration = 4, 3.0
    barrier = CTX.Barrier(procs)
    args = (redis_url, namespace, ["solo"], options, barrier, duration, tokens, False)
    results = run_workers([(mp_workers.hammer, args)] * procs)

    admitted = sum(r["admitted"].get("solo", 0) for r in results)
    assert all(set(r["admitted"]) <= {"solo"} for r in results)
    assert sum(r["refused"] for r in results) > 0, "the budget never ran out: no contention"
    # every admission happened in Redis between the first attempt and the last answer
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    used = admitted * unit
    assert used <= limit + limit * span / 60, f"{used} admitted in {span:.3f}s, limit {limit}"
    assert used >= limit, f"a fresh bucket of {limit} admitted only {used}"

    stats = parent_pool.stats(PROVIDER, "solo")
    assert stats.total_requests == admitted
    assert stats.tokens_used == admitted * tokens
    assert stats.in_flight == 0


def test_several_key_budgets_are_used_fully_and_never_exceeded(
    redis_url: str, namespace: str, parent_pool: KeyPool
) -> None:
    keys, rpm = ["k1", "k2", "k3"], 20
    register(parent_pool, keys, rpm=rpm)
    procs = 4
    barrier = CTX.Barrier(procs)
    args = (redis_url, namespace, keys, {"rpm": rpm}, barrier, 1.0, 0, True)
    results = run_workers([(mp_workers.hammer, args)] * procs)

    attempts = [a for r in results for a in r["attempts"]]
    admits = [a for a in attempts if a[2] is not None]
    refusals = [a for a in attempts if a[2] is None]
    per_key = Counter(a[2] for a in admits)
    span = max(a[1] for a in attempts) - min(a[0] for a in attempts)
    assert set(per_key) <= set(keys)
    for key_id in keys:
        assert per_key[key_id] <= rpm + rpm * span / 60, f"{key_id} over budget: {per_key}"
    assert sum(per_key.values()) >= len(keys) * rpm, f"budgets left unused: {per_key}"
    if span < 60 / rpm:  # no refill can have happened: exactly the three bursts
        assert sum(per_key.values()) == len(keys) * rpm

    # all spent: retry_after says when the earliest key refills, at most 60/rpm s away
    assert refusals, "the budgets never ran out"
    for _, _, _, retry_after in refusals:
        assert retry_after is not None and 0 < retry_after <= 60 / rpm + 1e-3
    # no refusal while a key had room: nothing was admitted after a refusal had returned,
    # up to the earliest moment any key could have refilled
    first_refusal_end = min(a[1] for a in refusals)
    no_refill_before = min(a[0] for a in admits) + 60 / rpm
    late = [a for a in admits if a[0] > first_refusal_end and a[1] < no_refill_before]
    assert not late, f"acquire raised while a key still had budget: {late[:3]}"

    for key_id in keys:
        assert parent_pool.stats(PROVIDER, key_id).total_requests == per_key[key_id]
    # once retry_after has passed, a key is available again
    try:
        parent_pool.acquire(PROVIDER).success()
    except NoKeyAvailable as exc:
        assert exc.retry_after is not None and 0 < exc.retry_after <= 60 / rpm + 1e-3
        time.sleep(exc.retry_after + 0.05)
        parent_pool.acquire(PROVIDER).success()


# ---------------------------------------------------------------------- 4. leases of the dead


def test_leases_of_a_killed_process_come_back_after_the_lease_ttl(
    redis_url: str, namespace: str
) -> None:
    ttl, maxc = 1.5, 2
    settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, lease_ttl=ttl)
    with KeyPool(redis_url, namespace=namespace, settings=settings) as pool:
        pool.add_key(PROVIDER, "solo", secret_for("solo"), max_concurrency=maxc)
        holding, times = CTX.Event(), CTX.Array("d", 2)
        proc = CTX.Process(
            target=mp_workers.hold_and_hang,
            args=(redis_url, namespace, "solo", maxc, ttl, holding, times),
            daemon=True,
        )
        proc.start()
        try:
            assert holding.wait(30), "the worker never took its leases"
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            assert proc.exitcode == -signal.SIGKILL

            called = time.time()
            with pytest.raises(NoKeyAvailable) as info:
                pool.acquire(PROVIDER)
            answered = time.time()
            retry_after = info.value.retry_after
            assert retry_after is not None and 0 < retry_after <= ttl
            # the dead worker's first lease expires ttl after it was taken
            taken_from, taken_by = times[0], times[1]
            assert taken_from + ttl - answered - 0.01 <= retry_after
            assert retry_after <= taken_by + ttl - called + 0.01
            assert pool.stats(PROVIDER, "solo").in_flight == maxc

            time.sleep(retry_after + 0.2)
            first = pool.acquire(PROVIDER)
            assert pool.stats(PROVIDER, "solo").in_flight == 1
            second = pool.acquire(PROVIDER)  # the whole capacity came back
            assert pool.stats(PROVIDER, "solo").in_flight == 2
            with pytest.raises(NoKeyAvailable):
                pool.acquire(PROVIDER)
            first.success()
            second.success()
            stats = pool.stats(PROVIDER, "solo")
            assert stats.in_flight == 0
            assert stats.total_requests == 2 * maxc
            assert stats.success_count == 2
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


# ---------------------------------------------------------------------- 5. max_concurrency


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    # at equal times an end counts before a start: the intervals are closed-open
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    best = current = 0
    for _, delta in events:
        current += delta
        best = max(best, current)
    return best


def test_max_concurrency_holds_across_processes(
    redis_url: str, namespace: str, parent_pool: KeyPool
) -> None:
    maxc, procs = 3, 4
    parent_pool.add_key(PROVIDER, "solo", secret_for("solo"), max_concurrency=maxc)
    barrier = CTX.Barrier(procs)
    args = (redis_url, namespace, "solo", maxc, barrier, 1.6, 0.2)
    results = run_workers([(mp_workers.hold_repeatedly, args)] * procs)

    intervals = [iv for r in results for iv in r["intervals"]]
    # each interval lies inside the time the lease was really open in Redis
    overlap = _max_overlap(intervals)
    assert overlap <= maxc, f"{overlap} leases held at once, max_concurrency={maxc}"
    assert overlap == maxc, "the key's capacity was never used in full"
    assert sum(r["refused"] for r in results) > 0, "a 4th holder was never turned away"
    stats = parent_pool.stats(PROVIDER, "solo")
    assert stats.in_flight == 0
    assert stats.total_requests == len(intervals)
