"""keypool behind Redis Sentinel: a master, a replica and three Sentinels on free ports
(``redis+sentinel://s1,s2,s3/mymaster``). The master is SIGKILLed while a worker loop
acquires and reports; calls fail fast with ``PoolUnavailable`` during the failover and go
on by themselves on the promoted replica, with the pool's state intact.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keypool import AsyncKeyPool, KeyPool, KeyPoolSettings, PoolUnavailable
from tests.cluster import HOST, Server, start_redis, start_sentinel, wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SERVICE = "mymaster"
PROVIDER = "openai"
SOCKET_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.5
# a failing call raises within this: one retry on a fresh connection (asking the sentinels
# again) may follow the first attempt
BOUND = 2 * (SOCKET_TIMEOUT + CONNECT_TIMEOUT) + 0.5
FAILOVER_DEADLINE = 25.0  # seconds from the kill until calls must be served again


def secret(key_id: str) -> str:
    return f"sk-sentinel-{key_id}-0123456789"


@dataclass
class Deployment:
    master: Server
    replica: Server
    sentinels: list[Server]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}"

    def master_port(self) -> int:
        with self.sentinels[0].client() as c:
            _host, port = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
        return int(port)


def _sentinels_ready(sentinels: list[Server]) -> bool:
    for sentinel in sentinels:
        with sentinel.client() as c:
            master = c.execute_command("SENTINEL MASTER", SERVICE)
            replicas = c.execute_command("SENTINEL REPLICAS", SERVICE)
        if int(master["num-other-sentinels"]) != len(sentinels) - 1 or not replicas:
            return False
    return True


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    """Master + replica + three Sentinels, every one killed after the test."""
    started: list[Server] = []
    try:
        master = start_redis(tmp_path, name="master")
        started.append(master)
        replica = start_redis(
            tmp_path, name="replica", extra=["--replicaof", HOST, str(master.port)]
        )
        started.append(replica)
        wait_until(
            lambda: replica.client().info("replication")["master_link_status"] == "up",
            15,
            "replica in sync",
        )
        sentinels = []
        for _ in range(3):
            sentinels.append(start_sentinel(tmp_path, master.port, service=SERVICE))
            started.append(sentinels[-1])
        wait_until(lambda: _sentinels_ready(sentinels), 20, "sentinels know each other")
        yield Deployment(master, replica, sentinels)
    finally:
        for server in started:
            server.kill()


def test_failover_is_survived(deployment: Deployment, namespace: str) -> None:
    settings = KeyPoolSettings(
        redis_url=deployment.url,
        namespace=namespace,
        socket_timeout=SOCKET_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT,
    )
    pool = KeyPool(settings=settings)
    try:
        pool.add_key(PROVIDER, "k1", secret("k1"))
        pool.add_key(PROVIDER, "k2", secret("k2"))
        pool.add_key(PROVIDER, "k3", secret("k3"), models=["gpt-4o"])
        pool.mark_failure(PROVIDER, "k2", 429, retry_after=300)
        for _ in range(10):
            with pool.acquire(PROVIDER):
                pass
        before = {s.key_id: s for s in pool.snapshot(PROVIDER)}
        with deployment.master.client() as master:
            assert master.wait(1, 5000) == 1  # every write so far is on the replica
            epoch = master.hget(f"{namespace}:{{{PROVIDER}}}:meta", "epoch")
        with deployment.replica.client() as replica:
            replica.script_flush()  # the promoted replica will not know the scripts

        # a worker loop; the master dies under it
        outcomes: list[tuple[float, float, str]] = []  # (since kill, took, outcome)
        killed_at: float | None = None
        served_after = 0
        loop_deadline = time.monotonic() + FAILOVER_DEADLINE + 5
        while time.monotonic() < loop_deadline:
            if killed_at is None and len(outcomes) >= 5:
                deployment.master.kill()
                killed_at = time.monotonic()
            start = time.monotonic()
            try:
                with pool.acquire(PROVIDER) as lease:
                    assert lease.secret == secret(lease.key_id)
                outcome = "ok"
            except PoolUnavailable:
                outcome = "unavailable"
            took = time.monotonic() - start
            since = start - killed_at if killed_at is not None else -1.0
            outcomes.append((since, took, outcome))
            if killed_at is not None and outcome == "ok":
                served_after += 1
                if served_after >= 5:
                    break
            if outcome != "ok":
                time.sleep(0.05)
        assert killed_at is not None
        during = [o for o in outcomes if o[0] >= 0]
        failures = [o for o in during if o[2] == "unavailable"]
        assert failures, "no call failed while the master was down"
        slowest = max(took for _, took, _ in failures)
        assert slowest < BOUND, f"a failing call took {slowest:.2f}s"
        assert served_after >= 5, f"not served again within {FAILOVER_DEADLINE}s: {during[-3:]}"
        recovered_at = min(since for since, _, outcome in during if outcome == "ok")
        assert recovered_at < FAILOVER_DEADLINE
        assert all(o[2] == "ok" for o in during if o[0] > recovered_at + 1.0)
        assert deployment.master_port() == deployment.replica.port  # the replica took over

        # the state came along: same pool (no re-registration), cooldown kept, counters on
        after = {s.key_id: s for s in pool.snapshot(PROVIDER)}
        assert set(after) == {"k1", "k2", "k3"}
        with deployment.replica.client() as new_master:
            assert new_master.hget(f"{namespace}:{{{PROVIDER}}}:meta", "epoch") == epoch
        assert after["k2"].status == "cooling"
        assert after["k2"].cooldown_until == before["k2"].cooldown_until
        assert after["k3"].models == ("gpt-4o",)
        total_before = sum(s.total_requests for s in before.values())
        assert sum(s.total_requests for s in after.values()) >= total_before + served_after

        # an asyncio process on the same URL sees the same pool on the new master
        async def from_async() -> tuple[str, int]:
            async with AsyncKeyPool(settings=settings) as apool:
                await apool.add_key(PROVIDER, "k3", secret("k3"), models=["gpt-4o"])
                async with apool.acquire(model="gpt-4o") as lease:
                    key_id = lease.key_id
                return key_id, (await apool.stats(PROVIDER, "k2")).error_count

        assert asyncio.run(from_async()) == ("k3", 1)

        # the new master loses everything (as a failover to an empty replica would):
        # the next call re-registers the keys this process holds and goes on
        with deployment.replica.client() as new_master:
            new_master.flushall()
        picks = Counter()
        for _ in range(3):
            with pool.acquire(PROVIDER) as lease:
                picks[lease.key_id] += 1
        assert picks == {"k1": 1, "k2": 1, "k3": 1}  # cooldown gone with the state
        assert sum(s.total_requests for s in pool.snapshot(PROVIDER)) == 3
    finally:
        pool.close()
