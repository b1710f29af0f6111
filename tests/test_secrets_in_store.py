"""Secrets never reach Redis in plaintext, nor any repr, str, exception or log line.

Every secret carries a unique marker; after registering keys every documented way and using
them, every key of the store is read in full (and DUMPed) and searched for the marker, in
plain, reversed, hex and base64 forms.
"""

from __future__ import annotations

import base64
import logging
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from keypool import (
    EnhancedAPIKeyManager,
    ErrorKind,
    KeyPool,
    NoKeyAvailable,
    Provider,
    UnknownKey,
)
from tests.test_security import read_store

OPENAI = Provider.OPENAI


def make_marker() -> str:
    return f"sk-MARKER-{uuid.uuid4().hex}"


def forbidden_forms(secret: str) -> set[str]:
    """The secret and the unique part of it, plain, reversed, hex and base64 at each byte
    alignment (so an encoded secret is found inside a longer encoded value too)."""
    forms: set[str] = set()
    unique = secret.rsplit("-", 1)[-1]
    for text in (secret, unique):
        data = text.encode()
        forms |= {text, text[::-1], data.hex(), data.hex().upper()}
        for shift in range(3):
            chunk = data[shift:]
            chunk = chunk[: len(chunk) // 3 * 3]
            for encode in (base64.b64encode, base64.urlsafe_b64encode):
                forms.add(encode(chunk).decode())
    return forms


def assert_not_in_store(raw: Any, namespace: str, secrets: list[str]) -> None:
    names, text, dumped = read_store(raw, f"{namespace}:*")
    assert names, "the pool wrote nothing?"
    for secret in secrets:
        for form in forbidden_forms(secret):
            assert form not in text, f"a form of a secret is stored in Redis: {form!r}"
            assert form.encode() not in dumped, f"a form of a secret is in a DUMP: {form!r}"
    # nothing outside the namespace either (the embedded store holds only this test's data)
    _, everything, all_dumped = read_store(raw, "*")
    for secret in secrets:
        unique = secret.rsplit("-", 1)[-1]
        assert unique not in everything and unique.encode() not in all_dumped


def assert_not_shown(secrets: list[str], *objects: object) -> None:
    for obj in objects:
        shown = [repr(obj), str(obj)]
        if isinstance(obj, BaseException):
            shown += [repr(a) for a in obj.args]
        for text in shown:
            for secret in secrets:
                unique = secret.rsplit("-", 1)[-1]
                assert secret not in text and unique not in text, (
                    f"secret shown by {type(obj).__name__}: {text}"
                )


class LeakyError(Exception):
    """An SDK error whose message (like many real ones) repeats the request's key."""

    def __init__(self, secret: str, status: int, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"Error code: {status} - invalid request with api_key={secret}")
        self.status_code = status
        self.response = type("Response", (), {"status_code": status, "headers": headers or {}})()


def use_every_way(pool: KeyPool, provider: object) -> None:
    """Acquire and report in every way there is, on every key of ``provider``."""
    n = len(pool.snapshot(provider))
    for _ in range(n):
        lease = pool.acquire(provider, model="gpt-4o", tokens=10)
        lease.success(tokens=12, latency=0.05)
    for status in (500, 400, 429):
        lease = pool.acquire(provider, tokens=5, wait=1.0)
        headers = {"x-api-key": lease.secret, "retry-after-ms": "50"}
        with pytest.raises(LeakyError), lease:
            raise LeakyError(lease.secret, status, headers)
    lease = pool.acquire(provider, wait=1.0)
    lease.fail(LeakyError(lease.secret, 401))
    for stats in pool.snapshot(provider):
        if stats.status == "disabled":
            pool.enable_key(provider, stats.key_id)
        pool.reset_key(provider, stats.key_id)
    lease = pool.acquire(provider, wait=1.0)
    assert lease.renew(5.0)
    lease.release()


# --- the store ----------------------------------------------------------------------------


def test_secrets_are_never_written_to_the_store(
    pool: KeyPool,
    raw: Any,
    namespace: str,
    store_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    markers = [make_marker() for _ in range(9)]
    # add_key, add_key with every option, and a re-key of the same id
    pool.add_key(OPENAI, "direct", markers[0])
    pool.add_key(OPENAI, "limited", markers[1], rpm=100, tpm=10_000, models=["gpt-4o"])
    pool.add_key(OPENAI, "direct", markers[2])
    # the environment, through from_env with an explicit mapping
    environ = {
        "OPENROUTER_API_KEYS": f"{markers[3]},\n{markers[4]}",
        "HF_RESEARCH_KEY": markers[5],
        "ANTHROPIC_API_KEY": markers[6],
    }
    env_pool = KeyPool.from_env(store_url, namespace=namespace, environ=environ)
    # the seed's manager, by add_key and by its own environment loading
    monkeypatch.setenv("KEYPOOL_REDIS_URL", store_url)
    monkeypatch.setenv("KEYPOOL_NAMESPACE", namespace)
    monkeypatch.setenv("COHERE_API_KEY", markers[7])
    km = EnhancedAPIKeyManager()
    try:
        km.add_key(Provider.GEMINI, "seed", markers[8])
        km.assign_model_to_key("gemini-pro", Provider.GEMINI, "seed")
        assert km.get_next_key(Provider.GEMINI) == ("seed", markers[8])
        assert km.get_key_for_model("gemini-pro") == ("seed", markers[8])
        assert km.get_best_key(Provider.COHERE) == ("default", markers[7])
        km.mark_key_error(Provider.GEMINI, "seed", is_rate_limit=True, retry_after=1)
        km.mark_key_success(Provider.COHERE, "default")
        km.get_key_usage_stats(Provider.GEMINI, "seed")

        use_every_way(pool, OPENAI)
        use_every_way(env_pool, Provider.OPENROUTER)
        use_every_way(env_pool, Provider.HUGGINGFACE)
        use_every_way(env_pool, Provider.ANTHROPIC)
        pool.disable_key(OPENAI, "limited", reason="rotating")
        pool.snapshot()
        env_pool.snapshot()

        assert_not_in_store(raw, namespace, markers)
    finally:
        env_pool.close()
        km.pool.close()


def test_sealed_mode_stores_only_ciphertext(
    make_pool: Callable[..., KeyPool], raw: Any, namespace: str
) -> None:
    pytest.importorskip("cryptography")
    sealing_key = "sealing-key-" + uuid.uuid4().hex
    marker = make_marker()
    adder = make_pool(secret_key=sealing_key)
    adder.add_key(OPENAI, "sealed", marker)
    use_every_way(adder, OPENAI)
    assert_not_in_store(raw, namespace, [marker, sealing_key])
    # a process that never registered the key can use it with the sealing key
    other = make_pool(secret_key=sealing_key)
    with other.acquire(OPENAI) as lease:
        assert lease.secret == marker
    assert_not_shown([marker, sealing_key], other, lease, other.settings, adder.settings)
    assert_not_in_store(raw, namespace, [marker, sealing_key])


# --- repr, str, exceptions ----------------------------------------------------------------


def test_repr_and_str_never_show_a_secret(pool: KeyPool, store_url: str, namespace: str) -> None:
    marker = make_marker()
    env_marker = make_marker()
    pool.add_key(OPENAI, "k1", marker)
    open_lease = pool.acquire(OPENAI)
    assert open_lease.secret == marker
    assert_not_shown([marker], pool, open_lease)
    failure = open_lease.fail(LeakyError(marker, 500))
    assert_not_shown([marker], open_lease, failure)
    stats = pool.stats(OPENAI, "k1")
    assert_not_shown([marker], stats, stats.as_dict(), *pool.snapshot(), pool.snapshot())

    km = EnhancedAPIKeyManager(url=store_url, namespace=namespace, load_env=False)
    env_pool = KeyPool.from_env(
        store_url, namespace=namespace, environ={"OPENAI_API_KEYS": env_marker}
    )
    try:
        km.add_key(OPENAI, "k2", marker + "-2")
        assert_not_shown([marker, env_marker], km, env_pool, km.get_key_usage_stats(OPENAI, "k2"))

        errors: list[BaseException] = []
        for key_id in ("k1", "k2"):
            pool.disable_key(OPENAI, key_id)
        for stats in env_pool.snapshot(OPENAI):
            env_pool.disable_key(OPENAI, stats.key_id)
        with pytest.raises(NoKeyAvailable) as no_key:
            pool.acquire(OPENAI)
        errors.append(no_key.value)
        with pytest.raises(UnknownKey) as unknown:
            pool.stats(OPENAI, "missing")
        errors.append(unknown.value)
        bad_calls: list[Callable[[], object]] = [
            lambda: pool.add_key("OpenAI", "k3", marker),
            lambda: pool.add_key(OPENAI, "bad id", marker),
            lambda: pool.add_key(OPENAI, "k3", f" {marker} "),
            lambda: pool.add_key(OPENAI, "k3", f"{marker}\n"),
            lambda: pool.add_key(OPENAI, "k3", marker, weight=0),
            lambda: pool.add_key(OPENAI, "k3", marker, rpm=-1),
            lambda: pool.add_key(OPENAI, "k3", marker, models=[""]),
            lambda: pool.add_key(3, "k3", marker),
            lambda: km.add_key("OpenAI", "k3", marker),
        ]
        for call in bad_calls:
            with pytest.raises((ValueError, TypeError)) as info:
                call()
            errors.append(info.value)
        assert_not_shown([marker, env_marker], *errors)
    finally:
        env_pool.close()
        km.pool.close()


# --- logs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_logs_never_show_a_secret(
    make_pool: Callable[..., KeyPool], caplog: pytest.LogCaptureFixture, log_format: str
) -> None:
    marker = make_marker()
    caplog.set_level(logging.DEBUG)
    pool = make_pool(log_level="debug", log_format=log_format)
    pool.add_key(OPENAI, "k1", marker, models=["gpt-4o"])
    pool.add_key(OPENAI, "k2", make_marker())
    use_every_way(pool, OPENAI)
    pool.acquire(OPENAI).fail(ErrorKind.AUTH)
    pool.disable_key(OPENAI, "k1", reason="manual")
    pool.disable_key(OPENAI, "k2", reason="manual")
    with pytest.raises(NoKeyAvailable):
        pool.acquire(OPENAI)
    pool.remove_key(OPENAI, "k2")
    assert caplog.records, "nothing was logged at debug level"
    unique = marker.rsplit("-", 1)[-1]
    for record in caplog.records:
        text = record.getMessage()
        assert marker not in text and unique not in text, text
    assert unique not in caplog.text
