"""Faults of the store: each test runs its own private ``redis-server`` on a free port and
breaks it — script cache flushed, server killed, restarted empty, restarted from its AOF,
workers killed while holding leases — and checks what callers see.

Timing bounds are only outer limits ("never hangs"), never assertions on speed.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keypool import (
    AsyncKeyPool,
    KeyPool,
    KeyPoolSettings,
    NoKeyAvailable,
    PoolUnavailable,
)
from tests import mp_workers
from tests.cluster import Server, start_redis

pytestmark = [pytest.mark.redis]

PROVIDER = "openai"
SOCKET_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.5
# A call to a dead or hung store must raise within this (the configured timeouts + margin).
BOUND = SOCKET_TIMEOUT + CONNECT_TIMEOUT + 0.5
CTX = multiprocessing.get_context("spawn")


def secret(key_id: str) -> str:
    return f"sk-fault-{key_id}-0123456789"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A private Redis without persistence; killed after the test whatever happens."""
    srv = start_redis(tmp_path)
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def aof_server(tmp_path: Path) -> Iterator[Server]:
    """A private Redis that writes every change to its append-only file before replying."""
    srv = start_redis(tmp_path, extra=["--appendonly", "yes", "--appendfsync", "always"])
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture
def make_pool(namespace: str) -> Iterator[Callable[..., KeyPool]]:
    pools: list[KeyPool] = []

    def make(url: str, **overrides: Any) -> KeyPool:
        options: dict[str, Any] = {
            "socket_timeout": SOCKET_TIMEOUT,
            "connect_timeout": CONNECT_TIMEOUT,
        }
        options.update(overrides)
        pool = KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=namespace, **options))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def add(pool: KeyPool, ids: list[str], **options: Any) -> None:
    for key_id in ids:
        pool.add_key(PROVIDER, key_id, secret(key_id), **options)


def timed(fn: Callable[[], Any]) -> tuple[float, BaseException | None]:
    """How long ``fn()`` took, and what it raised (None if it returned)."""
    start = time.monotonic()
    try:
        fn()
    except BaseException as exc:
        return time.monotonic() - start, exc
    return time.monotonic() - start, None


def assert_unavailable_fast(fn: Callable[[], Any], what: str) -> None:
    took, exc = timed(fn)
    assert isinstance(exc, PoolUnavailable), f"{what}: expected PoolUnavailable, got {exc!r}"
    assert took < BOUND, f"{what}: PoolUnavailable came after {took:.2f}s (bound {BOUND}s)"


# ---------------------------------------------------------------------- script cache flushed


def test_script_flush_is_invisible_to_callers(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    pool = make_pool(server.url)
    add(pool, ["k1", "k2", "k3"])
    admin = server.client()
    picks: Counter[str] = Counter()
    for i in range(60):
        if i % 3 == 0:
            admin.script_flush()
        with pool.acquire(PROVIDER) as lease:
            picks[lease.key_id] += 1
        if i % 10 == 0:
            admin.script_flush()
            pool.stats(PROVIDER, "k1")
    assert picks == {"k1": 20, "k2": 20, "k3": 20}  # rotation unaffected
    admin.script_flush()
    # the pipelined registration path too
    assert pool.add_keys([(PROVIDER, f"b{i}", secret(f"b{i}")) for i in range(5)]) == 5
    admin.script_flush()
    pool.disable_key(PROVIDER, "b0")
    snapshot = {s.key_id: s for s in pool.snapshot(PROVIDER)}
    assert len(snapshot) == 8
    assert snapshot["b0"].status == "disabled"
    assert sum(s.total_requests for s in snapshot.values()) == 60
    assert sum(s.success_count for s in snapshot.values()) == 60


def test_script_flush_is_invisible_to_async_callers(server: Server, namespace: str) -> None:
    admin = server.client()

    async def scenario() -> Counter[str]:
        settings = KeyPoolSettings(redis_url=server.url, namespace=namespace)
        async with AsyncKeyPool(settings=settings) as apool:
            admin.script_flush()
            await apool.add_keys([(PROVIDER, k, secret(k)) for k in ("k1", "k2")])
            picks: Counter[str] = Counter()
            for _ in range(10):
                admin.script_flush()
                async with apool.acquire(PROVIDER) as lease:
                    picks[lease.key_id] += 1
            admin.script_flush()
            assert (await apool.stats(PROVIDER, "k1")).success_count == 5
            return picks

    assert asyncio.run(scenario()) == {"k1": 5, "k2": 5}


# ---------------------------------------------------------------------- Redis killed


def test_killed_redis_fails_fast_then_recovers_on_restart(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    pool = make_pool(server.url)
    add(pool, ["k1", "k2"])
    held = pool.acquire(PROVIDER)
    server.kill()
    # every kind of call raises PoolUnavailable within the timeouts, and again on retry
    for _ in range(2):
        assert_unavailable_fast(lambda: pool.acquire(PROVIDER), "acquire")
    assert_unavailable_fast(held.success, "lease.success")
    assert_unavailable_fast(lambda: pool.stats(PROVIDER, "k1"), "stats")
    assert_unavailable_fast(pool.snapshot, "snapshot")
    assert_unavailable_fast(lambda: pool.add_key(PROVIDER, "k3", secret("k3")), "add_key")
    assert_unavailable_fast(
        lambda: pool.add_keys([(PROVIDER, "k4", secret("k4")), ("anthropic", "a", secret("a"))]),
        "add_keys",
    )
    assert_unavailable_fast(lambda: pool.disable_key(PROVIDER, "k1"), "disable_key")
    # back on the same port (empty: no persistence): the very next calls work by themselves.
    # The keys whose add_key failed are held by the process all the same, and come back too.
    server.start()
    picks: Counter[str] = Counter()
    for _ in range(8):
        with pool.acquire(PROVIDER) as lease:
            picks[lease.key_id] += 1
    assert picks == {"k1": 2, "k2": 2, "k3": 2, "k4": 2}


def test_hung_redis_times_out_instead_of_hanging(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    pool = make_pool(server.url)
    add(pool, ["k1"])
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        assert_unavailable_fast(lambda: pool.acquire(PROVIDER), "acquire on a hung server")
        assert_unavailable_fast(lambda: pool.stats(PROVIDER, "k1"), "stats on a hung server")
    finally:
        os.killpg(server.proc.pid, signal.SIGCONT)
    with pool.acquire(PROVIDER) as lease:
        assert lease.key_id == "k1"


def test_killed_redis_fails_fast_for_the_async_pool(server: Server, namespace: str) -> None:
    async def scenario() -> None:
        settings = KeyPoolSettings(
            redis_url=server.url,
            namespace=namespace,
            socket_timeout=SOCKET_TIMEOUT,
            connect_timeout=CONNECT_TIMEOUT,
        )
        async with AsyncKeyPool(settings=settings) as apool:
            await apool.add_key(PROVIDER, "k1", secret("k1"))
            server.kill()
            for _ in range(2):
                start = time.monotonic()
                with pytest.raises(PoolUnavailable):
                    await apool.acquire(PROVIDER)
                assert time.monotonic() - start < BOUND
            server.start()
            async with apool.acquire(PROVIDER) as lease:
                assert lease.key_id == "k1"
            assert (await apool.stats(PROVIDER, "k1")).success_count == 1

    asyncio.run(scenario())


# ---------------------------------------------------------------------- restarted empty


def test_restart_without_persistence_reregisters_the_keys_a_process_holds(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    pool = make_pool(server.url)
    pool.add_key(PROVIDER, "k1", secret("k1"), rpm=50, weight=2.0)
    pool.add_key(PROVIDER, "k2", secret("k2"), max_concurrency=3, models=["gpt-4o"])
    for _ in range(6):
        with pool.acquire(PROVIDER):
            pass
    assert sum(s.total_requests for s in pool.snapshot(PROVIDER)) == 6
    server.restart()  # SIGKILL, then an empty server on the same port
    assert server.client().dbsize() == 0
    with pool.acquire(PROVIDER) as lease:  # the next call re-registers and goes on
        assert lease.secret == secret(lease.key_id)
    stats = {s.key_id: s for s in pool.snapshot(PROVIDER)}
    assert set(stats) == {"k1", "k2"}
    assert sum(s.total_requests for s in stats.values()) == 1  # only counters restarted
    assert stats["k1"].rpm == 50 and stats["k1"].weight == 2.0
    assert stats["k2"].max_concurrency == 3 and stats["k2"].models == ("gpt-4o",)
    with pool.acquire(model="gpt-4o") as lease:
        assert lease.key_id == "k2"


def test_model_routing_after_an_empty_restart(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    """A process whose first call after the restart asks for a model (no provider) finds
    its keys again: it holds them, with their models."""
    pool = make_pool(server.url)
    pool.add_key(PROVIDER, "k1", secret("k1"))
    pool.add_key("anthropic", "a1", secret("a1"), models=["claude"])
    server.restart()
    with pool.acquire(model="claude") as lease:
        assert (lease.provider, lease.key_id) == ("anthropic", "a1")


def test_snapshot_after_an_empty_restart_shows_the_keys_a_process_holds(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    pool = make_pool(server.url)
    add(pool, ["k1", "k2"])
    server.restart()
    assert [s.key_id for s in pool.snapshot(PROVIDER)] == ["k1", "k2"]


def test_two_processes_with_different_key_sets_both_reregister(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    """Two pools (as two processes: each only knows what it registered itself) hold
    different keys of one provider; sealed mode lets each use the other's keys. After an
    empty restart each puts back its own keys on its next call (the pool's epoch changed
    under the second one, so it re-registers too)."""
    sealing = {"secret_key": "fault-test-sealing-key-0123456789abcdef"}
    first = make_pool(server.url, **sealing)
    second = make_pool(server.url, **sealing)
    add(first, ["a1", "a2"])
    add(second, ["b1", "b2"])
    server.restart()
    with first.acquire(PROVIDER) as lease:
        assert lease.key_id in ("a1", "a2")  # only its own keys are back so far
    assert {s.key_id for s in first.snapshot(PROVIDER)} == {"a1", "a2"}
    picks: Counter[str] = Counter()
    for _ in range(8):
        with second.acquire(PROVIDER) as lease:
            picks[lease.key_id] += 1
            assert lease.secret == secret(lease.key_id)
    assert {s.key_id for s in first.snapshot(PROVIDER)} == {"a1", "a2", "b1", "b2"}
    assert set(picks) == {"a1", "a2", "b1", "b2"}


# ---------------------------------------------------------------------- persistence


def test_aof_restart_loses_nothing(aof_server: Server, make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool(aof_server.url)
    pool.add_key(PROVIDER, "cool", secret("cool"))
    pool.add_key(PROVIDER, "off", secret("off"))
    pool.add_key(PROVIDER, "busy", secret("busy"), rpm=5, models=["gpt-4o"])
    pool.add_key(PROVIDER, "plain", secret("plain"))
    pool.mark_failure(PROVIDER, "cool", 429, retry_after=300)
    pool.disable_key(PROVIDER, "off", reason="revoked by ops")
    for _ in range(3):
        with pool.acquire(model="gpt-4o") as lease:
            assert lease.key_id == "busy"
    pool.mark_failure(PROVIDER, "plain", 500)
    before = {s.key_id: s for s in pool.snapshot(PROVIDER)}
    assert before["cool"].status == "cooling" and before["busy"].rpm_left == 2

    aof_server.restart()  # SIGKILL: no shutdown save, only what the AOF holds
    reader = make_pool(aof_server.url)  # a process that registered nothing itself
    after = {s.key_id: s for s in reader.snapshot(PROVIDER)}
    assert set(after) == set(before)
    for key_id, old in before.items():
        new = after[key_id]
        assert new.status == old.status, key_id
        assert new.cooldown_until == old.cooldown_until, key_id
        assert new.disabled_reason == old.disabled_reason, key_id
        assert new.total_requests == old.total_requests, key_id
        assert new.success_count == old.success_count, key_id
        assert new.error_count == old.error_count, key_id
        assert new.errors_by_kind == old.errors_by_kind, key_id
        assert new.consecutive_errors == old.consecutive_errors, key_id
        assert new.models == old.models, key_id
        assert new.fingerprint == old.fingerprint, key_id
    assert after["cool"].status == "cooling" and after["cool"].is_rate_limited
    assert after["off"].status == "disabled"
    assert after["busy"].rpm_left is not None and after["busy"].rpm_left <= 3  # budget kept
    # the process that holds the keys goes on without re-registering anything
    epoch = aof_server.client().hget(f"{reader.namespace}:{{{PROVIDER}}}:meta", "epoch")
    with pool.acquire(model="gpt-4o") as lease:
        assert lease.key_id == "busy"
    picks = Counter()
    for _ in range(4):
        with pool.acquire(PROVIDER) as lease:
            picks[lease.key_id] += 1
    assert set(picks) <= {"busy", "plain"}  # cooling and disabled keys stay out
    assert aof_server.client().hget(f"{reader.namespace}:{{{PROVIDER}}}:meta", "epoch") == epoch
    assert pool.stats(PROVIDER, "busy").total_requests == 4 + picks["busy"]


# ---------------------------------------------------------------------- workers killed


def test_leases_of_killed_workers_come_back_after_the_lease_ttl(
    server: Server, make_pool: Callable[..., KeyPool], namespace: str
) -> None:
    """Two workers each fill a key's max_concurrency with leases and are SIGKILLed: the keys
    stay full until the leases' TTL passes, then their whole capacity is back."""
    lease_ttl = 1.0
    keys = ["k1", "k2"]
    holding = [CTX.Event() for _ in keys]
    times = [CTX.Array("d", 2) for _ in keys]
    workers = [
        CTX.Process(
            target=mp_workers.hold_and_hang,
            args=(server.url, namespace, key_id, 2, lease_ttl, holding[i], times[i]),
            daemon=True,
        )
        for i, key_id in enumerate(keys)
    ]
    pool = make_pool(server.url)
    try:
        for proc in workers:
            proc.start()
        for i, event in enumerate(holding):
            assert event.wait(60), f"worker {i} never took its leases"
        for key_id in keys:
            pool.add_key(PROVIDER, key_id, mp_workers.secret_for(key_id), max_concurrency=2)
        for proc in workers:
            assert proc.pid is not None
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
        with pytest.raises(NoKeyAvailable) as full:
            pool.acquire(PROVIDER)  # the dead workers' leases still count
        assert full.value.retry_after is not None
        assert 0 < full.value.retry_after <= lease_ttl
        assert {s.in_flight for s in pool.snapshot(PROVIDER)} == {2}
        # wait= sleeps until the dead workers' leases expire: then the capacity is back
        leases = [pool.acquire(PROVIDER, wait=lease_ttl + 2) for _ in range(4)]
        assert Counter(lease.key_id for lease in leases) == {"k1": 2, "k2": 2}
        with pytest.raises(NoKeyAvailable):
            pool.acquire(PROVIDER)
        for lease in leases:
            lease.success()
        assert {s.in_flight for s in pool.snapshot(PROVIDER)} == {0}
    finally:
        for proc in workers:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def test_a_restart_between_acquire_and_report_does_not_break_the_report(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    pool = make_pool(server.url)
    add(pool, ["k1"])
    lease = pool.acquire(PROVIDER)
    server.restart()
    lease.fail(429, retry_after=60)  # the key is put back first, then marked cooling
    stats = pool.stats(PROVIDER, "k1")
    assert stats.status == "cooling"
    with pytest.raises(NoKeyAvailable):
        pool.acquire(PROVIDER)


def test_calls_from_many_threads_during_a_restart_never_hang(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    pool = make_pool(server.url)
    add(pool, ["k1", "k2", "k3"])
    outcomes: Counter[str] = Counter()
    slowest = [0.0]
    stop = threading.Event()
    lock = threading.Lock()

    def loop() -> None:
        while not stop.is_set():
            took, exc = timed(lambda: pool.acquire(PROVIDER).success())
            with lock:
                slowest[0] = max(slowest[0], took)
                outcomes["ok" if exc is None else type(exc).__name__] += 1
            if exc is not None:
                time.sleep(0.01)

    threads = [threading.Thread(target=loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.2)
        server.kill()
        time.sleep(0.5)
        server.start()
        time.sleep(0.3)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not any(t.is_alive() for t in threads)
    assert set(outcomes) <= {"ok", "PoolUnavailable"}, outcomes
    assert outcomes["PoolUnavailable"] > 0 and outcomes["ok"] > 0
    assert slowest[0] < BOUND
    # after the restart the threads went on with the keys put back
    assert {s.key_id for s in pool.snapshot(PROVIDER)} == {"k1", "k2", "k3"}


def test_threads_hitting_an_emptied_store_at_once_all_get_a_key(
    server: Server, make_pool: Callable[..., KeyPool]
) -> None:
    """Right after Redis lost everything, threads of one process call at the same moment:
    one re-registers the keys; none may meanwhile be told that no key exists."""
    pool = make_pool(server.url)
    add(pool, [f"k{i}" for i in range(20)])
    threads_n = 8
    for _round in range(6):
        server.client().flushall()
        barrier = threading.Barrier(threads_n)
        outcomes: list[str] = []

        def first_call(barrier: threading.Barrier, outcomes: list[str]) -> None:
            barrier.wait(10)
            try:
                pool.acquire(PROVIDER).success()
                outcomes.append("ok")
            except Exception as exc:  # recorded, asserted below
                outcomes.append(repr(exc))

        threads = [
            threading.Thread(target=first_call, args=(barrier, outcomes)) for _ in range(threads_n)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert outcomes == ["ok"] * threads_n, outcomes
