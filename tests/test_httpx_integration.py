"""``keypool.integrations.httpx`` against a local stub of the provider APIs, on every store.

The stub (``tests/stub_llm_server.py``) answers like Ollama, Gemini, OpenAI and Anthropic on
127.0.0.1 and records which key each request carried, so rotation, cooldowns and disabled
keys are checked from what a provider would see, and the pool's stats from what
``keypool status`` would show.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

httpx = pytest.importorskip("httpx")

from keypool import (  # noqa: E402
    AsyncKeyPool,
    KeyPool,
    KeyPoolSettings,
    KeyStats,
    NoKeyAvailable,
    Provider,
)
from keypool.integrations.httpx import (  # noqa: E402
    AsyncKeyPoolAuth,
    KeyPoolAuth,
    auth_header_for,
    usage_tokens,
)
from tests.stub_llm_server import (  # noqa: E402
    Reply,
    StubLLMServer,
    drop_connection,
    gemini_429,
    gemini_daily_quota,
    gemini_invalid_key,
    gemini_rate_limit_retry_info,
    openai_429,
    openai_insufficient_quota,
    server_error,
    slow,
)

ROOT = Path(__file__).resolve().parent.parent
GEMINI_PATH = "/v1beta/models/gemini-2.0-flash:generateContent"
ROUTES: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    # provider -> (path, body for a prompt)
    "gemini": (GEMINI_PATH, lambda p: {"contents": [{"role": "user", "parts": [{"text": p}]}]}),
    "ollama": (
        "/api/chat",
        lambda p: {
            "model": "llama3.2",
            "messages": [{"role": "user", "content": p}],
            "stream": False,
        },
    ),
    "openai": (
        "/v1/chat/completions",
        lambda p: {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": p}]},
    ),
    "anthropic": (
        "/v1/messages",
        lambda p: {
            "model": "claude-3-5-haiku-latest",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": p}],
        },
    ),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    with StubLLMServer() as server:
        yield server


def fake_secret(provider: str, key_id: str) -> str:
    return f"fake-{provider}-{key_id}-{uuid.uuid4().hex[:16]}"


def register(
    pool: KeyPool, stub: StubLLMServer | None, provider: str, *key_ids: str
) -> dict[str, str]:
    """Add keys to the pool (and to the stub, so it accepts them); key id -> secret."""
    secrets = {key_id: fake_secret(provider, key_id) for key_id in key_ids}
    for key_id, secret in secrets.items():
        pool.add_key(provider, key_id, secret)
        if stub is not None:
            stub.add_key(secret, key_id)
    return secrets


def post(client: Any, provider: str, prompt: str = "hello there") -> Any:
    path, body = ROUTES[provider]
    return client.post(path, json=body(prompt))


def cooldown_left(stats: KeyStats) -> float:
    assert stats.cooldown_until is not None, stats
    return stats.cooldown_until - time.time()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def make_apool(store_url: str, namespace: str) -> Callable[..., AsyncKeyPool]:
    """An AsyncKeyPool on the store and namespace under test (close it in the test's loop)."""

    def make(**overrides: Any) -> AsyncKeyPool:
        return AsyncKeyPool(
            settings=KeyPoolSettings(redis_url=store_url, namespace=namespace, **overrides)
        )

    return make


# --------------------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("provider", "header", "scheme"),
    [
        (Provider.OPENAI, "authorization", "Bearer "),
        (Provider.HUGGINGFACE, "authorization", "Bearer "),
        (Provider.OPENROUTER, "authorization", "Bearer "),
        (Provider.OLLAMA, "authorization", "Bearer "),
        (Provider.COHERE, "authorization", "Bearer "),
        (Provider.CUSTOM, "authorization", "Bearer "),
        ("mistral", "authorization", "Bearer "),
        (Provider.ANTHROPIC, "x-api-key", ""),
        (Provider.GEMINI, "x-goog-api-key", ""),
        (Provider.AZURE_OPENAI, "api-key", ""),
    ],
)
def test_each_provider_gets_its_auth_header(
    pool: KeyPool, stub: StubLLMServer, provider: str, header: str, scheme: str
) -> None:
    secret = register(pool, stub, str(provider), "only")["only"]
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, provider)) as client:
        response = client.post("/echo", json={"ping": 1})
    assert response.status_code == 200
    (call,) = stub.calls
    assert call.auth_headers == (header,)  # the key is in that header and no other
    assert call.headers[header] == scheme + secret
    if provider == Provider.ANTHROPIC:
        assert call.headers["anthropic-version"] == "2023-06-01"
    else:
        assert "anthropic-version" not in call.headers
    assert response.extensions["keypool_key_id"] == "only"
    assert response.extensions["keypool_provider"] == str(provider)
    assert pool.stats(provider, "only").success_count == 1


def test_anthropic_version_set_by_the_caller_is_kept(pool: KeyPool, stub: StubLLMServer) -> None:
    register(pool, stub, "anthropic", "a1")
    auth = KeyPoolAuth(pool, "anthropic")
    with httpx.Client(base_url=stub.base_url, auth=auth) as client:
        path, body = ROUTES["anthropic"]
        kept = client.post(path, json=body("hi"), headers={"anthropic-version": "2024-10-22"})
        default = client.post(path, json=body("hi"))
    assert kept.status_code == default.status_code == 200
    assert [c.headers["anthropic-version"] for c in stub.calls] == ["2024-10-22", "2023-06-01"]


def test_header_and_scheme_can_be_overridden(pool: KeyPool, stub: StubLLMServer) -> None:
    secret = register(pool, stub, "custom", "c1")["c1"]
    with httpx.Client(
        base_url=stub.base_url, auth=KeyPoolAuth(pool, "custom", header="X-Api-Key")
    ) as client:
        assert client.post("/echo", json={}).status_code == 200
    with httpx.Client(
        base_url=stub.base_url, auth=KeyPoolAuth(pool, "custom", scheme="Token")
    ) as client:
        assert client.post("/echo", json={}).status_code == 200
    first, second = stub.calls
    assert first.headers["x-api-key"] == secret and first.auth_headers == ("x-api-key",)
    assert second.headers["authorization"] == f"Token {secret}"
    assert auth_header_for("gemini") == ("x-goog-api-key", "")
    assert auth_header_for(Provider.OPENAI) == ("Authorization", "Bearer")


# --------------------------------------------------------------------------- rotation


@pytest.mark.parametrize("provider", ["gemini", "ollama", "openai"])
def test_requests_rotate_over_the_keys(pool: KeyPool, stub: StubLLMServer, provider: str) -> None:
    ids = ("k1", "k2", "k3")
    register(pool, stub, provider, *ids)
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, provider)) as client:
        statuses = [post(client, provider).status_code for _ in range(10)]
    assert statuses == [200] * 10
    seen = Counter(stub.key_ids())
    assert sorted(seen.values()) == [3, 3, 4]  # floor(10/3) or ceil(10/3) each
    assert set(seen) == set(ids)
    for key_id in ids:
        stats = pool.stats(provider, key_id)
        assert stats.total_requests == stats.success_count == seen[key_id]
        assert stats.in_flight == 0
        assert stats.latency_ms is not None


# --------------------------------------------------------------------------- failures


def test_gemini_429_with_retry_after_cools_that_key(pool: KeyPool, stub: StubLLMServer) -> None:
    secrets = register(pool, stub, "gemini", "g1", "g2")
    stub.plan(secrets["g1"], gemini_429(retry_after=20))
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "gemini")) as client:
        responses = [post(client, "gemini") for _ in range(5)]
    used = stub.key_ids()
    first_g1 = used.index("g1")  # round-robin reaches g1 on the first or second request
    assert first_g1 <= 1
    assert responses[first_g1].status_code == 429  # the caller sees the provider's answer
    assert responses[first_g1].json()["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert used[first_g1 + 1 :] == ["g2"] * (4 - first_g1)  # g1 rests, g2 serves
    cooled = pool.stats("gemini", "g1")
    assert cooled.status == "cooling" and cooled.is_rate_limited
    assert 15 < cooldown_left(cooled) <= 20.5  # Retry-After: 20
    assert cooled.errors_by_kind == {"rate_limit": 1}
    assert cooled.in_flight == 0
    assert pool.stats("gemini", "g2").status == "active"


@pytest.mark.parametrize(
    ("reset", "retry_after", "expected"),
    [
        ("1m30s", None, 90.0),  # only x-ratelimit-reset-requests: its duration
        ("2s", 2, 2.0),  # what OpenAI sends: reset-requests 2s and retry-after 2
    ],
)
def test_openai_429_rate_limit_headers_set_the_cooldown(
    pool: KeyPool, stub: StubLLMServer, reset: str, retry_after: float | None, expected: float
) -> None:
    secret = register(pool, stub, "openai", "o1")["o1"]
    stub.plan(secret, openai_429(reset_requests=reset, retry_after=retry_after))
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "openai")) as client:
        assert post(client, "openai").status_code == 429
        with pytest.raises(NoKeyAvailable) as caught:
            post(client, "openai")  # the only key is cooling: nothing is sent
    assert len(stub.calls) == 1
    stats = pool.stats("openai", "o1")
    assert stats.status == "cooling"
    assert expected - 3 < cooldown_left(stats) <= expected + 0.5
    assert caught.value.retry_after is not None
    assert caught.value.retry_after <= expected + 0.5


def test_401_disables_the_key_and_the_others_serve(pool: KeyPool, stub: StubLLMServer) -> None:
    register(pool, stub, "openai", "good")
    register(pool, None, "openai", "revoked")  # the provider does not know this one
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "openai")) as client:
        statuses = [post(client, "openai").status_code for _ in range(4)]
    used = stub.key_ids()
    assert used.count(None) == 1  # the revoked key was tried once, then never again
    assert statuses.count(401) == 1 and statuses.count(200) == 3
    assert used[used.index(None) + 1 :] == ["good"] * (3 - used.index(None))
    revoked = pool.stats("openai", "revoked")
    assert revoked.status == "disabled"
    assert revoked.errors_by_kind == {"auth": 1}
    assert revoked.disabled_reason


def test_all_keys_disabled_raises_no_key_available_without_sending(
    pool: KeyPool, stub: StubLLMServer
) -> None:
    register(pool, None, "gemini", "bad1", "bad2")
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "gemini")) as client:
        assert [post(client, "gemini").status_code for _ in range(2)] == [401, 401]
        with pytest.raises(NoKeyAvailable) as caught:
            post(client, "gemini")
    assert caught.value.retry_after is None  # disabled keys never come back by themselves
    assert len(stub.calls) == 2
    assert {s.status for s in pool.snapshot("gemini")} == {"disabled"}


@pytest.mark.parametrize(
    ("provider", "reply", "status", "kind"),
    [
        ("openai", openai_insufficient_quota(), "exhausted", "quota"),
        ("gemini", gemini_daily_quota(), "exhausted", "quota"),
        ("gemini", gemini_invalid_key(), "disabled", "auth"),
        ("openai", server_error(500), "active", "server"),
        ("openai", Reply(404), "active", "bad_request"),
    ],
    ids=["openai-insufficient-quota", "gemini-daily-quota", "gemini-invalid-key", "500", "404"],
)
def test_error_bodies_are_classified(
    pool: KeyPool, stub: StubLLMServer, provider: str, reply: Reply, status: str, kind: str
) -> None:
    secret = register(pool, stub, provider, "k1")["k1"]
    stub.plan(secret, reply)
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, provider)) as client:
        response = post(client, provider)
    assert response.status_code == reply.status
    assert response.json() == reply.body or reply.body is None  # body still readable
    stats = pool.stats(provider, "k1")
    assert stats.status == status
    assert stats.errors_by_kind == {kind: 1}
    assert stats.in_flight == 0


def test_gemini_retry_info_delay_is_used_without_a_header(
    pool: KeyPool, stub: StubLLMServer
) -> None:
    secret = register(pool, stub, "gemini", "g1")["g1"]
    stub.plan(secret, gemini_rate_limit_retry_info("40s"))
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "gemini")) as client:
        assert post(client, "gemini").status_code == 429
    stats = pool.stats("gemini", "g1")
    assert stats.status == "cooling"
    assert 35 < cooldown_left(stats) <= 40.5


def test_connection_dropped_fails_the_lease_and_raises(pool: KeyPool, stub: StubLLMServer) -> None:
    secret = register(pool, stub, "openai", "o1")["o1"]
    stub.plan(secret, drop_connection())
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "openai")) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            post(client, "openai")
        assert post(client, "openai").status_code == 200
    stats = pool.stats("openai", "o1")
    assert stats.errors_by_kind == {"connection": 1}
    assert stats.success_count == 1 and stats.consecutive_errors == 0
    assert stats.in_flight == 0


def test_timeout_fails_the_lease_as_timeout(pool: KeyPool, stub: StubLLMServer) -> None:
    secret = register(pool, stub, "gemini", "g1")["g1"]
    stub.plan(secret, slow(1.0))
    auth = KeyPoolAuth(pool, "gemini")
    with (
        httpx.Client(base_url=stub.base_url, auth=auth, timeout=0.2) as client,
        pytest.raises(httpx.ReadTimeout),
    ):
        post(client, "gemini")
    stats = pool.stats("gemini", "g1")
    assert stats.errors_by_kind == {"timeout": 1}
    assert stats.in_flight == 0


def test_connection_refused_fails_the_lease(pool: KeyPool) -> None:
    register(pool, None, "ollama", "o1")
    url = f"http://127.0.0.1:{free_port()}"
    with (
        httpx.Client(base_url=url, auth=KeyPoolAuth(pool, "ollama")) as client,
        pytest.raises(httpx.ConnectError),
    ):
        post(client, "ollama")
    stats = pool.stats("ollama", "o1")
    assert stats.errors_by_kind == {"connection": 1}
    assert stats.in_flight == 0


def test_raise_for_status_in_an_event_hook_is_classified_by_its_status(
    pool: KeyPool, stub: StubLLMServer
) -> None:
    secret = register(pool, stub, "gemini", "g1")["g1"]
    stub.plan(secret, gemini_429(retry_after=25))

    def raise_for_status(response: Any) -> None:
        response.raise_for_status()

    auth = KeyPoolAuth(pool, "gemini")
    hooks = {"response": [raise_for_status]}
    with (
        httpx.Client(base_url=stub.base_url, auth=auth, event_hooks=hooks) as client,
        pytest.raises(httpx.HTTPStatusError),
    ):
        post(client, "gemini")
    stats = pool.stats("gemini", "g1")
    assert stats.errors_by_kind == {"rate_limit": 1}
    assert 20 < cooldown_left(stats) <= 25.5
    assert stats.in_flight == 0


def test_retry_on_rate_limit_resends_with_another_key(pool: KeyPool, stub: StubLLMServer) -> None:
    secrets = register(pool, stub, "gemini", "g1", "g2")
    stub.plan(secrets["g1"], gemini_429(retry_after=30))
    auth = KeyPoolAuth(pool, "gemini", retry_on_rate_limit=1)
    with httpx.Client(base_url=stub.base_url, auth=auth) as client:
        responses = [post(client, "gemini", f"prompt {i}") for i in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 200]
    retried = [r for r in responses if r.history]
    assert len(retried) == 1
    assert [h.status_code for h in retried[0].history] == [429]
    assert retried[0].extensions["keypool_key_id"] == "g2"
    used = stub.key_ids()
    assert used.count("g1") == 1 and len(used) == 4
    assert used[used.index("g1") + 1] == "g2"
    # the re-sent request carried the same body
    i = used.index("g1")
    assert stub.calls[i].body == stub.calls[i + 1].body
    assert pool.stats("gemini", "g1").status == "cooling"
    assert pool.stats("gemini", "g2").success_count == 3


def test_retry_on_rate_limit_returns_the_429_when_no_key_is_left(
    pool: KeyPool, stub: StubLLMServer
) -> None:
    secrets = register(pool, stub, "openai", "o1", "o2")
    for secret in secrets.values():
        stub.plan(secret, openai_429(reset_requests="30s", retry_after=30))
    auth = KeyPoolAuth(pool, "openai", retry_on_rate_limit=5)
    with httpx.Client(base_url=stub.base_url, auth=auth) as client:
        response = post(client, "openai")
    assert response.status_code == 429
    assert len(response.history) == 1
    assert sorted(k or "" for k in stub.key_ids()) == ["o1", "o2"]
    assert {s.status for s in pool.snapshot("openai")} == {"cooling"}


# --------------------------------------------------------------------------- tokens


@pytest.mark.parametrize("provider", ["gemini", "ollama", "openai", "anthropic"])
def test_tokens_from_the_reply_are_recorded(
    pool: KeyPool, stub: StubLLMServer, provider: str
) -> None:
    register(pool, stub, provider, "k1")
    auth = KeyPoolAuth(pool, provider, tokens=50)  # an estimate, reconciled by the reply
    with httpx.Client(base_url=stub.base_url, auth=auth) as client:
        for prompt in ("one", "two words", "and three words"):
            assert post(client, provider, prompt).status_code == 200
    reported = [c.total_tokens for c in stub.calls]
    assert all(isinstance(t, int) and t > 0 for t in reported)
    assert pool.stats(provider, "k1").tokens_used == sum(t for t in reported if t)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_tokens_are_found_in_gzip_compressed_replies(pool: KeyPool, stream: bool) -> None:
    with StubLLMServer(gzip=True) as stub:
        register(pool, stub, "openai", "o1")
        body = {
            "model": "gpt-4o-mini",
            "messages": [{"role": "user", "content": "compressed please"}],
            "stream": stream,
            "stream_options": {"include_usage": True},
        }
        with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "openai")) as client:
            response = client.post("/v1/chat/completions", json=body)
        assert response.headers["content-encoding"] == "gzip"
        assert response.status_code == 200 and "stub" in response.text
        assert pool.stats("openai", "o1").tokens_used == stub.calls[0].total_tokens


def test_ollama_stream_holds_the_lease_until_closed(pool: KeyPool, stub: StubLLMServer) -> None:
    register(pool, stub, "ollama", "o1")
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "stream this"}]}
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "ollama")) as client:
        with client.stream("POST", "/api/chat", json=body) as response:
            assert response.status_code == 200
            assert not response.is_stream_consumed  # the auth did not read the body
            during = pool.stats("ollama", "o1")
            lines = list(response.iter_lines())
        after = pool.stats("ollama", "o1")
    assert during.in_flight == 1 and during.success_count == 0
    assert len(lines) > 2 and '"done": true' in lines[-1]
    assert after.in_flight == 0 and after.success_count == 1
    assert after.tokens_used == stub.calls[0].total_tokens


def test_openai_sse_stream_counts_the_final_usage(pool: KeyPool, stub: StubLLMServer) -> None:
    register(pool, stub, "openai", "o1")
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "stream with usage"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with (
        httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "openai")) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        events = [line for line in response.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"
    stats = pool.stats("openai", "o1")
    assert stats.success_count == 1 and stats.in_flight == 0
    assert stats.tokens_used == stub.calls[0].total_tokens


def test_stream_closed_early_is_a_success_with_what_it_showed(
    pool: KeyPool, stub: StubLLMServer
) -> None:
    secret = register(pool, stub, "ollama", "o1")["o1"]
    stub.plan(secret, Reply(chunk_delay=0.2))  # the counts come in the last line, later
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "a b c d e f"}]}
    with (
        httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "ollama")) as client,
        client.stream("POST", "/api/chat", json=body) as response,
    ):
        next(response.iter_lines())  # read one line, then leave before the counts
    stats = pool.stats("ollama", "o1")
    assert stats.success_count == 1 and stats.error_count == 0
    assert stats.in_flight == 0 and stats.tokens_used == 0


def test_long_stream_keeps_its_lease_renewed(
    make_pool: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make_pool(lease_ttl=0.6)
    secret = register(pool, stub, "ollama", "o1")["o1"]
    stub.plan(secret, Reply(chunk_delay=0.2))  # 7 chunks: about 1.2 s, twice the lease TTL
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "a b c"}]}
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "ollama")) as client:
        with client.stream("POST", "/api/chat", json=body) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if len(lines) == 6:  # about 1 s in, past the lease TTL
                    late = pool.stats("ollama", "o1")
        after = pool.stats("ollama", "o1")
    assert len(lines) == 7
    assert late.in_flight == 1  # renewed while the stream was read: still leased
    assert after.in_flight == 0 and after.success_count == 1
    assert after.tokens_used == stub.calls[0].total_tokens


def test_key_removed_while_in_flight_does_not_break_the_response(
    pool: KeyPool, stub: StubLLMServer
) -> None:
    register(pool, stub, "ollama", "o1", "o2")
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "bye"}]}
    with httpx.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "ollama")) as client:
        with client.stream("POST", "/api/chat", json=body) as response:
            pool.remove_key("ollama", response.extensions["keypool_key_id"])
            lines = list(response.iter_lines())
        assert '"done": true' in lines[-1]
        assert post(client, "ollama").status_code == 200  # the other key serves
    assert len(pool.snapshot("ollama")) == 1


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}, 7),
        ({"usage": {"prompt_tokens": 3, "completion_tokens": 4}}, 7),
        ({"usage": {"input_tokens": 10, "output_tokens": 5}}, 15),
        ({"usage": {"billed_units": {"input_tokens": 2, "output_tokens": 2}}}, 4),
        ({"usageMetadata": {"promptTokenCount": 4, "totalTokenCount": 9}}, 9),
        ({"done": True, "prompt_eval_count": 11, "eval_count": 9}, 20),
        ({"done": True, "eval_count": 9}, 9),  # Ollama omits a cached prompt's count
        ({"usage": {"total_tokens": True}}, None),
        ({"choices": []}, None),
        ([1, 2], None),
    ],
)
def test_usage_tokens(payload: object, expected: int | None) -> None:
    assert usage_tokens(payload) == expected


# --------------------------------------------------------------------------- asyncio


def test_async_auth_rotates_cools_and_counts(
    make_apool: Callable[..., AsyncKeyPool], stub: StubLLMServer
) -> None:
    secrets = {k: fake_secret("gemini", k) for k in ("g1", "g2")}
    for key_id, secret in secrets.items():
        stub.add_key(secret, key_id)
    stub.plan(secrets["g1"], gemini_429(retry_after=20))

    async def scenario() -> tuple[list[int], list[KeyStats]]:
        async with make_apool() as apool:
            for key_id, secret in secrets.items():
                await apool.add_key("gemini", key_id, secret)
            auth = AsyncKeyPoolAuth(apool, "gemini")
            async with httpx.AsyncClient(base_url=stub.base_url, auth=auth) as client:
                statuses = [(await post(client, "gemini")).status_code for _ in range(5)]
            return statuses, await apool.snapshot("gemini")

    statuses, (g1, g2) = asyncio.run(scenario())
    used = stub.key_ids()
    first_g1 = used.index("g1")
    assert statuses[first_g1] == 429 and statuses.count(200) == 4
    assert used[first_g1 + 1 :] == ["g2"] * (4 - first_g1)
    assert g1.status == "cooling" and 15 < cooldown_left(g1) <= 20.5
    assert g2.success_count == 4 and g2.in_flight == 0
    assert g2.tokens_used == sum(c.total_tokens or 0 for c in stub.calls if c.key_id == "g2")


def test_async_auth_streams_failures_and_cancellation(
    make_apool: Callable[..., AsyncKeyPool], stub: StubLLMServer
) -> None:
    secret = fake_secret("ollama", "o1")
    stub.add_key(secret, "o1")
    stub.plan(secret, Reply(), drop_connection(), slow(3.0))
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "stream me"}]}

    async def scenario() -> dict[str, Any]:
        seen: dict[str, Any] = {}
        async with make_apool() as apool:
            await apool.add_key("ollama", "o1", secret)
            auth = AsyncKeyPoolAuth(apool, "ollama", tokens=10)
            async with httpx.AsyncClient(base_url=stub.base_url, auth=auth) as client:
                async with client.stream("POST", "/api/chat", json=body) as response:
                    seen["during"] = await apool.stats("ollama", "o1")
                    seen["lines"] = [line async for line in response.aiter_lines()]
                seen["after_stream"] = await apool.stats("ollama", "o1")
                with pytest.raises(httpx.RemoteProtocolError):
                    await post(client, "ollama")
                seen["after_drop"] = await apool.stats("ollama", "o1")
                task = asyncio.create_task(post(client, "ollama"))
                for _ in range(100):  # until the slow request is at the stub
                    if len(stub.calls) == 3:
                        break
                    await asyncio.sleep(0.02)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                seen["after_cancel"] = await apool.stats("ollama", "o1")
        return seen

    seen = asyncio.run(scenario())
    assert seen["during"].in_flight == 1 and seen["during"].success_count == 0
    assert '"done": true' in seen["lines"][-1]
    assert seen["after_stream"].in_flight == 0 and seen["after_stream"].success_count == 1
    assert seen["after_stream"].tokens_used == stub.calls[0].total_tokens
    assert seen["after_drop"].errors_by_kind == {"connection": 1}
    cancelled = seen["after_cancel"]
    assert cancelled.in_flight == 0  # the key was given back ...
    assert cancelled.error_count == 1  # ... without blaming it for the cancellation
    assert cancelled.total_requests == 3


def test_sync_pool_auth_works_with_an_async_client(pool: KeyPool, stub: StubLLMServer) -> None:
    secrets = register(pool, stub, "openai", "o1", "o2")
    stub.plan(secrets["o1"], openai_429(reset_requests="20s", retry_after=None))

    async def scenario() -> list[int]:
        auth = KeyPoolAuth(pool, "openai", retry_on_rate_limit=1)
        async with httpx.AsyncClient(base_url=stub.base_url, auth=auth) as client:
            return [(await post(client, "openai")).status_code for _ in range(3)]

    assert asyncio.run(scenario()) == [200, 200, 200]
    assert pool.stats("openai", "o1").status == "cooling"
    o2 = pool.stats("openai", "o2")
    assert o2.success_count == 3 and o2.in_flight == 0
    assert o2.tokens_used == sum(c.total_tokens or 0 for c in stub.calls if c.key_id == "o2")


def test_async_auth_refuses_a_sync_client(
    make_apool: Callable[..., AsyncKeyPool], stub: StubLLMServer
) -> None:
    auth = AsyncKeyPoolAuth(make_apool(), "openai")
    with (
        httpx.Client(base_url=stub.base_url, auth=auth) as client,
        pytest.raises(TypeError, match="AsyncClient"),
    ):
        post(client, "openai")
    assert stub.calls == []


# --------------------------------------------------------------------------- arguments, secrets


def test_arguments_are_checked(pool: KeyPool) -> None:
    with pytest.raises(ValueError, match="provider"):
        KeyPoolAuth(pool, "Not A Provider")
    with pytest.raises(ValueError, match="strategy"):
        KeyPoolAuth(pool, "openai", strategy="random")
    with pytest.raises(ValueError, match="retry_on_rate_limit"):
        KeyPoolAuth(pool, "openai", retry_on_rate_limit=-1)
    with pytest.raises(ValueError, match="tokens"):
        KeyPoolAuth(pool, "openai", tokens=-5)
    with pytest.raises(ValueError, match="wait"):
        KeyPoolAuth(pool, "openai", wait=-1)
    with pytest.raises(ValueError, match="header"):
        KeyPoolAuth(pool, "openai", header="Bad Header:")
    with pytest.raises(TypeError, match="KeyPool"):
        KeyPoolAuth("redis://127.0.0.1", "openai")  # type: ignore[arg-type]


def test_no_secret_in_reprs_stats_errors_or_logs(
    make_pool: Callable[..., KeyPool],
    stub: StubLLMServer,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = make_pool(log_level="debug")
    secrets = register(pool, stub, "gemini", "g1", "g2")
    secrets.update(register(pool, None, "gemini", "unknown"))
    stub.plan(secrets["g1"], gemini_429(retry_after=5), drop_connection())
    stub.plan(secrets["g2"], server_error(503))
    auth = KeyPoolAuth(pool, "gemini", model="gemini-2.0-flash")
    seen: list[str] = [repr(auth), str(auth)]
    with httpx.Client(base_url=stub.base_url, auth=auth) as client:
        for _ in range(6):
            try:
                response = post(client, "gemini")
                seen.append(repr(response))
            except (httpx.HTTPError, NoKeyAvailable) as exc:
                seen.extend([repr(exc), str(exc)])
    seen.extend(repr(s) for s in pool.snapshot("gemini"))
    captured = capfd.readouterr()
    seen.extend([captured.out, captured.err, caplog.text])
    text = "\n".join(seen)
    assert "key_disabled" in caplog.text and "cooldown_set" in caplog.text  # logs were on
    for secret in secrets.values():
        assert secret not in text


def test_import_keypool_does_not_import_httpx() -> None:
    code = "import sys, keypool; assert 'httpx' not in sys.modules, 'httpx imported'"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- the examples


def _example_env(**extra: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("KEYPOOL_") and not name.endswith(("_KEY", "_KEYS"))
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("example", "env_name", "extra_args"),
    [
        ("examples/gemini_generate.py", "GEMINI_API_KEYS", ()),
        ("examples/ollama_chat.py", "OLLAMA_API_KEYS", ()),
        ("examples/ollama_chat.py", "OLLAMA_API_KEYS", ("--stream",)),
    ],
    ids=["gemini", "ollama", "ollama-stream"],
)
def test_example_runs_against_the_stub(
    stub: StubLLMServer,
    store_url: str,
    namespace: str,
    example: str,
    env_name: str,
    extra_args: tuple[str, ...],
) -> None:
    provider = env_name.split("_")[0].lower()
    secrets = [fake_secret(provider, f"env{i}") for i in range(2)]
    for i, secret in enumerate(secrets):
        stub.add_key(secret, f"env{i}")
    env = _example_env(
        **{env_name: ",".join(secrets)},
        KEYPOOL_REDIS_URL=store_url,
        KEYPOOL_NAMESPACE=namespace,
    )
    args = ["--base-url", stub.base_url, "--requests", "4", "--prompt", "say hi", *extra_args]
    proc = subprocess.run(
        [sys.executable, example, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert proc.stdout.count("stub answer to: say hi") == 4
    assert "per-key stats" in proc.stdout
    for secret in secrets:
        assert secret not in output
    assert sorted(Counter(stub.key_ids()).values()) == [2, 2]  # rotated over both keys
    assert all(c.status == 200 for c in stub.calls)


@pytest.mark.parametrize("example", ["examples/gemini_generate.py", "examples/ollama_chat.py"])
def test_example_uses_demo_keys_without_environment_keys(stub: StubLLMServer, example: str) -> None:
    spec = importlib.util.spec_from_file_location("kp_httpx_example", ROOT / example)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    demo: dict[str, str] = module.DEMO_KEYS
    for key_id, secret in demo.items():
        stub.add_key(secret, key_id)
    proc = subprocess.run(
        [sys.executable, example, "--base-url", stub.base_url, "--requests", "3"],
        cwd=ROOT,
        env=_example_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "demo keys" in proc.stdout
    for secret in demo.values():
        assert secret not in output
    assert sorted(Counter(stub.key_ids()).values()) == [1, 2]


def test_example_exits_nonzero_when_every_key_is_rejected(stub: StubLLMServer) -> None:
    env = _example_env(GEMINI_API_KEYS="fake-unknown-to-the-stub-1,fake-unknown-to-the-stub-2")
    proc = subprocess.run(
        [sys.executable, "examples/gemini_generate.py", "--base-url", stub.base_url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "HTTP 401" in proc.stdout and "disabled" in proc.stdout
    assert "fake-unknown-to-the-stub" not in output


# --------------------------------------------------------------------------- httpx2


def test_httpx2_auth_rotates_cools_and_counts(pool: KeyPool, stub: StubLLMServer) -> None:
    httpx2 = pytest.importorskip("httpx2")
    from keypool.integrations import httpx2 as kp_httpx2

    with pytest.raises(TypeError, match="auth"):  # an httpx.Auth is not an httpx2.Auth
        httpx2.Client(auth=KeyPoolAuth(pool, "openai"))
    secrets = register(pool, stub, "openai", "o1", "o2")
    stub.plan(secrets["o1"], openai_429(reset_requests="20s", retry_after=None))
    auth = kp_httpx2.KeyPoolAuth(pool, "openai", retry_on_rate_limit=1)
    with httpx2.Client(base_url=stub.base_url, auth=auth) as client:
        statuses = [post(client, "openai").status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert pool.stats("openai", "o1").status == "cooling"
    o2 = pool.stats("openai", "o2")
    assert o2.success_count == 3 and o2.in_flight == 0
    assert o2.tokens_used == sum(c.total_tokens or 0 for c in stub.calls if c.key_id == "o2")


def test_httpx2_async_auth_streams_and_counts(
    make_apool: Callable[..., AsyncKeyPool], stub: StubLLMServer
) -> None:
    httpx2 = pytest.importorskip("httpx2")
    from keypool.integrations import httpx2 as kp_httpx2

    secret = fake_secret("ollama", "o1")
    stub.add_key(secret, "o1")
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "stream me"}]}

    async def scenario() -> tuple[list[str], KeyStats]:
        async with make_apool() as apool:
            await apool.add_key("ollama", "o1", secret)
            auth = kp_httpx2.AsyncKeyPoolAuth(apool, "ollama")
            async with (
                httpx2.AsyncClient(base_url=stub.base_url, auth=auth) as client,
                client.stream("POST", "/api/chat", json=body) as response,
            ):
                lines = [line async for line in response.aiter_lines()]
            return lines, await apool.stats("ollama", "o1")

    lines, o1 = asyncio.run(scenario())
    assert '"done": true' in lines[-1]
    assert o1.success_count == 1 and o1.in_flight == 0
    assert o1.tokens_used == stub.calls[0].total_tokens
