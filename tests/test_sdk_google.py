"""Google's ``google-genai`` SDK through ``keypool.integrations.google``, against the local
stub, on the real Redis: its ``http_options.httpx_client``/``httpx_async_client`` carry the
pool's auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

genai = pytest.importorskip("google.genai")

from keypool import AsyncKeyPool, KeyPool, KeyPoolSettings  # noqa: E402
from keypool.integrations.google import async_genai_client, genai_client  # noqa: E402
from tests.stub_llm_server import (  # noqa: E402
    StubLLMServer,
    gemini_daily_quota,
    gemini_invalid_key,
    gemini_rate_limit_retry_info,
    register,
)

MODEL = "gemini-2.0-flash"


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


def tokens_of(stub: StubLLMServer, key_id: str) -> int:
    return sum(c.total_tokens or 0 for c in stub.calls if c.key_id == key_id and c.status == 200)


def test_sync_client_cools_disables_and_counts(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool, other = make(), make()
    secrets = register(pool, stub, "gemini", "g1", "g2", "g3", "g4")
    stub.plan(secrets["g1"], gemini_rate_limit_retry_info("20s"))
    stub.plan(secrets["g2"], gemini_invalid_key())
    stub.plan(secrets["g3"], gemini_daily_quota())
    client = genai_client(pool, retries=3, http_options={"base_url": stub.base_url})
    for i in range(3):
        reply = client.models.generate_content(model=MODEL, contents=f"question {i}")
        assert (reply.text or "").startswith("stub answer")
    g1, g2, g3, g4 = (other.stats("gemini", k) for k in ("g1", "g2", "g3", "g4"))
    assert g1.status == "cooling" and 15 < (g1.cooldown_until or 0) - time.time() <= 21
    assert g2.status == "disabled"
    assert g3.status == "exhausted"
    assert g4.success_count == 3 and g4.in_flight == 0
    assert g4.tokens_used == tokens_of(stub, "g4") > 0


def test_sync_stream_counts_usage_metadata(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    register(pool, stub, "gemini", "g1")
    client = genai_client(pool, http_options={"base_url": stub.base_url})
    text = "".join(
        chunk.text or ""
        for chunk in client.models.generate_content_stream(model=MODEL, contents="count me")
    )
    assert text.startswith("stub answer")
    assert stub.calls[0].path.endswith(":streamGenerateContent")
    g1 = make().stats("gemini", "g1")
    assert g1.success_count == 1 and g1.in_flight == 0
    assert g1.tokens_used == tokens_of(stub, "g1") > 0


def test_async_client_replies_and_streams(
    redis_url: str, namespace: str, make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    secrets = register(make(), stub, "gemini", "g1", "g2")
    stub.plan(secrets["g1"], gemini_rate_limit_retry_info("30s"))

    async def scenario() -> list[str]:
        settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace)
        async with AsyncKeyPool(settings=settings) as apool:
            for key_id, secret in secrets.items():
                await apool.add_key("gemini", key_id, secret)
            client = async_genai_client(apool, http_options={"base_url": stub.base_url})
            texts = []
            for i in range(2):
                reply = await client.aio.models.generate_content(model=MODEL, contents=f"q {i}")
                texts.append(reply.text or "")
            stream = await client.aio.models.generate_content_stream(
                model=MODEL, contents="stream it"
            )
            texts.append("".join([chunk.text or "" async for chunk in stream]))
            await client.aio.aclose()
            return texts

    texts = asyncio.run(scenario())
    assert all(t.startswith("stub answer") for t in texts)
    g1, g2 = make().snapshot("gemini")
    assert g1.status == "cooling" and g1.in_flight == 0
    assert g2.success_count == 3 and g2.in_flight == 0
    assert g2.tokens_used == tokens_of(stub, "g2") > 0


def test_the_blocking_pool_serves_the_async_half_too(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    register(pool, stub, "gemini", "g1")
    client = genai_client(pool, http_options={"base_url": stub.base_url})

    async def scenario() -> str:
        reply = await client.aio.models.generate_content(model=MODEL, contents="from async")
        return reply.text or ""

    assert asyncio.run(scenario()).startswith("stub answer")
    g1 = make().stats("gemini", "g1")
    assert g1.success_count == 1 and g1.tokens_used == tokens_of(stub, "g1") > 0


def test_credentials_of_its_own_are_refused(make: Callable[..., KeyPool]) -> None:
    with pytest.raises(TypeError, match="api_key"):
        genai_client(make(), api_key="AIza-other")
    with pytest.raises(TypeError, match="vertexai"):
        genai_client(make(), vertexai=True)
