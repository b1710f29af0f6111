"""Several LLM providers, several keys each, one shared pool: a complete keypool example.

Offline, the pool inside this process (``memory://``, the default), after ``pip install -e .``
(or with ``PYTHONPATH=.``) in the repository root::

    python examples/multi_provider_key_management.py

On a real Redis, in two terminals at once: each call prints the key it got and that key's
``total_requests`` as Redis counts them, so you see one rotation and both terminals' calls::

    KEYPOOL_REDIS_URL=redis://127.0.0.1:6379/0 python examples/multi_provider_key_management.py

Keys come from the environment when set (``OPENAI_API_KEYS="sk-a,sk-b"``, ``HF_RESEARCH_KEY``,
``ANTHROPIC_API_KEY``, ``GEMINI_API_KEY``...); other providers get fake demo keys. Nothing
leaves this machine: the "provider" is a local function that sometimes answers 429 (with
Retry-After) or 500. Namespace: ``KEYPOOL_NAMESPACE`` (default ``keypool-demo``). Options:
``--rounds N`` (calls per section), ``--seed S`` (the simulated failures), ``--reset``
(remove the demo's keys first: counters restart). Secrets are never printed, only key ids.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import time
from types import SimpleNamespace
from typing import NamedTuple

from keypool import (
    EnhancedAPIKeyManager,
    KeyPool,
    KeyPoolSettings,
    Lease,
    NoKeyAvailable,
    Provider,
    UnknownKey,
)

MODELS = {  # model -> provider; each model is served by two keys of its provider
    "gpt-4o-mini": Provider.OPENAI,
    "claude-3-5-haiku-latest": Provider.ANTHROPIC,
    "gemini-1.5-flash": Provider.GEMINI,
    "meta-llama/Llama-3.1-8B-Instruct": Provider.HUGGINGFACE,
}
FALLBACK_ORDER = (Provider.OPENAI, Provider.ANTHROPIC, Provider.GEMINI, Provider.HUGGINGFACE)
WAIT = 5.0  # seconds an acquire may wait for a cooling key (cooldowns here last 1-2 s)
PAUSE = 0.05  # between round-robin calls, so that two terminals interleave


class DemoKey(NamedTuple):
    provider: Provider
    key_id: str
    rpm: int | None = None  # requests per minute this key may make
    max_concurrency: int | None = None  # calls in flight at once

    @property
    def secret(self) -> str:
        return f"demo-{self.provider.value}-{self.key_id}-not-a-real-key"


DEMO_KEYS = (
    DemoKey(Provider.OPENAI, "key-1", rpm=500),
    DemoKey(Provider.OPENAI, "key-2", max_concurrency=4),
    DemoKey(Provider.OPENAI, "key-3"),
    DemoKey(Provider.ANTHROPIC, "key-1", rpm=300),
    DemoKey(Provider.ANTHROPIC, "key-2"),
    DemoKey(Provider.ANTHROPIC, "key-3", max_concurrency=2),
    DemoKey(Provider.GEMINI, "key-1"),
    DemoKey(Provider.GEMINI, "key-2", rpm=300),
    DemoKey(Provider.HUGGINGFACE, "research"),
    DemoKey(Provider.HUGGINGFACE, "prod", rpm=300, max_concurrency=2),
)


class SimulatedAPIError(Exception):
    """Shaped like the OpenAI SDK's ``APIStatusError``: ``status_code``, ``response.headers``."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(f"simulated HTTP {status_code}")
        self.status_code = status_code
        self.response = SimpleNamespace(status_code=status_code, headers=headers)


class SimulatedProvider:
    """Stands in for every provider's API: no network, failures from a seeded RNG."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.calls = 0  # every key the pool hands out here is used for exactly one call

    def complete(self, api_key: str, prompt: str, *, flaky: bool = False) -> str:
        self.calls += 1
        assert api_key  # a real client would send it; this example never prints it
        roll = self.rng.random()
        if flaky and roll < 0.3:
            raise SimulatedAPIError(429, {"Retry-After": str(self.rng.choice((1, 2)))})
        if flaky and roll < 0.4:
            raise SimulatedAPIError(500, {})
        return f"answer to {prompt!r}"


def register_keys(pool: KeyPool, reset: bool) -> dict[str, list[str]]:
    """Keys from the environment, else demo keys; models assigned. Returns provider -> ids."""
    env_keys = pool.load_env()
    if reset:
        for provider, key_id in [*((d.provider.value, d.key_id) for d in DEMO_KEYS), *env_keys]:
            with contextlib.suppress(UnknownKey):
                pool.remove_key(provider, key_id)
        env_keys = pool.load_env()
    keys: dict[str, list[str]] = {}
    for provider, key_id in env_keys:
        keys.setdefault(provider, []).append(key_id)
    from_env = set(keys)
    for d in (d for d in DEMO_KEYS if d.provider.value not in from_env):
        pool.add_key(d.provider, d.key_id, d.secret, rpm=d.rpm, max_concurrency=d.max_concurrency)
        keys.setdefault(d.provider.value, []).append(d.key_id)
    for model, provider in MODELS.items():
        for key_id in keys[provider.value][:2]:
            pool.assign_model(model, provider, key_id)
    for provider, ids in sorted(keys.items()):
        source = "environment" if provider in from_env else "demo keys"
        print(f"  {provider:<12} {', '.join(ids)}  ({source})")
    return keys


class Demo:
    """The pool, the seed's API over the same pool, and the simulated provider."""

    def __init__(self, pool: KeyPool, llm: SimulatedProvider) -> None:
        self.pool, self.km, self.llm = pool, EnhancedAPIKeyManager(pool=pool), llm

    def show(self, provider: str, key_id: str, label: str) -> None:
        """One line per call: the key it got and its counts, as every process sees them."""
        stats = self.pool.stats(provider, key_id)
        counts = f"total_requests={stats.total_requests:<4} errors={stats.error_count:<3}"
        print(f"  {provider + '/' + key_id:<22} {counts} <- {label}")

    def leased_call(self, label: str, provider: str | None, model: str | None = None) -> None:
        """Lease a key and call with it: success is reported on exit, failure on exception."""
        try:
            with self.pool.acquire(provider, model=model, wait=WAIT) as lease:
                self.llm.complete(lease.secret, label)
        except NoKeyAvailable as exc:
            print(f"  no key free, retry in {exc.retry_after}s <- {label}")
            return
        self.show(lease.provider, lease.key_id, label)

    def seed_call(self, label: str, provider: str, picked: tuple[str | None, str | None]) -> None:
        """The seed's style: got ``(key_id, api_key)``, call, report by hand."""
        key_id, api_key = picked
        if key_id is None or api_key is None:
            print(f"  no key free <- {label}")
            return
        self.llm.complete(api_key, label)
        self.km.mark_key_success(provider, key_id)
        self.show(provider, key_id, label)

    def ask_with_fallback(self, prompt: str) -> float | None:
        """One try per provider, in order. Returns None once answered, else the seconds
        until the earliest key is free again."""
        attempts: list[str] = []
        earliest: float | None = None
        for provider in FALLBACK_ORDER:
            try:
                lease = self.pool.acquire(provider)
            except NoKeyAvailable as exc:
                attempts.append(f"{provider}: all cooling")
                if exc.retry_after is not None:
                    earliest = min(exc.retry_after, earliest or float("inf"))
                continue
            try:
                self.llm.complete(lease.secret, prompt, flaky=True)
            except SimulatedAPIError as exc:
                failure = lease.fail(exc)  # 429: cools the key for Retry-After; 500: counted
                wait = f", cools {failure.retry_after:g}s" if failure.retry_after else ""
                attempts.append(f"{provider}/{lease.key_id} {failure.kind.value}{wait}")
                continue
            lease.success(tokens=42)  # tokens the answer used
            print(f"  {prompt}: {' -> '.join([*attempts, f'{provider}/{lease.key_id} ok'])}")
            return None
        print(f"  {prompt}: {' -> '.join(attempts)} -> no answer")
        return earliest

    def call_with_fallbacks(self, prompt: str) -> None:
        """The same done by ``pool.call``: another key after a failure, then the fallbacks."""
        trail: list[str] = []

        def attempt(lease: Lease) -> str:
            trail.append(f"{lease.provider}/{lease.key_id}")
            try:
                return self.llm.complete(lease.secret, prompt, flaky=True)
            except SimulatedAPIError as exc:
                trail[-1] += f" HTTP {exc.status_code}"
                raise

        fallbacks = [Provider.ANTHROPIC, (Provider.GEMINI, "gemini-1.5-flash")]
        try:
            self.pool.call(attempt, Provider.OPENAI, fallbacks=fallbacks, max_attempts=2)
            trail.append("ok")
        except NoKeyAvailable as exc:
            trail.append(f"no key free, retry in {exc.retry_after}s")
        except SimulatedAPIError as exc:
            trail.append(f"gave up after HTTP {exc.status_code}")
        print(f"  pool.call({prompt!r}): {' -> '.join(trail)}")

    def usage_table(self) -> None:
        snapshot = self.pool.snapshot()
        now = time.time()
        head = ("provider", "key", "status", "requests", "ok", "errors", "cooldown", "in flight")
        rows: list[tuple[str, ...]] = [head]
        for s in snapshot:
            errors = " ".join(f"{kind}={n}" for kind, n in sorted(s.errors_by_kind.items()))
            left = (s.cooldown_until or 0.0) - now
            cooldown = f"{left:.1f}s" if left > 0 else "-"
            numbers = (s.total_requests, s.success_count, errors or "-", cooldown, s.in_flight)
            rows.append((s.provider, s.key_id, s.status, *map(str, numbers)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        total = sum(s.total_requests for s in snapshot)
        print(f"\ntotal_requests in the pool: {total} (every process on this store)")
        print(f"calls made: {self.llm.calls}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=6, help="calls per section (default 6)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the simulated failures")
    parser.add_argument("--reset", action="store_true", help="remove the demo's keys first")
    args = parser.parse_args()

    os.environ.setdefault("KEYPOOL_NAMESPACE", "keypool-demo")
    # Short circuit-breaker cooldowns keep the demo quick; the rest comes from KEYPOOL_*.
    pool = KeyPool(settings=KeyPoolSettings(circuit_cooldown=2.0, circuit_max_cooldown=10.0))
    demo = Demo(pool, SimulatedProvider(args.seed))
    km = demo.km  # the seed's API, EnhancedAPIKeyManager, over the same pool
    print(repr(pool))
    keys = register_keys(pool, args.reset)

    print("\n== 1. Shared round-robin over OpenAI's keys ==")
    for i in range(args.rounds):
        demo.leased_call(f"acquire('openai') #{i + 1}", Provider.OPENAI)
        time.sleep(PAUSE)
    for i in range(2):
        demo.seed_call(f"km.get_next_key('openai') #{i + 1}", "openai", km.get_next_key("openai"))

    print("\n== 2. Model routing: the model picks the provider and its keys ==")
    for i in range(args.rounds):
        model = list(MODELS)[i % len(MODELS)]
        demo.leased_call(f"acquire(model={model!r})", None, model)
    for model, provider in MODELS.items():
        demo.seed_call(f"km.get_key_for_model({model!r})", provider, km.get_key_for_model(model))

    print("\n== 3. Best key: fewest recent errors, then least used ==")
    for key_id, errors in zip(keys["anthropic"], (2, 1), strict=False):
        for _ in range(errors):
            km.mark_key_error(Provider.ANTHROPIC, key_id)
        print(f"  marked {errors} error(s) on anthropic/{key_id}")
    for i in range(2):
        label = f"km.get_best_key('anthropic') #{i + 1}"
        demo.seed_call(label, "anthropic", km.get_best_key(Provider.ANTHROPIC))

    print("\n== 4. Fallback across providers: 429 cools a key down, 500 counts against it ==")
    for i in range(args.rounds):
        earliest = demo.ask_with_fallback(f"request {i + 1}")
        if earliest is not None:
            print(f"  waiting {earliest:.1f}s for the earliest key")
            time.sleep(earliest)
    for i in range(max(1, args.rounds // 2)):
        demo.call_with_fallbacks(f"question {i + 1}")

    print("\n== 5. Usage statistics (no secrets: key ids only) ==")
    demo.usage_table()
    pool.close()


if __name__ == "__main__":
    main()
