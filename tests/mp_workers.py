"""Worker functions for the multi-process tests.

They live in their own module because spawned processes import the function they run by
name. Every worker builds its own :class:`KeyPool` on the shared Redis and registers the
same keys (same secrets) as every other process, as a fleet does in the default mode.
Each worker reports through a queue: ``(index, "ok", result)`` or ``(index, "error", tb)``.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

from keypool import EnhancedAPIKeyManager, KeyPool, KeyPoolSettings, NoKeyAvailable

PROVIDER = "openai"
START_TIMEOUT = 30.0  # seconds a worker waits for the others at the start barrier


def secret_for(key_id: str) -> str:
    """The secret every process registers for ``key_id``."""
    return f"sk-test-{key_id}-0123456789abcdef"


def entry(out_q: Any, index: int, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """Run ``fn(*args)`` and put its result (or its traceback) on ``out_q``."""
    try:
        result = fn(*args)
    except BaseException:
        out_q.put(
            (index, "error", f"worker {index} (pid {os.getpid()}):\n" + traceback.format_exc())
        )
        raise
    out_q.put((index, "ok", result))


def _pool(url: str, ns: str, lease_ttl: float | None = None) -> KeyPool:
    if lease_ttl is None:
        return KeyPool(url, namespace=ns)
    settings = KeyPoolSettings(redis_url=url, namespace=ns, lease_ttl=lease_ttl)
    return KeyPool(url, namespace=ns, settings=settings)


def _register(pool: KeyPool, key_ids: list[str], options: dict[str, Any]) -> None:
    for key_id in key_ids:
        pool.add_key(PROVIDER, key_id, secret_for(key_id), **options)


# ---------------------------------------------------------------------- round robin


def round_robin(
    url: str, ns: str, key_ids: list[str], n: int, barrier: Any, use_manager: bool
) -> dict[str, Any]:
    """``n`` picks, by ``acquire`` + ``success`` or by ``EnhancedAPIKeyManager.get_next_key``.
    Returns the picks per key and how many picks came with a secret not matching the key."""
    picks: Counter[str] = Counter()
    wrong_secret = 0
    none_returned = 0
    if use_manager:
        km = EnhancedAPIKeyManager(url, namespace=ns)
        for key_id in key_ids:
            km.add_key(PROVIDER, key_id, secret_for(key_id))
        barrier.wait(START_TIMEOUT)
        for _ in range(n):
            key_id, secret = km.get_next_key(PROVIDER)
            if key_id is None:
                none_returned += 1
                continue
            picks[key_id] += 1
            wrong_secret += secret != secret_for(key_id)
        km.pool.close()
    else:
        pool = _pool(url, ns)
        _register(pool, key_ids, {})
        barrier.wait(START_TIMEOUT)
        for _ in range(n):
            lease = pool.acquire(PROVIDER)
            picks[lease.key_id] += 1
            wrong_secret += lease.secret != secret_for(lease.key_id)
            lease.success()
        pool.close()
    return {"picks": dict(picks), "wrong_secret": wrong_secret, "none": none_returned}


# ---------------------------------------------------------------------- rate limit seen at once


def rate_limit_marker(
    url: str, ns: str, key_ids: list[str], barrier: Any, marked: Any, handoff: Any
) -> dict[str, Any]:
    """Acquire a key, report a 429 with retry_after=30, hand its id over, signal ``marked``."""
    pool = _pool(url, ns)
    _register(pool, key_ids, {})
    barrier.wait(START_TIMEOUT)
    lease = pool.acquire(PROVIDER)
    before = time.time()
    lease.fail(429, retry_after=30)
    after = time.time()
    handoff.put(lease.key_id)
    marked.set()
    pool.close()
    return {"key_id": lease.key_id, "before": before, "after": after}


def rate_limit_observer(
    url: str, ns: str, key_ids: list[str], barrier: Any, marked: Any, handoff: Any, n: int
) -> dict[str, Any]:
    """Wait for ``marked``, then at once make ``n`` acquires and read the marked key's stats."""
    pool = _pool(url, ns)
    _register(pool, key_ids, {})
    barrier.wait(START_TIMEOUT)
    if not marked.wait(START_TIMEOUT):
        raise TimeoutError("the marking process never signalled")
    marked_id = handoff.get(timeout=START_TIMEOUT)
    picks: Counter[str] = Counter()
    for _ in range(n):
        with pool.acquire(PROVIDER) as lease:
            picks[lease.key_id] += 1
    stats = pool.stats(PROVIDER, marked_id)
    pool.close()
    return {
        "picks": dict(picks),
        "marked": marked_id,
        "status": stats.status,
        "is_rate_limited": stats.is_rate_limited,
        "cooldown_until": stats.cooldown_until,
        "error_count": stats.error_count,
    }


# ---------------------------------------------------------------------- budgets


def hammer(
    url: str,
    ns: str,
    key_ids: list[str],
    options: dict[str, Any],
    barrier: Any,
    duration: float,
    tokens: int,
    record_attempts: bool,
) -> dict[str, Any]:
    """Acquire as fast as possible for ``duration`` seconds, counting what is admitted.

    Every admitted lease is reported as a success at once. Returns the admits per key, the
    wall-clock time before the first attempt and after the last one, and (when
    ``record_attempts``) every attempt as ``(start, end, key_id or None, retry_after)``.
    """
    pool = _pool(url, ns)
    _register(pool, key_ids, options)
    admitted: Counter[str] = Counter()
    refused = 0
    attempts: list[tuple[float, float, str | None, float | None]] = []
    barrier.wait(START_TIMEOUT)
    first = time.time()
    stop = first + duration
    end = first
    while True:
        start = time.time()
        if start >= stop:
            break
        try:
            lease = pool.acquire(PROVIDER, tokens=tokens)
        except NoKeyAvailable as exc:
            end = time.time()
            refused += 1
            if record_attempts:
                attempts.append((start, end, None, exc.retry_after))
                time.sleep(0.001)
            continue
        end = time.time()
        admitted[lease.key_id] += 1
        if record_attempts:
            attempts.append((start, end, lease.key_id, None))
        lease.success()
    pool.close()
    return {
        "admitted": dict(admitted),
        "refused": refused,
        "first": first,
        "last": end,
        "attempts": attempts,
    }


# ---------------------------------------------------------------------- concurrency


def hold_and_hang(
    url: str,
    ns: str,
    key_id: str,
    max_concurrency: int,
    lease_ttl: float,
    holding: Any,
    times: Any,
) -> None:
    """Take ``max_concurrency`` leases, signal ``holding`` and hang until killed.
    ``times`` (a shared array of two doubles) gets the wall-clock time before the first
    acquire and after the last one."""
    pool = _pool(url, ns, lease_ttl)
    pool.add_key(PROVIDER, key_id, secret_for(key_id), max_concurrency=max_concurrency)
    times[0] = time.time()
    leases = [pool.acquire(PROVIDER) for _ in range(max_concurrency)]
    times[1] = time.time()
    holding.set()
    time.sleep(120)
    for lease in leases:  # only reached if nobody kills this process
        lease.release()


def hold_repeatedly(
    url: str,
    ns: str,
    key_id: str,
    max_concurrency: int,
    barrier: Any,
    duration: float,
    hold: float,
) -> dict[str, Any]:
    """For ``duration`` seconds: acquire the key (retrying shortly when it is full), hold it
    ``hold`` seconds, report success. Returns the intervals during which a lease was surely
    held: from after ``acquire`` returned to before ``success`` was called."""
    pool = _pool(url, ns)
    pool.add_key(PROVIDER, key_id, secret_for(key_id), max_concurrency=max_concurrency)
    intervals: list[tuple[float, float]] = []
    refused = 0
    barrier.wait(START_TIMEOUT)
    stop = time.time() + duration
    while time.time() < stop:
        try:
            lease = pool.acquire(PROVIDER)
        except NoKeyAvailable:
            refused += 1
            time.sleep(0.005)
            continue
        start = time.time()
        time.sleep(hold)
        end = time.time()
        lease.success()
        intervals.append((start, end))
    pool.close()
    return {"intervals": intervals, "refused": refused}


def succeed_once_then_idle(url: str, ns: str, provider: str, done: Any, release: Any) -> None:
    """Two leases, each reported a success, then no further call until ``release``."""
    pool = _pool(url, ns)
    _register(pool, ["k1", "k2"], {})
    pool.acquire(provider).success()  # a connection's first report waits for its reply
    pool.acquire(provider).success()  # this one does not
    done.set()
    release.wait(60)
