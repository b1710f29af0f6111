"""The official OpenAI SDK through ``keypool.integrations.openai``, against the local stub.

Every request of the real ``openai`` client (sync, async, streaming) leases a key from a
pool on the real Redis; what the pool did is read back by a second pool instance, as
another worker (or ``keypool status``) would see it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

openai = pytest.importorskip("openai")

from keypool import AsyncKeyPool, KeyPool, KeyPoolSettings, NoKeyAvailable  # noqa: E402
from keypool.integrations.openai import async_openai_client, openai_client  # noqa: E402
from tests.stub_llm_server import StubLLMServer, openai_429, register  # noqa: E402

MODEL = "gpt-4o-mini"


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    with StubLLMServer() as server:
        yield server


@pytest.fixture
def make(redis_url: str, namespace: str) -> Iterator[Callable[..., KeyPool]]:
    pools: list[KeyPool] = []

    def build(**overrides: Any) -> KeyPool:
        pool = KeyPool(
            settings=KeyPoolSettings(redis_url=redis_url, namespace=namespace, **overrides)
        )
        pools.append(pool)
        return pool

    yield build
    for pool in pools:
        pool.close()


def ask(client: Any, prompt: str = "hello there", **extra: Any) -> Any:
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], **extra
    )


def tokens_of(stub: StubLLMServer, key_id: str) -> int:
    return sum(c.total_tokens or 0 for c in stub.calls if c.key_id == key_id and c.status == 200)


def test_sync_client_moves_past_a_rate_limited_and_a_rejected_key(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool, other = make(), make()
    secrets = register(pool, stub, "openai", "o1", "o3")
    register(pool, None, "openai", "o2")  # unknown to the provider: 401
    stub.plan(secrets["o1"], openai_429(reset_requests="20s", retry_after=20))
    client = openai_client(pool, base_url=stub.base_url + "/v1")
    replies = [ask(client, f"question {i}") for i in range(4)]
    assert all(r.choices[0].message.content.startswith("stub answer") for r in replies)
    o1, o2, o3 = (other.stats("openai", k) for k in ("o1", "o2", "o3"))
    assert o1.status == "cooling" and 15 < (o1.cooldown_until or 0) - time.time() <= 21
    assert o2.status == "disabled"
    assert o3.success_count == 4 and o3.in_flight == 0
    assert o3.tokens_used == tokens_of(stub, "o3") > 0
    assert [c.status for c in stub.calls][:3] in ([429, 401, 200], [401, 429, 200])


def test_sync_stream_counts_usage_when_the_sdk_stops_at_done(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    register(pool, stub, "openai", "o1")
    client = openai_client(pool, base_url=stub.base_url + "/v1")
    stream = ask(client, "one two three", stream=True, stream_options={"include_usage": True})
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.startswith("stub answer")
    o1 = make().stats("openai", "o1")
    assert o1.success_count == 1 and o1.in_flight == 0
    assert o1.tokens_used == tokens_of(stub, "o1") > 0


def test_sync_stream_closed_early_gives_the_key_back(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    register(pool, stub, "openai", "o1")
    client = openai_client(pool, base_url=stub.base_url + "/v1")
    with ask(client, "a b c d e f", stream=True) as stream:
        next(iter(stream))
        assert make().stats("openai", "o1").in_flight == 1
    o1 = make().stats("openai", "o1")
    assert o1.success_count == 1 and o1.in_flight == 0


def test_no_key_available_is_raised_as_is(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    register(pool, stub, "openai", "o1")
    pool.disable_key("openai", "o1")
    client = openai_client(pool, base_url=stub.base_url + "/v1")
    with pytest.raises(NoKeyAvailable):
        ask(client)
    assert stub.calls == []


def test_async_client_counts_replies_and_streams(
    redis_url: str, namespace: str, make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    secrets = register(make(), stub, "openai", "o1", "o2")
    stub.plan(secrets["o1"], openai_429(retry_after=30))

    async def scenario() -> list[str]:
        settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace)
        async with AsyncKeyPool(settings=settings) as apool:
            for key_id, secret in secrets.items():  # each pool holds the secrets it uses
                await apool.add_key("openai", key_id, secret)
            client = async_openai_client(apool, base_url=stub.base_url + "/v1")
            texts = [
                (await ask_async(client, f"q {i}")).choices[0].message.content for i in range(2)
            ]
            stream = await client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "stream this"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            texts.append(
                "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            )
            await client.close()
            return texts

    texts = asyncio.run(scenario())
    assert all(t.startswith("stub answer") for t in texts)
    o1, o2 = make().snapshot("openai")
    assert o1.status == "cooling" and o1.in_flight == 0
    assert o2.success_count == 3 and o2.in_flight == 0
    assert o2.tokens_used == tokens_of(stub, "o2") > 0


async def ask_async(client: Any, prompt: str) -> Any:
    return await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}]
    )


def test_credentials_of_its_own_are_refused(make: Callable[..., KeyPool]) -> None:
    with pytest.raises(TypeError, match="api_key"):
        openai_client(make(), api_key="sk-other")
    client = openai_client(make(), base_url="http://127.0.0.1:9/v1")
    assert client.max_retries == 0


def test_no_secret_in_sdk_debug_logs_errors_or_reprs(
    make: Callable[..., KeyPool], stub: StubLLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    pool = make(log_level="debug")
    secrets = register(pool, stub, "openai", "o1")
    secrets.update(register(pool, None, "openai", "o2"))  # rejected: 401
    stub.plan(secrets["o1"], openai_429(retry_after=5))
    client = openai_client(pool, base_url=stub.base_url + "/v1", retries=0)
    seen = [repr(client), repr(client._client.auth)]
    for _ in range(3):
        try:
            seen.append(repr(ask(client)))
        except (openai.OpenAIError, NoKeyAvailable) as exc:
            seen.extend([repr(exc), str(exc)])
    text = "\n".join([*seen, caplog.text])
    assert "HTTP Request" in caplog.text or "Request options" in caplog.text  # logs were on
    for secret in secrets.values():
        assert secret not in text
