"""Routing by model: a model's keys rotate exactly among themselves, keys held back for the
model come back when their limit frees, and a rotation missing from the store is rebuilt."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from keypool import KeyPool, NoKeyAvailable
from keypool.keyspace import ProviderKeys

P = "openai"


def secret(key_id: str) -> str:
    return f"sk-routing-{key_id}-0123456789abcdef"


def test_a_models_keys_rotate_exactly_and_others_are_never_used(
    make_pool: Callable[..., KeyPool],
) -> None:
    pool = make_pool()
    for i in range(6):
        pool.add_key(P, f"k{i}", secret(f"k{i}"), models=["m"] if i < 3 else ["other"])
    picks = Counter()
    for _ in range(30):
        with pool.acquire(model="m") as lease:
            picks[lease.key_id] += 1
    assert picks == {"k0": 10, "k1": 10, "k2": 10}


def test_a_key_held_back_for_a_model_comes_back_when_its_cooldown_ends(
    make_pool: Callable[..., KeyPool],
) -> None:
    pool = make_pool()
    pool.add_key(P, "a", secret("a"), models=["m"])
    pool.add_key(P, "b", secret("b"), models=["m"])
    lease = pool.acquire(model="m")
    cooled = lease.key_id
    lease.fail(429, retry_after=1)
    for _ in range(4):
        with pool.acquire(model="m") as other:
            assert other.key_id != cooled
    time.sleep(1.1)
    seen = set()
    for _ in range(4):
        with pool.acquire(model="m") as again:
            seen.add(again.key_id)
    assert seen == {"a", "b"}


def test_no_key_for_a_model_says_when_one_frees(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool()
    pool.add_key(P, "a", secret("a"), models=["m"])
    pool.acquire(model="m").fail(429, retry_after=20)
    with pytest.raises(NoKeyAvailable) as none:
        pool.acquire(model="m")
    assert none.value.retry_after is not None and 15 < none.value.retry_after <= 20.01


def test_a_missing_model_rotation_is_rebuilt(
    make_pool: Callable[..., KeyPool], raw: Any, namespace: str
) -> None:
    pool = make_pool()
    pool.add_key(P, "a", secret("a"), models=["m"])
    pool.add_key(P, "b", secret("b"), models=["m"])
    keys = ProviderKeys(namespace, P)
    raw.delete(keys.prefix + "mr:m")  # as a store written before model rotations existed
    raw.srem(keys.prefix + "mrs", "m")
    picks = Counter(pool.acquire(model="m").key_id for _ in range(4))
    assert picks == {"a": 2, "b": 2}
    assert set(raw.zrange(keys.prefix + "mr:m", 0, -1)) == {"a", "b"}


def test_unassigning_the_last_key_drops_the_models_rotation(
    make_pool: Callable[..., KeyPool], raw: Any, namespace: str
) -> None:
    pool = make_pool()
    pool.add_key(P, "a", secret("a"), models=["m"])
    pool.acquire(model="m").success()
    pool.unassign_model("m", P, "a")
    keys = ProviderKeys(namespace, P)
    assert not raw.exists(keys.prefix + "mr:m")
    assert not raw.sismember(keys.prefix + "mrs", "m")


def test_a_cooldown_for_a_model_leaves_nothing_behind_when_it_ends(
    make_pool: Callable[..., KeyPool], raw: Any, namespace: str
) -> None:
    pool = make_pool()
    pool.add_key(P, "a", secret("a"), models=["m"])
    pool.acquire(model="m").fail(429, retry_after=1)
    assert [s.scope for s in pool.scopes(P)] == ["key_model"]
    time.sleep(1.1)
    pool.acquire(model="m").success()  # housekeeping forgets the ended cooldown
    assert pool.scopes(P) == []
    assert not list(raw.scan_iter(match=f"{namespace}:*s:km:*"))
