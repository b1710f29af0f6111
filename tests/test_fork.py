"""A pool created before a fork (a Celery prefork worker, gunicorn) keeps working in every
child, each on connections of its own, and threads share one pool safely."""

from __future__ import annotations

import os
import threading
from collections import Counter

import pytest

from keypool import KeyPool

pytestmark = pytest.mark.redis


def test_pool_used_across_fork_keeps_exact_rotation(redis_url: str, namespace: str) -> None:
    pool = KeyPool(redis_url, namespace=namespace)
    for i in range(4):
        pool.add_key("openai", f"k{i}", f"secret-fork-{i}")
    with pool.acquire("openai") as lease:  # the parent has an open connection now
        assert lease.key_id

    children = []
    read_fds = []
    for _ in range(3):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: same pool object, inherited before the fork
            os.close(r)
            code = 0
            try:
                got = []
                for _ in range(40):
                    with pool.acquire("openai") as lease:
                        got.append(lease.key_id)
                os.write(w, ",".join(got).encode())
            except BaseException:
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        children.append(pid)
        read_fds.append(r)

    picks: Counter[str] = Counter()
    for pid, r in zip(children, read_fds, strict=True):
        with os.fdopen(r, "rb") as fh:
            data = fh.read().decode()
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, "a child failed to use the inherited pool"
        picks.update(data.split(","))
    # the parent still works after its children used copies of its pool
    with pool.acquire("openai") as lease:
        picks[lease.key_id] += 1
    totals = {s.key_id: s.total_requests for s in pool.snapshot("openai")}
    assert sum(picks.values()) == 121
    assert sum(totals.values()) == 122  # + the parent's first call
    assert max(totals.values()) - min(totals.values()) <= 1


def test_threads_share_one_pool(redis_url: str, namespace: str) -> None:
    pool = KeyPool(redis_url, namespace=namespace)
    for i in range(5):
        pool.add_key("openai", f"k{i}", f"secret-thread-{i}")
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(50):
                with pool.acquire("openai") as lease, lock:
                    seen[lease.key_id] += 1
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(seen.values()) == [80] * 5
    assert all(s.in_flight == 0 for s in pool.snapshot("openai"))
