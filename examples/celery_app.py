"""A Celery fleet sharing one keypool: every worker process draws from the same keys.

Needs a Redis at 127.0.0.1:6379 and the celery extra (``pip install -e '.[celery]'`` from
the repository root). Then, from the repository root, in two terminals::

    celery -A examples.celery_app worker --concurrency 4 --loglevel info     # terminal 1
    python examples/celery_app.py 100                                          # terminal 2

Terminal 2 enqueues 100 ``complete`` tasks, waits for them and prints which keys served them
(per key counts from the task results, then the pool's own counters in Redis, which include
every earlier run), how many worker processes took part and how many tasks had to wait for
a key. Start more workers, on this machine or others pointing at the same Redis, and the
rotation stays one: each key serves its equal share, whichever process asks.

How it is built (the recipe):

* one ``KeyPool`` per worker process, built on first use after the fork (``get_pool()``),
  never in the parent before it forks its children;
* the task calls the provider through ``pool.call(fn, "openai", fallbacks=["anthropic"])``,
  which moves to another key after a failure, then to the fallback provider;
* when no key can serve now, ``pool.call`` raises ``NoKeyAvailable`` whose ``retry_after``
  says when the earliest key frees up, and the task re-queues itself for then:
  ``raise self.retry(countdown=e.retry_after, exc=e)`` (at least ``MIN_COUNTDOWN`` ahead,
  see there). The worker process is not blocked meanwhile.

Settings, all from the environment:

* ``CELERY_BROKER_URL`` (default ``redis://127.0.0.1:6379/15``), also the result backend
  unless ``CELERY_RESULT_BACKEND`` is set;
* ``KEYPOOL_REDIS_URL`` (default here ``redis://127.0.0.1:6379/0``), ``KEYPOOL_NAMESPACE``
  (default here ``keypool-celery``) and every other ``KEYPOOL_*`` setting;
* provider keys as keypool reads them (``OPENAI_API_KEYS="sk-a,sk-b"``, ``ANTHROPIC_API_KEY``,
  ...). A provider with no key in the environment gets fake demo keys: ``DEMO_KEYS`` says how
  many (default ``openai:3,anthropic:1``), ``DEMO_RPM`` gives each a requests-per-minute
  budget (default: none). Every worker process must see the same keys.
* ``DEMO_429_RATE`` (default 0): the share of simulated calls that answer HTTP 429 with
  ``Retry-After: DEMO_429_RETRY_AFTER`` seconds (default 1), to watch keys cool down.

No request leaves this machine: the "provider" is a local function that answers at once.
Results name the key that served (provider and key id), never its secret.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

from celery import Celery
from celery.result import AsyncResult, ResultSet
from celery.signals import worker_process_init, worker_process_shutdown
from kombu.utils.url import maybe_sanitize_url

from keypool import KeyPool, KeyPoolSettings, Lease, NoKeyAvailable

BROKER_URL = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15")
RESULT_BACKEND = os.environ.get("CELERY_RESULT_BACKEND", BROKER_URL)
KEYPOOL_DEFAULTS = {"redis_url": "redis://127.0.0.1:6379/0", "namespace": "keypool-celery"}

PROVIDER = "openai"
FALLBACKS = ["anthropic"]
MAX_RETRIES = 50  # re-queues after NoKeyAvailable before the task fails
NEVER_FREE_COUNTDOWN = 5.0  # retry_after None: no key will free up by itself (all disabled)
# Celery sends the retry message before it stores the task's RETRY state: a retry that runs
# and succeeds within those milliseconds has its SUCCESS overwritten by that late RETRY, and
# whoever waits for the result waits forever. Never re-queue sooner than this.
MIN_COUNTDOWN = 0.5

app = Celery("keypool_demo", broker=BROKER_URL, backend=RESULT_BACKEND)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=3600,
    broker_connection_retry_on_startup=True,
)


# ---------------------------------------------------------------------- one pool per process

_pool: KeyPool | None = None
_pool_pid = 0
_pool_lock = threading.Lock()


def keypool_settings() -> KeyPoolSettings:
    """``KEYPOOL_*`` from the environment (and ``.env``), with this example's defaults for the
    store and the namespace when those are not set."""
    settings = KeyPoolSettings()
    missing = {k: v for k, v in KEYPOOL_DEFAULTS.items() if k not in settings.model_fields_set}
    return KeyPoolSettings(**missing) if missing else settings


def demo_key_counts() -> dict[str, int]:
    """``DEMO_KEYS`` (``"openai:3,anthropic:1"``) as provider -> number of demo keys."""
    counts: dict[str, int] = {}
    for item in os.environ.get("DEMO_KEYS", "openai:3,anthropic:1").replace(" ", "").split(","):
        if item:
            provider, _, count = item.partition(":")
            counts[provider] = int(count or "1")
    return counts


def build_pool() -> KeyPool:
    """What ``KeyPool.from_env()`` does (keys from the environment), plus fake demo keys for
    the providers the environment has none of."""
    pool = KeyPool(settings=keypool_settings())
    from_env = {provider for provider, _ in pool.load_env()}
    rpm = int(os.environ["DEMO_RPM"]) if os.environ.get("DEMO_RPM") else None
    for provider, count in demo_key_counts().items():
        if provider in from_env:
            continue
        pool.add_keys(
            [
                (provider, f"demo-{i}", f"demo-{provider}-{i}-not-a-real-key")
                for i in range(1, count + 1)
            ],
            rpm=rpm,
        )
    return pool


def get_pool() -> KeyPool:
    """This process's pool, built on first use. A forked child never uses its parent's pool:
    it builds its own (the pid check), so connections are never shared across a fork."""
    global _pool, _pool_pid
    pid = os.getpid()
    if _pool is None or _pool_pid != pid:
        with _pool_lock:
            if _pool is None or _pool_pid != pid:
                _pool = build_pool()
                _pool_pid = pid
    return _pool


@worker_process_init.connect
def _forget_inherited_pool(**_: Any) -> None:
    """A prefork child starts clean; its pool is built by its first task."""
    global _pool, _pool_pid
    _pool, _pool_pid = None, 0


@worker_process_shutdown.connect
def _close_pool(**_: Any) -> None:
    if _pool is not None and _pool_pid == os.getpid():
        _pool.close()


# ---------------------------------------------------------------------- a simulated provider


class SimulatedRateLimit(Exception):
    """Shaped like an SDK's HTTP error: ``status_code`` and ``response.headers``; keypool
    classifies it as a rate limit and cools the key for ``Retry-After`` seconds."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("simulated HTTP 429")
        self.status_code = 429
        self.response = SimpleNamespace(
            status_code=429, headers={"Retry-After": f"{retry_after:g}"}
        )


def simulated_provider(api_key: str, prompt: str) -> str:
    """Stands in for the provider's API: answers at once, sometimes 429 (``DEMO_429_RATE``)."""
    assert api_key  # a real client would send it; nothing here prints it
    if random.random() < float(os.environ.get("DEMO_429_RATE") or 0):
        raise SimulatedRateLimit(float(os.environ.get("DEMO_429_RETRY_AFTER") or 1))
    return f"answer to {prompt!r}"


# ---------------------------------------------------------------------- the task


@app.task(bind=True, name="keypool_demo.complete", max_retries=MAX_RETRIES)
def complete(self: Any, prompt: str) -> dict[str, Any]:
    """Answer ``prompt`` with whichever key the shared pool hands out."""

    def call_provider(lease: Lease) -> dict[str, Any]:
        admitted_at = time.time()  # just after the pool admitted this request
        text = simulated_provider(lease.secret, prompt)
        return {
            "provider": lease.provider,
            "key_id": lease.key_id,  # the key's id only: never the secret
            "admitted_at": admitted_at,
            "text": text,
        }

    try:
        served = get_pool().call(call_provider, PROVIDER, fallbacks=FALLBACKS)
    except NoKeyAvailable as e:
        countdown = NEVER_FREE_COUNTDOWN if e.retry_after is None else e.retry_after
        countdown = max(countdown, MIN_COUNTDOWN)
        raise self.retry(countdown=countdown, exc=e) from None
    return {**served, "pid": os.getpid(), "retries": self.request.retries}


# ---------------------------------------------------------------------- enqueue and summarise


def summarise(outcomes: list[Any], elapsed: float) -> list[str]:
    """Lines describing the task results (dicts, or exceptions for failed tasks)."""
    done = [o for o in outcomes if isinstance(o, dict)]
    failed = [o for o in outcomes if not isinstance(o, dict)]
    retried = [o for o in done if o["retries"]]
    lines = [
        f"{len(done)} done, {len(failed)} failed in {elapsed:.1f} s, "
        f"by {len({o['pid'] for o in done})} worker processes; "
        f"{len(retried)} waited for a key "
        f"({sum(o['retries'] for o in retried)} retries after NoKeyAvailable)",
        "served by (from the task results):",
    ]
    served = Counter(f"{o['provider']}/{o['key_id']}" for o in done)
    lines += [f"  {key:<24} {count:>5}" for key, count in sorted(served.items())]
    for error in failed[:5]:
        lines.append(f"  failed: {type(error).__name__}: {error}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Enqueue N tasks and summarise who served them.")
    parser.add_argument("n", type=int, nargs="?", default=100, help="tasks to enqueue")
    parser.add_argument("--queue", default=None, help="queue (default: Celery's default)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait")
    args = parser.parse_args(argv)

    settings = keypool_settings()
    print(f"broker {maybe_sanitize_url(BROKER_URL)}, queue {args.queue or 'celery'}")
    print(f"keypool {maybe_sanitize_url(settings.redis_url)}, namespace {settings.namespace!r}")
    options = {"queue": args.queue} if args.queue else {}
    started = time.monotonic()
    results: list[AsyncResult] = [
        complete.apply_async((f"prompt {i}",), **options) for i in range(args.n)
    ]
    print(f"enqueued {args.n} tasks; waiting (is a worker running?)")
    outcomes = ResultSet(results).get(timeout=args.timeout, propagate=False)
    elapsed = time.monotonic() - started
    for result in results:
        result.forget()
    print("\n".join(summarise(outcomes, elapsed)))

    with KeyPool(settings=settings) as pool:
        print(f"pool counters in namespace {settings.namespace!r} (every run, every process):")
        for s in pool.snapshot():
            print(
                f"  {s.provider + '/' + s.key_id:<24} total_requests={s.total_requests:<6} "
                f"errors={s.error_count:<4} status={s.status}"
            )
    return 0 if all(isinstance(o, dict) for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
