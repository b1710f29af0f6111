"""AsyncKeyPool: the asyncio twin of KeyPool, on every store.

Each test runs its coroutine with ``asyncio.run`` and builds its pools inside it, so the
async clients belong to that loop. A KeyPool and an AsyncKeyPool on the same store URL and
namespace are one pool: what one does, the other sees.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from keypool import (
    AsyncKeyPool,
    AsyncLease,
    ErrorKind,
    KeyPool,
    KeyStats,
    Lease,
    NoKeyAvailable,
    Provider,
    UnknownKey,
)

P = Provider.OPENAI


def secret_of(provider: object, key_id: str) -> str:
    return f"sk-test-{provider}-{key_id}-0123456789abcdef"


class ProviderError(Exception):
    """Shaped like an SDK's status error: only ``status_code`` matters."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"Error code: {status_code}")
        self.status_code = status_code


async def async_pool(store_url: str, namespace: str, *ids: str, **limits: Any) -> AsyncKeyPool:
    apool = AsyncKeyPool(store_url, namespace=namespace)
    for key_id in ids:
        await apool.add_key(P, key_id, secret_of(P, key_id), **limits)
    return apool


def run(
    store_url: str,
    namespace: str,
    ids: tuple[str, ...],
    body: Callable[[AsyncKeyPool], Awaitable[Any]],
) -> Any:
    """Run ``body(apool)`` in a fresh event loop with keys ``ids`` registered, then close."""

    async def main() -> Any:
        apool = await async_pool(store_url, namespace, *ids)
        try:
            return await body(apool)
        finally:
            await apool.close()

    return asyncio.run(main())


def sync_pool(store_url: str, namespace: str, *ids: str) -> KeyPool:
    pool = KeyPool(store_url, namespace=namespace)
    for key_id in ids:
        pool.add_key(P, key_id, secret_of(P, key_id))
    return pool


# --------------------------------------------------------------------------- round robin


@pytest.mark.parametrize("k", [3, 7])
def test_round_robin_is_exact_under_200_concurrent_tasks(
    store_url: str, namespace: str, k: int
) -> None:
    ids = tuple(f"key{i}" for i in range(k))
    n = 200

    async def body(apool: AsyncKeyPool) -> tuple[Counter[str], list[KeyStats]]:
        counts: Counter[str] = Counter()

        async def task() -> None:
            async with apool.acquire("openai") as lease:
                await asyncio.sleep(0)
                counts[lease.key_id] += 1

        await asyncio.gather(*(task() for _ in range(n)))
        return counts, await apool.snapshot(P)

    counts, snap = run(store_url, namespace, ids, body)
    assert sum(counts.values()) == n
    assert set(counts) == set(ids)
    low, high = n // k, -(-n // k)
    assert all(low <= c <= high for c in counts.values()), counts
    by_id = {s.key_id: s for s in snap}
    for key_id in ids:
        assert by_id[key_id].total_requests == counts[key_id]
        assert by_id[key_id].success_count == counts[key_id]
        assert by_id[key_id].in_flight == 0


def test_sync_and_async_pools_share_one_rotation_and_state(store_url: str, namespace: str) -> None:
    ids = ("a", "b", "c")
    pool = sync_pool(store_url, namespace, *ids)

    async def body(apool: AsyncKeyPool) -> Counter[str]:
        counts: Counter[str] = Counter()
        for i in range(30):
            if i % 2:
                with pool.acquire(P) as lease:
                    counts[lease.key_id] += 1
            else:
                async with apool.acquire(P) as alease:
                    counts[alease.key_id] += 1
        # an operator action taken by the async pool is seen by the sync pool, and back
        await apool.disable_key(P, "b", reason="rotated")
        assert pool.stats(P, "b").status == "disabled"
        pool.enable_key(P, "b")
        assert (await apool.stats(P, "b")).status == "active"
        return counts

    try:
        counts = run(store_url, namespace, ids, body)
        assert counts == {"a": 10, "b": 10, "c": 10}
        assert {s.key_id: s.total_requests for s in pool.snapshot(P)} == counts
    finally:
        pool.close()


# --------------------------------------------------------------------------- both forms


def test_awaited_acquire_and_explicit_success(store_url: str, namespace: str) -> None:
    async def body(apool: AsyncKeyPool) -> tuple[KeyStats, KeyStats, KeyStats]:
        lease = await apool.acquire(P, tokens=10)
        assert isinstance(lease, AsyncLease)
        assert (lease.provider, lease.key_id, lease.secret) == ("openai", "a", secret_of(P, "a"))
        during = await apool.stats(P, "a")
        await lease.success(tokens=7)
        after = await apool.stats(P, "a")
        await lease.success()  # reporting twice is a no-op
        await lease.fail(ErrorKind.SERVER)
        await lease.release()
        return during, after, await apool.stats(P, "a")

    during, after, again = run(store_url, namespace, ("a",), body)
    assert during.in_flight == 1
    assert during.total_requests == 1
    assert after.in_flight == 0
    assert after.success_count == 1
    assert after.tokens_used == 7
    assert after.error_count == 0
    assert again == after


def test_async_with_acquire_reports_success(store_url: str, namespace: str) -> None:
    async def body(apool: AsyncKeyPool) -> tuple[int, KeyStats]:
        async with apool.acquire(P) as lease:
            assert isinstance(lease, AsyncLease)
            assert lease.secret == secret_of(P, "a")
            inside = (await apool.stats(P, "a")).in_flight
        return inside, await apool.stats(P, "a")

    inside, after = run(store_url, namespace, ("a",), body)
    assert inside == 1
    assert after.in_flight == 0
    assert after.success_count == 1
    assert after.error_count == 0


def test_exception_inside_async_with_fails_the_lease_and_is_reraised(
    store_url: str, namespace: str
) -> None:
    async def body(apool: AsyncKeyPool) -> KeyStats:
        error = ProviderError(500)
        with pytest.raises(ProviderError) as excinfo:
            async with apool.acquire(P):
                await asyncio.sleep(0)
                raise error
        assert excinfo.value is error
        return await apool.stats(P, "a")

    after = run(store_url, namespace, ("a",), body)
    assert after.error_count == 1
    assert after.errors_by_kind == {"server": 1}
    assert after.success_count == 0
    assert after.in_flight == 0


def test_rate_limit_inside_async_with_cools_the_key(store_url: str, namespace: str) -> None:
    async def body(apool: AsyncKeyPool) -> tuple[KeyStats, NoKeyAvailable]:
        with pytest.raises(ProviderError):
            async with apool.acquire(P):
                raise ProviderError(429)
        with pytest.raises(NoKeyAvailable) as excinfo:
            await apool.acquire(P)
        return await apool.stats(P, "a"), excinfo.value

    after, exc = run(store_url, namespace, ("a",), body)
    assert after.status == "cooling"
    assert after.is_rate_limited
    assert after.errors_by_kind == {"rate_limit": 1}
    assert exc.retry_after is not None and exc.retry_after > 0


def test_cancelled_inside_async_with_releases_without_an_error(
    store_url: str, namespace: str
) -> None:
    async def body(apool: AsyncKeyPool) -> tuple[int, KeyStats]:
        started = asyncio.Event()

        async def worker() -> None:
            async with apool.acquire(P):
                started.set()
                await asyncio.sleep(30)

        task = asyncio.create_task(worker())
        await started.wait()
        held = (await apool.stats(P, "a")).in_flight
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return held, await apool.stats(P, "a")

    held, after = run(store_url, namespace, ("a",), body)
    assert held == 1
    assert after.in_flight == 0
    assert after.error_count == 0
    assert after.errors_by_kind == {}
    assert after.success_count == 0
    assert after.total_requests == 1
    assert after.status == "active"


def test_asyncio_timeout_around_async_with_releases_the_key(store_url: str, namespace: str) -> None:
    async def body(apool: AsyncKeyPool) -> KeyStats:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05), apool.acquire(P):
                await asyncio.sleep(30)
        return await apool.stats(P, "a")

    after = run(store_url, namespace, ("a",), body)
    assert after.in_flight == 0
    assert after.error_count == 0
    assert after.total_requests == 1


def test_max_concurrency_is_freed_by_async_with(store_url: str, namespace: str) -> None:
    async def body(apool: AsyncKeyPool) -> list[str]:
        await apool.add_key(P, "solo", secret_of(P, "solo"), max_concurrency=1)
        seen = []
        async with apool.acquire(P) as lease:
            seen.append(lease.key_id)
            with pytest.raises(NoKeyAvailable):
                await apool.acquire(P)
        async with apool.acquire(P) as lease:
            seen.append(lease.key_id)
        return seen

    assert run(store_url, namespace, (), body) == ["solo", "solo"]


# --------------------------------------------------------------------------- parity


def public_methods(cls: type) -> dict[str, Any]:
    return {
        name: member
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member)
    }


def params(fn: Any) -> list[tuple[str, Any, Any]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_keypool_method_exists_on_asynckeypool_as_a_coroutine() -> None:
    sync_methods = public_methods(KeyPool)
    async_methods = public_methods(AsyncKeyPool)
    assert set(sync_methods) <= set(async_methods), set(sync_methods) - set(async_methods)
    assert {"acquire", "call", "stats", "snapshot", "from_env", "add_key"} <= set(sync_methods)
    for name, sync_fn in sync_methods.items():
        async_fn = async_methods[name]
        assert params(async_fn) == params(sync_fn), name
        if name == "acquire":
            assert not inspect.iscoroutinefunction(async_fn)
        else:
            assert inspect.iscoroutinefunction(async_fn), f"AsyncKeyPool.{name} is not async"
    # the context-manager protocols mirror each other
    assert hasattr(KeyPool, "__enter__") and hasattr(KeyPool, "__exit__")
    assert inspect.iscoroutinefunction(AsyncKeyPool.__aenter__)
    assert inspect.iscoroutinefunction(AsyncKeyPool.__aexit__)


def test_every_lease_method_exists_on_asynclease_as_a_coroutine() -> None:
    for name, sync_fn in public_methods(Lease).items():
        async_fn = getattr(AsyncLease, name)
        assert params(async_fn) == params(sync_fn), name
        assert inspect.iscoroutinefunction(async_fn), f"AsyncLease.{name} is not async"
    props = {n for n, m in inspect.getmembers(Lease) if isinstance(m, property)}
    assert {"provider", "key_id", "secret", "model"} <= props
    assert props <= {n for n, m in inspect.getmembers(AsyncLease) if isinstance(m, property)}


def test_acquire_returns_an_awaitable_async_context_manager(store_url: str, namespace: str) -> None:
    async def body(apool: AsyncKeyPool) -> None:
        ctx = apool.acquire(P)
        assert not inspect.iscoroutine(ctx)  # nothing is leased until awaited or entered
        assert (await apool.stats(P, "a")).total_requests == 0
        assert hasattr(ctx, "__await__")
        assert hasattr(ctx, "__aenter__") and hasattr(ctx, "__aexit__")
        lease = await ctx
        assert lease.key_id == "a"
        await lease.release()

    run(store_url, namespace, ("a",), body)


def test_async_from_env_registers_the_environment_keys(
    store_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env-openai-0123456789")
    monkeypatch.setenv("HF_RESEARCH_KEY", "hf_env_research_0123456789")

    async def main() -> tuple[list[tuple[str, str]], str, str]:
        apool = await AsyncKeyPool.from_env(store_url, namespace=namespace)
        try:
            assert isinstance(apool, AsyncKeyPool)
            found = sorted((s.provider, s.key_id) for s in await apool.snapshot())
            async with apool.acquire(P) as lease:
                openai_secret = lease.secret
            async with apool.acquire("huggingface") as lease:
                hf_secret = lease.secret
            return found, openai_secret, hf_secret
        finally:
            await apool.close()

    found, openai_secret, hf_secret = asyncio.run(main())
    assert found == [("huggingface", "research"), ("openai", "default")]
    assert openai_secret == "sk-env-openai-0123456789"
    assert hf_secret == "hf_env_research_0123456789"
    # the sync pool reads the same environment the same way
    with KeyPool(store_url, namespace=namespace) as pool:
        assert sorted(pool.load_env()) == found


def test_async_from_env_accepts_an_explicit_environ(store_url: str, namespace: str) -> None:
    environ = {"ANTHROPIC_API_KEYS": "sk-ant-one-0123456789, sk-ant-two-0123456789"}

    async def main() -> list[str]:
        apool = await AsyncKeyPool.from_env(store_url, namespace=namespace, environ=environ)
        try:
            return sorted(s.key_id for s in await apool.snapshot("anthropic"))
        finally:
            await apool.close()

    async_ids = asyncio.run(main())
    assert len(async_ids) == 2
    pool = KeyPool.from_env(store_url, namespace=namespace, environ=environ)
    try:
        assert sorted(s.key_id for s in pool.snapshot("anthropic")) == async_ids
    finally:
        pool.close()


def view(stats: list[KeyStats]) -> list[dict[str, Any]]:
    """What a user compares between two pools: everything but times and the provider."""
    out = []
    for s in stats:
        d = s.as_dict()
        for name in (
            "provider",
            "cooldown_until",
            "last_used",
            "last_error_at",
            "available_at",
            "created_at",
            "latency_ms",
            "rpm_left",
        ):
            d.pop(name)
        out.append(d)
    return out


def test_sync_and_async_behave_the_same(store_url: str, namespace: str) -> None:
    """The same operator script on a sync and an async pool gives the same states."""
    sp, ap = "mirror-sync", "mirror-async"

    def sync_script() -> list[Any]:
        out: list[Any] = []
        with KeyPool(store_url, namespace=namespace) as pool:
            pool.add_key(sp, "a", secret_of("mirror", "a"), rpm=100, models=["m1"])
            pool.add_key(sp, "b", secret_of("mirror", "b"))
            pool.assign_model("m2", sp, "b")
            with pool.acquire(sp, tokens=3) as lease:
                out.append(lease.key_id)
            pool.mark_success(sp, "b", tokens=4, latency=0.1)
            out.append(pool.mark_failure(sp, "a", 500))
            out.append(pool.mark_failure(sp, "b", 429, retry_after=30))
            pool.disable_key(sp, "a", reason="rotated")
            out.append(view(pool.snapshot(sp)))
            with pytest.raises(NoKeyAvailable) as excinfo:
                pool.acquire(sp)
            out.append(round(excinfo.value.retry_after or 0))
            pool.enable_key(sp, "a")
            pool.reset_key(sp, "b")
            out.append(view([pool.stats(sp, "a"), pool.stats(sp, "b")]))
            pool.remove_key(sp, "b")
            with pytest.raises(UnknownKey):
                pool.stats(sp, "b")
            out.append(view(pool.snapshot(sp)))
            out.append(sp in pool.providers())
        return out

    async def async_script() -> list[Any]:
        out: list[Any] = []
        async with AsyncKeyPool(store_url, namespace=namespace) as pool:
            await pool.add_key(ap, "a", secret_of("mirror", "a"), rpm=100, models=["m1"])
            await pool.add_key(ap, "b", secret_of("mirror", "b"))
            await pool.assign_model("m2", ap, "b")
            async with pool.acquire(ap, tokens=3) as lease:
                out.append(lease.key_id)
            await pool.mark_success(ap, "b", tokens=4, latency=0.1)
            out.append(await pool.mark_failure(ap, "a", 500))
            out.append(await pool.mark_failure(ap, "b", 429, retry_after=30))
            await pool.disable_key(ap, "a", reason="rotated")
            out.append(view(await pool.snapshot(ap)))
            with pytest.raises(NoKeyAvailable) as excinfo:
                await pool.acquire(ap)
            out.append(round(excinfo.value.retry_after or 0))
            await pool.enable_key(ap, "a")
            await pool.reset_key(ap, "b")
            out.append(view([await pool.stats(ap, "a"), await pool.stats(ap, "b")]))
            await pool.remove_key(ap, "b")
            with pytest.raises(UnknownKey):
                await pool.stats(ap, "b")
            out.append(view(await pool.snapshot(ap)))
            out.append(ap in await pool.providers())
        return out

    sync_out = sync_script()
    async_out = asyncio.run(async_script())
    assert async_out == sync_out
    # and the script did what it says (so equality is not of two empty results)
    key, fail_a, fail_b, snap, retry, after_reset, final, listed = sync_out
    assert key == "a"
    assert fail_a.kind is ErrorKind.SERVER
    assert fail_b.kind is ErrorKind.RATE_LIMIT
    assert [s["status"] for s in snap] == ["disabled", "cooling"]
    assert snap[0]["disabled_reason"] == "rotated"
    assert 29 <= retry <= 30
    assert [s["status"] for s in after_reset] == ["active", "active"]
    assert [s["key_id"] for s in final] == ["a"]
    assert listed is True


# --------------------------------------------------------------------------- wait=


def test_wait_sleeps_until_the_key_cools_down_without_blocking_the_loop(
    store_url: str, namespace: str
) -> None:
    async def body(apool: AsyncKeyPool) -> tuple[float, str, list[float], float, float]:
        lease = await apool.acquire(P)
        await lease.fail(ErrorKind.RATE_LIMIT, retry_after=0.4)
        ticks: list[float] = []
        stop = asyncio.Event()

        async def ticker() -> None:
            while not stop.is_set():
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        start = time.monotonic()
        lease = await apool.acquire(P, wait=2)
        end = time.monotonic()
        stop.set()
        await tick_task
        await lease.success()
        return end - start, lease.key_id, ticks, start, end

    elapsed, key_id, ticks, start, end = run(store_url, namespace, ("a",), body)
    assert key_id == "a"
    assert 0.3 <= elapsed < 1.9, elapsed  # it slept until the cooldown ended, not the full wait
    during = [t for t in ticks if start < t < end]
    assert len(during) >= 5, f"the event loop was blocked: {len(during)} ticks in {elapsed:.2f}s"


def test_wait_shorter_than_the_cooldown_raises_with_retry_after(
    store_url: str, namespace: str
) -> None:
    async def body(apool: AsyncKeyPool) -> NoKeyAvailable:
        lease = await apool.acquire(P)
        await lease.fail(ErrorKind.RATE_LIMIT, retry_after=5)
        with pytest.raises(NoKeyAvailable) as excinfo:
            await apool.acquire(P, wait=0.1)
        return excinfo.value

    exc = run(store_url, namespace, ("a",), body)
    assert exc.retry_after is not None
    assert 4.0 < exc.retry_after <= 5.0


# --------------------------------------------------------------------------- NoKeyAvailable


def test_no_key_available_retry_after_matches_between_sync_and_async(
    store_url: str, namespace: str
) -> None:
    pool = sync_pool(store_url, namespace, "a", "b")
    try:
        pool.acquire(P).fail(ErrorKind.RATE_LIMIT, retry_after=5)
        pool.acquire(P).fail(ErrorKind.RATE_LIMIT, retry_after=8)

        async def body(apool: AsyncKeyPool) -> NoKeyAvailable:
            with pytest.raises(NoKeyAvailable) as excinfo:
                await apool.acquire(P)
            return excinfo.value

        async_exc = run(store_url, namespace, ("a", "b"), body)
        with pytest.raises(NoKeyAvailable) as excinfo:
            pool.acquire(P)
        sync_exc = excinfo.value
    finally:
        pool.close()
    assert async_exc.retry_after is not None and sync_exc.retry_after is not None
    assert 4.0 < async_exc.retry_after <= 5.0  # the earliest of the two cooldowns
    assert abs(async_exc.retry_after - sync_exc.retry_after) < 1.0
    assert async_exc.provider == sync_exc.provider == "openai"


def test_no_key_available_retry_after_is_none_when_all_are_disabled(
    store_url: str, namespace: str
) -> None:
    async def body(apool: AsyncKeyPool) -> NoKeyAvailable:
        await apool.disable_key(P, "a")
        with pytest.raises(NoKeyAvailable) as excinfo:
            await apool.acquire(P)
        return excinfo.value

    exc = run(store_url, namespace, ("a",), body)
    assert exc.retry_after is None
