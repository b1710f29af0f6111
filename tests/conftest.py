"""One test matrix over every store: the embedded fakeredis store and a real Redis.

The real server is ``KEYPOOL_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/0``). Tests
never flush it: each test gets a namespace of its own and deletes that namespace's keys.
Under ``CI=true`` a missing server fails the run instead of skipping.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from keypool import KeyPool, KeyPoolSettings

REDIS_URL = os.environ.get("KEYPOOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _redis_ok() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except redis.RedisError:
        return False


REDIS_AVAILABLE = _redis_ok()


def require_redis() -> None:
    """Skip (or, under CI, fail) when the real Redis is not there."""
    if REDIS_AVAILABLE:
        return
    if IN_CI:
        pytest.fail(f"CI=true but no Redis answers at {REDIS_URL}", pytrace=False)
    pytest.skip(f"no Redis at {REDIS_URL}")


def drop_namespace(url: str, namespace: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start : start + 500])
    client.close()


@pytest.fixture
def namespace() -> str:
    return "kptest-" + uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def matrix_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A three-master Redis Cluster on free ports, started the first time a test asks."""
    from tests.cluster import start_cluster

    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("CI=true but redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    running = start_cluster(tmp_path_factory.mktemp("matrix-cluster"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_url(request: pytest.FixtureRequest, namespace: str) -> Iterator[str]:
    """A store URL of each kind: the embedded store, one Redis, a three-master Redis
    Cluster. The namespace fixture keeps tests apart."""
    if request.param == "memory":
        yield f"memory://{namespace}"
        return
    if request.param == "cluster":
        cluster = request.getfixturevalue("matrix_cluster")
        yield cluster.url
        cluster.delete(f"{namespace}:*")
        return
    require_redis()
    yield REDIS_URL
    drop_namespace(REDIS_URL, namespace)


@pytest.fixture
def redis_url(namespace: str) -> Iterator[str]:
    """The real Redis only (multi-process tests)."""
    require_redis()
    yield REDIS_URL
    drop_namespace(REDIS_URL, namespace)


@pytest.fixture
def make_pool(store_url: str, namespace: str) -> Iterator[Callable[..., KeyPool]]:
    """Build pools on the store under test; every pool shares the test's namespace."""
    pools: list[KeyPool] = []

    def make(**overrides: Any) -> KeyPool:
        settings = KeyPoolSettings(redis_url=store_url, namespace=namespace, **overrides)
        pool = KeyPool(settings=settings)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


@pytest.fixture
def pool(make_pool: Callable[..., KeyPool]) -> KeyPool:
    return make_pool()


@pytest.fixture
def raw(store_url: str, pool: KeyPool) -> Any:
    """A plain client on the same store, to look at what the pool wrote."""
    return pool._client


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no KEYPOOL_* or provider keys from the machine."""
    for name in list(os.environ):
        if name.startswith("KEYPOOL_") or name.endswith(("_API_KEY", "_API_KEYS")):
            monkeypatch.delenv(name, raising=False)
