"""The seed's API (``EnhancedAPIKeyManager``), kept working on top of the shared pool.

Each test runs on the embedded store and on the real Redis. A plain ``KeyPool`` on the same
store and namespace (the ``pool`` fixture) looks at what the manager did.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from keypool import (
    EnhancedAPIKeyManager,
    KeyPool,
    KeyPoolError,
    KeyStats,
    LLMProvider,
    UnknownKey,
)

HF = LLMProvider.HUGGINGFACE
OPENAI = LLMProvider.OPENAI


@pytest.fixture
def km(store_url: str, namespace: str) -> Iterator[EnhancedAPIKeyManager]:
    manager = EnhancedAPIKeyManager(url=store_url, namespace=namespace, load_env=False)
    yield manager
    close = getattr(getattr(manager, "pool", None), "close", None)
    if close is not None:
        close()


def secret_of(key_id: str) -> str:
    return f"hf_secret_value_{key_id}"


def add(km: EnhancedAPIKeyManager, *ids: str, provider: Any = HF) -> None:
    for key_id in ids:
        km.add_key(provider, key_id, secret_of(key_id))


def assert_exact_rotation(seq: list[str | None], keys: list[str]) -> None:
    k = len(keys)
    assert set(seq) <= set(keys), seq
    for start in range(len(seq)):
        counts: Counter[str | None] = Counter()
        for end in range(start, len(seq)):
            counts[seq[end]] += 1
            m = end - start + 1
            lo, hi = m // k, -(-m // k)
            assert all(lo <= counts[key] <= hi for key in keys), (start, end, seq)


def store_snapshot(raw: Any, namespace: str) -> dict[str, bytes]:
    return {name: bytes(raw.dump(name)) for name in raw.scan_iter(match=f"{namespace}:*")}


# --- get_next_key -------------------------------------------------------------------------


def test_add_key_then_get_next_key(km: EnhancedAPIKeyManager) -> None:
    km.add_key(HF, "research", "hf_research_secret")
    got = km.get_next_key(HF)
    assert isinstance(got, tuple) and len(got) == 2
    assert got == ("research", "hf_research_secret")
    assert km.get_next_key("huggingface") == ("research", "hf_research_secret")


def test_get_next_key_rotates_exactly(km: EnhancedAPIKeyManager) -> None:
    add(km, "a", "b", "c")
    picks = [km.get_next_key(HF) for _ in range(11)]
    for key_id, secret in picks:
        assert key_id is not None and secret == secret_of(key_id)
    assert_exact_rotation([key_id for key_id, _ in picks], ["a", "b", "c"])


def test_rotation_is_shared_between_managers(
    km: EnhancedAPIKeyManager, store_url: str, namespace: str
) -> None:
    other = EnhancedAPIKeyManager(url=store_url, namespace=namespace, load_env=False)
    try:
        add(km, "a", "b", "c")
        add(other, "a", "b", "c")
        seq = [(km if i % 2 else other).get_next_key(HF)[0] for i in range(12)]
        assert_exact_rotation(seq, ["a", "b", "c"])
    finally:
        other.pool.close()


def test_get_next_key_none_when_no_keys(km: EnhancedAPIKeyManager) -> None:
    assert km.get_next_key(HF) == (None, None)
    add(km, "a", provider=OPENAI)
    assert km.get_next_key(HF) == (None, None)
    assert km.get_best_key(HF) == (None, None)


def test_get_next_key_none_when_all_disabled(km: EnhancedAPIKeyManager, pool: KeyPool) -> None:
    add(km, "a", "b")
    pool.disable_key(HF, "a")
    pool.disable_key(HF, "b")
    assert km.get_next_key(HF) == (None, None)
    assert km.get_best_key(HF) == (None, None)
    pool.enable_key(HF, "b")
    assert km.get_next_key(HF) == ("b", secret_of("b"))


def test_get_next_key_none_when_all_cooling(km: EnhancedAPIKeyManager) -> None:
    add(km, "a", "b")
    km.mark_key_error(HF, "a", is_rate_limit=True, retry_after=30)
    km.mark_key_error(HF, "b", is_rate_limit=True)  # the default cooldown applies
    assert km.get_next_key(HF) == (None, None)
    assert km.get_best_key(HF) == (None, None)
    stats = km.get_key_usage_stats(HF, "b")
    assert stats["is_rate_limited"] is True
    assert stats["cooldown_until"] is not None and stats["cooldown_until"] > time.time() + 1


def test_get_next_key_counts_one_request_and_holds_no_lease(
    km: EnhancedAPIKeyManager, pool: KeyPool
) -> None:
    km.add_key(HF, "solo", secret_of("solo"), max_concurrency=1)
    for n in range(1, 6):
        assert km.get_next_key(HF) == ("solo", secret_of("solo"))
        s = pool.stats(HF, "solo")
        assert s.total_requests == n
        assert s.in_flight == 0
    assert km.get_best_key(HF)[0] == "solo"
    stats = km.get_key_usage_stats(HF, "solo")
    assert stats["total_requests"] == 6 and stats["in_flight"] == 0
    # and a real lease can still be taken: nothing was left held
    pool.add_key(HF, "solo", secret_of("solo"), max_concurrency=1)  # this process holds it too
    with pool.acquire(HF) as lease:
        assert lease.key_id == "solo"


# --- models -------------------------------------------------------------------------------


def test_get_key_for_model_uses_only_the_model_keys(km: EnhancedAPIKeyManager) -> None:
    add(km, "a", "b", "c", "d")
    km.assign_model_to_key("meta-llama/Llama-3-8B", HF, "b")
    km.assign_model_to_key("meta-llama/Llama-3-8B", HF, "d")
    picks = [km.get_key_for_model("meta-llama/Llama-3-8B") for _ in range(20)]
    for key_id, secret in picks:
        assert key_id in ("b", "d") and secret == secret_of(key_id)
    assert_exact_rotation([key_id for key_id, _ in picks], ["b", "d"])
    stats = km.get_key_usage_stats(HF, "b")
    assert stats["total_requests"] == 10 and stats["in_flight"] == 0
    assert "meta-llama/Llama-3-8B" in stats["models"]


def test_get_key_for_model_none_when_unknown_or_unavailable(km: EnhancedAPIKeyManager) -> None:
    add(km, "a", "b")
    assert km.get_key_for_model("never-assigned") == (None, None)
    km.assign_model_to_key("m1", HF, "a")
    km.mark_key_error(HF, "a", is_rate_limit=True, retry_after=30)
    assert km.get_key_for_model("m1") == (None, None)  # "b" does not serve m1
    assert km.get_next_key(HF) == ("b", secret_of("b"))


def test_assign_model_to_unknown_key(km: EnhancedAPIKeyManager) -> None:
    add(km, "a")
    with pytest.raises(UnknownKey):
        km.assign_model_to_key("m1", HF, "nope")


# --- best, errors, successes --------------------------------------------------------------


def test_get_best_key_prefers_fewer_consecutive_errors(km: EnhancedAPIKeyManager) -> None:
    add(km, "a", "b", "c")
    km.mark_key_error(HF, "a")
    km.mark_key_error(HF, "a")
    km.mark_key_error(HF, "b")
    for _ in range(8):
        assert km.get_best_key(HF) == ("c", secret_of("c"))
    km.mark_key_error(HF, "c")
    km.mark_key_error(HF, "c")
    assert km.get_best_key(HF)[0] == "b"  # 1 consecutive error against 2 and 2


def test_mark_key_error_rate_limit_cools_the_key(km: EnhancedAPIKeyManager) -> None:
    add(km, "a", "b")
    t0 = time.time()
    km.mark_key_error(HF, "a", is_rate_limit=True, retry_after=0.3)
    stats = km.get_key_usage_stats(HF, "a")
    assert stats["is_rate_limited"] is True
    assert stats["status"] == "cooling"
    assert stats["cooldown_until"] is not None
    assert t0 < stats["cooldown_until"] <= t0 + 1.0
    assert stats["error_count"] == 1
    for _ in range(5):
        assert km.get_next_key(HF)[0] == "b"
        assert km.get_best_key(HF)[0] == "b"
    time.sleep(0.4)
    stats = km.get_key_usage_stats(HF, "a")
    assert stats["is_rate_limited"] is False and stats["status"] == "active"
    assert "a" in {km.get_next_key(HF)[0] for _ in range(2)}


def test_mark_key_error_without_rate_limit(km: EnhancedAPIKeyManager) -> None:
    add(km, "a")
    km.mark_key_error(HF, "a")
    stats = km.get_key_usage_stats(HF, "a")
    assert stats["error_count"] == 1 and stats["consecutive_errors"] == 1
    assert stats["is_rate_limited"] is False
    assert km.get_next_key(HF)[0] == "a"  # one error does not take it out


def test_mark_key_success_resets_consecutive_errors(km: EnhancedAPIKeyManager) -> None:
    add(km, "a")
    km.mark_key_error(HF, "a")
    km.mark_key_error(HF, "a")
    assert km.get_key_usage_stats(HF, "a")["consecutive_errors"] == 2
    km.mark_key_success(HF, "a")
    stats = km.get_key_usage_stats(HF, "a")
    assert stats["consecutive_errors"] == 0
    assert stats["success_count"] == 1 and stats["error_count"] == 2


def test_get_key_usage_stats_has_every_field(km: EnhancedAPIKeyManager, pool: KeyPool) -> None:
    km.add_key(HF, "a", secret_of("a"), rpm=60)
    km.get_next_key(HF)
    km.mark_key_success(HF, "a")
    km.get_next_key(HF)
    km.mark_key_error(HF, "a")
    stats = km.get_key_usage_stats(HF, "a")
    assert isinstance(stats, dict)
    names = {f.name for f in dataclasses.fields(KeyStats)}
    assert {"total_requests", "error_count", "is_rate_limited"} <= names
    assert names <= set(stats), names - set(stats)
    assert stats["provider"] == "huggingface" and stats["key_id"] == "a"
    assert stats["total_requests"] == 2
    assert stats["success_count"] == 1 and stats["error_count"] == 1
    assert stats["is_rate_limited"] is False
    assert stats["rpm"] == 60
    assert stats["last_used"] is not None and stats["last_error"] is not None
    same = pool.stats(HF, "a")
    for name in ("total_requests", "error_count", "success_count", "consecutive_errors", "rpm"):
        assert stats[name] == getattr(same, name)


def test_seed_calls_on_unknown_keys(km: EnhancedAPIKeyManager) -> None:
    add(km, "a")
    for call in (
        lambda: km.mark_key_error(HF, "nope"),
        lambda: km.mark_key_success(HF, "nope"),
        lambda: km.get_key_usage_stats(HF, "nope"),
        lambda: km.get_key_usage_stats(OPENAI, "a"),
    ):
        with pytest.raises(UnknownKey):
            call()
    assert issubclass(UnknownKey, KeyPoolError)


def test_add_key_is_an_upsert(km: EnhancedAPIKeyManager) -> None:
    add(km, "a")
    km.get_next_key(HF)
    km.add_key(HF, "a", secret_of("a"))
    assert km.get_key_usage_stats(HF, "a")["total_requests"] == 1


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("add_key provider", lambda km: km.add_key("HuggingFace", "a", "s-1")),
        ("add_key key_id", lambda km: km.add_key(HF, "a b", "s-1")),
        ("add_key secret", lambda km: km.add_key(HF, "new", "")),
        ("add_key secret None", lambda km: km.add_key(HF, "new", None)),
        ("get_next_key provider", lambda km: km.get_next_key("Hugging Face")),
        ("get_best_key provider", lambda km: km.get_best_key("")),
        ("get_key_for_model model", lambda km: km.get_key_for_model("")),
        ("assign model", lambda km: km.assign_model_to_key("x" * 257, HF, "a")),
        ("assign key_id", lambda km: km.assign_model_to_key("m", HF, "a/b")),
        ("mark_key_error key_id", lambda km: km.mark_key_error(HF, "-a")),
        ("mark_key_error retry_after", lambda km: km.mark_key_error(HF, "a", True, -1)),
        ("mark_key_success provider", lambda km: km.mark_key_success("OPENAI", "a")),
        ("get_key_usage_stats key_id", lambda km: km.get_key_usage_stats(HF, "é")),
    ],
)
def test_bad_arguments_raise_and_write_nothing(
    km: EnhancedAPIKeyManager, raw: Any, namespace: str, name: str, call: Any
) -> None:
    add(km, "a", "b")
    km.get_next_key(HF)
    before = store_snapshot(raw, namespace)
    with pytest.raises((ValueError, TypeError)):
        call(km)
    assert store_snapshot(raw, namespace) == before, name


# --- construction -------------------------------------------------------------------------


def test_default_construction_reads_the_environment(
    store_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYPOOL_REDIS_URL", store_url)
    monkeypatch.setenv("KEYPOOL_NAMESPACE", namespace)
    monkeypatch.setenv("HF_RESEARCH_KEY", "hf_from_environment_1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-environment-2")
    km = EnhancedAPIKeyManager()
    try:
        assert km.get_next_key(HF) == ("research", "hf_from_environment_1")
        assert km.get_next_key(OPENAI) == ("default", "sk-from-environment-2")
    finally:
        km.pool.close()


def test_load_env_false_ignores_the_environment(
    store_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-environment-3")
    km = EnhancedAPIKeyManager(url=store_url, namespace=namespace, load_env=False)
    try:
        assert km.get_next_key(OPENAI) == (None, None)
    finally:
        km.pool.close()
