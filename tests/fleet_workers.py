"""Worker processes of the fleet soak (``tests/test_fleet_faults.py``).

They live in a module of their own because spawned processes import the function they run
by name. Each worker builds its own :class:`KeyPool`, registers the same keys as every
other process, waits for the others, then runs acquire / success / fail / release cycles
until its time is up, counting what it saw. It reports ``(index, "ok", Tally)`` or
``(index, "error", traceback)`` on the queue.
"""

from __future__ import annotations

import os
import random
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from keypool import KeyPool, KeyPoolSettings, NoKeyAvailable, PoolUnavailable

PROVIDER = "openai"
START_TIMEOUT = 60.0
# key id -> add_key options; every worker and the test register the same
KEYS: dict[str, dict[str, int]] = {
    "c1": {"max_concurrency": 2},
    "c2": {"max_concurrency": 2},
    "r1": {"rpm": 120},
    "p1": {},
    "p2": {},
}
LEASE_TTL = 30.0  # long enough that a leaked slot is still held when the soak ends


def secret_for(key_id: str) -> str:
    return f"sk-fleet-{key_id}-0123456789abcdef"


@dataclass
class Tally:
    """What one worker saw."""

    acquired: Counter[str] = field(default_factory=Counter)
    succeeded: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    released: Counter[str] = field(default_factory=Counter)
    no_key: int = 0
    unavailable: Counter[str] = field(default_factory=Counter)  # PoolUnavailable, by call
    pid: int = 0


def settings_for(url: str, namespace: str) -> KeyPoolSettings:
    return KeyPoolSettings(
        redis_url=url,
        namespace=namespace,
        lease_ttl=LEASE_TTL,
        socket_timeout=2.0,
        connect_timeout=1.0,
        error_threshold=1000,  # failures are counted, keys stay in service
    )


def register(pool: KeyPool) -> None:
    for key_id, options in KEYS.items():
        pool.add_key(PROVIDER, key_id, secret_for(key_id), **options)


def cycles(url: str, namespace: str, seed: int, seconds: float, barrier: Any) -> Tally:
    """Acquire, then success (60 %), fail with a 400 (25 %) or release (15 %), for
    ``seconds`` after every worker is ready."""
    rng = random.Random(seed)
    tally = Tally(pid=os.getpid())
    pool = KeyPool(settings=settings_for(url, namespace))
    try:
        register(pool)
        barrier.wait(START_TIMEOUT)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                lease = pool.acquire(PROVIDER)
            except NoKeyAvailable:
                tally.no_key += 1
                time.sleep(0.002)
                continue
            except PoolUnavailable:
                tally.unavailable["acquire"] += 1
                time.sleep(0.01)
                continue
            key_id = lease.key_id
            tally.acquired[key_id] += 1
            roll = rng.random()
            try:
                if roll < 0.60:
                    lease.success(tokens=rng.randint(0, 50))
                    tally.succeeded[key_id] += 1
                elif roll < 0.85:
                    lease.fail(400)
                    tally.failed[key_id] += 1
                else:
                    lease.release()
                    tally.released[key_id] += 1
            except PoolUnavailable:
                tally.unavailable["report"] += 1
    finally:
        pool.close()  # reads the replies of the last reports
    return tally


def entry(out_q: Any, index: int, args: tuple[Any, ...]) -> None:
    try:
        result = cycles(*args)
    except BaseException:
        out_q.put(
            (index, "error", f"worker {index} (pid {os.getpid()}):\n{traceback.format_exc()}")
        )
        raise
    out_q.put((index, "ok", result))
