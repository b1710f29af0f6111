"""Worker functions for the limit-scope fleet tests (spawned processes import them by name).
Every worker builds its own pool on the shared Redis, registers the same two keys of one
account, and reports what it was admitted."""

from __future__ import annotations

import time
from typing import Any

from keypool import KeyPool, NoKeyAvailable

PROVIDER = "openai"
ACCOUNT = "org-a"
KEYS = ("k1", "k2")


def secret_for(key_id: str) -> str:
    return f"sk-scope-{key_id}-0123456789abcdef"


def pool_with_keys(url: str, ns: str) -> KeyPool:
    pool = KeyPool(url, namespace=ns)
    for key_id in KEYS:
        pool.add_key(PROVIDER, key_id, secret_for(key_id), account=ACCOUNT)
    return pool


def burst(
    url: str, ns: str, barrier: Any, model: str, tries: int, sizes: tuple[int, int]
) -> dict[str, Any]:
    """``tries`` acquires for ``model`` (input, output token estimates ``sizes``), each
    reported at once; returns the keys admitted and when."""
    pool = pool_with_keys(url, ns)
    barrier.wait(30)
    admitted: list[tuple[str, float]] = []
    for _ in range(tries):
        try:
            lease = pool.acquire(
                PROVIDER, model=model, input_tokens=sizes[0], output_tokens=sizes[1]
            )
        except NoKeyAvailable:
            continue
        admitted.append((lease.key_id, time.monotonic()))
        lease.success(input_tokens=sizes[0], output_tokens=sizes[1])
    pool.close()
    return {"admitted": admitted}


def cool_then_serve(url: str, ns: str, barrier: Any, role: str) -> dict[str, Any]:
    """role "cooler": a 429 on (k1, gpt-4o). role "user": after it, gpt-4o-mini on k1 still
    serves and gpt-4o never goes to k1."""
    pool = pool_with_keys(url, ns)
    seen: dict[str, list[str]] = {"gpt-4o": [], "gpt-4o-mini": []}
    if role == "cooler":
        while True:
            lease = pool.acquire(PROVIDER, model="gpt-4o")
            if lease.key_id == "k1":
                lease.fail(429, retry_after=60)
                break
            lease.success()
        barrier.wait(30)
    else:
        barrier.wait(30)
        for _ in range(6):
            for model in seen:
                with pool.acquire(PROVIDER, model=model) as lease:
                    seen[model].append(lease.key_id)
    pool.close()
    return seen
