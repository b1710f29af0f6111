"""The gateway in one process on the embedded store: pass-through, credentials, retries,
streaming, disconnects, limits, and the read-only routes."""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.test_server_support import ServerThread, StreamStub, raw_connection, wait_for

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from keypool import AsyncKeyPool, ConfigError, KeyPoolSettings  # noqa: E402
from keypool.server import GatewaySettings, create_app  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.stub_llm_server import StubLLMServer, openai_429, server_error  # noqa: E402

TOKEN = "kp-test-token-" + "x" * 16
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class EchoStub:
    """An upstream that answers every request with what it received, as JSON."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            await receive()
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        call = {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "headers": [[n.decode(), v.decode()] for n, v in scope["headers"]],
            "body": body.decode(),
        }
        self.calls.append(call)
        data = json.dumps(call).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"x-upstream", b"echo")],
            }
        )
        await send({"type": "http.response.body", "body": data})


Gateway = Callable[..., ServerThread]


@pytest.fixture
def gateway(namespace: str) -> Iterator[Gateway]:
    """Start gateways on the embedded store: ``gateway(environ, **gateway_settings)``."""
    started: list[ServerThread] = []

    def start(
        environ: dict[str, str], pool: AsyncKeyPool | None = None, **options: Any
    ) -> ServerThread:
        options.setdefault("proxy_tokens", TOKEN)
        settings = KeyPoolSettings(redis_url=f"memory://{namespace}", namespace=namespace)
        app = create_app(settings, gateway=GatewaySettings(**options), environ=environ, pool=pool)
        server = ServerThread(app).__enter__()
        server.app = app  # type: ignore[attr-defined]
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__()


def stats_of(server: ServerThread, provider: str = "openai") -> dict[str, dict[str, Any]]:
    doc = httpx.get(server.url + "/status.json", headers=AUTH).json()
    return {k["key_id"]: k for k in doc["providers"][provider]["keys"]}


@pytest.fixture
def echo() -> Iterator[tuple[EchoStub, ServerThread]]:
    stub = EchoStub()
    with ServerThread(stub) as server:
        yield stub, server


# --------------------------------------------------------------------------- pass-through


def test_forwards_unchanged_with_the_leased_key_and_without_client_credentials(
    gateway: Gateway, echo: tuple[EchoStub, ServerThread]
) -> None:
    _, upstream = echo
    gw = gateway({"OPENAI_K1_KEY": "sk-one", "KEYPOOL_UPSTREAM_OPENAI": upstream.url + "/base"})
    body = b'{"model": "gpt-4o", "messages": []}'
    r = httpx.post(
        gw.url + "/openai/v1/chat/completions%3Ax?a=1&b=%20two",
        content=body,
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "x-api-key": TOKEN,
            "x-goog-api-key": TOKEN,
            "api-key": TOKEN,
            "Connection": "keep-alive, x-private",
            "x-private": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic abc",
            "x-custom": "kept",
            "content-type": "application/json",
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-upstream"] == "echo"
    assert r.headers["x-keypool-key-id"] == "k1"
    seen = r.json()
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/base/v1/chat/completions%3Ax"
    assert seen["query"] == "a=1&b=%20two"
    assert seen["body"] == body.decode()
    headers = dict(seen["headers"])
    assert headers["authorization"] == "Bearer sk-one"
    assert headers["x-custom"] == "kept"
    assert headers["host"] == upstream.url.removeprefix("http://")
    for gone in ("x-api-key", "x-goog-api-key", "api-key", "x-private", "keep-alive", "te"):
        assert gone not in headers
    assert "proxy-authorization" not in headers
    assert TOKEN not in json.dumps(seen)


def test_provider_auth_headers(gateway: Gateway, echo: tuple[EchoStub, ServerThread]) -> None:
    _, upstream = echo
    gw = gateway(
        {
            "ANTHROPIC_API_KEY": "sk-ant",
            "GEMINI_API_KEY": "g-key",
            "AZURE_OPENAI_API_KEY": "az-key",
            "KEYPOOL_UPSTREAM_ANTHROPIC": upstream.url,
            "KEYPOOL_UPSTREAM_GEMINI": upstream.url,
            "KEYPOOL_UPSTREAM_AZURE_OPENAI": upstream.url,
        }
    )
    ant = httpx.post(
        gw.url + "/anthropic/v1/messages", json={"model": "c"}, headers={"x-api-key": TOKEN}
    )
    headers = dict(ant.json()["headers"])
    assert headers["x-api-key"] == "sk-ant" and headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    gem = httpx.post(
        gw.url + f"/gemini/v1beta/models/gemini-2.0-flash:generateContent?key={TOKEN}&alt=sse",
        json={"contents": []},
    )
    assert gem.status_code == 200, gem.text
    assert dict(gem.json()["headers"])["x-goog-api-key"] == "g-key"
    assert gem.json()["query"] == "alt=sse"
    az = httpx.post(
        gw.url + "/azure_openai/openai/deployments/d1/chat/completions?api-version=2024-06-01",
        json={},
        headers={"api-key": TOKEN},
    )
    assert dict(az.json()["headers"])["api-key"] == "az-key"


def test_openai_sdk_through_the_gateway_counts_usage(gateway: Gateway) -> None:
    with StubLLMServer({"sk-1": "k1", "sk-2": "k2"}) as stub:
        gw = gateway(
            {
                "OPENAI_K1_KEY": "sk-1",
                "OPENAI_K2_KEY": "sk-2",
                "KEYPOOL_UPSTREAM_OPENAI": stub.base_url,
            }
        )
        client = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=TOKEN, max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
        )
        assert reply.usage is not None and reply.usage.total_tokens == 7
        chunks = list(
            client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "hello there"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].usage is not None
        assert sorted(stub.key_ids()) == ["k1", "k2"]
        wait_for(lambda: sum(k["tokens_used"] for k in stats_of(gw).values()) == 14)
        keys = stats_of(gw)
        assert [k["success_count"] for k in keys.values()] == [1, 1]
        assert all(k["in_flight"] == 0 for k in keys.values())


def test_model_routing_from_the_body_and_the_path(gateway: Gateway) -> None:
    with StubLLMServer({"g1": "g1", "g2": "g2", "sk-1": "k1", "sk-2": "k2"}) as stub:
        pool = AsyncKeyPool(
            settings=KeyPoolSettings(redis_url="memory://routing-" + uuid.uuid4().hex)
        )
        gw = gateway(
            {
                "GEMINI_G1_KEY": "g1",
                "GEMINI_G2_KEY": "g2",
                "OPENAI_K1_KEY": "sk-1",
                "OPENAI_K2_KEY": "sk-2",
                "KEYPOOL_UPSTREAM_GEMINI": stub.base_url,
                "KEYPOOL_UPSTREAM_OPENAI": stub.base_url,
            },
            pool=pool,
        )
        httpx.get(gw.url + "/readyz")

        async def assign() -> None:
            await pool.load_env(
                {
                    "GEMINI_G1_KEY": "g1",
                    "GEMINI_G2_KEY": "g2",
                    "OPENAI_K1_KEY": "sk-1",
                    "OPENAI_K2_KEY": "sk-2",
                }
            )
            await pool.assign_model("gemini-pro", "gemini", "g2")
            await pool.assign_model("gpt-big", "openai", "k1")

        _run_in_loop(gw, assign())
        for _ in range(4):
            r = httpx.post(
                gw.url + "/gemini/v1beta/models/gemini-pro:generateContent",
                json={"contents": [{"parts": [{"text": "hi"}]}]},
                headers={"x-goog-api-key": TOKEN},
            )
            assert r.status_code == 200, r.text
            r = httpx.post(
                gw.url + "/openai/v1/chat/completions",
                json={"model": "gpt-big", "messages": [{"role": "user", "content": "x"}]},
                headers=AUTH,
            )
            assert r.status_code == 200, r.text
        assert stub.key_ids("gemini") == ["g2"] * 4
        assert stub.key_ids("openai") == ["k1"] * 4


def _run_in_loop(server: ServerThread, coro: Any) -> Any:
    """Run a coroutine on the gateway's own event loop (where its pool lives)."""
    import asyncio

    return asyncio.run_coroutine_threadsafe(coro, server.loop).result(10)


# --------------------------------------------------------------------------- who gets in


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"x-api-key": "wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"x-goog-api-key": TOKEN[:-1]},
    ],
)
def test_requests_without_a_valid_token_are_refused(
    gateway: Gateway, headers: dict[str, str]
) -> None:
    with StubLLMServer({"sk-1": "k1"}) as stub:
        gw = gateway({"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": stub.base_url})
        r = httpx.post(gw.url + "/openai/v1/chat/completions", json={"model": "m"}, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_proxy_token"
        for path in ("/status", "/status.json", "/metrics"):
            assert httpx.get(gw.url + path, headers=headers).status_code == 401
        assert stub.calls == []


def test_every_token_location_is_accepted(
    gateway: Gateway, echo: tuple[EchoStub, ServerThread]
) -> None:
    _, upstream = echo
    gw = gateway(
        {"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": upstream.url},
        proxy_tokens=f"other-token, {TOKEN}",
    )
    for headers in (
        {"Authorization": f"Bearer {TOKEN}"},
        {"x-api-key": TOKEN},
        {"x-goog-api-key": TOKEN},
        {"api-key": TOKEN},
        {"Authorization": "Basic " + base64.b64encode(f"me:{TOKEN}".encode()).decode()},
    ):
        assert httpx.get(gw.url + "/openai/v1/models", headers=headers).status_code == 200
    assert httpx.get(gw.url + f"/openai/v1/models?key={TOKEN}").status_code == 200


def test_no_path_reaches_an_unconfigured_host(
    gateway: Gateway, echo: tuple[EchoStub, ServerThread]
) -> None:
    _, upstream = echo
    decoy = EchoStub()
    with ServerThread(decoy) as evil:
        host = f"127.0.0.1:{evil.port}"
        gw = gateway({"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": upstream.url + "/v"})
        statuses = {}
        for path in (
            f"/openai//{host}/x",
            f"/openai/@{host}/x",
            f"/openai/..%2f..%2f{host}",
            "/openai/../x",
            "/openai/%2e%2e/x",
            f"/http://{host}/x",
            f"/{host}/x",
            "/custom/x",
            "/azure_openai/openai/deployments/d/chat/completions",
            f"/openai\\@{host}/x",
        ):
            r = httpx.get(gw.url + path, headers={**AUTH, "Host": host, "X-Forwarded-Host": host})
            statuses[path] = r.status_code
        with raw_connection(gw.port) as sock:  # absolute-form request target
            sock.sendall(
                f"GET http://{host}/x HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}"
                "\r\nConnection: close\r\n\r\n".encode()
            )
            answer = _read_all(sock)
        assert decoy.calls == []
        assert statuses["/custom/x"] == 404
        assert statuses["/azure_openai/openai/deployments/d/chat/completions"] == 404
        assert statuses["/openai/../x"] in (400, 404)
        assert statuses[f"/openai/..%2f..%2f{host}"] == 400
        assert answer.startswith(b"HTTP/1.1 4"), answer[:60]
        # paths that were forwarded stayed on the configured host, under its base path
        assert all(c["raw_path"].startswith("/v/") for c in echo[0].calls)


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


# --------------------------------------------------------------------------- failures


def test_a_429_is_retried_on_another_key_and_the_key_cools_for_that_model(
    gateway: Gateway,
) -> None:
    with StubLLMServer({"sk-1": "k1", "sk-2": "k2"}) as stub:
        gw = gateway(
            {
                "OPENAI_K1_KEY": "sk-1",
                "OPENAI_K2_KEY": "sk-2",
                "KEYPOOL_UPSTREAM_OPENAI": stub.base_url,
            }
        )
        stub.plan("sk-1", openai_429(reset_requests="30s", retry_after=30))
        stub.plan("sk-2", server_error(503))
        client = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=TOKEN, max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        for _ in range(3):
            client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
        # first request: k1 429 -> k2 503 -> k2 ok; the next two: k2 (k1 cools for m)
        assert stub.key_ids() == ["k1", "k2", "k2", "k2", "k2"]
        keys = stats_of(gw)
        # the key itself still serves: only (k1, m) cools
        assert keys["k1"]["status"] == "active" and keys["k1"]["cooldown_left"] is None
        assert keys["k1"]["cooling_models_left"]["m"] > 20
        assert set(keys["k1"]["cooling_models"]) == {"m"}
        assert keys["k2"]["errors_by_kind"] == {"server": 1} and keys["k2"]["cooling_models"] == {}
        scopes = httpx.get(gw.url + "/status.json", headers=AUTH).json()["providers"]["openai"]
        (cooled,) = [c for c in scopes["scopes"] if c["scope"] == "key_model"]
        assert (cooled["key_id"], cooled["model"], cooled["state"]) == ("k1", "m", "cooling")
        assert cooled["unavailable_reason"] == "rate_limit" and cooled["cooldown_left"] > 20
        # another model is served by both keys again
        stub.clear()
        for _ in range(2):
            client.chat.completions.create(model="other", messages=messages)  # type: ignore[arg-type]
        assert sorted(stub.key_ids()) == ["k1", "k2"]
        stub.clear()
        client.chat.completions.create(model="m", messages=messages)  # type: ignore[arg-type]
        assert stub.key_ids() == ["k2"]


def test_no_key_answers_429_with_retry_after(gateway: Gateway) -> None:
    with StubLLMServer({"sk-1": "k1"}) as stub:
        gw = gateway({"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": stub.base_url})
        stub.plan("sk-1", openai_429(reset_requests=None, retry_after=40))
        first = httpx.post(
            gw.url + "/openai/v1/chat/completions", json={"model": "m"}, headers=AUTH
        )
        assert first.status_code == 429  # the provider's own answer: no other key to try
        assert first.json()["error"]["code"] == "rate_limit_exceeded"
        second = httpx.post(
            gw.url + "/openai/v1/chat/completions", json={"model": "m"}, headers=AUTH
        )
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "no_key_available"
        assert 35 <= int(second.headers["retry-after"]) <= 40
        assert len(stub.calls) == 1


def test_connection_errors_are_retried_then_502(gateway: Gateway) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw = gateway(
        {"OPENAI_K1_KEY": "sk-1", "OPENAI_K2_KEY": "sk-2", "KEYPOOL_UPSTREAM_OPENAI": dead},
        proxy_max_attempts=2,
    )
    r = httpx.post(gw.url + "/openai/v1/chat/completions", json={"model": "m"}, headers=AUTH)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"
    keys = stats_of(gw)
    assert sorted(k["errors_by_kind"].get("connection", 0) for k in keys.values()) == [1, 1]
    assert all(k["in_flight"] == 0 for k in keys.values())


def test_body_size_is_bounded(gateway: Gateway, echo: tuple[EchoStub, ServerThread]) -> None:
    stub, upstream = echo
    gw = gateway(
        {"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": upstream.url}, proxy_max_body=4096
    )
    r = httpx.post(gw.url + "/openai/v1/x", content=b"x" * 5000, headers=AUTH)
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 1000

    r = httpx.post(gw.url + "/openai/v1/x", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert stub.calls == []


# --------------------------------------------------------------------------- streaming


def test_stream_flows_through_as_it_arrives_and_usage_is_counted(gateway: Gateway) -> None:
    stub = StreamStub()
    with ServerThread(stub) as upstream:
        gw = gateway({"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": upstream.url})
        body = {"model": "m", "stream": True, "messages": []}
        with httpx.stream(
            "POST", gw.url + "/openai/v1/chat/completions", json=body, headers=AUTH
        ) as r:
            assert r.status_code == 200
            assert "content-length" not in r.headers
            lines = r.iter_lines()
            for i in range(3):
                stub.release()  # the upstream sends one chunk only now ...
                line = next(line for line in lines if line)
                assert f"w{i}" in line  # ... and the client has it before the next
                assert not stub.finished.is_set()
                assert stats_of(gw)["k1"]["in_flight"] == 1  # the lease lives on
            stub.release()
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"
        key = wait_for(lambda: (k := stats_of(gw)["k1"])["success_count"] == 1 and k)
        assert key["tokens_used"] == 14 and key["in_flight"] == 0


def test_the_lease_lives_until_the_last_byte(gateway: Gateway, namespace: str) -> None:
    stub = StreamStub()
    with ServerThread(stub) as upstream:
        settings = KeyPoolSettings(
            redis_url=f"memory://{namespace}", namespace=namespace, lease_ttl=0.6
        )
        pool = AsyncKeyPool(settings=settings)
        gw = gateway({"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": upstream.url}, pool=pool)
        _run_in_loop(gw, pool.load_env({"OPENAI_K1_KEY": "sk-1"}))
        body = {"model": "m", "stream": True}
        with httpx.stream(
            "POST", gw.url + "/openai/v1/chat/completions", json=body, headers=AUTH
        ) as r:
            lines = r.iter_lines()
            for _ in range(3):  # 2.4 s: four lease TTLs
                stub.release()
                next(line for line in lines if line)
                time.sleep(0.8)
                assert stats_of(gw)["k1"]["in_flight"] == 1
            stub.release()
            list(lines)
        key = wait_for(lambda: (k := stats_of(gw)["k1"])["success_count"] == 1 and k)
        assert key["tokens_used"] == 14 and key["in_flight"] == 0


def test_client_disconnect_mid_stream_releases_the_lease_once(gateway: Gateway) -> None:
    stub = StreamStub(endless=True)
    with ServerThread(stub) as upstream:
        gw = gateway({"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": upstream.url})
        body = json.dumps({"model": "m", "stream": True}).encode()
        with raw_connection(gw.port) as sock:
            sock.sendall(
                b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            stub.release(2)
            got = b""
            while b"w1" not in got:
                got += sock.recv(65536)
            assert stats_of(gw)["k1"]["in_flight"] == 1
        wait_for(stub.cancelled.is_set)  # the gateway hung up on the upstream too
        key = wait_for(lambda: (k := stats_of(gw)["k1"])["in_flight"] == 0 and k)
        assert key["success_count"] == 0 and key["error_count"] == 0
        assert key["total_requests"] == 1


# --------------------------------------------------------------------------- other routes


def test_health_metrics_and_status_show_no_secret(gateway: Gateway) -> None:
    secrets = {"OPENAI_K1_KEY": "sk-secret-one-123456", "OPENAI_K2_KEY": "sk-secret-two-654321"}
    with StubLLMServer({"sk-secret-one-123456": "k1", "sk-secret-two-654321": "k2"}) as stub:
        gw = gateway({**secrets, "KEYPOOL_UPSTREAM_OPENAI": stub.base_url})
        stub.plan("sk-secret-one-123456", openai_429(retry_after=30))
        r = httpx.post(
            gw.url + "/openai/v1/chat/completions",
            json={"model": "m", "messages": [{"role": "user", "content": "a b"}]},
            headers=AUTH,
        )
        assert r.status_code == 200
        assert httpx.get(gw.url + "/healthz").text == "ok\n"
        assert httpx.get(gw.url + "/readyz").status_code == 200
        metrics = httpx.get(gw.url + "/metrics", headers=AUTH)
        status = httpx.get(gw.url + "/status", headers=AUTH)
        doc = httpx.get(gw.url + "/status.json", headers=AUTH)
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    # the 429 came on a lease for model m: k1 cools for m only, and stays active
    assert 'keypool_key_state{key_id="k1",provider="openai",scope="key",state="active"} 1.0' in text
    assert (
        'keypool_scope_state{account="",key_id="k1",model="m",provider="openai",'
        'scope="key_model",state="cooling"} 1.0' in text
    )
    assert (
        'keypool_scope_unavailable{account="",key_id="k1",model="m",provider="openai",'
        'reason="rate_limit",scope="key_model"} 1.0' in text
    )
    cooldown = re.search(
        r'keypool_scope_cooldown_seconds\{account="",key_id="k1",model="m",'
        r'provider="openai",scope="key_model"\} ([0-9.]+)',
        text,
    )
    assert cooldown and 20 < float(cooldown.group(1)) <= 30
    assert (
        'keypool_key_errors_total{key_id="k1",kind="rate_limit",provider="openai",scope="key"} 1.0'
        in text
    )
    assert 'keypool_key_requests_total{key_id="k2",provider="openai",scope="key"} 1.0' in text
    assert 'keypool_key_input_tokens_total{key_id="k2",provider="openai",scope="key"}' in text
    assert 'keypool_key_output_tokens_total{key_id="k2",provider="openai",scope="key"}' in text
    assert "keypool_key_cooldown_seconds" in text and "keypool_key_in_flight" in text
    assert 'keypool_proxy_request_duration_seconds_bucket{le="0.5",provider="openai"}' in text
    assert 'keypool_proxy_requests_total{code="200",provider="openai"} 1.0' in text
    assert 'keypool_proxy_upstream_failures_total{kind="rate_limit",provider="openai"} 1.0' in text
    page = status.text
    assert status.headers["content-type"].startswith("text/html")
    assert 'http-equiv="refresh"' in page and "k1" in page
    row = page.split('id="key-openai-k1"', 1)[1].split("</tr>", 1)[0]
    assert 'class="state active"' in row
    assert re.search(r"cooling for m, (2\d|30) s", row), row
    scope_row = page.split('id="scope-openai-key_model-k1-m"', 1)[1].split("</tr>", 1)[0]
    assert 'class="state cooling"' in scope_row and "rate_limit" in scope_row
    keys = {k["key_id"]: k for k in doc.json()["providers"]["openai"]["keys"]}
    assert keys["k1"]["status"] == "active" and "fingerprint" not in keys["k1"]
    assert set(keys["k1"]["cooling_models"]) == {"m"}
    for secret in secrets.values():
        for shown in (text, page, doc.text):
            assert secret not in shown
    assert TOKEN not in text + page + doc.text


def test_status_can_be_public(gateway: Gateway) -> None:
    gw = gateway({"OPENAI_K1_KEY": "sk-1"}, status_public=True)
    assert httpx.get(gw.url + "/status").status_code == 200
    assert httpx.get(gw.url + "/openai/v1/models").status_code == 401


def test_readyz_fails_when_the_store_is_unreachable() -> None:
    settings = KeyPoolSettings(
        redis_url=f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, connect_timeout=0.5
    )
    app = create_app(settings, gateway=GatewaySettings(proxy_tokens=TOKEN), environ={})
    # no lifespan startup: the first request opens the pool
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started)
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 503
    finally:
        server.should_exit = True
        thread.join(10)


# --------------------------------------------------------------------------- start-up


def test_starting_without_tokens_is_refused() -> None:
    with pytest.raises(ConfigError, match="KEYPOOL_PROXY_TOKENS"):
        create_app(KeyPoolSettings(), gateway=GatewaySettings(), environ={})
    create_app(KeyPoolSettings(), gateway=GatewaySettings(proxy_no_auth=True), environ={})


def test_serve_refuses_no_auth_off_loopback() -> None:
    from keypool.cli import EXIT_CONFIG, main

    assert main(["serve", "--host", "0.0.0.0", "--port", "9"]) == EXIT_CONFIG
    assert main(["serve", "--host", "0.0.0.0", "--port", "9", "--no-auth"]) == EXIT_CONFIG
    assert main(["serve", "--host", "10.1.2.3", "--no-auth"]) == EXIT_CONFIG


def test_no_auth_serves_loopback_clients(
    gateway: Gateway, echo: tuple[EchoStub, ServerThread]
) -> None:
    _, upstream = echo
    gw = gateway(
        {"OPENAI_K1_KEY": "sk-1", "KEYPOOL_UPSTREAM_OPENAI": upstream.url},
        proxy_tokens="",
        proxy_no_auth=True,
    )
    r = httpx.get(gw.url + "/openai/v1/models", headers={"Authorization": "Bearer anything"})
    assert r.status_code == 200
    assert dict(r.json()["headers"])["authorization"] == "Bearer sk-1"


def test_importing_keypool_does_not_import_the_server() -> None:
    code = (
        "import sys, keypool, keypool.cli; "
        "bad = [m for m in ('uvicorn', 'httpx2', 'prometheus_client', 'keypool.server') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
