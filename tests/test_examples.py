"""The example runs as a user would run it: a separate process, offline and on a real Redis."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

from keypool import KeyPool

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/multi_provider_key_management.py"
HEADINGS = (
    "== 1. Shared round-robin",
    "== 2. Model routing",
    "== 3. Best key",
    "== 4. Fallback across providers",
    "== 5. Usage statistics",
)
TIMEOUT = 90


def _example_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kp_example", ROOT / EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    """The machine's environment without any keypool setting or provider key."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("KEYPOOL_") and not name.endswith(("_KEY", "_KEYS"))
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


def _command(*args: str) -> list[str]:
    return [sys.executable, EXAMPLE, *args]


def _check_output(proc: subprocess.CompletedProcess[str]) -> int:
    """Exit code 0, every section, no secret anywhere; returns the calls the run made."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for heading in HEADINGS:
        assert heading in proc.stdout
    for demo in _example_module().DEMO_KEYS:
        assert demo.secret not in output
    assert "not-a-real-key" not in output
    found = re.search(r"^calls made: (\d+)$", proc.stdout, re.MULTILINE)
    assert found is not None, proc.stdout
    return int(found.group(1))


def _pool_total(stdout: str) -> int:
    found = re.search(r"^total_requests in the pool: (\d+)", stdout, re.MULTILINE)
    assert found is not None, stdout
    return int(found.group(1))


def test_example_runs_offline_on_memory() -> None:
    proc = subprocess.run(
        _command("--rounds", "6"),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    calls = _check_output(proc)
    assert "url='memory://'" in proc.stdout
    assert "namespace='keypool-demo'" in proc.stdout
    # alone on its store, the pool counted exactly the calls this run made
    assert calls == _pool_total(proc.stdout) > 0
    # section 1: six acquires over three equally available keys, two each, in turn
    picked = re.findall(r"^  openai/(\S+) .* <- acquire\('openai'\)", proc.stdout, re.MULTILINE)
    assert len(picked) == 6
    assert Counter(picked) == {"key-1": 2, "key-2": 2, "key-3": 2}
    assert len(set(picked[:3])) == 3
    # section 2: a model is served only by the keys assigned to it
    routed = [line for line in proc.stdout.splitlines() if line.endswith("'gpt-4o-mini')")]
    assert len(routed) == 3  # two acquire(model=...) and one get_key_for_model
    for line in routed:
        assert re.match(r"  openai/key-[12] ", line), line
    # section 3: the anthropic key without errors is the best one
    best = re.findall(r"^  anthropic/(\S+) .* <- km.get_best_key", proc.stdout, re.MULTILINE)
    assert best == ["key-3", "key-3"]
    # section 4/5: simulated 429s were reported and show up in the table
    assert "rate_limit" in proc.stdout
    assert re.search(r"^  openai +key-1 ", proc.stdout, re.MULTILINE)


def test_example_runs_on_real_redis(redis_url: str, namespace: str) -> None:
    env = _env(KEYPOOL_REDIS_URL=redis_url, KEYPOOL_NAMESPACE=namespace)
    proc = subprocess.run(
        _command("--rounds", "4", "--reset"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    calls = _check_output(proc)
    assert f"namespace={namespace!r}" in proc.stdout
    assert calls == _pool_total(proc.stdout) > 0
    with KeyPool(redis_url, namespace=namespace) as pool:
        stats = pool.snapshot()
    assert {s.provider for s in stats} == {"openai", "anthropic", "gemini", "huggingface"}
    assert sum(s.total_requests for s in stats) == calls
    assert all(s.in_flight == 0 for s in stats)


def test_two_runs_in_parallel_share_one_pool(redis_url: str, namespace: str) -> None:
    env = _env(KEYPOOL_REDIS_URL=redis_url, KEYPOOL_NAMESPACE=namespace)
    procs = [
        subprocess.Popen(
            _command("--rounds", "10", "--seed", str(seed)),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in (1, 2)
    ]
    done: list[subprocess.CompletedProcess[str]] = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    calls = [_check_output(result) for result in done]
    with KeyPool(redis_url, namespace=namespace) as pool:
        stats = pool.snapshot()
    # one set of counters: every request either process made is counted once, in Redis
    assert sum(s.total_requests for s in stats) == sum(calls)
    assert all(s.in_flight == 0 for s in stats)
    # the run that finished last saw the other's calls in the shared totals
    assert max(_pool_total(result.stdout) for result in done) > max(calls)
