"""keypool soak test: a long run against a real Redis proving that nothing the pool keeps in
Redis grows without bound.

A few worker processes (spawned) hammer one pool with a realistic mix: acquire + success
with token reconciliation, every kind of failure (429 with short retry_after, 5xx opening
circuits, timeouts, quota, auth, bad requests), leases abandoned without a report (they must
expire and be reaped), acquire by model with models assigned and re-assigned, keys with
rpm/tpm/rpd/max_concurrency budgets, disable/enable/reset, all five strategies, and key churn
(every few seconds one key is removed and a new one added, each with a model of its own, as a
rolling redeploy does: every process follows the same schedule, a little later than the one
before it; ``--no-key-models`` leaves the churn keys without models). Every ``--interval``
seconds the parent samples the namespace: Redis keys, ``MEMORY USAGE`` over them, the size of
every structure, invariants that must hold exactly (no orphan ids, in-flight counters equal
to open leases), the log volume of the workers and Redis ``used_memory``. It prints the
samples, then a verdict.

    python benchmarks/soak.py                          # 3 minutes, 4 workers, 50 keys
    python benchmarks/soak.py --minutes 30 --workers 8 --json soak.json
    python benchmarks/soak.py --url redis://127.0.0.1:6379/3 --keys 200

Nothing is flushed: everything lives under a namespace of its own, deleted at the end.
Exit code: 0 when every check passes, 1 when one fails (growth, band, bound, invariant,
drain or memory target), 2 when a worker process died.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import logging
import math
import multiprocessing as mp
import os
import queue
import random
import re
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from keypool import (
    ErrorKind,
    KeyPool,
    KeyPoolSettings,
    Lease,
    NoKeyAvailable,
    SecretUnavailable,
    UnknownKey,
)

PROVIDER = "soak"
STRATEGIES = ("round_robin", "weighted", "least_busy", "best", "latency")
SHARED_MODELS = ("soak-alpha", "soak-beta", "soak-gamma")
KEYS_PER_MODEL = 4  # each shared model is served by this many base keys at any time
MOVE_PERIOD = 2.0  # seconds between two re-assignments of every shared model
CHURN_WINDOW = 5  # churn keys alive at once
MAX_HELD = 3  # leases a worker holds at once
ABANDON_PER_S = 3.0  # at most this many leases abandoned per second and worker
REAP_SLACK = 1.0  # seconds an expired lease may stay before an acquire reaps it
REPORT_EVERY = 1.0  # seconds between two progress reports of a worker
STAGGER = 0.2  # worker i applies each churn step and model move i x STAGGER seconds late

# how the calls of a key that is not flaky end, and how often (weights, in 1/1000)
OUTCOME_MIX = {
    "success": 850,
    "abandoned": 10,  # rate-capped by ABANDON_PER_S: the excess is reported as success
    "429 retry_after": 15,
    "429 Retry-After header": 5,
    "429 retry-after-ms": 5,
    "402 quota": 3,
    "401 auth": 1,
    "5xx": 15,
    "timeout": 5,
    "connection": 5,
    "other": 3,
    "400": 20,
    "release": 20,
    "503 in with-block": 5,
    "renew + success": 10,
}
OUTCOMES = list(OUTCOME_MIX)
OUTCOME_WEIGHTS = list(OUTCOME_MIX.values())

SETTINGS: dict[str, Any] = {
    "lease_ttl": 2.0,
    "rate_limit_cooldown": 0.5,
    "rate_limit_max_cooldown": 4.0,
    "circuit_cooldown": 0.5,
    "circuit_max_cooldown": 4.0,
    "error_threshold": 3,
    "quota_cooldown": 2.0,
    "log_level": "info",
}


# ---------------------------------------------------------------------- the pool's keys


@dataclass(frozen=True, slots=True)
class KeySpec:
    key_id: str
    weight: float
    rpm: int | None
    tpm: int | None
    rpd: int | None
    max_concurrency: int | None
    flaky: bool  # answers most calls with a 5xx: its circuit opens again and again
    models: tuple[str, ...]


def key_spec(key_id: str, n: int, own_models: bool, base: int = 0) -> KeySpec:
    """The same key always gets the same configuration, in every process. Base keys start
    with the shared models of the first re-assignment slot (``base`` = base key count)."""
    rpm = 600 if n % 5 == 0 else None
    tpm = 120_000 if n % 5 == 1 else None
    rpd = 50_000 if n % 5 == 3 else None
    maxc = 2 if n % 5 == 2 else (1 if n % 7 == 0 else None)
    models: tuple[str, ...] = ()
    if key_id.startswith("k") and base:
        models = tuple(m for i, m in enumerate(SHARED_MODELS) if n in model_keys(0, i, base))
    elif key_id.startswith("c") and own_models:
        models = (f"ft-{key_id}",)  # a model (deployment) of its own, gone with the key
    return KeySpec(key_id, 1.0 + n % 3, rpm, tpm, rpd, maxc, n % 10 == 3, models)


def secret_of(key_id: str) -> str:
    return f"soak-secret-{key_id}-0123456789"


def churn_id(gen: int) -> str:
    return f"c{gen:05d}"


def register(pool: KeyPool, spec: KeySpec) -> None:
    pool.add_key(
        PROVIDER,
        spec.key_id,
        secret_of(spec.key_id),
        weight=spec.weight,
        rpm=spec.rpm,
        tpm=spec.tpm,
        rpd=spec.rpd,
        max_concurrency=spec.max_concurrency,
        models=spec.models,
    )


def model_keys(slot: int, model_index: int, base: int) -> set[int]:
    """Base key numbers serving a shared model during a re-assignment slot: a window that
    moves by one key per slot, so each move is one unassign and one assign."""
    start = (slot + model_index * (base // len(SHARED_MODELS))) % base
    return {(start + j) % base for j in range(KEYS_PER_MODEL)}


# ---------------------------------------------------------------------- worker processes


@dataclass(frozen=True, slots=True)
class Config:
    url: str
    namespace: str
    keys: int
    workers: int
    t0: float  # wall clock: the run starts here in every process
    seconds: float
    churn_period: float
    own_models: bool
    seed: int

    @property
    def base(self) -> int:
        return self.keys - CHURN_WINDOW

    def settings(self) -> KeyPoolSettings:
        return KeyPoolSettings(redis_url=self.url, namespace=self.namespace, **SETTINGS)


class CountingHandler(logging.Handler):
    """Counts keypool's log records (INFO and above) by event name."""

    _EVENT = re.compile(r"event='([^']*)'")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.total = 0
        self.events: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        self.total += 1
        found = self._EVENT.search(str(record.msg))
        self.events[found.group(1) if found else "?"] += 1


class FakeHTTPError(Exception):
    """What an SDK raises: an exception carrying the HTTP status and headers."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers or {}


@dataclass
class Tally:
    ops: int = 0
    leases: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def oops(self, exc: BaseException, where: str) -> None:
        name = f"{where}: {type(exc).__name__}"
        self.unexpected[name] += 1
        if len(self.samples) < 10:
            self.samples.append(f"{name}: {exc}"[:300])


class Worker:
    def __init__(self, cfg: Config, index: int, out: Any) -> None:
        self.cfg = cfg
        self.index = index
        self.out = out
        self.rng = random.Random(cfg.seed * 1000 + index)
        self.log = CountingHandler()
        logger = logging.getLogger("keypool")
        logger.addHandler(self.log)
        logger.propagate = False  # counted, not printed
        self.pool = KeyPool(settings=cfg.settings())
        self.tally = Tally()
        self.gen = 0  # churn generation this process has reached
        self.slot = 0  # model re-assignment slot this process has reached
        # a rolling deploy: the processes do not all change their keys at the same instant
        self.lag = min(index * STAGGER, cfg.churn_period / 2, MOVE_PERIOD / 2)
        self.enable_at: dict[str, float] = {}
        self.last_abandon = 0.0
        self.next_admin = time.time() + self.rng.uniform(0.5, 2.0)
        self.next_report = 0.0

    # -- schedule shared by every process

    def churn(self, now: float) -> None:
        gen = max(0, int((now - self.lag - self.cfg.t0) / self.cfg.churn_period))
        while self.gen < gen:
            old, self.gen = self.gen, self.gen + 1
            new = self.gen + CHURN_WINDOW - 1
            register(self.pool, key_spec(churn_id(new), new, self.cfg.own_models))
            try:
                self.pool.remove_key(PROVIDER, churn_id(old))
            except UnknownKey:  # another process removed it first
                self.tally.expected["UnknownKey (remove)"] += 1

    def move_models(self, now: float) -> None:
        slot = max(0, int((now - self.lag - self.cfg.t0) / MOVE_PERIOD))
        while self.slot < slot:
            self.slot += 1
            for m, model in enumerate(SHARED_MODELS):
                before = model_keys(self.slot - 1, m, self.cfg.base)
                after = model_keys(self.slot, m, self.cfg.base)
                for n in before - after:
                    self.pool.unassign_model(model, PROVIDER, f"k{n:03d}")
                for n in after - before:
                    self.pool.assign_model(model, PROVIDER, f"k{n:03d}")

    # -- the traffic

    def acquire(self) -> Lease | None:
        rng = self.rng
        strategy = rng.choice(STRATEGIES)
        tokens = rng.randint(50, 800)
        r = rng.random()
        self.tally.ops += 1
        try:
            if r < 0.65:
                lease = self.pool.acquire(PROVIDER, strategy=strategy, tokens=tokens)
            elif r < 0.85:  # by model alone: the model's keys decide, provider omitted
                model = rng.choice(SHARED_MODELS)
                lease = self.pool.acquire(model=model, strategy=strategy, tokens=tokens)
            elif r < 0.95:  # a churn key's own model, sometimes of a key just removed
                gen = self.gen + rng.randint(-1, CHURN_WINDOW - 1)
                lease = self.pool.acquire(
                    PROVIDER, model=f"ft-{churn_id(max(gen, 0))}", strategy=strategy
                )
            else:
                lease = self.pool.acquire(PROVIDER, strategy=strategy, tokens=tokens, wait=0.2)
        except NoKeyAvailable:
            self.tally.expected["NoKeyAvailable"] += 1
            return None
        except SecretUnavailable:  # a key another process added a moment before this one
            self.tally.expected["SecretUnavailable"] += 1
            return None
        self.tally.leases += 1
        return lease

    def finish(self, lease: Lease) -> None:
        """Report the call the way a real client would, with a realistic outcome mix."""
        rng = self.rng
        flaky = key_spec(lease.key_id, int(lease.key_id[1:]), False).flaky
        if flaky and rng.random() < 0.6:
            lease.fail(500)
            outcome = "500 (flaky key)"
        else:
            outcome = rng.choices(OUTCOMES, weights=OUTCOME_WEIGHTS)[0]
            if outcome == "abandoned" and time.monotonic() - self.last_abandon < 1 / ABANDON_PER_S:
                outcome = "success"
            self.report_as(lease, outcome)
        self.tally.outcomes[outcome] += 1

    def report_as(self, lease: Lease, outcome: str) -> None:
        rng = self.rng
        if outcome == "abandoned":  # never reported: the lease must expire and be reaped
            self.last_abandon = time.monotonic()
        elif outcome == "429 retry_after":
            lease.fail(429, retry_after=rng.uniform(0.2, 1.0))
        elif outcome == "429 Retry-After header":
            lease.fail(FakeHTTPError(429, {"retry-after": f"{rng.uniform(0.2, 1.0):.2f}"}))
        elif outcome == "429 retry-after-ms":
            lease.fail(429, headers={"retry-after-ms": str(rng.randint(200, 1000))})
        elif outcome == "402 quota":
            lease.fail(402, retry_after=rng.uniform(0.3, 1.0))
        elif outcome == "401 auth":  # disables the key: an operator enables it again soon
            lease.fail(401)
            self.enable_at[lease.key_id] = time.time() + rng.uniform(0.5, 1.5)
        elif outcome == "5xx":
            lease.fail(rng.choice((500, 502, 503)))
        elif outcome == "timeout":
            lease.fail(TimeoutError("read timed out"))
        elif outcome == "connection":
            lease.fail(ConnectionError("connection reset"))
        elif outcome == "other":
            lease.fail(ErrorKind.OTHER)
        elif outcome == "400":
            lease.fail(400)
        elif outcome == "release":
            lease.release()
        elif outcome == "503 in with-block":
            with contextlib.suppress(FakeHTTPError), lease:
                raise FakeHTTPError(503)
        elif outcome == "renew + success":
            lease.renew(rng.uniform(0.5, 2.0))
            lease.success(tokens=lease.tokens)
        else:  # success: reconcile the reserved tokens with what the call used
            actual = max(0, int(lease.tokens * rng.uniform(0.3, 1.6)))
            lease.success(tokens=actual, latency=rng.uniform(0.05, 2.0))

    def call(self) -> None:
        rng = self.rng
        self.tally.ops += 1

        def fn(lease: Lease) -> str:
            if rng.random() < 0.3:
                raise FakeHTTPError(rng.choice((429, 500, 503)), {"retry-after": "0.3"})
            return lease.key_id

        try:
            self.pool.call(fn, PROVIDER, max_attempts=2, strategy=rng.choice(STRATEGIES))
            self.tally.outcomes["call ok"] += 1
        except FakeHTTPError:
            self.tally.outcomes["call failed"] += 1
        except NoKeyAvailable:
            self.tally.expected["NoKeyAvailable"] += 1
        except SecretUnavailable:
            self.tally.expected["SecretUnavailable"] += 1

    def admin(self, now: float) -> None:
        rng = self.rng
        for key_id, at in list(self.enable_at.items()):
            if at <= now:
                del self.enable_at[key_id]
                self.guard("enable", functools.partial(self.pool.enable_key, PROVIDER, key_id))
        if now < self.next_admin:
            return
        self.next_admin = now + rng.uniform(0.5, 3.0)
        key_id = f"k{rng.randrange(self.cfg.base):03d}"
        r = rng.random()
        if r < 0.4:
            self.guard("disable", lambda: self.pool.disable_key(PROVIDER, key_id, "soak"))
            self.enable_at[key_id] = now + rng.uniform(0.5, 1.5)
        elif r < 0.7:
            self.guard("reset", lambda: self.pool.reset_key(PROVIDER, key_id))
        elif r < 0.9:
            gen = self.gen + rng.randint(0, CHURN_WINDOW - 1)
            self.guard("stats", lambda: self.pool.stats(PROVIDER, churn_id(gen)))
        else:
            self.guard("snapshot", lambda: self.pool.snapshot(PROVIDER))

    def guard(self, what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except UnknownKey:
            self.tally.expected[f"UnknownKey ({what})"] += 1

    def report(self, final: bool = False) -> None:
        self.out.put(
            {
                "worker": self.index,
                "final": final,
                "ops": self.tally.ops,
                "leases": self.tally.leases,
                "logs": self.log.total,
                "log_events": dict(self.log.events),
                "outcomes": dict(self.tally.outcomes),
                "expected": dict(self.tally.expected),
                "unexpected": dict(self.tally.unexpected),
                "unexpected_samples": list(self.tally.samples),
            }
        )

    def run(self) -> None:
        cfg = self.cfg
        # every process of the fleet registers the same keys (the default, unsealed mode)
        for n in range(cfg.base):
            register(self.pool, key_spec(f"k{n:03d}", n, cfg.own_models, cfg.base))
        for gen in range(CHURN_WINDOW):
            register(self.pool, key_spec(churn_id(gen), gen, cfg.own_models))
        time.sleep(max(0.0, cfg.t0 - time.time()))
        deadline = cfg.t0 + cfg.seconds
        held: list[Lease] = []
        while (now := time.time()) < deadline:
            try:
                self.churn(now)
                self.move_models(now)
                self.admin(now)
                if self.rng.random() < 0.05:
                    self.call()
                else:
                    for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
                        lease = self.acquire()
                        if lease is not None:
                            held.append(lease)
                    self.rng.shuffle(held)
                    while held:
                        self.finish(held.pop())
            except Exception as exc:  # counted and shown; the run goes on
                self.tally.oops(exc, "loop")
                held.clear()
            if now >= self.next_report:
                self.next_report = now + REPORT_EVERY
                self.report()
        for key_id in self.enable_at:
            self.guard("enable", functools.partial(self.pool.enable_key, PROVIDER, key_id))
        self.report(final=True)
        self.pool.close()


def worker_main(cfg: Config, index: int, out: Any) -> None:
    Worker(cfg, index, out).run()


# ---------------------------------------------------------------------- sampling


@dataclass(slots=True)
class Sample:
    t: float
    ops: int
    logs: int
    redis_keys: int
    k_hashes: int
    kl_zsets: int
    m_sets: int
    model_sets: int
    mem_bytes: int
    bytes_per_key: float
    leases: int
    wait: int
    rr: int
    wrr: int
    best: int
    busy: int
    lat: int
    all: int
    model_members: int
    meta_hlen: int
    key_hlen: int  # HLEN of one base key's hash (k000)
    key_hlen_max: int
    kl_members: int
    orphans: int  # ids in a structure that are not in `all`
    inflight_mismatch: int  # keys whose `inflight` differs from their open leases
    stale_churn: int  # churn keys still registered a full period after their removal
    used_memory: int
    used_memory_lua: int
    used_memory_functions: int  # the function library's Lua (key states kept between calls)
    cached_scripts: int
    orphan_detail: list[str] = field(default_factory=list)
    mismatch_detail: list[str] = field(default_factory=list)


_bytes_clients: dict[int, redis.Redis] = {}


def _bytes_client(raw: redis.Redis) -> redis.Redis:
    """A client to the same server that returns bytes (for a key's packed state)."""
    client = _bytes_clients.get(id(raw))
    if client is None:
        kwargs = dict(raw.connection_pool.connection_kwargs)
        kwargs["decode_responses"] = False
        pool = redis.ConnectionPool(**kwargs)
        client = _bytes_clients[id(raw)] = redis.Redis(connection_pool=pool)
    return client


def take_sample(raw: redis.Redis, cfg: Config, t: float, ops: int, logs: int) -> Sample:
    ns = cfg.namespace
    prefix = f"{ns}:{{{PROVIDER}}}:"
    names = sorted(raw.scan_iter(match=f"{ns}:*", count=1000))
    # The records of closed calls (kept a minute to recognise a repeat, an hour for a lease
    # that expired unreported) are bounded by their retention, not by the keys: measured
    # apart from the keys' own memory.
    records = (prefix + "lease", prefix + "done")
    pipe = raw.pipeline(transaction=False)
    for name in names:
        if name not in records:
            pipe.memory_usage(name, samples=0)
    mem = sum(int(x or 0) for x in pipe.execute())

    k_names = [n for n in names if n.startswith(prefix + "k:")]
    kl_names = [n for n in names if n.startswith(prefix + "kl:")]
    m_names = [n for n in names if n.startswith(prefix + "m:")]
    model_names = [n for n in names if n.startswith(f"{ns}:model:")]

    # one MULTI/EXEC: a consistent view of the provider's structures
    tx = _bytes_client(raw).pipeline(transaction=True)
    tx.smembers(prefix + "all")
    zsets = ("wait", "leases", "rr", "wrr", "best", "busy", "lat")
    for zname in zsets:
        tx.zrange(prefix + zname, 0, -1)
    tx.hlen(prefix + "meta")
    tx.hgetall(prefix + "lease")
    for n in k_names:
        tx.hmget(n, "inflight", "maxc")
        tx.hlen(n)
        tx.zcard(prefix + "kl:" + n[len(prefix) + 2 :])
    for n in kl_names:
        tx.zcard(n)
    for n in m_names:
        tx.smembers(n)
    replies = iter(tx.execute())
    all_ids: set[str] = {m.decode() for m in next(replies)}
    z: dict[str, list[str]] = {name: [m.decode() for m in next(replies)] for name in zsets}
    meta_hlen = int(next(replies))
    records = {k.decode(): v.decode() for k, v in next(replies).items()}
    hashes: dict[str, tuple[int, int, int, int]] = {}  # inflight, maxc, HLEN, kl: ZCARD
    for n in k_names:
        numbers = next(replies)
        hlen = int(next(replies))
        kl_card = int(next(replies))
        if hlen and numbers[0] is not None:  # deleted between the scan and now
            inflight, maxc = int(float(numbers[0])), int(float(numbers[1] or 0))
            hashes[n[len(prefix) + 2 :]] = (inflight, maxc, hlen, kl_card)
    # lease sets of ids without a hash (seen by the scan): must be empty
    kl: dict[str, int] = {n[len(prefix) + 3 :]: int(next(replies)) for n in kl_names}
    kl.update({k: h[3] for k, h in hashes.items()})
    m_members: dict[str, set[str]] = {n: {m.decode() for m in next(replies)} for n in m_names}

    orphans: list[str] = []
    for name in zsets:
        for member in z[name]:
            if name == "leases":
                continue  # lease ids: their records name the key (checked by in-flight)
            key_id = member
            if key_id not in all_ids:
                orphans.append(f"{name}:{member}")
    orphans += [f"k:{k}" for k in hashes if k not in all_ids]
    orphans += [f"kl:{k}" for k, c in kl.items() if c and k not in all_ids]
    for n, members in m_members.items():
        orphans += [f"{n[len(prefix) :]}:{k}" for k in members - all_ids]

    mismatches: list[str] = []
    # an open lease's record names its key: "<key_id>\n<figures>\n<model>"
    open_leases = Counter(records[m].split("\n", 1)[0] for m in z["leases"] if m in records)
    mismatch = 0
    for key_id, (inflight, maxc, _, kl_card) in hashes.items():
        if inflight != open_leases.get(key_id, 0) or kl_card:  # (no kl: zset is kept now)
            mismatch += 1
            mismatches.append(
                f"{key_id}: inflight {inflight}, leases {open_leases.get(key_id, 0)}, "
                f"kl {kl_card}, maxc {maxc}"
            )

    gen_now = int((time.time() - cfg.t0) / cfg.churn_period)
    stale = sum(1 for k in all_ids if k.startswith("c") and int(k[1:]) < gen_now - 1)

    info = raw.info("memory")
    return Sample(
        t=t,
        ops=ops,
        logs=logs,
        redis_keys=len(names),
        k_hashes=len(k_names),
        kl_zsets=sum(1 for c in kl.values() if c),
        m_sets=len(m_names),
        model_sets=len(model_names),
        mem_bytes=mem,
        bytes_per_key=mem / max(1, len(all_ids)),
        leases=len(z["leases"]),
        wait=len(z["wait"]),
        rr=len(z["rr"]),
        wrr=len(z["wrr"]),
        best=len(z["best"]),
        busy=len(z["busy"]),
        lat=len(z["lat"]),
        all=len(all_ids),
        model_members=sum(len(m) for m in m_members.values()),
        meta_hlen=meta_hlen,
        key_hlen=hashes.get("k000", (0, 0, 0, 0))[2],
        key_hlen_max=max((h[2] for h in hashes.values()), default=0),
        kl_members=sum(kl.values()),
        orphans=len(orphans),
        inflight_mismatch=mismatch,
        stale_churn=stale,
        used_memory=int(info["used_memory"]),
        used_memory_lua=int(info.get("used_memory_lua", 0)),
        used_memory_functions=int(info.get("used_memory_vm_functions", 0)),
        cached_scripts=int(info.get("number_of_cached_scripts", 0)),
        orphan_detail=orphans[:10],
        mismatch_detail=mismatches[:10],
    )


# ---------------------------------------------------------------------- the verdict


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


# metric -> absolute slack: tiny counts may move by a few units without meaning anything
GROWTH_METRICS: dict[str, float] = {
    "redis_keys": 3,
    "k_hashes": 2,
    "kl_zsets": 3,
    "m_sets": 1,
    "model_sets": 1,
    "mem_bytes": 2048,
    "bytes_per_key": 32,
    "all": 2,
    "model_members": 2,
    "meta_hlen": 1,
    "key_hlen_max": 2,
    "kl_members": 4,
    "log_per_kop": 2,
}
BAND_METRICS = (
    "redis_keys",
    "k_hashes",
    "model_sets",
    "mem_bytes",
    "bytes_per_key",
    "all",
    "model_members",
    "meta_hlen",
    "key_hlen_max",
)
BAND = 1.25
WHAT = {  # where each metric lives in Redis (README, "Redis layout")
    "redis_keys": "keys under <ns>:*",
    "k_hashes": "<ns>:{p}:k:* hashes",
    "kl_zsets": "<ns>:{p}:kl:* zsets",
    "m_sets": "<ns>:{p}:m:* sets",
    "model_sets": "<ns>:model:* sets",
    "mem_bytes": "MEMORY USAGE of <ns>:*",
    "bytes_per_key": "MEMORY USAGE / SCARD all",
    "all": "SCARD all",
    "model_members": "SCARD of m:* summed",
    "meta_hlen": "HLEN meta",
    "key_hlen_max": "max HLEN of k:*",
    "kl_members": "ZCARD of kl:* summed",
    "log_per_kop": "log records per 1,000 ops",
}


def series(samples: list[Sample], name: str) -> list[float]:
    if name == "log_per_kop":  # keypool log records per 1,000 operations, per interval
        out = []
        for a, b in itertools.pairwise(samples):
            ops = b.ops - a.ops
            out.append(1000 * (b.logs - a.logs) / ops if ops else 0.0)
        return out
    return [float(getattr(s, name)) for s in samples]


def grew(xs: list[float], slack: float) -> tuple[bool, str]:
    """Monotonic growth: every sample of the last third above every sample of the first
    third, and the median moved by more than 2 % plus the metric's slack."""
    third = max(1, len(xs) // 3)
    first, last = xs[:third], xs[-third:]
    m1, m2 = statistics.median(first), statistics.median(last)
    up = min(last) > max(first) and m2 > m1 * 1.02 + slack
    return up, f"first third median {fmt(m1)}, last third median {fmt(m2)}"


def verdict(
    samples: list[Sample], cfg: Config, seconds: float, drain: dict[str, int]
) -> tuple[list[Check], dict[str, float]]:
    steady = [s for s in samples if s.t >= 0.2 * seconds]
    checks: list[Check] = []
    if len(steady) < 3:
        checks.append(Check("enough samples after warm-up", False, f"{len(steady)} < 3"))
        return checks, {}
    for name, slack in GROWTH_METRICS.items():
        xs = series(steady, name)
        if len(xs) < 3:
            continue
        up, detail = grew(xs, slack)
        if up:
            rate = (xs[-1] - xs[0]) / max(1e-9, steady[-1].t - steady[0].t) * 60
            detail += f"; +{fmt(rate)}/min"
        checks.append(Check(f"no growth: {WHAT[name]}", not up, detail))
    for name in BAND_METRICS:
        xs = series(steady, name)
        med = statistics.median(xs)
        ok = max(xs) <= BAND * med + (GROWTH_METRICS.get(name, 0) if med < 50 else 0)
        checks.append(
            Check(f"band: {WHAT[name]}", ok, f"max {fmt(max(xs))} vs median {fmt(med)} (x{BAND})")
        )
    lease_bound = cfg.workers * (
        MAX_HELD + math.ceil(ABANDON_PER_S * (SETTINGS["lease_ttl"] + REAP_SLACK)) + 1
    )
    worst = max(s.leases for s in samples)
    checks.append(
        Check(
            "bound: leases ZCARD",
            worst <= lease_bound,
            f"max {worst} <= {lease_bound} (workers x (held {MAX_HELD} + abandoned within TTL))",
        )
    )
    for name in ("wait", "rr", "wrr", "best", "busy", "lat", "kl_zsets"):
        over = [s.t for s in samples if getattr(s, name) > s.all]
        checks.append(
            Check(f"bound: {name} <= keys", not over, f"over at t={over[:3]}" if over else "ok")
        )
    for name, what in (
        ("orphans", "ids in a structure but not in `all`"),
        ("inflight_mismatch", "`inflight` != open leases (or a kl: zset left)"),
        ("stale_churn", "removed keys back in the pool a period later"),
    ):
        bad = [(s.t, getattr(s, name)) for s in samples if getattr(s, name)]
        detail = what if not bad else f"{what}: {bad[:4]}"
        if name == "orphans" and bad:
            detail += f" e.g. {next(s.orphan_detail for s in samples if s.orphans)}"
        if name == "inflight_mismatch" and bad:
            detail += f" e.g. {next(s.mismatch_detail for s in samples if s.inflight_mismatch)}"
        checks.append(Check(f"invariant: {name} == 0", not bad, detail))
    checks.append(
        Check(
            "drain: leases reaped after the run",
            drain["leases"] == 0 and drain["kl_members"] == 0 and drain["inflight"] == 0,
            f"after TTL + housekeeping: leases {drain['leases']}, kl: members "
            f"{drain['kl_members']}, sum of inflight {drain['inflight']}",
        )
    )
    per_key = statistics.median(s.bytes_per_key for s in steady)
    checks.append(
        Check("memory per key <= 2 KiB", per_key <= 2048, f"{per_key:.0f} bytes (median)")
    )
    summary = {
        "bytes_per_key": per_key,
        "redis_keys": statistics.median(s.redis_keys for s in steady),
        "used_memory_first": steady[0].used_memory,
        "used_memory_last": steady[-1].used_memory,
        "used_memory_lua_last": steady[-1].used_memory_lua,
        "used_memory_functions_last": steady[-1].used_memory_functions,
    }
    return checks, summary


def fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 or x == int(x) else f"{x:.2f}"


# ---------------------------------------------------------------------- the run


def drop(raw: redis.Redis, ns: str) -> None:
    batch = list(raw.scan_iter(match=f"{ns}:*", count=1000))
    for i in range(0, len(batch), 500):
        raw.delete(*batch[i : i + 500])


def drain_check(raw: redis.Redis, cfg: Config) -> dict[str, int]:
    """After the workers stopped: wait out the lease TTL, let one acquire run the
    housekeeping, and count what is left in flight."""
    time.sleep(SETTINGS["lease_ttl"] + 0.5)
    pool = KeyPool(settings=cfg.settings().model_copy(update={"log_level": "warning"}))
    for n in range(cfg.base):
        register(pool, key_spec(f"k{n:03d}", n, cfg.own_models))  # holds their secrets
    for _ in range(3):
        with contextlib.suppress(NoKeyAvailable, SecretUnavailable):
            pool.acquire(PROVIDER).release()
    pool.close()
    s = take_sample(raw, cfg, -1, 0, 0)
    prefix = f"{cfg.namespace}:{{{PROVIDER}}}:"
    inflight = 0
    packed_reader = _bytes_client(raw)
    for name in raw.scan_iter(match=prefix + "k:*", count=1000):
        value = packed_reader.hget(name, "inflight")
        if value:
            inflight += int(float(value))
    return {"leases": s.leases, "kl_members": s.kl_members, "inflight": inflight}


def merge(reports: Iterable[dict[str, Any]], key: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for r in reports:
        total.update(r[key])
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--keys", type=int, default=50, help="keys in the pool at any time")
    parser.add_argument(
        "--url", default=os.environ.get("KEYPOOL_BENCH_URL", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument("--json", help="also write the samples and the verdict here")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--churn-period", type=float, default=3.0, help="seconds per key swap")
    parser.add_argument(
        "--no-key-models",
        action="store_true",
        help="churn keys get no model of their own (only the shared models)",
    )
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.keys < CHURN_WINDOW + KEYS_PER_MODEL * len(SHARED_MODELS):
        parser.error(f"--keys must be at least {CHURN_WINDOW + KEYS_PER_MODEL * 3}")
    if args.workers < 1 or args.minutes <= 0 or args.interval <= 0:
        parser.error("--workers, --minutes and --interval must be positive")

    seconds = args.minutes * 60
    ns = "kpsoak-" + uuid.uuid4().hex[:8]
    cfg = Config(
        url=args.url,
        namespace=ns,
        keys=args.keys,
        workers=args.workers,
        t0=time.time() + 4.0 + 0.5 * args.workers,  # time for the processes to start
        seconds=seconds,
        churn_period=args.churn_period,
        own_models=not args.no_key_models,
        seed=args.seed,
    )
    raw = redis.Redis.from_url(args.url, decode_responses=True)
    info = raw.info("server")
    print(
        f"soak: {args.workers} workers, {args.keys} keys, {args.minutes:g} min, namespace {ns}, "
        f"Redis {info.get('redis_version')}, {os.cpu_count()} cores",
        file=sys.stderr,
    )
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=worker_main, args=(cfg, i, out), name=f"soak-worker-{i}")
        for i in range(args.workers)
    ]
    latest: dict[int, dict[str, Any]] = {}

    def collect(block_s: float = 0.0) -> None:
        end = time.time() + block_s
        while True:
            try:
                r = out.get(timeout=max(0.01, end - time.time()) if block_s else 0.01)
            except queue.Empty:
                if time.time() >= end:
                    return
                continue
            latest[r["worker"]] = r

    samples: list[Sample] = []
    dead = False
    try:
        for p in procs:
            p.start()
        steps = max(1, int(seconds // args.interval))
        times = [min(k * args.interval, seconds - 0.5) for k in range(steps + 1)]
        for t in times:
            while time.time() < cfg.t0 + t:
                collect(min(0.5, max(0.0, cfg.t0 + t - time.time())))
            collect()
            ops = sum(r["ops"] for r in latest.values())
            logs = sum(r["logs"] for r in latest.values())
            s = take_sample(raw, cfg, round(time.time() - cfg.t0, 1), ops, logs)
            samples.append(s)
            print(
                f"  t={s.t:6.1f}s ops={ops:>9} keys={s.redis_keys} leases={s.leases} "
                f"B/key={s.bytes_per_key:.0f}",
                file=sys.stderr,
            )
            if any(not p.is_alive() and p.exitcode for p in procs):
                dead = True
                break
        while any(p.is_alive() for p in procs):
            collect(0.5)
        for p in procs:
            p.join()
        collect()
        dead = dead or any(p.exitcode for p in procs)
        drain = drain_check(raw, cfg)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        drop(raw, ns)
        left = sum(1 for _ in raw.scan_iter(match=f"{ns}:*", count=1000))
        print(f"namespace {ns} deleted ({left} keys left)", file=sys.stderr)

    table(
        [
            "t s",
            "ops",
            "logs/kop",
            "ns keys",
            "k:",
            "kl:",
            "m:",
            "model:",
            "mem KiB",
            "B/key",
            "leases",
            "wait",
            "rr",
            "wrr",
            "best",
            "busy",
            "lat",
            "all",
            "m: members",
            "meta HLEN",
            "k000 HLEN",
            "max HLEN",
            "used_memory MiB",
            "lua MiB",
            "functions MiB",
        ],
        [
            [
                f"{s.t:.0f}",
                str(s.ops),
                "-" if i == 0 else fmt(series(samples[i - 1 : i + 1], "log_per_kop")[0]),
                str(s.redis_keys),
                str(s.k_hashes),
                str(s.kl_zsets),
                str(s.m_sets),
                str(s.model_sets),
                f"{s.mem_bytes / 1024:.1f}",
                f"{s.bytes_per_key:.0f}",
                str(s.leases),
                str(s.wait),
                str(s.rr),
                str(s.wrr),
                str(s.best),
                str(s.busy),
                str(s.lat),
                str(s.all),
                str(s.model_members),
                str(s.meta_hlen),
                str(s.key_hlen),
                str(s.key_hlen_max),
                f"{s.used_memory / 2**20:.2f}",
                f"{s.used_memory_lua / 2**20:.2f}",
                f"{s.used_memory_functions / 2**20:.2f}",
            ]
            for i, s in enumerate(samples)
        ],
    )

    finals = list(latest.values())
    ops = sum(r["ops"] for r in finals)
    print(
        f"\n{ops:,} operations ({ops / seconds:,.0f}/s), "
        f"{sum(r['leases'] for r in finals):,} leases, "
        f"{sum(r['logs'] for r in finals):,} keypool log records"
    )
    for title, key in (
        ("outcomes", "outcomes"),
        ("expected errors", "expected"),
        ("log events", "log_events"),
    ):
        counts = merge(finals, key)
        print(f"{title}: " + ", ".join(f"{k} {v:,}" for k, v in counts.most_common()))
    unexpected = merge(finals, "unexpected")
    checks, summary = verdict(samples, cfg, seconds, drain)
    checks.append(
        Check(
            "workers: no unexpected errors",
            not unexpected and not dead,
            "none"
            if not unexpected and not dead
            else f"{dict(unexpected)}; died: {dead}; "
            + " | ".join(x for r in finals for x in r["unexpected_samples"][:3]),
        )
    )
    used = [s.used_memory for s in samples if s.t >= 0.2 * seconds]
    if summary:
        print(
            f"\nmemory per key at steady state: {summary['bytes_per_key']:.0f} bytes "
            f"(target <= 2048); Redis used_memory {summary['used_memory_first'] / 2**20:.2f} "
            f"-> {summary['used_memory_last'] / 2**20:.2f} MiB over the steady state "
            "(whole server, other clients included: shown, not judged)"
        )
        if len(used) >= 3 and grew([float(x) for x in used], 2**20)[0]:
            print("  note: used_memory grew; see whether the namespace figures grew too")
    table(
        ["check", "ok", "detail"],
        [[c.name, "yes" if c.ok else "NO", c.detail] for c in checks],
    )
    failed = [c for c in checks if not c.ok]
    print(
        "\nverdict: "
        + ("PASS: nothing grows without bound" if not failed else f"FAIL ({len(failed)} checks)")
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {
                    "config": {
                        **{k: v for k, v in asdict(cfg).items() if k != "t0"},
                        "settings": SETTINGS,
                    },
                    "samples": [asdict(s) for s in samples],
                    "drain": drain,
                    "workers": finals,
                    "summary": summary,
                    "checks": [asdict(c) for c in checks],
                },
                fh,
                indent=2,
            )
    if dead:
        return 2
    return 1 if failed else 0


def table(header: list[str], rows: list[list[str]]) -> None:
    """Print a Markdown table."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
