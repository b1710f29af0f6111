"""The embedded store against a real Redis: acquire+success p50 on ``memory://`` and on the
Redis, interleaved in one run so that machine drift hits both alike.

    python benchmarks/embedded.py                       # redis://127.0.0.1:6379/0
    python benchmarks/embedded.py --url redis://host:6379/3 --rounds 40

Nothing is flushed: the Redis side lives under a namespace of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from typing import Any

from keypool import KeyPool, KeyPoolSettings

BUDGETS = {"rpm": 10_000_000, "tpm": 1_000_000_000, "rpd": 1_000_000_000}


def p50(samples: list[float]) -> float:
    return sorted(samples)[len(samples) // 2]


def make_pool(url: str, ns: str) -> KeyPool:
    pool = KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=ns, lease_ttl=600))
    pool.add_keys((("openai", f"k{i:02d}", f"bench-secret-{i}") for i in range(10)), **BUDGETS)
    return pool


def cycle(pool: KeyPool, n: int, out: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(n):
        start = clock()
        pool.acquire("openai", tokens=10).success(tokens=12)
        out.append(clock() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--url", default=os.environ.get("KEYPOOL_BENCH_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=200)
    args = parser.parse_args(argv)

    ns = "kpbench-" + uuid.uuid4().hex[:8]
    pools = {
        "memory://": make_pool(f"memory://{ns}", ns),
        "redis": make_pool(args.url, ns),
    }
    samples: dict[str, list[float]] = {name: [] for name in pools}
    for pool in pools.values():
        cycle(pool, 100, [])  # warm up: scripts loaded, connections open
    for r in range(args.rounds):
        order = list(pools) if r % 2 == 0 else list(reversed(pools))
        for name in order:
            cycle(pools[name], args.batch, samples[name])
    drop(pools["redis"], ns)
    for pool in pools.values():
        pool.close()

    memory, real = p50(samples["memory://"]) * 1e6, p50(samples["redis"]) * 1e6
    print("\n| store | acquire+success p50 µs | ratio to Redis |")
    print("|---|---|---|")
    print(f"| memory:// | {memory:.1f} | {memory / real:.2f} |")
    print(f"| {args.url} | {real:.1f} | 1.00 |")
    return 0


def drop(pool: KeyPool, ns: str) -> None:
    client: Any = pool._client
    batch = list(client.scan_iter(match=f"{ns}:*", count=1000))
    for i in range(0, len(batch), 500):
        client.delete(*batch[i : i + 500])


if __name__ == "__main__":
    sys.exit(main())
