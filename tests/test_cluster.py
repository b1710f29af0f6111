"""keypool on a real Redis Cluster: three masters on free ports, started once for the module
(``redis+cluster://`` URL naming two of them), plus a private cluster for the node-failure
test. Each (namespace, provider) lives in one slot; the tests pick provider names whose
slots belong to different masters, so every cross-slot path (pipelined registration, the
namespace-level sets, model routing without a provider) really crosses nodes.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.crc import key_slot

from keypool import (
    AsyncKeyPool,
    EnhancedAPIKeyManager,
    KeyPool,
    KeyPoolSettings,
    NoKeyAvailable,
    PoolUnavailable,
)
from tests import mp_workers
from tests.cluster import HOST, Cluster, free_port, start_cluster, wait_until

pytestmark = [pytest.mark.redis]

CTX = multiprocessing.get_context("spawn")
SOCKET_TIMEOUT = 1.0
CONNECT_TIMEOUT = 0.5
BOUND = SOCKET_TIMEOUT + CONNECT_TIMEOUT + 0.5  # a failing call raises within this


def secret(provider: str, key_id: str) -> str:
    return f"sk-cluster-{provider}-{key_id}-0123456789"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A three-master Redis Cluster for the whole module, killed afterwards."""
    running = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def make_pool(cluster: Cluster, namespace: str) -> Iterator[Callable[..., KeyPool]]:
    pools: list[KeyPool] = []

    def make(**overrides: Any) -> KeyPool:
        options: dict[str, Any] = {"redis_url": cluster.url, "namespace": namespace}
        options.update(overrides)
        pool = KeyPool(settings=KeyPoolSettings(**options))
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()
    cluster.delete(f"{namespace}:*")


@pytest.fixture
def pool(make_pool: Callable[..., KeyPool]) -> KeyPool:
    return make_pool()


def slot_of(namespace: str, provider: str) -> int:
    return key_slot(f"{namespace}:{{{provider}}}:meta".encode())


def spread_providers(cluster: Cluster, namespace: str) -> list[str]:
    """Three provider names whose slots belong to three different masters."""
    by_node: dict[int, str] = {}
    for i in range(500):
        name = f"prov{i}"
        by_node.setdefault(cluster.node_of_slot(slot_of(namespace, name)), name)
        if len(by_node) == len(cluster.nodes):
            return [by_node[node.port] for node in cluster.nodes]
    raise AssertionError("could not find providers on every node")


def run_workers(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> list[Any]:
    """Run each ``fn(*args)`` in a spawned process; their results, in order."""
    out_q = CTX.Queue()
    procs = [
        CTX.Process(target=mp_workers.entry, args=(out_q, i, fn, args), daemon=True)
        for i, (fn, args) in enumerate(calls)
    ]
    results: dict[int, Any] = {}
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 60
        while len(results) < len(procs):
            try:
                index, status, value = out_q.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"workers did not finish in time; got {sorted(results)}")
            if status == "error":
                pytest.fail(value, pytrace=False)
            results[index] = value
        return [results[i] for i in range(len(procs))]
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


# ---------------------------------------------------------------------- layout


def owner_by_cluster_nodes(cluster: Cluster, slot: int) -> int:
    """The port of the master that owns ``slot``, as CLUSTER NODES tells it."""
    with cluster.nodes[0].client() as direct:
        nodes = direct.execute_command("CLUSTER NODES")
    for address, info in nodes.items():
        if "master" in info["flags"]:
            for bounds in info["slots"]:
                if int(bounds[0]) <= slot <= int(bounds[-1]):
                    return int(address.split("@")[0].rsplit(":", 1)[1])
    raise LookupError(slot)


def test_each_provider_lives_in_one_slot_on_the_node_that_owns_it(
    cluster: Cluster, pool: KeyPool, namespace: str
) -> None:
    providers = spread_providers(cluster, namespace)
    for provider in providers:
        pool.add_key(provider, "k1", secret(provider, "k1"), rpm=10, max_concurrency=2)
        with pool.acquire(provider):
            pass
    owners = {}
    for provider in providers:
        slot = slot_of(namespace, provider)
        with cluster.nodes[0].client() as direct:  # the server computes the same slot
            for suffix in ("meta", "all", "rr", "k:k1", "leases"):
                name = f"{namespace}:{{{provider}}}:{suffix}"
                assert direct.execute_command("CLUSTER KEYSLOT", name) == slot
        owners[provider] = owner_by_cluster_nodes(cluster, slot)
    assert len(set(owners.values())) == 3  # three providers, three masters
    for provider, port in owners.items():
        node = next(n for n in cluster.nodes if n.port == port)
        with node.client() as direct:
            local = set(direct.scan_iter(match=f"{namespace}:{{*", count=1000))
            assert local, f"node {port} holds nothing of {provider}"
            assert all(name.startswith(f"{namespace}:{{{provider}}}:") for name in local), local
        # what `redis-cli -p <port> HGETALL <key>` shows an operator on that node
        with node.client(decode_responses=False) as direct:
            raw = direct.hgetall(f"{namespace}:{{{provider}}}:k:k1")
        state = {k.decode(): v for k, v in raw.items()}
        assert state["id"] == b"k1" and state["total"] == b"1" and state["rpm"] == b"10"
        assert secret(provider, "k1").encode() not in b"".join([*raw.keys(), *raw.values()])


# ---------------------------------------------------------------------- the API on a cluster


def test_add_keys_pipelines_across_slots_and_nodes(
    cluster: Cluster, pool: KeyPool, namespace: str
) -> None:
    providers = spread_providers(cluster, namespace)
    entries = [(p, f"k{i}", secret(p, f"k{i}")) for p in providers for i in range(4)]
    assert pool.add_keys(entries, rpm=100, models=["shared-model"]) == 12
    assert pool.add_keys(entries, rpm=100) == 12  # idempotent
    assert pool.providers() == sorted(providers)
    snapshot = pool.snapshot()
    assert [(s.provider, s.key_id) for s in snapshot] == sorted((p, k) for p, k, _ in entries)
    assert {s.rpm for s in snapshot} == {100}
    assert {s.models for s in snapshot} == {("shared-model",)}
    # the model's provider set (another slot) names all three providers
    client = cluster.client()
    assert client.smembers(f"{namespace}:model:shared-model") == set(providers)
    assert client.smembers(f"{namespace}:providers") == set(providers)
    client.close()


def test_acquire_report_stats_snapshot(cluster: Cluster, pool: KeyPool, namespace: str) -> None:
    providers = spread_providers(cluster, namespace)
    for provider in providers:
        for key_id in ("a", "b"):
            pool.add_key(provider, key_id, secret(provider, key_id))
    for provider in providers:
        picks = Counter()
        for _ in range(6):
            with pool.acquire(provider) as lease:
                assert lease.secret == secret(provider, lease.key_id)
                picks[lease.key_id] += 1
        assert picks == {"a": 3, "b": 3}
        lease = pool.acquire(provider)
        lease.fail(500)
        stats = pool.stats(provider, lease.key_id)
        assert stats.error_count == 1 and stats.errors_by_kind == {"server": 1}
    assert sum(s.success_count for s in pool.snapshot()) == 18
    assert len(pool.snapshot(providers[1])) == 2


def test_model_routing_without_a_provider_crosses_nodes(
    cluster: Cluster, pool: KeyPool, namespace: str
) -> None:
    first, second, third = spread_providers(cluster, namespace)
    for provider in (first, second, third):
        pool.add_key(provider, "k1", secret(provider, "k1"))
        pool.add_key(provider, "k2", secret(provider, "k2"))
    pool.assign_model("gpt-x", first, "k2")
    pool.assign_model("gpt-x", third, "k1")
    served = set()
    for _ in range(6):
        with pool.acquire(model="gpt-x") as lease:
            served.add((lease.provider, lease.key_id))
            assert lease.model == "gpt-x"
    assert served <= {(first, "k2"), (third, "k1")}
    pool.disable_key(first, "k2")
    for _ in range(3):
        with pool.acquire(model="gpt-x") as lease:
            assert (lease.provider, lease.key_id) == (third, "k1")
    pool.disable_key(third, "k1")
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(model="gpt-x")
    assert info.value.retry_after is None
    # another process (a fresh pool, no local cache) finds the model's providers too
    other = KeyPool(settings=KeyPoolSettings(redis_url=cluster.url, namespace=namespace))
    try:
        other.add_key(third, "k1", secret(third, "k1"))  # every process holds the secrets
        pool.enable_key(third, "k1")
        with other.acquire(model="gpt-x") as lease:
            assert (lease.provider, lease.key_id) == (third, "k1")
    finally:
        other.close()


def test_cooldown_set_by_one_pool_is_seen_by_another(
    cluster: Cluster, make_pool: Callable[..., KeyPool], namespace: str
) -> None:
    provider = spread_providers(cluster, namespace)[2]
    first, second = make_pool(), make_pool()
    for p in (first, second):
        for key_id in ("k1", "k2"):
            p.add_key(provider, key_id, secret(provider, key_id))
    lease = first.acquire(provider)
    lease.fail(429, retry_after=30)
    seen = second.stats(provider, lease.key_id)
    assert seen.status == "cooling" and seen.is_rate_limited
    assert seen.cooldown_until == first.stats(provider, lease.key_id).cooldown_until
    assert seen.cooldown_until is not None and seen.cooldown_until > time.time() + 20
    for _ in range(4):
        with second.acquire(provider) as other:
            assert other.key_id != lease.key_id


def test_seed_api_on_a_cluster(cluster: Cluster, namespace: str) -> None:
    provider = spread_providers(cluster, namespace)[1]
    km = EnhancedAPIKeyManager(url=cluster.url, namespace=namespace, load_env=False)
    other = EnhancedAPIKeyManager(url=cluster.url, namespace=namespace, load_env=False)
    try:
        for key_id in ("research", "prod", "batch"):
            km.add_key(provider, key_id, secret(provider, key_id))
            other.add_key(provider, key_id, secret(provider, key_id))
        picks = Counter()
        for manager in (km, other, km, other, km, other):
            key_id, api_key = manager.get_next_key(provider)
            assert key_id is not None and api_key == secret(provider, key_id)
            picks[key_id] += 1
        assert picks == {"research": 2, "prod": 2, "batch": 2}  # one shared rotation
        km.assign_model_to_key("llama", provider, "prod")
        assert other.get_key_for_model("llama") == ("prod", secret(provider, "prod"))
        km.mark_key_error(provider, "research", is_rate_limit=True, retry_after=60)
        stats = other.get_key_usage_stats(provider, "research")
        assert stats["is_rate_limited"] is True and stats["error_count"] == 1
        km.mark_key_error(provider, "batch")
        assert other.get_best_key(provider)[0] == "prod"
        km.mark_key_success(provider, "batch")
        assert other.get_key_usage_stats(provider, "batch")["consecutive_errors"] == 0
    finally:
        km.pool.close()
        other.pool.close()
        cluster.delete(f"{namespace}:*")


def test_async_pool_on_a_cluster(cluster: Cluster, namespace: str) -> None:
    providers = spread_providers(cluster, namespace)

    async def scenario() -> None:
        settings = KeyPoolSettings(redis_url=cluster.url, namespace=namespace)
        async with AsyncKeyPool(settings=settings) as apool:
            entries = [(p, k, secret(p, k)) for p in providers for k in ("k1", "k2")]
            assert await apool.add_keys(entries) == 6
            await apool.assign_model("m", providers[2], "k2")
            picks = Counter()
            for provider in providers:
                for _ in range(4):
                    async with apool.acquire(provider) as lease:
                        assert lease.secret == secret(provider, lease.key_id)
                        picks[(provider, lease.key_id)] += 1
            assert set(picks.values()) == {2}
            lease = await apool.acquire(model="m")
            assert (lease.provider, lease.key_id) == (providers[2], "k2")
            await lease.fail(429, retry_after=30)  # for model m only
            stats = await apool.stats(providers[2], "k2")
            assert stats.status == "active" and set(stats.cooling_models) == {"m"}
            snapshot = await apool.snapshot()
            assert len(snapshot) == 6 and sum(s.success_count for s in snapshot) == 12
            assert await apool.providers() == sorted(providers)

    try:
        asyncio.run(scenario())
    finally:
        cluster.delete(f"{namespace}:*")


# ---------------------------------------------------------------------- many processes


@pytest.mark.slow
def test_round_robin_is_exact_across_processes(cluster: Cluster, namespace: str) -> None:
    key_ids = ["k1", "k2", "k3"]
    n, workers = 25, 4
    barrier = CTX.Barrier(workers)
    try:
        results = run_workers(
            [
                (mp_workers.round_robin, (cluster.url, namespace, key_ids, n, barrier, False))
                for _ in range(workers)
            ]
        )
    finally:
        cluster.delete(f"{namespace}:*")
    total: Counter[str] = Counter()
    for result in results:
        total.update(result["picks"])
        assert result["wrong_secret"] == 0
    m = n * workers
    assert sum(total.values()) == m
    assert set(total.values()) <= {m // len(key_ids), -(-m // len(key_ids))}, total


@pytest.mark.slow
def test_rpm_budget_holds_under_contention(cluster: Cluster, namespace: str) -> None:
    limit, duration, workers = 20, 1.5, 4
    barrier = CTX.Barrier(workers)
    try:
        results = run_workers(
            [
                (
                    mp_workers.hammer,
                    (cluster.url, namespace, ["k1"], {"rpm": limit}, barrier, duration, 0, False),
                )
                for _ in range(workers)
            ]
        )
    finally:
        cluster.delete(f"{namespace}:*")
    admitted = sum(sum(r["admitted"].values()) for r in results)
    span = max(r["last"] for r in results) - min(r["first"] for r in results)
    assert admitted >= limit  # the full bucket is usable at once
    assert admitted <= limit + limit * span / 60, (admitted, span)
    assert sum(r["refused"] for r in results) > 0


# ---------------------------------------------------------------------- script cache


def test_script_flush_on_every_node_mid_run_is_invisible(
    cluster: Cluster, pool: KeyPool, namespace: str
) -> None:
    providers = spread_providers(cluster, namespace)
    pool.add_keys([(p, k, secret(p, k)) for p in providers for k in ("k1", "k2")])
    errors: list[BaseException] = []
    done = Counter()
    stop = threading.Event()

    def loop(provider: str) -> None:
        try:
            while not stop.is_set():
                with pool.acquire(provider) as lease:
                    assert lease.secret == secret(provider, lease.key_id)
                done[provider] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(p,)) for p in providers]
    for thread in threads:
        thread.start()
    try:
        for i in range(25):
            cluster.flush_scripts()
            if i % 5 == 0:  # the pipelined path too, with a fresh batch each time
                batch = [(p, f"extra{i}", secret(p, f"extra{i}")) for p in providers]
                cluster.flush_scripts()
                assert pool.add_keys(batch) == 3
            time.sleep(0.02)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    assert not errors, errors
    assert all(done[p] > 0 for p in providers)
    cluster.flush_scripts()
    snapshot = pool.snapshot()
    assert len(snapshot) == 3 * (2 + 5)
    assert sum(s.success_count for s in snapshot) == sum(done.values())


def test_script_flush_is_invisible_to_the_async_pool(cluster: Cluster, namespace: str) -> None:
    providers = spread_providers(cluster, namespace)

    async def scenario() -> int:
        settings = KeyPoolSettings(redis_url=cluster.url, namespace=namespace)
        async with AsyncKeyPool(settings=settings) as apool:
            cluster.flush_scripts()
            await apool.add_keys([(p, "k1", secret(p, "k1")) for p in providers])
            count = 0
            for _ in range(4):
                cluster.flush_scripts()
                for provider in providers:
                    async with apool.acquire(provider):
                        count += 1
            cluster.flush_scripts()
            return sum(s.success_count for s in await apool.snapshot())

    try:
        assert asyncio.run(scenario()) == 12
    finally:
        cluster.delete(f"{namespace}:*")


# ---------------------------------------------------------------------- failures


def test_pool_on_an_unreachable_cluster_raises_pool_unavailable(namespace: str) -> None:
    url = f"redis+cluster://{HOST}:{free_port()},{HOST}:{free_port()}"
    settings = KeyPoolSettings(
        redis_url=url,
        namespace=namespace,
        socket_timeout=SOCKET_TIMEOUT,
        connect_timeout=CONNECT_TIMEOUT,
    )
    pool = KeyPool(settings=settings)  # creating it does not need the cluster yet
    try:
        for call in (lambda: pool.add_key("openai", "k1", "sk-1234567890"), pool.snapshot):
            start = time.monotonic()
            with pytest.raises(PoolUnavailable):
                call()
            assert time.monotonic() - start < BOUND
    finally:
        pool.close()


def test_a_master_going_down_and_coming_back_empty(tmp_path: Path, namespace: str) -> None:
    """Calls for the dead master's slots fail fast with PoolUnavailable; once the cluster
    declares itself down every call does; when the node is back (empty), calls go on and
    the keys this process holds are registered again on that node. With every node gone,
    calls still fail fast with PoolUnavailable."""
    cluster = start_cluster(tmp_path, node_timeout_ms=1000)
    pool = None
    try:
        pool = KeyPool(
            settings=KeyPoolSettings(
                redis_url=cluster.url,
                namespace=namespace,
                socket_timeout=SOCKET_TIMEOUT,
                connect_timeout=CONNECT_TIMEOUT,
            )
        )
        providers = spread_providers(cluster, namespace)
        for provider in providers:
            for key_id in ("k1", "k2"):
                pool.add_key(provider, key_id, secret(provider, key_id))
            with pool.acquire(provider):
                pass
        victim, survivor = cluster.nodes[2], cluster.nodes[0]
        lost, alive = providers[2], providers[0]
        victim.kill()

        def unavailable_fast(provider: str) -> None:
            start = time.monotonic()
            with pytest.raises(PoolUnavailable):
                pool.acquire(provider)
            took = time.monotonic() - start
            assert took < BOUND, f"PoolUnavailable after {took:.2f}s"

        unavailable_fast(lost)
        wait_until(lambda: cluster.state(survivor) == "fail", 15, "cluster marked down")
        unavailable_fast(alive)  # CLUSTERDOWN from a node that is up
        unavailable_fast(lost)
        victim.start()
        cluster.wait_ok()

        def serves(provider: str) -> bool:
            try:
                with pool.acquire(provider):
                    return True
            except PoolUnavailable:
                return False

        wait_until(lambda: all(serves(p) for p in providers), 15, "calls served again")
        restarted = {s.key_id: s for s in pool.snapshot(lost)}
        assert set(restarted) == {"k1", "k2"}  # re-registered on the empty node
        assert sum(s.total_requests for s in pool.snapshot(alive)) >= 2  # kept
        cluster.stop()  # every node gone: still PoolUnavailable, still fast
        unavailable_fast(alive)
        unavailable_fast(lost)
    finally:
        if pool is not None:
            pool.close()
        cluster.stop()
