"""A fleet soak with connections killed every second (contract section 12).

Several spawned worker processes share one pool on a private ``redis-server`` and run
acquire / success / fail / release cycles for about ten seconds, while a thread of the
test sends ``CLIENT KILL TYPE normal SKIPME yes`` every second: every worker's connection
is cut, between calls or in the middle of one. When every worker has finished and closed
its pool:

* no slot leaked: every key's ``in_flight`` is 0 and the ``max_concurrency`` keys can be
  fully acquired again,
* nothing was counted twice or lost: per key, ``total_requests`` equals the acquires the
  workers saw succeed, ``success_count`` the successes they reported, ``error_count`` the
  failures,
* no caller saw the blip (a cut connection is the pool's to deal with),
* the rpm key admitted at most ``limit + limit·D/60`` over the run.
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from keypool import KeyPool, NoKeyAvailable
from tests import fleet_workers
from tests.cluster import Server, start_redis
from tests.fleet_workers import KEYS, PROVIDER, Tally

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CTX = multiprocessing.get_context("spawn")
WORKERS = 3
SECONDS = 10.0
KILL_EVERY = 1.0


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_redis(tmp_path)
    try:
        yield srv
    finally:
        srv.kill()


class Killer(threading.Thread):
    """Cuts every client connection of the server (but its own) every ``every`` seconds."""

    def __init__(self, server: Server, every: float) -> None:
        super().__init__(name="connection-killer", daemon=True)
        self.client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2.0)
        self.every = every
        self.stopping = threading.Event()
        self.rounds = 0
        self.killed = 0

    def run(self) -> None:
        while not self.stopping.wait(self.every):
            try:
                self.killed += int(
                    self.client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
                )
                self.rounds += 1
            except redis.RedisError:
                continue

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)
        self.client.close()


def test_fleet_with_connections_killed_every_second_leaks_nothing_and_counts_once(
    server: Server, namespace: str
) -> None:
    pool = KeyPool(settings=fleet_workers.settings_for(server.url, namespace))
    fleet_workers.register(pool)
    barrier = CTX.Barrier(WORKERS + 1)
    out_q = CTX.Queue()
    procs = [
        CTX.Process(
            target=fleet_workers.entry,
            args=(out_q, i, (server.url, namespace, 1000 + i, SECONDS, barrier)),
            daemon=True,
        )
        for i in range(WORKERS)
    ]
    killer = Killer(server, KILL_EVERY)
    tallies: list[Tally] = []
    errors: list[str] = []
    try:
        for proc in procs:
            proc.start()
        barrier.wait(fleet_workers.START_TIMEOUT)
        started = time.monotonic()
        killer.start()
        deadline = time.monotonic() + SECONDS + 60
        while len(tallies) + len(errors) < WORKERS and time.monotonic() < deadline:
            try:
                _index, status, payload = out_q.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs) and out_q.empty():
                    break
                continue
            (tallies if status == "ok" else errors).append(payload)
        duration = time.monotonic() - started
        killer.stop()
        for proc in procs:
            proc.join(10)
    finally:
        killer.stop()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    assert not errors, "\n".join(errors)
    assert len(tallies) == WORKERS, f"only {len(tallies)} of {WORKERS} workers reported"
    assert killer.rounds >= SECONDS / KILL_EVERY / 2 and killer.killed > 0, (
        f"the killer ran {killer.rounds} rounds and cut {killer.killed} connections"
    )

    seen = Tally()
    for tally in tallies:
        seen.acquired.update(tally.acquired)
        seen.succeeded.update(tally.succeeded)
        seen.failed.update(tally.failed)
        seen.released.update(tally.released)
        seen.unavailable.update(tally.unavailable)
    assert sum(seen.acquired.values()) > 100, f"the fleet hardly ran: {seen}"

    try:
        stats = {s.key_id: s for s in pool.snapshot(PROVIDER)}
        assert set(stats) == set(KEYS)
        problems: list[str] = []
        for key_id, s in sorted(stats.items()):
            if s.in_flight != 0:
                problems.append(f"{key_id}: {s.in_flight} slots still held (leaked)")
            stored = (s.total_requests, s.success_count, s.error_count)
            reported = (seen.acquired[key_id], seen.succeeded[key_id], seen.failed[key_id])
            if stored != reported:
                problems.append(
                    f"{key_id}: (total_requests, success_count, error_count) stored {stored}, "
                    f"workers saw {reported}"
                )
        assert not problems, (
            f"after {killer.killed} connections cut in {killer.rounds} rounds:\n"
            + "\n".join(problems)
        )
        assert not seen.unavailable, f"callers saw the cut connections: {dict(seen.unavailable)}"

        rpm = KEYS["r1"]["rpm"]
        bound = rpm + rpm * (duration + 1.0) / 60
        assert stats["r1"].total_requests <= bound, (
            f"r1 (rpm={rpm}) admitted {stats['r1'].total_requests} in {duration:.1f}s "
            f"(bound {bound:.0f})"
        )
        assert seen.acquired["r1"] <= bound

        # every max_concurrency key can be fully acquired again
        for key_id, options in KEYS.items():
            limit = options.get("max_concurrency")
            if limit is None:
                continue
            for other in KEYS:
                if other != key_id:
                    pool.disable_key(PROVIDER, other)
            held = []
            for _ in range(limit):
                held.append(pool.acquire(PROVIDER))
            with pytest.raises(NoKeyAvailable):
                pool.acquire(PROVIDER)
            assert Counter(lease.key_id for lease in held) == {key_id: limit}
            for lease in held:
                lease.release()
            for other in KEYS:
                if other != key_id:
                    pool.enable_key(PROVIDER, other)
    finally:
        pool.close()
