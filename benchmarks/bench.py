"""keypool benchmarks: every figure is a ratio against a raw Redis round trip measured in the
same run, on the same Redis, with the operations interleaved so machine drift hits all alike.

    python benchmarks/bench.py                         # redis://127.0.0.1:6379/0
    python benchmarks/bench.py --url redis://host:6379/3 --rounds 40 --json out.json

Nothing is flushed: everything lives under a namespace of its own, deleted at the end.
Needs the ``limits`` package for the peer comparison (``pip install limits``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio as aredis

from keypool import AsyncKeyPool, EnhancedAPIKeyManager, KeyPool, KeyPoolSettings

BUDGETS = {
    "rpm": 10_000_000,
    "tpm": 1_000_000_000,
    "rpd": 1_000_000_000,
    "max_concurrency": 100_000,
}


def pctl(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Callable[[], Any], n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        fn()
        out.append(clock() - start)


def make_pool(url: str, ns: str, keys: int, provider: str) -> KeyPool:
    pool = KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=ns, lease_ttl=600))
    pool.add_keys(
        ((provider, f"k{i:05d}", f"bench-secret-{provider}-{i}") for i in range(keys)), **BUDGETS
    )
    return pool


async def make_async_pool(url: str, ns: str, keys: int, provider: str) -> AsyncKeyPool:
    apool = AsyncKeyPool(settings=KeyPoolSettings(redis_url=url, namespace=ns, lease_ttl=600))
    await apool.add_keys(
        ((provider, f"k{i:05d}", f"bench-secret-{provider}-{i}") for i in range(keys)), **BUDGETS
    )
    return apool


async def atimed(fn: Callable[[], Any], n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        await fn()
        out.append(clock() - start)


def latency_suite(url: str, ns: str, rounds: int, batch: int) -> dict[str, dict[str, float]]:
    raw = redis.Redis.from_url(url)
    noop_sha = raw.script_load("return 1")
    pool = make_pool(url, ns, 10, "openai")
    km = EnhancedAPIKeyManager(pool=pool)
    # the embedded default store (memory://), same keys and budgets, in this process
    embedded = make_pool(f"memory://{ns}", ns, 10, "openai")
    sizes = {
        10: pool,
        1000: make_pool(url, ns, 1000, "p1k"),
        10000: make_pool(url, ns, 10000, "p10k"),
    }
    providers = {10: "openai", 1000: "p1k", 10000: "p10k"}
    # model routing: a model assigned to 10 or 5,000 keys of a provider
    routed = {10: make_pool(url, ns, 10, "m10"), 5000: make_pool(url, ns, 5000, "m5k")}
    for size, p in routed.items():
        prov = "m10" if size == 10 else "m5k"
        p.add_keys(
            ((prov, f"k{i:05d}", f"bench-secret-{prov}-{i}") for i in range(size)),
            models=[f"routed{size}"],
            **BUDGETS,
        )
    # every limit scope in play: the key, the key for the model, the account, the account
    # for the model
    scoped = make_pool(url, ns, 0, "scoped")
    scoped.add_keys(
        (("scoped", f"k{i:05d}", f"bench-secret-scoped-{i}") for i in range(10)),
        account="acct",
        **BUDGETS,
    )
    scoped.set_limits("scoped", account="acct", rpm=10**9, tpm=10**12)
    scoped.set_limits("scoped", account="acct", model="m", rpm=10**9, tpm=10**12)
    for i in range(10):
        scoped.set_limits("scoped", key_id=f"k{i:05d}", model="m", rpm=10**9, tpm=10**12)

    limiter: Any = None
    try:
        from limits import RateLimitItemPerSecond
        from limits.storage import RedisStorage
        from limits.strategies import MovingWindowRateLimiter

        limiter = MovingWindowRateLimiter(RedisStorage(url))
        item = RateLimitItemPerSecond(10_000_000)
    except ImportError:
        print("(limits not installed: the peer comparison is skipped)", file=sys.stderr)

    samples: dict[str, list[float]] = {}

    def add(name: str) -> list[float]:
        return samples.setdefault(name, [])

    # the asyncio pool on the same keys, its batches run in one loop between the others
    loop = asyncio.new_event_loop()
    apool = loop.run_until_complete(make_async_pool(url, ns, 10, "openai"))

    async def async_cycle() -> None:
        await (await apool.acquire("openai", tokens=10)).success(tokens=12)

    # warm up every path (script load, connections)
    for _ in range(50):
        loop.run_until_complete(async_cycle())
        raw.ping()
        raw.evalsha(noop_sha, 0)
        pool.acquire("openai", tokens=10).success(tokens=10)
        embedded.acquire("openai", tokens=10).success(tokens=10)
        for size, p in sizes.items():
            p.acquire(providers[size]).success()
        for size, p in routed.items():
            p.acquire(model=f"routed{size}").success()
        scoped.acquire("scoped", model="m", tokens=10).success(tokens=10)

    for r in range(rounds):
        steps: list[Callable[[], None]] = []
        steps.append(lambda: timed(raw.ping, batch, add("redis PING")))
        steps.append(lambda: timed(lambda: raw.evalsha(noop_sha, 0), batch, add("no-op EVALSHA")))
        if limiter is not None:
            steps.append(
                lambda: timed(
                    lambda: limiter.hit(item, "bench", ns), batch, add("limits moving-window hit")
                )
            )

        def leases_then_success() -> None:
            leases: list[Any] = []
            timed(lambda: leases.append(pool.acquire("openai", tokens=10)), batch, add("acquire"))
            it = iter(leases)
            timed(lambda: next(it).success(tokens=12), batch, add("lease.success"))

        steps.append(leases_then_success)
        steps.append(
            lambda: timed(
                lambda: pool.acquire("openai", tokens=10).success(tokens=12),
                batch,
                add("acquire+success"),
            )
        )
        steps.append(
            lambda: loop.run_until_complete(
                atimed(async_cycle, batch, add("acquire+success, asyncio"))
            )
        )
        steps.append(
            lambda: timed(
                lambda: embedded.acquire("openai", tokens=10).success(tokens=12),
                batch,
                add("acquire+success, memory://"),
            )
        )
        steps.append(lambda: timed(lambda: km.get_next_key("openai"), batch, add("get_next_key")))
        for size, p in sizes.items():
            name = f"acquire+success, {size:,} keys"

            def sized(p: KeyPool = p, prov: str = providers[size], name: str = name) -> None:
                timed(lambda: p.acquire(prov, tokens=10).success(tokens=10), batch, add(name))

            steps.append(sized)
        for size, p in routed.items():
            name = f"acquire+success, model of {size:,} keys"

            def by_model(p: KeyPool = p, name: str = name, model: str = f"routed{size}") -> None:
                timed(
                    lambda: p.acquire(model=model, tokens=10).success(tokens=10),
                    batch,
                    add(name),
                )

            steps.append(by_model)
        steps.append(
            lambda: timed(
                lambda: scoped.acquire("scoped", model="m", tokens=10).success(tokens=10),
                batch,
                add("acquire+success, 4 scopes"),
            )
        )
        # rotate the order each round so no operation always runs first or last
        shift = r % len(steps)
        for step in steps[shift:] + steps[:shift]:
            step()

    results = {
        name: {"p50_us": pctl(xs, 0.5) * 1e6, "p99_us": pctl(xs, 0.99) * 1e6, "n": len(xs)}
        for name, xs in samples.items()
    }
    loop.run_until_complete(apool.close())
    loop.close()
    embedded.close()
    raw.close()
    return results


# ---------------------------------------------------------------------- inside Redis


def inside_redis(url: str, ns: str, batches: int = 20, batch: int = 100) -> dict[str, float]:
    """Server time per call, from ``INFO commandstats`` deltas (nothing is reset): the part
    of a decision spent running its script, apart from the round trip. At 10 and at 10,000
    keys (every acquire of the larger pool serves a key not served for 10,000 calls)."""
    raw = redis.Redis.from_url(url)
    noop = raw.script_load("return 1")
    pools = {10: make_pool(url, ns, 10, "inside"), 10000: make_pool(url, ns, 10000, "inside10k")}
    provider = {10: "inside", 10000: "inside10k"}
    for size, pool in pools.items():
        for _ in range(20 if size == 10 else 10000):  # every key served once
            pool.acquire(provider[size], tokens=10).success(tokens=12)
    # a model assigned to 10 or to 5,000 keys of a provider, routed by the model alone
    routed = {10: make_pool(url, ns, 0, "inm10"), 5000: make_pool(url, ns, 0, "inm5k")}
    for size, pool in routed.items():
        prov = "inm10" if size == 10 else "inm5k"
        pool.add_keys(
            ((prov, f"k{i:05d}", f"bench-secret-{prov}-{i}") for i in range(size)),
            models=[f"inside{size}"],
            **BUDGETS,
        )
        for _ in range(max(20, size)):
            pool.acquire(model=f"inside{size}", tokens=10).success(tokens=12)
    lane = pools[10]._lanes.current() if pools[10]._lanes is not None else None
    verb = "fcall" if lane is not None and lane.uses_functions else "evalsha"

    def stat(command: str) -> tuple[int, int]:
        row = raw.info("commandstats").get(f"cmdstat_{command}", {})
        return int(row.get("usec", 0)), int(row.get("calls", 0))

    spent: dict[str, list[int]] = {"no-op EVALSHA": [0, 0]}

    def measure(name: str, command: str, fn: Callable[[], None]) -> None:
        usec, calls = stat(command)
        fn()
        usec2, calls2 = stat(command)
        row = spent.setdefault(name, [0, 0])
        row[0] += usec2 - usec
        row[1] += calls2 - calls

    leases: list[Any] = []

    def acquire(pool: KeyPool, prov: str) -> None:
        leases.extend(pool.acquire(prov, tokens=10) for _ in range(batch))

    def acquire_model(pool: KeyPool, model: str) -> None:
        leases.extend(pool.acquire(model=model, tokens=10) for _ in range(batch))

    def report(pool: KeyPool) -> None:
        while leases:
            leases.pop().success(tokens=12)
        pool.providers()  # reads the reports' replies (not a script call)

    for _ in range(batches):
        measure("no-op EVALSHA", "evalsha", lambda: [raw.evalsha(noop, 0) for _ in range(batch)])
        for size, pool in pools.items():
            measure(f"acquire, {size:,} keys", verb, lambda p=pool, s=size: acquire(p, provider[s]))
            measure(f"report, {size:,} keys", verb, lambda p=pool: report(p))
        for size, pool in routed.items():
            measure(
                f"acquire, model of {size:,} keys",
                verb,
                lambda p=pool, s=size: acquire_model(p, f"inside{s}"),
            )
            measure(f"report, model of {size:,} keys", verb, lambda p=pool: report(p))
    for pool in (*pools.values(), *routed.values()):
        pool.close()
    raw.close()
    out = {name: usec / max(1, calls) for name, (usec, calls) in spent.items()}
    for size in pools:
        out[f"acquire+report cycle, {size:,} keys"] = (
            out[f"acquire, {size:,} keys"] + out[f"report, {size:,} keys"]
        )
    for size in routed:
        out[f"acquire+report cycle, model of {size:,} keys"] = (
            out[f"acquire, model of {size:,} keys"] + out[f"report, model of {size:,} keys"]
        )
    out["calls_by"] = 1.0 if verb == "fcall" else 0.0
    return out


# ---------------------------------------------------------------------- throughput


def _throughput_worker(args: tuple[str, str, str, int, float, Any]) -> int:
    url, ns, mode, _idx, seconds, barrier = args
    if mode == "keypool":
        pool = KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=ns, lease_ttl=600))
        pool.add_keys(
            (("tput", f"k{i:03d}", f"bench-secret-tput-{i}") for i in range(50)), **BUDGETS
        )

        def cycle() -> None:
            pool.acquire("tput", tokens=10).success(tokens=10)
    else:
        raw = redis.Redis.from_url(url)
        sha = raw.script_load("return 1")

        def cycle() -> None:  # the same two round trips, doing nothing
            raw.evalsha(sha, 0)
            raw.evalsha(sha, 0)

    for _ in range(20):
        cycle()
    barrier.wait()
    done = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        cycle()
        done += 1
    return done


def throughput_suite(
    url: str, ns: str, procs: list[int], seconds: float
) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    out: dict[str, dict[str, float]] = {}
    for n in procs:
        row: dict[str, float] = {}
        for mode in ("evalsha", "keypool"):
            barrier = ctx.Manager().Barrier(n)
            with ctx.Pool(n) as workers:
                counts = workers.map(
                    _throughput_worker, [(url, ns, mode, i, seconds, barrier) for i in range(n)]
                )
            row[mode] = sum(counts) / seconds
        out[str(n)] = row
    return out


async def _async_throughput(url: str, ns: str, tasks: int, seconds: float) -> dict[str, float]:
    """Cycles per second of ``tasks`` tasks in one event loop: AsyncKeyPool acquire+success
    against two no-op EVALSHA on ``redis.asyncio`` (its default client), interleaved."""
    apool = await make_async_pool(url, ns, 50, "atput")
    raw = aredis.Redis.from_url(url)
    sha = await raw.script_load("return 1")

    async def keypool_cycle() -> None:
        await (await apool.acquire("atput", tokens=10)).success(tokens=10)

    async def evalsha_cycle() -> None:  # the same two round trips, doing nothing
        await raw.evalsha(sha, 0)
        await raw.evalsha(sha, 0)

    async def run(cycle: Callable[[], Any], span: float) -> int:
        done = 0
        deadline = time.perf_counter() + span

        async def task() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await cycle()
                done += 1

        await asyncio.gather(*(task() for _ in range(tasks)))
        return done

    counts = {"evalsha": 0, "keypool": 0}
    for cycle in (evalsha_cycle, keypool_cycle):
        await run(cycle, 0.2)  # warm up: connections, scripts
    rounds = 3
    for r in range(rounds):
        order = [("evalsha", evalsha_cycle), ("keypool", keypool_cycle)]
        for name, cycle in order if r % 2 == 0 else order[::-1]:
            counts[name] += await run(cycle, seconds / rounds)
    await apool.close()
    await raw.aclose()
    return {name: count / seconds for name, count in counts.items()}


def async_throughput(url: str, ns: str, tasks: int, seconds: float) -> dict[str, float]:
    return asyncio.run(_async_throughput(url, ns, tasks, seconds))


# ---------------------------------------------------------------------- import and memory


def import_and_memory(url: str, ns: str) -> dict[str, float]:
    pool = KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=ns, lease_ttl=600))
    entries = [("imp", f"k{i:05d}", f"bench-secret-imp-{i}") for i in range(10_000)]
    start = time.perf_counter()
    pool.add_keys(entries, rpm=1000, tpm=100_000, rpd=100_000, max_concurrency=4)
    import_s = time.perf_counter() - start
    # steady state: every key used, budgets charged, one lease open on each
    leases = [pool.acquire("imp", tokens=5) for _ in range(10_000)]
    for lease in leases[: len(leases) // 2]:
        lease.success(tokens=7)
    raw = redis.Redis.from_url(url)
    total = 0
    count = 0
    for key in raw.scan_iter(match=f"{ns}:{{imp}}:*", count=1000):
        total += raw.memory_usage(key, samples=0) or 0
        count += 1
    raw.close()
    return {"import_10k_s": import_s, "bytes_per_key": total / 10_000, "redis_keys": count}


def drop(url: str, ns: str) -> None:
    raw = redis.Redis.from_url(url)
    batch = list(raw.scan_iter(match=f"{ns}:*", count=1000))
    for i in range(0, len(batch), 500):
        raw.delete(*batch[i : i + 500])
    raw.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default=os.environ.get("KEYPOOL_BENCH_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--procs", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)

    ns = "kpbench-" + uuid.uuid4().hex[:8]
    try:
        lat = latency_suite(args.url, ns, args.rounds, args.batch)
        inside = inside_redis(args.url, ns)
        tput = (
            {}
            if args.skip_throughput
            else throughput_suite(
                args.url, ns, [int(p) for p in args.procs.split(",")], args.seconds
            )
        )
        atput = async_throughput(args.url, ns, 100, args.seconds)
        mem = import_and_memory(args.url, ns)
    finally:
        drop(args.url, ns)

    ping = lat["redis PING"]["p50_us"]
    noop = lat["no-op EVALSHA"]["p50_us"]
    info = redis.Redis.from_url(args.url).info("server")
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, Redis {info.get('redis_version')}, "
        f"hiredis: {_has_hiredis()}"
    )
    table(
        ["operation", "p50 µs", "p99 µs", "p50 / PING", "p50 / no-op EVALSHA"],
        [
            [
                name,
                f"{r['p50_us']:.1f}",
                f"{r['p99_us']:.1f}",
                f"{r['p50_us'] / ping:.2f}",
                f"{r['p50_us'] / noop:.2f}",
            ]
            for name, r in lat.items()
        ],
    )
    via = "FCALL" if inside.pop("calls_by") else "EVALSHA"
    print(f"\ninside Redis (INFO commandstats deltas; keypool's calls by {via}):")
    table(
        ["call", "µs in Redis per call"],
        [[name, f"{usec:.1f}"] for name, usec in inside.items()],
    )
    cycle_us = max(inside[f"acquire+report cycle, {n:,} keys"] for n in (10, 10000))
    print(f"one Redis shard's ceiling: about {1e6 / cycle_us:,.0f} acquire+report cycles/s")
    memory_p50 = lat["acquire+success, memory://"]["p50_us"]
    print(
        f"memory:// acquire+success p50: {memory_p50:.1f} µs "
        f"({memory_p50 / lat['acquire+success']['p50_us']:.2f} x the same on Redis)"
    )
    if tput:
        table(
            ["processes", "no-op EVALSHA pairs/s", "acquire+success/s", "ratio"],
            [
                [
                    n,
                    f"{r['evalsha']:.0f}",
                    f"{r['keypool']:.0f}",
                    f"{r['keypool'] / r['evalsha']:.2f}",
                ]
                for n, r in tput.items()
            ],
        )
    sync_p50 = lat["acquire+success"]["p50_us"]
    async_p50 = lat["acquire+success, asyncio"]["p50_us"]
    print("\nasyncio (AsyncKeyPool) against the sync pool and redis.asyncio, same run:")
    table(
        ["measure", "AsyncKeyPool", "reference", "ratio"],
        [
            [
                "acquire+success p50 µs (reference: KeyPool)",
                f"{async_p50:.1f}",
                f"{sync_p50:.1f}",
                f"{async_p50 / sync_p50:.2f}",
            ],
            [
                "100 tasks, cycles/s (reference: no-op EVALSHA pairs)",
                f"{atput['keypool']:.0f}",
                f"{atput['evalsha']:.0f}",
                f"{atput['keypool'] / atput['evalsha']:.2f}",
            ],
        ],
    )
    print(
        f"\nimport of 10,000 keys: {mem['import_10k_s']:.2f} s; Redis memory per key: "
        f"{mem['bytes_per_key']:.0f} bytes ({mem['redis_keys']} Redis keys, "
        "budgets and leases in use)"
    )

    targets = {
        "acquire p50 <= limits hit p50": lat["acquire"]["p50_us"]
        <= lat.get("limits moving-window hit", {"p50_us": float("inf")})["p50_us"],
        "acquire p50 <= 1.3 x no-op EVALSHA": lat["acquire"]["p50_us"] <= 1.3 * noop,
        "acquire+success p50 <= 2.3 x PING": lat["acquire+success"]["p50_us"] <= 2.3 * ping,
        "10,000 keys <= 1.25 x 10 keys": lat["acquire+success, 10,000 keys"]["p50_us"]
        <= 1.25 * lat["acquire+success, 10 keys"]["p50_us"],
        "model of 5,000 keys <= 1.25 x model of 10 keys": lat[
            "acquire+success, model of 5,000 keys"
        ]["p50_us"]
        <= 1.25 * lat["acquire+success, model of 10 keys"]["p50_us"],
        "model of 5,000 keys <= 1.25 x model of 10 keys, inside Redis": inside[
            "acquire+report cycle, model of 5,000 keys"
        ]
        <= 1.25 * inside["acquire+report cycle, model of 10 keys"],
        "4 scopes <= 1.3 x plain acquire+success": lat["acquire+success, 4 scopes"]["p50_us"]
        <= 1.3 * lat["acquire+success"]["p50_us"],
        "asyncio acquire+success p50 <= 1.25 x sync": async_p50 <= 1.25 * sync_p50,
        "asyncio 100 tasks >= 0.8 x redis.asyncio no-op pairs": atput["keypool"]
        >= 0.8 * atput["evalsha"],
        "server time per acquire+report cycle <= 30 µs (10 and 10,000 keys)": cycle_us <= 30.0,
        "memory:// acquire+success p50 <= 250 µs": memory_p50 <= 250.0,
        "import 10,000 keys <= 2 s": mem["import_10k_s"] <= 2.0,
        "memory per key <= 2 KiB": mem["bytes_per_key"] <= 2048,
    }
    if "4" in tput:
        targets["4-process throughput >= 0.5 x no-op pairs"] = (
            tput["4"]["keypool"] >= 0.5 * tput["4"]["evalsha"]
        )
    table(["target", "met"], [[name, "yes" if ok else "NO"] for name, ok in targets.items()])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "latency": lat,
                    "inside_redis": inside,
                    "throughput": tput,
                    "async_throughput": atput,
                    "memory": mem,
                    "targets": targets,
                },
                fh,
                indent=2,
            )
    return 0


def table(header: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def _has_hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
