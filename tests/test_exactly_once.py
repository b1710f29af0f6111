"""Exactly-once under faults (contract section 12), black-box through the public API.

A fault-injection proxy (``tests/faultproxy.py``) sits between the pool and a private
``redis-server``: it lets the server run one script call and then closes the connection
before the reply reaches the pool — the caller cannot know whether the call ran, and a
retry must not run it twice. For every script (register, acquire, the reports success /
fail / release, the admin actions disable / enable / reset / remove / assign, renew) on
``KeyPool``, ``AsyncKeyPool`` and a Redis Cluster, each test checks afterwards that

* the caller saw one result (one lease, no error),
* each key's ``in_flight`` equals the leases the test holds open,
* its counters equal what the callers saw (one ``total_requests`` per lease handed out,
  one ``success_count`` / ``error_count`` per report),
* its ``rpm`` / ``tpm`` budget was charged once and the bound holds.

Then: a report on a lease that expired, the budget bound across a restart that lost
everything, one secret under two key ids, and a pick that must look past spent keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import redis

from keypool import (
    AsyncKeyPool,
    KeyPool,
    KeyPoolSettings,
    KeyStats,
    NoKeyAvailable,
    PoolUnavailable,
    UnknownKey,
)
from tests.cluster import Cluster, Server, start_cluster, start_redis
from tests.faultproxy import ClusterProxy, FaultProxy, command_named, script_calls

pytestmark = [pytest.mark.redis]

PROVIDER = "openai"
# A report on a connection idle this long waits for its reply (README, "Reports"), so a
# reply dropped on its way back is a reply the pool itself must deal with.
IDLE = 1.1
SOCKET_TIMEOUT = 3.0


def secret(key_id: str) -> str:
    return f"sk-once-{key_id}-0123456789abcdef"


# ---------------------------------------------------------------------- servers and proxies


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_redis(tmp_path_factory.mktemp("once-redis"))
    try:
        yield srv
    finally:
        srv.kill()


@pytest.fixture(scope="module")
def proxy(server: Server) -> Iterator[FaultProxy]:
    with FaultProxy(server.port) as running:
        yield running


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("once-cluster"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def cluster_proxy(cluster: Cluster) -> Iterator[ClusterProxy]:
    with ClusterProxy(n.port for n in cluster.nodes) as running:
        yield running


# ---------------------------------------------------------------------- one API, three ways


class Handle(Protocol):
    key_id: str

    def success(self, **kwargs: Any) -> None: ...
    def fail(self, error: object, **kwargs: Any) -> None: ...
    def release(self) -> None: ...
    def renew(self, ttl: float | None = None) -> bool: ...


class Api(Protocol):
    """What the scenarios do with a pool, whether it is sync or async."""

    def add_key(self, key_id: str, **options: Any) -> None: ...
    def acquire(self, **kwargs: Any) -> Handle: ...
    def stats(self, key_id: str) -> KeyStats: ...
    def snapshot(self) -> list[KeyStats]: ...
    def disable_key(self, key_id: str, reason: str = "") -> None: ...
    def enable_key(self, key_id: str) -> None: ...
    def reset_key(self, key_id: str) -> None: ...
    def remove_key(self, key_id: str) -> None: ...
    def assign_model(self, model: str, key_id: str) -> None: ...
    def mark_failure(self, key_id: str, error: object) -> None: ...
    def close(self) -> None: ...


class SyncHandle:
    def __init__(self, lease: Any) -> None:
        self.lease = lease
        self.key_id: str = lease.key_id

    def success(self, **kwargs: Any) -> None:
        self.lease.success(**kwargs)

    def fail(self, error: object, **kwargs: Any) -> None:
        self.lease.fail(error, **kwargs)

    def release(self) -> None:
        self.lease.release()

    def renew(self, ttl: float | None = None) -> bool:
        return bool(self.lease.renew(ttl))


class SyncApi:
    def __init__(self, pool: KeyPool) -> None:
        self.pool = pool

    def add_key(self, key_id: str, **options: Any) -> None:
        self.pool.add_key(PROVIDER, key_id, secret(key_id), **options)

    def acquire(self, **kwargs: Any) -> Handle:
        return SyncHandle(self.pool.acquire(PROVIDER, **kwargs))

    def stats(self, key_id: str) -> KeyStats:
        return self.pool.stats(PROVIDER, key_id)

    def snapshot(self) -> list[KeyStats]:
        return self.pool.snapshot(PROVIDER)

    def disable_key(self, key_id: str, reason: str = "") -> None:
        self.pool.disable_key(PROVIDER, key_id, reason=reason)

    def enable_key(self, key_id: str) -> None:
        self.pool.enable_key(PROVIDER, key_id)

    def reset_key(self, key_id: str) -> None:
        self.pool.reset_key(PROVIDER, key_id)

    def remove_key(self, key_id: str) -> None:
        self.pool.remove_key(PROVIDER, key_id)

    def assign_model(self, model: str, key_id: str) -> None:
        self.pool.assign_model(model, PROVIDER, key_id)

    def mark_failure(self, key_id: str, error: object) -> None:
        self.pool.mark_failure(PROVIDER, key_id, error)

    def close(self) -> None:
        self.pool.close()


class AsyncHandle:
    def __init__(self, runner: asyncio.Runner, lease: Any) -> None:
        self.runner = runner
        self.lease = lease
        self.key_id: str = lease.key_id

    def success(self, **kwargs: Any) -> None:
        self.runner.run(self.lease.success(**kwargs))

    def fail(self, error: object, **kwargs: Any) -> None:
        self.runner.run(self.lease.fail(error, **kwargs))

    def release(self) -> None:
        self.runner.run(self.lease.release())

    def renew(self, ttl: float | None = None) -> bool:
        return bool(self.runner.run(self.lease.renew(ttl)))


class AsyncApi:
    """An ``AsyncKeyPool`` driven from a test on one event loop of its own."""

    def __init__(self, settings: KeyPoolSettings) -> None:
        self.runner = asyncio.Runner()
        self.pool = AsyncKeyPool(settings=settings)

    def add_key(self, key_id: str, **options: Any) -> None:
        self.runner.run(self.pool.add_key(PROVIDER, key_id, secret(key_id), **options))

    def acquire(self, **kwargs: Any) -> Handle:
        async def go() -> Any:
            return await self.pool.acquire(PROVIDER, **kwargs)

        return AsyncHandle(self.runner, self.runner.run(go()))

    def stats(self, key_id: str) -> KeyStats:
        result: KeyStats = self.runner.run(self.pool.stats(PROVIDER, key_id))
        return result

    def snapshot(self) -> list[KeyStats]:
        result: list[KeyStats] = self.runner.run(self.pool.snapshot(PROVIDER))
        return result

    def disable_key(self, key_id: str, reason: str = "") -> None:
        self.runner.run(self.pool.disable_key(PROVIDER, key_id, reason=reason))

    def enable_key(self, key_id: str) -> None:
        self.runner.run(self.pool.enable_key(PROVIDER, key_id))

    def reset_key(self, key_id: str) -> None:
        self.runner.run(self.pool.reset_key(PROVIDER, key_id))

    def remove_key(self, key_id: str) -> None:
        self.runner.run(self.pool.remove_key(PROVIDER, key_id))

    def assign_model(self, model: str, key_id: str) -> None:
        self.runner.run(self.pool.assign_model(model, PROVIDER, key_id))

    def mark_failure(self, key_id: str, error: object) -> None:
        self.runner.run(self.pool.mark_failure(PROVIDER, key_id, error))

    def close(self) -> None:
        try:
            self.runner.run(self.pool.close())
        finally:
            self.runner.close()


Fault = FaultProxy | ClusterProxy


@dataclass
class Target:
    """A pool whose every call goes through a fault proxy."""

    api: Api
    fault: Fault
    kind: str


@pytest.fixture(params=["sync", "async", "cluster"])
def target(request: pytest.FixtureRequest, namespace: str) -> Iterator[Target]:
    kind: str = request.param
    fault: Fault
    if kind == "cluster":
        fault = request.getfixturevalue("cluster_proxy")
    else:
        fault = request.getfixturevalue("proxy")
    settings = KeyPoolSettings(
        redis_url=fault.url, namespace=namespace, socket_timeout=SOCKET_TIMEOUT
    )
    api: Api = AsyncApi(settings) if kind == "async" else SyncApi(KeyPool(settings=settings))
    fault.reset()
    try:
        yield Target(api, fault, kind)
    finally:
        fault.disarm()
        api.close()


# ---------------------------------------------------------------------- the books


@dataclass
class Books:
    """What callers saw, key by key: the store's counters must say the same."""

    acquired: Counter[str] = field(default_factory=Counter)
    succeeded: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    open: Counter[str] = field(default_factory=Counter)
    tokens: Counter[str] = field(default_factory=Counter)  # budget tokens charged
    started: float = field(default_factory=time.monotonic)

    def acquire(self, api: Api, **kwargs: Any) -> Handle:
        handle = api.acquire(**kwargs)
        self.acquired[handle.key_id] += 1
        self.open[handle.key_id] += 1
        self.tokens[handle.key_id] += int(kwargs.get("tokens", 0))
        return handle

    def closed(self, handle: Handle, outcome: str, estimate: int = 0, actual: int = 0) -> None:
        self.open[handle.key_id] -= 1
        if outcome == "success":
            self.succeeded[handle.key_id] += 1
            self.tokens[handle.key_id] += actual - estimate
        elif outcome == "fail":
            self.failed[handle.key_id] += 1

    def forget(self, key_id: str) -> None:
        for counter in (self.acquired, self.succeeded, self.failed, self.tokens):
            counter.pop(key_id, None)


def assert_books(api: Api, books: Books, key_ids: list[str]) -> None:
    """The store's counters, in-flight counts and budgets say what the callers saw."""
    elapsed = time.monotonic() - books.started + 0.5
    for key_id in key_ids:
        s = api.stats(key_id)
        seen = (
            books.acquired[key_id],
            books.succeeded[key_id],
            books.failed[key_id],
            books.open[key_id],
        )
        stored = (s.total_requests, s.success_count, s.error_count, s.in_flight)
        assert stored == seen, (
            f"{key_id}: (total_requests, success_count, error_count, in_flight) "
            f"stored {stored}, callers saw {seen}"
        )
        if s.rpm is not None:
            assert s.rpm_left is not None
            low = s.rpm - books.acquired[key_id]
            high = low + s.rpm * elapsed / 60
            assert low <= s.rpm_left <= high, (
                f"{key_id}: rpm_left {s.rpm_left}, expected {low}..{high:.2f} "
                f"after {books.acquired[key_id]} requests"
            )
        if s.tpm is not None:
            assert s.tpm_left is not None
            low = max(s.tpm - books.tokens[key_id], 0)
            high = low + s.tpm * elapsed / 60
            assert low <= s.tpm_left <= high, (
                f"{key_id}: tpm_left {s.tpm_left}, expected {low}..{high:.0f} "
                f"after {books.tokens[key_id]} tokens charged"
            )


def dropped_one(fault: Fault, what: str) -> None:
    """The proxy dropped exactly one reply (of a call the server ran)."""
    assert fault.trigger.wait_dropped(1, timeout=5), f"{what}: no reply was dropped"
    assert fault.dropped_count == 1, f"{what}: {fault.dropped_count} replies dropped"
    fault.disarm()


def cycle(api: Api, books: Books, **kwargs: Any) -> None:
    """One acquire and its success, both booked."""
    handle = books.acquire(api, **kwargs)
    handle.success()
    books.closed(handle, "success")


# ---------------------------------------------------------------------- the proxy itself


def test_proxy_drops_the_reply_of_a_command_the_server_ran(
    server: Server, proxy: FaultProxy
) -> None:
    proxy.disarm()
    before = proxy.dropped_count
    client = redis.Redis(port=proxy.port, retry=None, socket_timeout=SOCKET_TIMEOUT)
    try:
        assert client.ping()
        proxy.arm(command_named("SET"))
        with pytest.raises(redis.ConnectionError):
            client.set("faultproxy:after", "ran")
        assert server.client().get("faultproxy:after") == "ran"  # it ran all the same
        proxy.arm(command_named("SET"), mode="before")
        with pytest.raises(redis.ConnectionError):
            client.set("faultproxy:before", "ran")
        assert server.client().get("faultproxy:before") is None  # never reached the server
        assert [d.mode for d in proxy.dropped[before:]] == ["after", "before"]
        assert proxy.dropped[before].reply == b"+OK\r\n"
        assert client.get("faultproxy:after") == b"ran"  # a fresh connection passes again
    finally:
        client.close()
        server.client().delete("faultproxy:after", "faultproxy:before")


def test_cluster_proxy_routes_every_node_through_itself(
    cluster: Cluster, cluster_proxy: ClusterProxy
) -> None:
    cluster_proxy.disarm()
    client = redis.RedisCluster(
        host="127.0.0.1", port=cluster_proxy.proxies[0].port, decode_responses=True
    )
    try:
        ports = {node.port for node in client.get_nodes()}
        assert ports == {p.port for p in cluster_proxy.proxies}
        before = cluster_proxy.dropped_count
        cluster_proxy.arm(command_named("SET"), mode="after")
        client.set("faultproxy:{x}", "ran")  # the client retries on a fresh connection
        assert cluster_proxy.dropped_count == before + 1
        assert client.get("faultproxy:{x}") == "ran"
        client.delete("faultproxy:{x}")
    finally:
        client.close()


# ---------------------------------------------------------------------- every script, replayed


def test_acquire_whose_reply_was_lost_hands_out_one_lease_charged_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1", max_concurrency=1, rpm=6)
    cycle(api, books)
    target.fault.arm(script_calls)
    handle = books.acquire(api)  # one lease, not NoKeyAvailable from an orphaned first one
    dropped_one(target.fault, "acquire")
    assert handle.key_id == "k1"
    assert_books(api, books, ["k1"])
    handle.success()
    books.closed(handle, "success")
    cycle(api, books)  # the key's one slot is free again
    assert_books(api, books, ["k1"])


def test_register_whose_reply_was_lost_registers_the_key_once(target: Target) -> None:
    api, books = target.api, Books()
    target.fault.arm(script_calls)
    api.add_key("k1", rpm=6, max_concurrency=2)
    dropped_one(target.fault, "add_key")
    [only] = api.snapshot()
    assert (only.key_id, only.rpm, only.max_concurrency) == ("k1", 6, 2)
    cycle(api, books)
    assert_books(api, books, ["k1"])


def test_success_whose_reply_was_lost_is_counted_once_and_refunds_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1", tpm=1000, max_concurrency=1)
    first = books.acquire(api, tokens=600)
    first.success(tokens=600)
    books.closed(first, "success", 600, 600)
    second = books.acquire(api, tokens=300)
    time.sleep(IDLE)
    target.fault.arm(script_calls)
    second.success(tokens=0)  # 300 reserved, none used: 300 go back, once
    books.closed(second, "success", 300, 0)
    dropped_one(target.fault, "lease.success")
    assert_books(api, books, ["k1"])


def test_fail_whose_reply_was_lost_is_counted_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1", max_concurrency=1)
    handle = books.acquire(api)
    target.fault.arm(script_calls)
    handle.fail(500)
    books.closed(handle, "fail")
    dropped_one(target.fault, "lease.fail")
    stats = api.stats("k1")
    assert stats.errors_by_kind == {"server": 1}
    assert stats.consecutive_errors == 1
    assert_books(api, books, ["k1"])


def test_release_whose_reply_was_lost_frees_the_slot_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1", max_concurrency=1)
    handle = books.acquire(api)
    time.sleep(IDLE)
    target.fault.arm(script_calls)
    handle.release()
    books.closed(handle, "release")
    dropped_one(target.fault, "lease.release")
    assert_books(api, books, ["k1"])
    cycle(api, books)
    assert_books(api, books, ["k1"])


def test_renew_whose_reply_was_lost_keeps_the_lease(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1", max_concurrency=1)
    handle = books.acquire(api)
    target.fault.arm(script_calls)
    assert handle.renew(30.0) is True
    dropped_one(target.fault, "lease.renew")
    assert_books(api, books, ["k1"])
    handle.success()
    books.closed(handle, "success")
    assert_books(api, books, ["k1"])


def test_mark_failure_whose_reply_was_lost_is_counted_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1")
    target.fault.arm(script_calls)
    api.mark_failure("k1", 500)
    books.failed["k1"] += 1
    dropped_one(target.fault, "mark_failure")
    assert_books(api, books, ["k1"])


def test_disable_whose_reply_was_lost_disables_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1")
    target.fault.arm(script_calls)
    api.disable_key("k1", reason="rotating")
    dropped_one(target.fault, "disable_key")
    stats = api.stats("k1")
    assert (stats.status, stats.disabled_reason) == ("disabled", "rotating")
    with pytest.raises(NoKeyAvailable):
        api.acquire()
    assert_books(api, books, ["k1"])


def test_enable_whose_reply_was_lost_enables_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1")
    api.disable_key("k1")
    target.fault.arm(script_calls)
    api.enable_key("k1")
    dropped_one(target.fault, "enable_key")
    assert api.stats("k1").status == "active"
    cycle(api, books)
    assert_books(api, books, ["k1"])


def test_reset_whose_reply_was_lost_resets_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1", rpm=6)
    handle = books.acquire(api)
    handle.fail(500)
    target.fault.arm(script_calls)
    api.reset_key("k1")
    dropped_one(target.fault, "reset_key")
    books = Books()  # counters and budgets start again
    stats = api.stats("k1")
    assert (stats.total_requests, stats.error_count, stats.consecutive_errors) == (0, 0, 0)
    cycle(api, books)
    assert_books(api, books, ["k1"])


def test_remove_whose_reply_was_lost_removes_without_an_error(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1")
    api.add_key("k2")
    target.fault.arm(script_calls)
    api.remove_key("k2")  # removed once: the caller is not told the key is unknown
    dropped_one(target.fault, "remove_key")
    with pytest.raises(UnknownKey):
        api.stats("k2")
    assert [s.key_id for s in api.snapshot()] == ["k1"]
    for _ in range(3):
        cycle(api, books)
    assert_books(api, books, ["k1"])


def test_assign_whose_reply_was_lost_assigns_once(target: Target) -> None:
    api, books = target.api, Books()
    api.add_key("k1")
    api.add_key("k2")
    target.fault.arm(script_calls)
    api.assign_model("gpt-once", "k2")
    dropped_one(target.fault, "assign_model")
    for _ in range(3):
        handle = books.acquire(api, model="gpt-once")
        assert handle.key_id == "k2"
        handle.success()
        books.closed(handle, "success")
    assert api.stats("k2").models == ("gpt-once",)
    assert_books(api, books, ["k1", "k2"])


# ---------------------------------------------------------------------- the contrast cases


def test_acquire_dropped_before_the_server_ran_it_hands_out_one_lease(
    proxy: FaultProxy, namespace: str
) -> None:
    """The request never reached Redis: the pool sends it again and the caller gets one."""
    proxy.disarm()
    before = proxy.dropped_count
    api = SyncApi(KeyPool(settings=KeyPoolSettings(redis_url=proxy.url, namespace=namespace)))
    try:
        books = Books()
        api.add_key("k1", max_concurrency=1, rpm=6)
        proxy.arm(script_calls, mode="before")
        handle = books.acquire(api)
        assert proxy.dropped_count == before + 1
        assert_books(api, books, ["k1"])
        handle.success()
        books.closed(handle, "success")
        assert_books(api, books, ["k1"])
    finally:
        proxy.disarm()
        api.close()


def test_report_sent_without_waiting_whose_reply_was_lost_is_applied_once(
    proxy: FaultProxy, namespace: str
) -> None:
    """On a connection in use a moment ago ``success()`` does not wait for its reply: the
    lost reply is noticed by the next call, which goes on by itself."""
    proxy.disarm()
    before = proxy.dropped_count
    api = SyncApi(KeyPool(settings=KeyPoolSettings(redis_url=proxy.url, namespace=namespace)))
    try:
        books = Books()
        api.add_key("k1", max_concurrency=1)
        cycle(api, books)
        handle = books.acquire(api)
        proxy.arm(script_calls)
        handle.success()
        books.closed(handle, "success")
        assert proxy.trigger.wait_dropped(before + 1)
        assert_books(api, books, ["k1"])
        cycle(api, books)
        assert_books(api, books, ["k1"])
    finally:
        proxy.disarm()
        api.close()


# ---------------------------------------------------------------------- expired leases


def test_report_on_an_expired_lease_does_not_count_twice(proxy: FaultProxy, namespace: str) -> None:
    """A lease outlived its TTL (its slot came back by itself) and its report comes late —
    and its reply is lost, so it may be sent again. The slot is not given back a second
    time (in_flight still counts the other open lease) and the failure counts once."""
    proxy.disarm()
    settings = KeyPoolSettings(redis_url=proxy.url, namespace=namespace, lease_ttl=0.3)
    pool = KeyPool(settings=settings)
    try:
        pool.add_key(PROVIDER, "k1", secret("k1"), max_concurrency=2)
        late = pool.acquire(PROVIDER)
        time.sleep(0.5)
        held = pool.acquire(PROVIDER)
        before = proxy.dropped_count
        proxy.arm(script_calls)
        late.fail(500)
        assert proxy.trigger.wait_dropped(before + 1)
        proxy.disarm()
        stats = pool.stats(PROVIDER, "k1")
        assert stats.in_flight == 1, f"in_flight {stats.in_flight} with one lease open"
        assert stats.total_requests == 2
        assert stats.error_count <= 1, f"one late failure counted {stats.error_count} times"
        assert stats.success_count == 0
        other = pool.acquire(PROVIDER)  # the second slot is free: exactly one
        with pytest.raises(NoKeyAvailable):
            pool.acquire(PROVIDER)
        held.success()
        other.success()
        assert pool.stats(PROVIDER, "k1").in_flight == 0
    finally:
        proxy.disarm()
        pool.close()


# ---------------------------------------------------------------------- state lost


def test_budget_bound_holds_across_a_restart_that_lost_everything(
    tmp_path: Path, namespace: str
) -> None:
    """An rpm=30 key admits at most 30 + 30·D/60 over D seconds, even when Redis restarts
    empty in the middle (kill -9, started again without persistence on the same port):
    the re-registered key starts with its budget spent."""
    srv = start_redis(tmp_path)
    settings = KeyPoolSettings(
        redis_url=srv.url, namespace=namespace, socket_timeout=1.0, connect_timeout=0.5
    )
    pool = KeyPool(settings=settings)
    rpm = 30
    admitted = 0
    try:
        pool.add_key(PROVIDER, "k1", secret("k1"), rpm=rpm)
        start = time.monotonic()
        restarted = False
        while time.monotonic() - start < 3.0:
            if not restarted and time.monotonic() - start > 1.0:
                srv.restart()  # SIGKILL, then empty on the same port
                restarted = True
            try:
                pool.acquire(PROVIDER).success()
                admitted += 1
            except NoKeyAvailable:
                time.sleep(0.02)
            except PoolUnavailable:
                time.sleep(0.05)
        duration = time.monotonic() - start
    finally:
        pool.close()
        srv.kill()
    bound = rpm + rpm * duration / 60
    assert restarted
    assert admitted <= bound, f"rpm={rpm} admitted {admitted} in {duration:.1f}s (bound {bound})"


# ---------------------------------------------------------------------- one secret, one budget


def test_one_secret_under_two_key_ids_has_one_budget(server: Server, namespace: str) -> None:
    """The provider limits the secret, not the name: registering it again under another id
    either reuses the key or is refused (ValueError) — never a second budget."""
    pool = KeyPool(settings=KeyPoolSettings(redis_url=server.url, namespace=namespace))
    try:
        same = "sk-shared-secret-0123456789abcdef"
        pool.add_key(PROVIDER, "first", same, rpm=3)
        with contextlib.suppress(ValueError):  # refused: fine too
            pool.add_key(PROVIDER, "second", same, rpm=3)
        admitted = Counter[str]()
        start = time.monotonic()
        for _ in range(10):
            try:
                lease = pool.acquire(PROVIDER)
            except NoKeyAvailable:
                continue
            admitted[lease.key_id] += 1
            lease.success()
        duration = time.monotonic() - start
        bound = 3 + 3 * duration / 60
        total = sum(admitted.values())
        assert total <= bound, f"one secret with rpm=3 admitted {total} ({dict(admitted)})"
    finally:
        pool.close()


# ---------------------------------------------------------------------- picks look far enough


def test_acquire_finds_a_key_with_budget_behind_many_spent_ones(
    server: Server, namespace: str
) -> None:
    """600 keys with tpm=1000: 520 have 400 tokens left and come first in the rotation, 80
    have 1,000 free. A request for 900 tokens is served by one of the 80."""
    pool = KeyPool(settings=KeyPoolSettings(redis_url=server.url, namespace=namespace))
    try:
        ids = [f"k{i:03d}" for i in range(600)]
        pool.add_keys([(PROVIDER, k, secret(k)) for k in ids], tpm=1000)
        spent: set[str] = set()
        for _ in range(520):  # served first, so they come first again
            lease = pool.acquire(PROVIDER, tokens=600)
            spent.add(lease.key_id)
            lease.success(tokens=600)
        for _ in range(80):
            lease = pool.acquire(PROVIDER)
            assert lease.key_id not in spent
            lease.success(tokens=0)
        assert len(spent) == 520
        lease = pool.acquire(PROVIDER, tokens=900)
        assert lease.key_id not in spent
        lease.success(tokens=900)
    finally:
        pool.close()
