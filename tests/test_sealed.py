"""Sealed mode (``KEYPOOL_SECRET_KEY``): secrets are stored encrypted in Redis, so a key
added by one process is usable by every process that has the sealing key, and by no other.
"""

from __future__ import annotations

import multiprocessing
import queue
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from keypool import (
    ConfigError,
    KeyPool,
    KeyPoolError,
    KeyPoolSettings,
    Provider,
    SecretUnavailable,
)
from keypool.keyspace import ProviderKeys
from tests.test_security import Secret, assert_not_shown, leaks, read_store

OPENAI = Provider.OPENAI
SEALING = "sealing-key-one-" + "0123456789abcdef" * 2
OTHER_SEALING = "sealing-key-two-" + "fedcba9876543210" * 2


def sealed_field(client: Any, namespace: str, key_id: str, provider: str = "openai") -> str:
    value = client.hget(ProviderKeys(namespace, provider).key_hash(key_id), "sealed")
    assert value, f"no sealed secret stored for {key_id}"
    return str(value)


def seal_id(sealed: str) -> str:
    version, kid, payload = sealed.split(":", 2)
    assert version == "v1" and kid and payload
    return kid


def test_a_key_added_by_one_pool_is_usable_by_another(
    make_pool: Callable[..., KeyPool], namespace: str
) -> None:
    adder = make_pool(secret_key=SEALING)
    user = make_pool(secret_key=SEALING)  # never registers anything
    secrets = {"team-a": Secret("sk-proj-MARKER{}"), "team-b": Secret("MARKER-{}")}
    adder.add_key(OPENAI, "team-a", secrets["team-a"], models=["gpt-4o"])
    adder.add_keys([(OPENAI, "team-b", secrets["team-b"])])

    got = {}
    for _ in range(2):
        lease = user.acquire(OPENAI)
        got[lease.key_id] = lease.secret
        assert_not_shown(list(secrets.values()), lease, user)
        lease.success()
    assert got == secrets
    lease = user.acquire(model="gpt-4o")
    assert (lease.key_id, lease.secret) == ("team-a", secrets["team-a"])
    lease.release()
    assert all(s.in_flight == 0 for s in user.snapshot(OPENAI))

    # Redis holds ciphertext only
    _, text, dumped = read_store(adder._client, f"{namespace}:*")
    assert not leaks(text, list(secrets.values())) and not leaks(dumped, list(secrets.values()))
    for key_id, secret in secrets.items():
        sealed = sealed_field(adder._client, namespace, key_id)
        assert sealed.startswith("v1:")
        assert secret.unique not in sealed and secret not in sealed
    # each seal is fresh (random nonce): the two stored values differ in full
    assert sealed_field(adder._client, namespace, "team-a") != sealed_field(
        adder._client, namespace, "team-b"
    )


def _child(url: str, namespace: str, sealing: str, own_secret: str, out: Any) -> None:
    """In a spawned process: use the parent's key (never registered here), add one."""
    try:
        settings = KeyPoolSettings(redis_url=url, namespace=namespace, secret_key=sealing)
        with KeyPool(settings=settings) as pool:
            lease = pool.acquire("openai", model="parent-model")
            seen = (lease.key_id, lease.secret)
            lease.success()
            pool.add_key("anthropic", "from-child", own_secret)
        out.put(("ok", seen))
    except BaseException:
        out.put(("error", traceback.format_exc()))


def test_keys_cross_process_boundaries(redis_url: str, namespace: str) -> None:
    """A spawned process (nothing inherited) uses the parent's key, and the parent uses the
    key the child added, through Redis alone."""
    settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, secret_key=SEALING)
    parent_secret, child_secret = Secret("sk-proj-MARKER{}"), Secret("sk-ant-api03-MARKER{}")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with KeyPool(settings=settings) as pool:
        pool.add_key(OPENAI, "from-parent", parent_secret, models=["parent-model"])
        proc = ctx.Process(
            target=_child,
            args=(redis_url, namespace, SEALING, str(child_secret), out),
            daemon=True,
        )
        proc.start()
        try:
            status, result = out.get(timeout=25)
        except queue.Empty:
            pytest.fail("the spawned process did not answer within 25 s")
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        assert status == "ok", result
        assert tuple(result) == ("from-parent", parent_secret)
        assert pool.stats(OPENAI, "from-parent").success_count == 1
        lease = pool.acquire(Provider.ANTHROPIC)
        assert (lease.key_id, lease.secret) == ("from-child", child_secret)
        lease.release()
        _, text, dumped = read_store(pool._client, f"{namespace}:*")
    assert not leaks(text, [parent_secret, child_secret])
    assert not leaks(dumped, [parent_secret, child_secret])


def test_a_wrong_sealing_key_gives_secret_unavailable_and_gives_the_lease_back(
    make_pool: Callable[..., KeyPool],
) -> None:
    adder = make_pool(secret_key=SEALING)
    secret = Secret("sk-proj-MARKER{}")
    adder.add_key(OPENAI, "team-a", secret, max_concurrency=1)

    wrong = make_pool(secret_key=OTHER_SEALING)
    with pytest.raises(SecretUnavailable) as unavailable:
        wrong.acquire(OPENAI)
    message = str(unavailable.value)
    assert "team-a" in message and "sealing key" in message
    assert "KEYPOOL_SECRET_KEY" in message
    assert_not_shown([secret], unavailable.value)
    assert OTHER_SEALING not in message and SEALING not in message
    assert isinstance(unavailable.value, KeyPoolError)
    stats = adder.stats(OPENAI, "team-a")
    assert stats.in_flight == 0 and stats.status == "active"
    # the lease really is free: the key (max_concurrency=1) serves the next caller
    lease = make_pool(secret_key=SEALING).acquire(OPENAI)
    assert lease.secret == secret
    lease.release()

    # a pool without any sealing key says how to fix it
    unsealed = make_pool()
    with pytest.raises(SecretUnavailable) as unavailable:
        unsealed.acquire(OPENAI)
    assert "KEYPOOL_SECRET_KEY" in str(unavailable.value)
    assert adder.stats(OPENAI, "team-a").in_flight == 0


def test_rotation_reads_old_seals_and_re_adding_reseals(
    make_pool: Callable[..., KeyPool], namespace: str
) -> None:
    old, new = SEALING, OTHER_SEALING
    old_pool = make_pool(secret_key=old)
    secret = Secret("hf_MARKER{}")
    old_pool.add_key(Provider.HUGGINGFACE, "research", secret)
    client = old_pool._client
    old_id = seal_id(sealed_field(client, namespace, "research", "huggingface"))

    # the new key alone cannot read it; new + old can (several old keys, comma-separated)
    with pytest.raises(SecretUnavailable):
        make_pool(secret_key=new).acquire(Provider.HUGGINGFACE)
    rotating = make_pool(secret_key=new, old_secret_keys=f"retired-key-{'x' * 20}, {old}")
    lease = rotating.acquire(Provider.HUGGINGFACE)
    assert lease.secret == secret
    lease.release()

    # re-adding the key seals it with the new key
    rotating.add_key(Provider.HUGGINGFACE, "research", secret)
    new_id = seal_id(sealed_field(client, namespace, "research", "huggingface"))
    assert new_id != old_id
    lease = make_pool(secret_key=new).acquire(Provider.HUGGINGFACE)
    assert lease.secret == secret
    lease.release()
    with pytest.raises(SecretUnavailable):
        make_pool(secret_key=old).acquire(Provider.HUGGINGFACE)


def test_rotation_through_the_environment(
    store_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = Secret("sk-MARKER{}")
    monkeypatch.setenv("KEYPOOL_SECRET_KEY", SEALING)
    with KeyPool(store_url, namespace=namespace) as adder:
        adder.add_key(OPENAI, "a", secret)
    monkeypatch.setenv("KEYPOOL_SECRET_KEY", OTHER_SEALING)
    monkeypatch.setenv("KEYPOOL_OLD_SECRET_KEYS", SEALING)
    with KeyPool(store_url, namespace=namespace) as reader:
        lease = reader.acquire(OPENAI)
        assert lease.secret == secret
        lease.release()


@pytest.mark.parametrize("short", ["x", "fifteen-chars!!"])
def test_a_too_short_sealing_key_is_a_config_error(
    make_pool: Callable[..., KeyPool], short: str
) -> None:
    with pytest.raises(ConfigError) as bad:
        make_pool(secret_key=short)
    assert "KEYPOOL_SECRET_KEY" in str(bad.value)
    assert short not in str(bad.value)


def test_a_too_short_sealing_key_in_the_environment_is_a_config_error(
    store_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYPOOL_SECRET_KEY", "tiny-key")
    with pytest.raises(ConfigError) as bad:
        KeyPool(store_url, namespace=namespace)
    assert "KEYPOOL_SECRET_KEY" in str(bad.value) and "tiny-key" not in str(bad.value)


def _flip(payload: str, index: int) -> str:
    ch = payload[index]
    return payload[:index] + ("A" if ch != "A" else "B") + payload[index + 1 :]


@pytest.mark.parametrize(
    "tamper",
    [
        "flip-ciphertext",
        "flip-nonce",
        "truncate",
        "not-base64",
        "no-version",
        "other-key-id",
        "swap-with-other-key",
    ],
)
def test_tampered_ciphertext_gives_secret_unavailable(
    make_pool: Callable[..., KeyPool], namespace: str, tamper: str
) -> None:
    adder = make_pool(secret_key=SEALING)
    secrets = [Secret("sk-proj-MARKER{}"), Secret("MARKER-{}")]
    adder.add_key(OPENAI, "victim", secrets[0])
    adder.add_key(OPENAI, "other", secrets[1])
    adder.disable_key(OPENAI, "other")
    client = adder._client
    h = ProviderKeys(namespace, "openai").key_hash("victim")
    sealed = sealed_field(client, namespace, "victim")
    version, kid, payload = sealed.split(":", 2)
    changed = {
        "flip-ciphertext": f"{version}:{kid}:{_flip(payload, len(payload) // 2)}",
        "flip-nonce": f"{version}:{kid}:{_flip(payload, 2)}",
        "truncate": f"{version}:{kid}:{payload[:24]}",
        "not-base64": f"{version}:{kid}:{payload[:-4]}!!!!",
        "no-version": payload,
        "other-key-id": f"{version}:00000000:{payload}",
        # a valid seal, but of another key: bound to its own key id, it must not open here
        "swap-with-other-key": sealed_field(client, namespace, "other"),
    }[tamper]
    client.hset(h, "sealed", changed)

    user = make_pool(secret_key=SEALING)
    with pytest.raises(SecretUnavailable) as unavailable:
        user.acquire(OPENAI)
    assert "victim" in str(unavailable.value)
    assert_not_shown(secrets, unavailable.value)
    assert adder.stats(OPENAI, "victim").in_flight == 0
    # re-adding the key repairs it
    adder.add_key(OPENAI, "victim", secrets[0])
    lease = user.acquire(OPENAI)
    assert lease.secret == secrets[0]
    lease.release()
