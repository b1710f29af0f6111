"""``pool.call(fn, ...)``: retries on another key, fallbacks, and what is raised when all is
spent — for the sync ``KeyPool.call`` and the async ``AsyncKeyPool.call``, on every store.

The ``h`` fixture runs each test once per mode. In async mode the call runs on an
AsyncKeyPool in its own event loop, with the same keys registered; the sync pool ``h.pool``
(same store, same namespace, so the same pool) sets things up and reads the state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
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
)

OPENAI = "openai"
ANTHROPIC = "anthropic"
AnyLease = Lease | AsyncLease


def secret_of(provider: str, key_id: str) -> str:
    return f"sk-test-{provider}-{key_id}-0123456789abcdef"


class ProviderError(Exception):
    """Shaped like an SDK status error (openai.APIStatusError and the like)."""

    def __init__(self, status_code: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"Error code: {status_code}")
        self.status_code = status_code
        self.headers = dict(headers or {})


class Harness:
    """Registers keys, runs ``call`` in the mode under test, and reads the shared state."""

    def __init__(self, mode: str, store_url: str, namespace: str) -> None:
        self.mode = mode
        self.store_url = store_url
        self.namespace = namespace
        self.pool = KeyPool(store_url, namespace=namespace)
        self.keys: list[tuple[str, str, dict[str, Any]]] = []
        self.seen: list[tuple[str, str, str | None]] = []

    def add(self, provider: str, *ids: str, **options: Any) -> None:
        for key_id in ids:
            self.pool.add_key(provider, key_id, secret_of(provider, key_id), **options)
            self.keys.append((provider, key_id, options))

    def cool(self, provider: str, key_id: str, seconds: float) -> None:
        """Put one key in a rate-limit cooldown of ``seconds``."""
        self.pool.mark_failure(provider, key_id, ErrorKind.RATE_LIMIT, retry_after=seconds)
        assert self.pool.stats(provider, key_id).status == "cooling"

    def call(self, body: Callable[[AnyLease], Any], *args: Any, **kwargs: Any) -> Any:
        """``pool.call`` with ``fn(lease)`` = record the lease, then ``body(lease)``."""

        def record(lease: AnyLease) -> None:
            assert lease.secret == secret_of(lease.provider, lease.key_id)
            self.seen.append((lease.provider, lease.key_id, lease.model))

        if self.mode == "sync":

            def fn(lease: Lease) -> Any:
                record(lease)
                return body(lease)

            return self.pool.call(fn, *args, **kwargs)

        async def main() -> Any:
            apool = AsyncKeyPool(self.store_url, namespace=self.namespace)
            try:
                for provider, key_id, options in self.keys:
                    await apool.add_key(provider, key_id, secret_of(provider, key_id), **options)

                async def afn(lease: AsyncLease) -> Any:
                    await asyncio.sleep(0)
                    record(lease)
                    return body(lease)

                return await apool.call(afn, *args, **kwargs)
            finally:
                await apool.close()

        return asyncio.run(main())

    def stats(self, provider: str, key_id: str) -> KeyStats:
        return self.pool.stats(provider, key_id)

    def totals(self) -> dict[tuple[str, str], int]:
        return {(s.provider, s.key_id): s.total_requests for s in self.pool.snapshot()}

    def assert_no_lease_held(self) -> None:
        held = {(s.provider, s.key_id): s.in_flight for s in self.pool.snapshot() if s.in_flight}
        assert held == {}, f"leases left in flight: {held}"


@pytest.fixture(params=["sync", "async"])
def h(request: pytest.FixtureRequest, store_url: str, namespace: str) -> Iterator[Harness]:
    harness = Harness(request.param, store_url, namespace)
    yield harness
    harness.pool.close()


def fail_first(n: int, status: int = 500, result: str = "ok") -> Callable[[AnyLease], str]:
    """A body that raises a provider error with ``status`` on its first ``n`` calls."""
    calls = [0]

    def body(lease: AnyLease) -> str:
        calls[0] += 1
        if calls[0] <= n:
            raise ProviderError(status)
        return f"{result}:{lease.provider}:{lease.key_id}"

    return body


def always(status: int, errors: list[ProviderError] | None = None) -> Callable[[AnyLease], Any]:
    def body(lease: AnyLease) -> Any:
        error = ProviderError(status)
        if errors is not None:
            errors.append(error)
        raise error

    return body


# --------------------------------------------------------------------------- retries


def test_success_on_the_first_key_returns_the_result(h: Harness) -> None:
    h.add(OPENAI, "a", "b")
    assert h.call(lambda lease: 42, OPENAI) == 42
    assert len(h.seen) == 1
    _, key_id, _ = h.seen[0]
    assert h.stats(OPENAI, key_id).success_count == 1
    h.assert_no_lease_held()


@pytest.mark.parametrize("strategy", ["round_robin", "weighted", "least_busy", "best", "latency"])
def test_a_server_error_moves_to_another_key(h: Harness, strategy: str) -> None:
    h.add(OPENAI, "a", "b", "c")
    result = h.call(fail_first(1, 500), OPENAI, strategy=strategy)
    assert len(h.seen) == 2
    (_, failed, _), (_, served, _) = h.seen
    assert served != failed, f"retried on the key that just failed ({strategy})"
    assert result == f"ok:openai:{served}"
    failed_stats = h.stats(OPENAI, failed)
    assert failed_stats.error_count == 1
    assert failed_stats.errors_by_kind == {"server": 1}
    assert failed_stats.success_count == 0
    served_stats = h.stats(OPENAI, served)
    assert served_stats.success_count == 1
    assert served_stats.error_count == 0
    h.assert_no_lease_held()


def test_the_retry_avoids_the_failed_key_even_when_the_rotation_points_at_it(
    h: Harness,
) -> None:
    """Another worker takes a key while the first attempt runs, so the shared round-robin
    cursor is back on the key that failed: the retry must still take the other one."""
    h.add(OPENAI, "a", "b")
    calls = [0]

    def body(lease: AnyLease) -> str:
        calls[0] += 1
        if calls[0] == 1:
            with h.pool.acquire(OPENAI) as other:  # another worker, same pool
                assert other.key_id != lease.key_id
            raise ProviderError(503)
        return lease.key_id

    served = h.call(body, OPENAI)
    (_, failed, _), (_, again, _) = h.seen
    assert again == served != failed
    assert h.stats(OPENAI, failed).error_count == 1
    h.assert_no_lease_held()


def test_a_single_key_is_retried_when_it_is_the_only_one(h: Harness) -> None:
    h.add(OPENAI, "solo")
    result = h.call(fail_first(1, 500), OPENAI, max_attempts=2)
    assert result == "ok:openai:solo"
    assert [key_id for _, key_id, _ in h.seen] == ["solo", "solo"]
    s = h.stats(OPENAI, "solo")
    assert (s.error_count, s.success_count, s.consecutive_errors) == (1, 1, 0)
    h.assert_no_lease_held()


def test_each_target_gets_max_attempts_tries(h: Harness) -> None:
    h.add(OPENAI, "a", "b", "c", "d")
    with pytest.raises(ProviderError):
        h.call(always(500), OPENAI, max_attempts=3)
    assert len(h.seen) == 3
    assert len({key_id for _, key_id, _ in h.seen}) == 3
    h.assert_no_lease_held()


# --------------------------------------------------------------------------- fallbacks


def test_rate_limits_on_every_primary_key_move_to_the_fallback(h: Harness) -> None:
    h.add(OPENAI, "a", "b")
    h.add(ANTHROPIC, "x")

    def body(lease: AnyLease) -> str:
        if lease.provider == OPENAI:
            raise ProviderError(429)
        return f"served by {lease.provider}/{lease.key_id}"

    assert h.call(body, OPENAI, fallbacks=[ANTHROPIC]) == "served by anthropic/x"
    providers = [p for p, _, _ in h.seen]
    assert providers[-1] == ANTHROPIC
    assert sorted(k for p, k, _ in h.seen if p == OPENAI) == ["a", "b"]
    for key_id in ("a", "b"):
        s = h.stats(OPENAI, key_id)
        assert s.status == "cooling"
        assert s.errors_by_kind == {"rate_limit": 1}
    assert h.stats(ANTHROPIC, "x").success_count == 1
    h.assert_no_lease_held()


def test_a_fallback_pair_passes_its_model(h: Harness) -> None:
    h.add(OPENAI, "a")
    h.add(ANTHROPIC, "x")

    def body(lease: AnyLease) -> str | None:
        if lease.provider == OPENAI:
            raise ProviderError(429)
        return lease.model

    result = h.call(body, OPENAI, model="gpt-4o", fallbacks=[(ANTHROPIC, "claude-x")])
    assert result == "claude-x"
    assert h.seen[0] == (OPENAI, "a", "gpt-4o")
    assert h.seen[-1] == (ANTHROPIC, "x", "claude-x")
    h.assert_no_lease_held()


def test_a_plain_fallback_keeps_the_model(h: Harness) -> None:
    h.add(OPENAI, "a")
    h.add(ANTHROPIC, "x")

    def body(lease: AnyLease) -> str | None:
        if lease.provider == OPENAI:
            raise ProviderError(500)
        return lease.model

    assert h.call(body, OPENAI, model="shared-model", fallbacks=[ANTHROPIC]) == "shared-model"
    assert h.seen[-1] == (ANTHROPIC, "x", "shared-model")


def test_a_cooling_primary_goes_straight_to_the_fallback(h: Harness) -> None:
    h.add(OPENAI, "a")
    h.add(ANTHROPIC, "x")
    h.cool(OPENAI, "a", 30)
    assert h.call(lambda lease: lease.provider, OPENAI, fallbacks=[ANTHROPIC]) == ANTHROPIC
    assert [p for p, _, _ in h.seen] == [ANTHROPIC]


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("status", [400, 404, 422])
def test_a_bad_request_is_raised_at_once(h: Harness, status: int) -> None:
    h.add(OPENAI, "a", "b", "c")
    h.add(ANTHROPIC, "x")
    errors: list[ProviderError] = []
    with pytest.raises(ProviderError) as excinfo:
        h.call(always(status, errors), OPENAI, fallbacks=[ANTHROPIC], max_attempts=3)
    assert len(errors) == 1, "fn was called again after a bad request"
    assert excinfo.value is errors[0]
    (_, key_id, _) = h.seen[0]
    totals = h.totals()
    assert totals[(OPENAI, key_id)] == 1
    assert sum(totals.values()) == 1, f"other keys were tried: {totals}"
    s = h.stats(OPENAI, key_id)
    assert s.errors_by_kind == {"bad_request": 1}
    assert s.status == "active"  # not penalised
    h.assert_no_lease_held()


# --------------------------------------------------------------------------- all spent


def test_provider_errors_everywhere_raise_the_last_provider_error(h: Harness) -> None:
    h.add(OPENAI, "a", "b", "c")
    h.add(ANTHROPIC, "x", "y")
    errors: list[ProviderError] = []
    with pytest.raises(ProviderError) as excinfo:
        h.call(always(500, errors), OPENAI, fallbacks=[ANTHROPIC], max_attempts=2)
    assert len(errors) == 4  # two tries on each target
    assert excinfo.value is errors[-1]
    assert [p for p, _, _ in h.seen] == [OPENAI, OPENAI, ANTHROPIC, ANTHROPIC]
    assert h.seen[0][1] != h.seen[1][1]
    assert h.seen[2][1] != h.seen[3][1]
    h.assert_no_lease_held()


def test_cooling_everywhere_raises_no_key_available_with_the_earliest_retry_after(
    h: Harness,
) -> None:
    h.add(OPENAI, "a")
    h.add(ANTHROPIC, "x")
    h.cool(OPENAI, "a", 5)
    h.cool(ANTHROPIC, "x", 2)
    with pytest.raises(NoKeyAvailable) as excinfo:
        h.call(lambda lease: "never", OPENAI, fallbacks=[ANTHROPIC])
    assert h.seen == []
    retry_after = excinfo.value.retry_after
    assert retry_after is not None
    assert 1.0 < retry_after <= 2.0, retry_after


def test_the_earliest_retry_after_may_come_from_the_primary(h: Harness) -> None:
    h.add(OPENAI, "a")
    h.add(ANTHROPIC, "x")
    h.cool(OPENAI, "a", 2)
    h.cool(ANTHROPIC, "x", 5)
    with pytest.raises(NoKeyAvailable) as excinfo:
        h.call(lambda lease: "never", OPENAI, fallbacks=[ANTHROPIC])
    retry_after = excinfo.value.retry_after
    assert retry_after is not None
    assert 1.0 < retry_after <= 2.0, retry_after


def test_rate_limits_everywhere_give_the_earliest_provider_retry_after(h: Harness) -> None:
    """Every key answers 429 with a Retry-After header: the caller is told to come back
    when the first of them ends (what a Celery task passes to ``self.retry``)."""
    h.add(OPENAI, "a", "b")
    h.add(ANTHROPIC, "x")
    wait_for = {(OPENAI, "a"): "9", (OPENAI, "b"): "7", (ANTHROPIC, "x"): "3"}

    def body(lease: AnyLease) -> Any:
        raise ProviderError(429, {"Retry-After": wait_for[(lease.provider, lease.key_id)]})

    with pytest.raises(NoKeyAvailable) as excinfo:
        h.call(body, OPENAI, fallbacks=[ANTHROPIC])
    assert sorted(h.seen) == [(ANTHROPIC, "x", None), (OPENAI, "a", None), (OPENAI, "b", None)]
    retry_after = excinfo.value.retry_after
    assert retry_after is not None
    assert 2.0 < retry_after <= 3.0, retry_after
    h.assert_no_lease_held()


def test_all_disabled_raises_no_key_available_without_retry_after(h: Harness) -> None:
    h.add(OPENAI, "a")
    h.pool.disable_key(OPENAI, "a")
    with pytest.raises(NoKeyAvailable) as excinfo:
        h.call(lambda lease: "never", OPENAI)
    assert excinfo.value.retry_after is None
    assert h.seen == []


def test_call_with_wait_sleeps_until_a_key_is_back(h: Harness) -> None:
    h.add(OPENAI, "a")
    h.cool(OPENAI, "a", 0.3)
    start = time.monotonic()
    assert h.call(lambda lease: lease.key_id, OPENAI, wait=3) == "a"
    assert time.monotonic() - start >= 0.2


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("max_attempts", [0, -1, True, False])
def test_invalid_max_attempts_is_rejected_before_anything(h: Harness, max_attempts: Any) -> None:
    h.add(OPENAI, "a")
    with pytest.raises(ValueError, match="max_attempts"):
        h.call(lambda lease: "never", OPENAI, max_attempts=max_attempts)
    assert h.seen == []
    assert h.totals() == {(OPENAI, "a"): 0}


@pytest.mark.parametrize("max_attempts", [1.5, "3", None])
def test_max_attempts_of_the_wrong_type_is_rejected(h: Harness, max_attempts: Any) -> None:
    h.add(OPENAI, "a")
    with pytest.raises((ValueError, TypeError)):
        h.call(lambda lease: "never", OPENAI, max_attempts=max_attempts)
    assert h.seen == []
    assert h.totals() == {(OPENAI, "a"): 0}


@pytest.mark.parametrize(
    "fallback",
    [(ANTHROPIC,), (ANTHROPIC, "claude-x", "extra"), (), ("Not A Provider", "m"), (ANTHROPIC, "")],
)
def test_invalid_fallback_is_rejected_before_anything(h: Harness, fallback: Any) -> None:
    h.add(OPENAI, "a")
    h.add(ANTHROPIC, "x")
    with pytest.raises(ValueError):
        h.call(lambda lease: "never", OPENAI, fallbacks=[fallback])
    assert h.seen == []
    assert h.totals() == {(OPENAI, "a"): 0, (ANTHROPIC, "x"): 0}


def test_call_without_provider_or_model_is_rejected(h: Harness) -> None:
    h.add(OPENAI, "a")
    with pytest.raises(ValueError):
        h.call(lambda lease: "never")
    assert h.totals() == {(OPENAI, "a"): 0}


def test_call_by_model_only_uses_the_model_keys(h: Harness) -> None:
    h.add(OPENAI, "a", "b")
    h.add(ANTHROPIC, "x", models=["claude-x"])
    result = h.call(lambda lease: (lease.provider, lease.key_id), model="claude-x")
    assert result == (ANTHROPIC, "x")


# --------------------------------------------------------------------------- interruption


def test_a_cancelled_async_call_gives_the_key_back(store_url: str, namespace: str) -> None:
    """Cancelling a task in the middle of ``fn`` is not the key's fault: the lease is
    released (no error counted, nothing left in flight), like ``async with acquire``."""

    async def main() -> tuple[int, KeyStats]:
        apool = AsyncKeyPool(store_url, namespace=namespace)
        try:
            await apool.add_key(OPENAI, "a", secret_of(OPENAI, "a"))
            started = asyncio.Event()

            async def fn(lease: AsyncLease) -> str:
                started.set()
                await asyncio.sleep(30)
                return "never"

            task = asyncio.create_task(apool.call(fn, OPENAI))
            await started.wait()
            held = (await apool.stats(OPENAI, "a")).in_flight
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return held, await apool.stats(OPENAI, "a")
        finally:
            await apool.close()

    held, after = asyncio.run(main())
    assert held == 1
    assert after.error_count == 0
    assert after.in_flight == 0, "the cancelled call left its lease in flight"


def test_a_keyboard_interrupt_in_a_sync_call_gives_the_key_back(
    store_url: str, namespace: str
) -> None:
    with KeyPool(store_url, namespace=namespace) as pool:
        pool.add_key(OPENAI, "a", secret_of(OPENAI, "a"))

        def fn(lease: Lease) -> str:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            pool.call(fn, OPENAI)
        after = pool.stats(OPENAI, "a")
    assert after.error_count == 0
    assert after.in_flight == 0, "the interrupted call left its lease in flight"


def test_call_takes_a_function_per_provider_and_model(make_pool: Callable[..., KeyPool]) -> None:
    """A fallback to another provider (or model) runs that provider's own function."""
    pool = make_pool()
    pool.add_key("openai", "o1", "sk-call-map-openai-0123456789")
    pool.add_key("anthropic", "a1", "sk-call-map-anthropic-0123456789")
    seen: list[tuple[str, str | None]] = []

    class Overloaded(Exception):
        status_code = 503

    def openai_fn(lease: Any) -> str:
        seen.append((lease.provider, lease.model))
        raise Overloaded("busy")

    def mini_fn(lease: Any) -> str:
        seen.append((lease.provider, lease.model))
        raise Overloaded("busy")

    def anthropic_fn(lease: Any) -> str:
        seen.append((lease.provider, lease.model))
        return "from anthropic"

    result = pool.call(
        {("openai", "gpt-4o"): openai_fn, "gpt-4o-mini": mini_fn, "anthropic": anthropic_fn},
        "openai",
        model="gpt-4o",
        fallbacks=[("openai", "gpt-4o-mini"), ("anthropic", "claude")],
        max_attempts=1,
    )
    assert result == "from anthropic"
    assert seen == [("openai", "gpt-4o"), ("openai", "gpt-4o-mini"), ("anthropic", "claude")]
    with pytest.raises(TypeError):
        pool.call({"openai": "not callable"}, "openai")  # type: ignore[dict-item]
