"""The hot path's own connection: the function library (FCALL) and its fallbacks, and lease
reports sent without waiting for their reply. Each test runs a private ``redis-server``."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from keypool import KeyPool, KeyPoolSettings, scripts
from keypool.lane import Lane
from tests import mp_workers
from tests.cluster import Server, start_redis
from tests.faultproxy import FaultProxy, containing, script_calls

pytestmark = [pytest.mark.redis]

PROVIDER = "openai"
CTX = multiprocessing.get_context("spawn")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_redis(tmp_path)
    try:
        yield srv
    finally:
        srv.kill()


def make_pool(url: str, namespace: str) -> KeyPool:
    pool = KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=namespace, lease_ttl=60))
    for key_id in ("k1", "k2"):
        pool.add_key(PROVIDER, key_id, mp_workers.secret_for(key_id))
    return pool


def totals(pool: KeyPool) -> tuple[int, int, int]:
    """(requests, successes, in flight) over the provider's keys."""
    keys = pool.snapshot(PROVIDER)
    return (
        sum(s.total_requests for s in keys),
        sum(s.success_count for s in keys),
        sum(s.in_flight for s in keys),
    )


def libraries(client: Any) -> set[str]:
    """The function libraries loaded (RESP2 lists each as flat name/value pairs)."""
    found = set()
    for lib in client.function_list():
        fields = lib if isinstance(lib, dict) else dict(zip(lib[0::2], lib[1::2], strict=True))
        found.add(fields["library_name"])
    return found


def test_decisions_run_as_functions_and_survive_a_function_flush(
    server: Server, namespace: str
) -> None:
    with make_pool(server.url, namespace) as pool:
        for _ in range(5):
            pool.acquire(PROVIDER).success()
        with server.client() as admin:
            assert scripts.library_name() in libraries(admin)
            admin.function_flush()
        for _ in range(20):
            pool.acquire(PROVIDER).success()
        assert totals(pool) == (25, 25, 0)
        with server.client() as admin:
            assert scripts.library_name() in libraries(admin)


def test_reports_refused_after_a_flush_are_sent_again_in_order(
    server: Server, namespace: str
) -> None:
    """Reports sent unconfirmed while the server lost its code are sent again when their
    replies are read — by the next call, or by close() — none is lost or counted twice."""
    with make_pool(server.url, namespace) as pool:
        leases = [pool.acquire(PROVIDER) for _ in range(12)]
        leases[0].success()  # the first report of a connection waits for its reply
        with server.client() as admin:
            admin.function_flush()
            admin.script_flush()
        for lease in leases[1:6]:
            lease.success()  # sent; the server refuses them (no function); not read yet
        assert totals(pool) == (12, 6, 6)  # this call reads the refusals and sends again
        with server.client() as admin:
            admin.function_flush()
        for lease in leases[6:]:
            lease.success()
    # close() read the last replies and sent the refused reports again
    with make_pool(server.url, namespace) as fresh:
        assert totals(fresh) == (12, 12, 0)


def test_without_fcall_rights_the_scripts_are_used(server: Server, namespace: str) -> None:
    with server.client() as admin:
        admin.execute_command(
            "ACL", "SETUSER", "nofcall", "on", ">pw", "~*", "&*", "+@all", "-fcall", "-function"
        )
    url = f"redis://nofcall:pw@127.0.0.1:{server.port}/0"
    with make_pool(url, namespace) as pool:
        for _ in range(10):
            with pool.acquire(PROVIDER):
                pass
        assert totals(pool) == (10, 10, 0)
    with server.client() as admin:
        assert not libraries(admin)  # nothing could be loaded, nothing was


def test_a_report_takes_effect_without_a_further_call(server: Server, namespace: str) -> None:
    """A worker reports success and then does nothing more with the pool: another process
    sees the lease closed and the success counted all the same."""
    with make_pool(server.url, namespace) as watcher:
        done = CTX.Event()
        release = CTX.Event()
        worker = CTX.Process(
            target=mp_workers.succeed_once_then_idle,
            args=(server.url, namespace, PROVIDER, done, release),
            daemon=True,
        )
        worker.start()
        try:
            assert done.wait(60), "the worker never reported"
            assert totals(watcher) == (2, 2, 0)
        finally:
            release.set()
            worker.join(10)
        assert worker.exitcode == 0


def test_a_dropped_connection_loses_no_later_call(server: Server, namespace: str) -> None:
    with make_pool(server.url, namespace) as pool:
        pool.acquire(PROVIDER).success()
        pool.acquire(PROVIDER).success()
        with server.client() as admin:
            admin.client_kill_filter(_type="normal", skipme=True)
        for _ in range(5):
            pool.acquire(PROVIDER).success()
        requests, successes, in_flight = totals(pool)
        assert requests == 7 and in_flight == 0
        # the reply of a report in flight when the connection dropped may be lost, never
        # the report itself: Redis had it before the connection was killed
        assert successes == 7


def test_raw_client_calls_keep_working_beside_the_lane(server: Server, namespace: str) -> None:
    """The pool's other operations (registration, admin, stats) use the client's own
    connections; a report sent just before them has already been applied."""
    with make_pool(server.url, namespace) as pool:
        lease = pool.acquire(PROVIDER)
        lease.success()
        pool.disable_key(PROVIDER, lease.key_id, reason="test")
        assert pool.stats(PROVIDER, lease.key_id).success_count == 1
        with redis.Redis.from_url(server.url) as raw:
            assert raw.ping()


def test_a_report_on_a_connection_the_server_closed_is_not_lost(tmp_path: Path) -> None:
    """The server closes idle connections (`timeout 1`): a worker that acquired, then
    spent longer than that on its call, still has its report applied."""
    srv = start_redis(tmp_path, extra=["--timeout", "1"])
    try:
        with make_pool(srv.url, "kpidle") as pool:
            lease = pool.acquire(PROVIDER)
            time.sleep(2.5)  # the server drops the idle connection meanwhile
            lease.success()
            assert totals(pool) == (1, 1, 0)
            time.sleep(2.5)
            pool.acquire(PROVIDER).success()
            pool.acquire(PROVIDER).success()
            assert totals(pool) == (3, 3, 0)
    finally:
        srv.kill()


def _child_uses_the_pool(pool: KeyPool) -> None:
    pool.providers()  # a plain command first: it must not read the parent's replies
    with pool.acquire(PROVIDER):
        pass


def test_a_forked_child_leaves_the_parents_unread_replies_alone(
    server: Server, namespace: str
) -> None:
    with make_pool(server.url, namespace) as pool:
        pool.acquire(PROVIDER).success()
        pool.acquire(PROVIDER).success()  # unconfirmed: its reply is still unread
        child = multiprocessing.get_context("fork").Process(
            target=_child_uses_the_pool, args=(pool,)
        )
        child.start()
        child.join(30)
        assert child.exitcode == 0
        for _ in range(3):
            pool.acquire(PROVIDER).success()
        assert totals(pool) == (6, 6, 0)


def test_an_interrupt_while_a_report_is_sent_keeps_later_calls_in_step(
    server: Server, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with make_pool(server.url, namespace) as pool:
        pool.acquire(PROVIDER).success()
        send = Lane._write

        def send_then_interrupt(self: Lane, *args: Any) -> None:
            send(self, *args)
            raise KeyboardInterrupt  # after the bytes left, before the call is recorded

        lease = pool.acquire(PROVIDER)
        monkeypatch.setattr(Lane, "_write", send_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            lease.success()
        monkeypatch.undo()
        picked = {pool.acquire(PROVIDER).key_id for _ in range(2)}
        assert picked == {"k1", "k2"}  # real replies, not a neighbour's
        requests, successes, in_flight = totals(pool)
        assert (requests, successes, in_flight) == (4, 2, 2)


def test_short_lived_threads_do_not_use_up_a_small_connection_pool(
    server: Server, namespace: str
) -> None:
    url = f"{server.url}?max_connections=4"
    with make_pool(url, namespace) as pool:
        errors: list[BaseException] = []

        def work() -> None:
            try:
                pool.acquire(PROVIDER).success()
            except BaseException as exc:  # pragma: no cover - the failure being tested
                errors.append(exc)

        for _ in range(20):
            thread = threading.Thread(target=work)
            thread.start()
            thread.join()
        assert not errors
        assert totals(pool) == (20, 20, 0)


def test_an_acquire_sent_behind_an_unread_report_finds_it_applied(
    server: Server, namespace: str
) -> None:
    """A report is sent without waiting, and the next acquire goes right behind it on the
    same connection (one round trip for both): the server runs them in that order, so a
    key that allows one lease at a time is free again every time."""
    with KeyPool(
        settings=KeyPoolSettings(redis_url=server.url, namespace=namespace, lease_ttl=60)
    ) as pool:
        pool.add_key(PROVIDER, "solo", mp_workers.secret_for("solo"), max_concurrency=1)
        for _ in range(50):
            pool.acquire(PROVIDER, wait=0).success()
        stats = pool.stats(PROVIDER, "solo")
        assert (stats.total_requests, stats.success_count, stats.in_flight) == (50, 50, 0)


@pytest.mark.parametrize("dropped", ["report", "acquire"])
def test_a_connection_lost_with_a_report_and_an_acquire_in_flight(
    server: Server, namespace: str, dropped: str
) -> None:
    """The connection drops after the server ran the report (its reply lost, the acquire
    behind it never sent on) or after it ran both (the acquire's reply lost): both calls go
    again on a fresh connection and each takes effect once."""
    with FaultProxy(server.port) as proxy:
        pool = KeyPool(
            settings=KeyPoolSettings(redis_url=proxy.url, namespace=namespace, lease_ttl=60)
        )
        with pool:
            pool.add_key(PROVIDER, "solo", mp_workers.secret_for("solo"), max_concurrency=1)
            pool.acquire(PROVIDER).success()  # the lane's connection is open and proven
            lease = pool.acquire(PROVIDER)
            proxy.arm(containing(b"success") if dropped == "report" else script_calls)
            if dropped == "acquire":
                proxy.arm(script_calls, skip=1)  # the report goes through; the acquire not
            lease.success()
            again = pool.acquire(PROVIDER, wait=0)
            assert proxy.dropped_count == 1
            again.success()
            stats = pool.stats(PROVIDER, "solo")
            assert (stats.total_requests, stats.success_count, stats.in_flight) == (3, 3, 0)


class _Interrupted(Exception):
    """What a signal handler raises in a worker (as Celery's soft time limit does)."""


def test_an_acquire_interrupted_behind_an_unread_report_is_abandoned(
    server: Server, namespace: str
) -> None:
    """The server holds writes for a moment; an acquire sent behind an unread report is
    interrupted while it waits. It is abandoned — never sent again, its reply never taken
    for another's — and the report goes through: the thread's next acquire gets a key,
    and no lease is left open."""

    def interrupt(*_: object) -> None:
        raise _Interrupted

    with KeyPool(
        settings=KeyPoolSettings(redis_url=server.url, namespace=namespace, lease_ttl=60)
    ) as pool:
        for key_id in ("a", "b"):
            pool.add_key(PROVIDER, key_id, mp_workers.secret_for(key_id), max_concurrency=1)
        for _ in range(3):
            pool.acquire(PROVIDER).success()
        pool.acquire(PROVIDER).success()  # its report is left unread
        previous = signal.signal(signal.SIGALRM, interrupt)
        try:
            with server.client() as admin:
                admin.execute_command("CLIENT", "PAUSE", "300", "WRITE")
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            with pytest.raises(_Interrupted):
                pool.acquire(PROVIDER)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        time.sleep(0.4)
        lease = pool.acquire(PROVIDER, wait=0)
        lease.success()
        stats = {s.key_id: s for s in pool.snapshot(PROVIDER)}
        assert sum(s.in_flight for s in stats.values()) == 0
        assert sum(s.success_count for s in stats.values()) == 5


def test_reports_sent_again_after_a_lost_connection_survive_an_interrupt(
    server: Server, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops before two reports reach the server; sending them again is
    interrupted at the first. Neither is lost: the next call sends both."""
    with FaultProxy(server.port) as proxy:
        pool = KeyPool(
            settings=KeyPoolSettings(redis_url=proxy.url, namespace=namespace, lease_ttl=60)
        )
        with pool:
            pool.add_key(PROVIDER, "k1", mp_workers.secret_for("k1"))
            pool.add_key(PROVIDER, "k2", mp_workers.secret_for("k2"))
            pool.acquire(PROVIDER).success()
            leases = [pool.acquire(PROVIDER) for _ in range(2)]
            proxy.arm(containing(b"success"), mode="before")  # never reaches the server
            for lease in leases:
                lease.success()  # sent (as far as the pool knows); replies unread
            round_trip = Lane._round_trip

            def interrupted(self: Lane, *args: Any) -> Any:
                monkeypatch.setattr(Lane, "_round_trip", round_trip)
                raise KeyboardInterrupt

            monkeypatch.setattr(Lane, "_round_trip", interrupted)
            with pytest.raises(KeyboardInterrupt):
                pool.acquire(PROVIDER)
            assert proxy.dropped_count == 1
            pool.acquire(PROVIDER).success()
            requests, successes, in_flight = totals(pool)
            assert successes == requests - in_flight == 4
