"""A lease lives exactly as long as its request, through the official SDKs and httpx2.

Pools here have a 1 s lease TTL and keys with ``max_concurrency=1``; a second pool instance
on the same Redis (another worker) watches the key while slow calls run. Without renewals
the lease would expire after 1 s, the key would look free and a second call would get it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

httpx2 = pytest.importorskip("httpx2")
openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

from keypool import AsyncKeyPool, KeyPool, KeyPoolSettings, NoKeyAvailable  # noqa: E402
from keypool.integrations.anthropic import async_anthropic_client  # noqa: E402
from keypool.integrations.google import genai_client  # noqa: E402
from keypool.integrations.httpx2 import AsyncKeyPoolAuth, KeyPoolAuth  # noqa: E402
from keypool.integrations.openai import openai_client  # noqa: E402
from tests.stub_llm_server import Reply, StubLLMServer, fake_secret, slow  # noqa: E402

TTL = 1.0


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    with StubLLMServer() as server:
        yield server


@pytest.fixture
def make(redis_url: str, namespace: str) -> Iterator[Callable[..., KeyPool]]:
    pools: list[KeyPool] = []

    def build(**overrides: Any) -> KeyPool:
        settings = KeyPoolSettings(
            redis_url=redis_url, namespace=namespace, lease_ttl=TTL, **overrides
        )
        pool = KeyPool(settings=settings)
        pools.append(pool)
        return pool

    yield build
    for pool in pools:
        pool.close()


def one_key(pools: list[KeyPool], stub: StubLLMServer, provider: str, *replies: Reply) -> str:
    """One key with ``max_concurrency=1``, known to every pool (each process holds the
    secrets it registered) and to the stub."""
    secret = fake_secret(provider, "k1")
    for pool in pools:
        pool.add_key(provider, "k1", secret, max_concurrency=1)
    stub.add_key(secret, "k1")
    stub.plan(secret, *replies)
    return secret


def watch(other: KeyPool, provider: str, during: Callable[[], object]) -> list[tuple[int, bool]]:
    """Run ``during`` in a thread; meanwhile, past the lease TTL, look at the key from
    ``other``: (its in-flight count, whether another acquire got it)."""
    seen: list[tuple[int, bool]] = []
    with ThreadPoolExecutor(1) as runner:
        started = time.monotonic()
        future = runner.submit(during)
        for moment in (1.4, 2.0):
            time.sleep(max(0.0, started + moment - time.monotonic()))
            got = False
            try:
                other.acquire(provider).release()
                got = True
            except NoKeyAvailable:
                pass
            seen.append((other.stats(provider, "k1").in_flight, got))
        future.result(timeout=30)
    return seen


def test_slow_reply_keeps_its_lease_sync_openai(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool, other = make(), make()
    one_key([pool, other], stub, "openai", slow(2.6))
    client = openai_client(pool, base_url=stub.base_url + "/v1")

    def call() -> Any:
        return client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "slow"}]
        )

    assert watch(other, "openai", call) == [(1, False), (1, False)]
    k1 = other.stats("openai", "k1")
    assert k1.in_flight == 0 and k1.success_count == 1 and k1.tokens_used > 0


def test_slow_stream_keeps_its_lease_async_anthropic(
    redis_url: str, namespace: str, make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    other = make()
    secret = one_key([other], stub, "anthropic", Reply(chunk_delay=0.35))

    async def call() -> str:
        settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, lease_ttl=TTL)
        async with AsyncKeyPool(settings=settings) as apool:
            await apool.add_key("anthropic", "k1", secret, max_concurrency=1)
            client = async_anthropic_client(apool, base_url=stub.base_url)
            async with client.messages.stream(
                model="claude",
                max_tokens=64,
                messages=[{"role": "user", "content": "a slow stream of words"}],
            ) as stream:
                text = "".join([t async for t in stream.text_stream])
            await client.close()
            return text

    assert watch(other, "anthropic", lambda: asyncio.run(call())) == [(1, False), (1, False)]
    k1 = other.stats("anthropic", "k1")
    assert k1.in_flight == 0 and k1.success_count == 1
    assert k1.tokens_used == stub.calls[0].total_tokens


def test_slow_reply_keeps_its_lease_genai(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool, other = make(), make()
    one_key([pool, other], stub, "gemini", slow(2.6))
    client = genai_client(pool, http_options={"base_url": stub.base_url})

    def call() -> Any:
        return client.models.generate_content(model="gemini-2.0-flash", contents="slow")

    assert watch(other, "gemini", call) == [(1, False), (1, False)]
    assert other.stats("gemini", "k1").in_flight == 0


def test_max_concurrency_holds_under_load(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool, other = make(), make()
    for key_id in ("k1", "k2"):
        secret = fake_secret("openai", key_id)
        pool.add_key("openai", key_id, secret, max_concurrency=1)
        stub.add_key(secret, key_id)
        stub.plan(secret, *[slow(0.4)] * 8)
    client = openai_client(pool, base_url=stub.base_url + "/v1", wait=30)
    peak: dict[str, int] = {"k1": 0, "k2": 0}
    done = threading.Event()

    def monitor() -> None:
        while not done.is_set():
            for s in other.snapshot("openai"):
                peak[s.key_id] = max(peak[s.key_id], s.in_flight)
            time.sleep(0.05)

    def call(i: int) -> str:
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"n {i}"}]
        )
        return str(reply.choices[0].message.content)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    try:
        with ThreadPoolExecutor(6) as runner:
            answers = list(runner.map(call, range(8)))
    finally:
        done.set()
        watcher.join()
    assert len(answers) == 8 and all(a.startswith("stub answer") for a in answers)
    assert peak == {"k1": 1, "k2": 1}
    served = [c.key_id for c in stub.calls]
    assert sorted(served) == ["k1"] * served.count("k1") + ["k2"] * served.count("k2")
    assert sum(s.success_count for s in other.snapshot("openai")) == 8


def test_a_dropped_response_is_reported_once(
    make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    pool = make()
    one_key([pool], stub, "openai")
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "dropped"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx2.Client(base_url=stub.base_url, auth=KeyPoolAuth(pool, "openai")) as client:
        response = client.send(
            client.build_request("POST", "/v1/chat/completions", json=body), stream=True
        )
        chunks = response.iter_raw()
        next(chunks)  # read a little, never closed
        assert pool.stats("openai", "k1").in_flight == 1
        del chunks, response
        gc.collect()
        deadline = time.monotonic() + 5
        while pool.stats("openai", "k1").in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
    k1 = pool.stats("openai", "k1")
    assert k1.in_flight == 0 and k1.success_count == 1 and k1.error_count == 0


def test_async_httpx2_auth_keeps_a_slow_lease(
    redis_url: str, namespace: str, make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    other = make()
    secret = one_key([other], stub, "openai", slow(2.6))

    async def call() -> int:
        settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, lease_ttl=TTL)
        async with AsyncKeyPool(settings=settings) as apool:
            await apool.add_key("openai", "k1", secret, max_concurrency=1)
            auth = AsyncKeyPoolAuth(apool, "openai")
            async with httpx2.AsyncClient(base_url=stub.base_url, auth=auth) as client:
                body = {"model": "m", "messages": [{"role": "user", "content": "slow"}]}
                response = await client.post("/v1/chat/completions", json=body)
                return response.status_code

    assert watch(other, "openai", lambda: asyncio.run(call())) == [(1, False), (1, False)]
    k1 = other.stats("openai", "k1")
    assert k1.in_flight == 0 and k1.success_count == 1 and k1.tokens_used > 0


def test_a_dropped_async_response_is_reported_once(
    redis_url: str, namespace: str, make: Callable[..., KeyPool], stub: StubLLMServer
) -> None:
    other = make()
    secret = one_key([other], stub, "anthropic")
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}

    async def scenario() -> tuple[int, int]:
        settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, lease_ttl=TTL)
        async with AsyncKeyPool(settings=settings) as apool:
            await apool.add_key("anthropic", "k1", secret, max_concurrency=1)
            auth = AsyncKeyPoolAuth(apool, "anthropic")
            async with httpx2.AsyncClient(base_url=stub.base_url, auth=auth) as client:
                request = client.build_request(
                    "POST", "/v1/messages", json={**body, "stream": True}
                )
                response = await client.send(request, stream=True)
                during = (await apool.stats("anthropic", "k1")).in_flight
                del response
                gc.collect()
                for _ in range(100):
                    await asyncio.sleep(0.05)
                    if not (await apool.stats("anthropic", "k1")).in_flight:
                        break
                return during, (await apool.stats("anthropic", "k1")).in_flight

    assert asyncio.run(scenario()) == (1, 0)
    k1 = other.stats("anthropic", "k1")
    assert k1.success_count == 1 and k1.error_count == 0 and k1.total_requests == 1
