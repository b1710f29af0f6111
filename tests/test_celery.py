"""A real Celery worker (prefork, several processes) running examples/celery_app.py shares one
pool: one exact rotation over the fleet, one rate budget, and tasks that find no key re-queue
themselves for when the pool says a key frees up.

Needs celery (``pip install 'keypool[celery]'``) and the real Redis; the broker and result
backend are db 15 of that server, on a queue of this test's own. Under ``CI=true`` a missing
celery or Redis fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from keypool import KeyPool

from .conftest import IN_CI

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/celery_app.py"
TASK = "keypool_demo.complete"
BROKER_DB = 15
CONCURRENCY = 4
DEMO_KEYS = "openai:3,anthropic:1"
STARTUP = 30.0  # seconds a worker may take to start and take its first tasks
STOP_GRACE = 15.0  # seconds between SIGTERM and SIGKILL


def require_celery() -> None:
    """Skip (or, under CI, fail) when celery is not installed."""
    if importlib.util.find_spec("celery") is not None:
        return
    if IN_CI:
        pytest.fail(
            "CI=true but celery is not installed (pip install 'keypool[celery]')",
            pytrace=False,
        )
    pytest.skip("celery is not installed (pip install 'keypool[celery]')")


@pytest.fixture(autouse=True)
def _celery_installed() -> None:
    require_celery()


def _broker_url(redis_url: str) -> str:
    return urlsplit(redis_url)._replace(path=f"/{BROKER_DB}").geturl()


def _env(**extra: str) -> dict[str, str]:
    """The machine's environment without keypool settings, provider keys, demo or Celery
    settings; the repository importable."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("KEYPOOL_", "DEMO_", "CELERY_"))
        and not name.endswith(("_KEY", "_KEYS"))
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@dataclass
class Worker:
    """A running worker and what the test needs to talk to it."""

    proc: subprocess.Popen[bytes]
    client: Any  # a Celery app on the same broker and backend
    queue: str
    env: dict[str, str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def run(self, n: int, timeout: float) -> list[Any]:
        """Send ``n`` tasks to the worker's queue and wait for all of them: returns each
        task's result (a dict) or, for a failed task, its exception."""
        from celery.result import ResultSet

        results = [
            self.client.send_task(TASK, args=(f"prompt {i}",), queue=self.queue) for i in range(n)
        ]
        rs = ResultSet(results, app=self.client)
        deadline = time.monotonic() + timeout
        try:
            while rs.completed_count() < n:
                if self.proc.poll() is not None:
                    pytest.fail(f"the worker exited ({self.proc.returncode}):\n{self.log()}")
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"{rs.completed_count()} of {n} tasks done after {timeout:.0f} s:\n"
                        + self.log()[-5000:]
                    )
                time.sleep(0.2)
            return list(rs.get(timeout=timeout, propagate=False))
        finally:
            for result in results:
                result.forget()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (warm shutdown), then SIGKILL to the worker's process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE)
    with suppress(ProcessLookupError, PermissionError):  # pool children outliving the parent
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _drop_broker_state(broker_url: str, token: str) -> None:
    """Delete every broker key, binding and result this test's worker left in db 15."""
    client = redis.Redis.from_url(broker_url)
    try:
        for key in list(client.scan_iter(match=f"*{token}*", count=1000)):
            client.delete(key)
        for binding in list(client.scan_iter(match="_kombu.binding.*", count=1000)):
            stale = [m for m in client.smembers(binding) if token.encode() in m]
            if stale:
                client.srem(binding, *stale)
    finally:
        client.close()


@contextmanager
def celery_worker(redis_url: str, namespace: str, **demo_env: str) -> Iterator[Worker]:
    """A real prefork worker on examples.celery_app, on a queue of its own."""
    from celery import Celery

    token = "kpcelery-" + uuid.uuid4().hex[:10]
    broker = _broker_url(redis_url)
    env = _env(
        CELERY_BROKER_URL=broker,
        CELERY_RESULT_BACKEND=broker,
        KEYPOOL_REDIS_URL=redis_url,
        KEYPOOL_NAMESPACE=namespace,
        **demo_env,
    )
    command = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "examples.celery_app",
        "worker",
        "--concurrency",
        str(CONCURRENCY),
        "--pool",
        "prefork",
        "--without-heartbeat",
        "--without-gossip",
        "--without-mingle",
        "-Q",
        token,
        "-n",
        f"{token}@%h",
        "--loglevel",
        "info",  # the retry lines ("Retry in 1.2s: NoKeyAvailable(...)") are at info
    ]
    client = Celery("kptest-client", broker=broker, backend=broker)
    client.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "worker.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield Worker(proc, client, token, env, log_path)
        finally:
            _stop(proc)
            client.close()
            _drop_broker_state(broker, token)


def _key(outcome: dict[str, Any]) -> str:
    return f"{outcome['provider']}/{outcome['key_id']}"


def _served(outcomes: list[Any]) -> Counter[str]:
    return Counter(_key(o) for o in outcomes)


def _check_all_done(outcomes: list[Any], worker: Worker) -> list[dict[str, Any]]:
    failed = [o for o in outcomes if not isinstance(o, dict)]
    assert not failed, f"{len(failed)} tasks failed, e.g. {failed[0]!r}\n{worker.log()[-5000:]}"
    text = repr(outcomes) + worker.log()
    assert "not-a-real-key" not in text  # results and logs name keys, never secrets
    return list(outcomes)


def test_fleet_shares_one_exact_rotation(redis_url: str, namespace: str) -> None:
    n = 200
    with celery_worker(redis_url, namespace, DEMO_KEYS=DEMO_KEYS) as worker:
        outcomes = _check_all_done(worker.run(n, timeout=STARTUP + 60), worker)

        # the tasks really ran in several processes of the fleet
        assert len({o["pid"] for o in outcomes}) > 1
        assert all(o["retries"] == 0 for o in outcomes)  # nothing limits these keys
        # one shared rotation: 3 keys of equal standing, 200 picks -> 66 or 67 each; the
        # fallback provider is never needed while the first one has a key
        served = _served(outcomes)
        assert set(served) == {"openai/demo-1", "openai/demo-2", "openai/demo-3"}
        assert sorted(served.values()) == [66, 67, 67]
        # Redis counted exactly these requests, and every lease was given back
        with KeyPool(redis_url, namespace=namespace) as pool:
            for key, count in served.items():
                stats = pool.stats("openai", key.split("/")[1])
                assert stats.total_requests == count
                assert stats.in_flight == 0
            assert pool.stats("anthropic", "demo-1").total_requests == 0

        # the example's own client, as a user runs it: 12 more tasks, counters shown
        proc = subprocess.run(
            [sys.executable, EXAMPLE, "12", "--queue", worker.queue, "--timeout", "60"],
            cwd=ROOT,
            env=worker.env,
            capture_output=True,
            text=True,
            timeout=90,
        )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "not-a-real-key" not in output
    assert re.search(r"^12 done, 0 failed in [\d.]+ s, by \d+ worker processes", output, re.M)
    run_counts = re.findall(r"^  openai/demo-\d +(\d+)$", proc.stdout, re.M)
    assert sorted(map(int, run_counts)) == [4, 4, 4], output
    totals = re.findall(r"^  openai/demo-\d +total_requests=(\d+)", proc.stdout, re.M)
    assert sorted(map(int, totals)) == [70, 71, 71], output  # 212 picks, one rotation


def test_fleet_shares_one_budget_and_retries_when_the_pool_says(
    redis_url: str, namespace: str
) -> None:
    rpm = 30  # per key: a bucket of 30 requests, refilled at one request per 2 s
    keys = 4  # openai 3 + the anthropic fallback
    n = 4 * rpm + 10  # every bucket drained, then 10 more wait for the refill (~5 s)
    with celery_worker(redis_url, namespace, DEMO_KEYS=DEMO_KEYS, DEMO_RPM=str(rpm)) as worker:
        outcomes = _check_all_done(worker.run(n, timeout=STARTUP + 60), worker)
        log = worker.log()
        with KeyPool(redis_url, namespace=namespace) as pool:
            counted = {
                f"{s.provider}/{s.key_id}": (s.total_requests, s.in_flight) for s in pool.snapshot()
            }

    served = _served(outcomes)
    assert len(served) == keys  # the fallback provider took its share once openai ran dry
    # every admitted request is one finished task, and Redis counted exactly those
    assert sum(served.values()) == n
    assert counted == {key: (count, 0) for key, count in served.items()}

    # the budget held across the whole fleet: on each key, over any interval of length D,
    # admitted requests <= rpm + rpm * D / 60 (D measured from the worker clocks just after
    # admission; TOLERANCE covers the gap between Redis' clock reading and that moment)
    tolerance = 0.5
    for key in served:
        times = sorted(
            o["admitted_at"] for o in outcomes if f"{o['provider']}/{o['key_id']}" == key
        )
        for i in range(len(times)):
            for j in range(i, len(times)):
                bound = rpm + rpm * (times[j] - times[i] + tolerance) / 60
                assert j - i + 1 <= bound, (key, j - i + 1, times[j] - times[i])

    # tasks that found no key were retried, and every one eventually got a key; a task
    # admitted on its first try needed a token from the first burst or the trickle of refill
    retried = [o for o in outcomes if o["retries"] > 0]
    assert len(retried) >= n - keys * rpm
    # ... each retry was scheduled retry_after seconds ahead, as NoKeyAvailable said (or the
    # example's floor, when that is later)
    from examples.celery_app import MIN_COUNTDOWN

    retries = re.findall(
        r"retry: Retry in ([\d.e-]+)s: NoKeyAvailable\(.*?retry after ([\d.]+)s", log
    )
    assert len(retries) == sum(o["retries"] for o in outcomes), log[-5000:]
    assert any(float(retry_after) > MIN_COUNTDOWN for _, retry_after in retries)
    for countdown, retry_after in retries:
        expected = max(float(retry_after), MIN_COUNTDOWN)
        assert float(countdown) == pytest.approx(expected, abs=0.0006)
