"""The official Anthropic SDK (built on ``httpx2``) through
``keypool.integrations.anthropic``, against the local stub, on the real Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

anthropic = pytest.importorskip("anthropic")

from keypool import AsyncKeyPool, KeyPool, KeyPoolSettings, Lease, NoKeyAvailable  # noqa: E402
from keypool.integrations.anthropic import (  # noqa: E402
    anthropic_client,
    async_anthropic_client,
)
from tests.stub_llm_server import StubLLMServer, anthropic_429, register  # noqa: E402

MODEL = "claude-3-5-haiku-latest"


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    with StubLLMServer() as server:
        yield server


@pytest.fixture
def make(redis_url: str, namespace: str) -> Iterator[Callable[..., KeyPool]]:
    pools: list[KeyPool] = []

    def build(**overrides: Any) -> KeyPool:
        settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, **overrides)
        pool = KeyPool(settings=settings)
        pools.append(pool)
        return pool

    yield build
    for pool in pools:
        pool.close()


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def tokens_of(stub: StubLLMServer, key_id: str) -> int:
    return sum(c.total_tokens or 0 for c in stub.calls if c.key_id == key_id and c.status == 200)


def test_httpx_client_is_refused_by_the_sdk_but_ours_is_httpx2(
    make: Callable[..., KeyPool],
) -> None:
    httpx = pytest.importorskip("httpx")
    with pytest.raises(TypeError, match="httpx2"):
        anthropic.Anthropic(api_key="x", http_client=httpx.Client())
    client = anthropic_client(make(), base_url="http://127.0.0.1:9")
    assert isinstance(client, anthropic.Anthropic) and client.max_retries == 0


def test_sync_client_cools_429_disables_401_and_counts(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool, other = make(), make()
    secrets = register(pool, stub, "anthropic", "a1", "a3")
    register(pool, None, "anthropic", "a2")  # rejected by the provider
    stub.plan(secrets["a1"], anthropic_429(retry_after=20))
    client = anthropic_client(pool, base_url=stub.base_url)
    for i in range(3):
        reply = client.messages.create(model=MODEL, max_tokens=64, messages=messages(f"q {i}"))
        assert reply.content[0].text.startswith("stub answer")
    a1, a2, a3 = (other.stats("anthropic", k) for k in ("a1", "a2", "a3"))
    assert a1.status == "cooling" and 15 < (a1.cooldown_until or 0) - time.time() <= 21
    assert a2.status == "disabled"
    assert a3.success_count == 3 and a3.in_flight == 0
    assert a3.tokens_used == tokens_of(stub, "a3") > 0


def test_streams_count_input_and_output_tokens(
    make: Callable[..., KeyPool], stub: StubLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[dict[str, Any]] = []
    success = Lease.success

    def spy(self: Lease, *args: Any, **kwargs: Any) -> None:
        seen.append(kwargs)
        success(self, *args, **kwargs)

    monkeypatch.setattr(Lease, "success", spy)
    pool = make()
    register(pool, stub, "anthropic", "a1")
    client = anthropic_client(pool, base_url=stub.base_url)
    with client.messages.stream(
        model=MODEL, max_tokens=64, messages=messages("four words of prompt")
    ) as stream:
        text = "".join(stream.text_stream)
    assert text.startswith("stub answer")
    for _event in client.messages.create(
        model=MODEL, max_tokens=64, messages=messages("two words"), stream=True
    ):
        pass
    a1 = make().stats("anthropic", "a1")
    assert a1.success_count == 2 and a1.in_flight == 0
    assert a1.tokens_used == tokens_of(stub, "a1")
    assert seen[0]["input_tokens"] == 4 and seen[0]["output_tokens"] == len(text.split())
    assert seen[1]["input_tokens"] == 2


def test_stream_closed_after_its_first_event_reports_what_was_seen(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    register(pool, stub, "anthropic", "a1")
    client = anthropic_client(pool, base_url=stub.base_url)
    stream = client.messages.create(
        model=MODEL, max_tokens=64, messages=messages("five words in this prompt"), stream=True
    )
    first = next(iter(stream))
    assert first.type == "message_start"
    stream.close()
    a1 = make().stats("anthropic", "a1")
    assert a1.success_count == 1 and a1.in_flight == 0
    assert a1.tokens_used >= 5  # the input tokens of message_start at least


def test_no_key_available_is_not_a_connection_error(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    register(pool, stub, "anthropic", "a1")
    pool.disable_key("anthropic", "a1")
    client = anthropic_client(pool, base_url=stub.base_url)
    with pytest.raises(NoKeyAvailable):
        client.messages.create(model=MODEL, max_tokens=8, messages=messages("hi"))
    assert stub.calls == []


def test_async_client_replies_and_streams(
    redis_url: str, namespace: str, make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    secrets = register(make(), stub, "anthropic", "a1", "a2")
    stub.plan(secrets["a1"], anthropic_429(retry_after=30))

    async def scenario() -> list[str]:
        settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace)
        async with AsyncKeyPool(settings=settings) as apool:
            for key_id, secret in secrets.items():
                await apool.add_key("anthropic", key_id, secret)
            client = async_anthropic_client(apool, base_url=stub.base_url)
            texts = []
            for i in range(2):
                reply = await client.messages.create(
                    model=MODEL, max_tokens=64, messages=messages(f"q {i}")
                )
                texts.append(reply.content[0].text)
            async with client.messages.stream(
                model=MODEL, max_tokens=64, messages=messages("stream it")
            ) as stream:
                texts.append("".join([t async for t in stream.text_stream]))
            await client.close()
            return texts

    texts = asyncio.run(scenario())
    assert all(t.startswith("stub answer") for t in texts)
    a1, a2 = make().snapshot("anthropic")
    assert a1.status == "cooling" and a1.in_flight == 0
    assert a2.success_count == 3 and a2.in_flight == 0
    assert a2.tokens_used == tokens_of(stub, "a2") > 0
