"""The gateway's parts on their own: upstream table, tokens, usage tap, request routing."""

from __future__ import annotations

import gzip
import json

import pytest

pytest.importorskip("httpx2")

from keypool import ConfigError
from keypool.integrations._usage import UsageMeter
from keypool.server.auth import TokenChecker, presented_tokens, strip_key_param
from keypool.server.routing import inspect_request
from keypool.server.upstreams import load_upstreams


def test_upstream_table_defaults_overrides_and_removal() -> None:
    table = load_upstreams(
        {
            "KEYPOOL_UPSTREAM_OLLAMA": "http://10.0.0.5:11434/",
            "KEYPOOL_UPSTREAM_MYLLM": "https://llm.example.com/api/",
            "KEYPOOL_UPSTREAM_COHERE": "off",
        }
    )
    assert table["openai"].origin == "https://api.openai.com"
    assert table["ollama"].origin == "http://10.0.0.5:11434"
    assert table["myllm"].base_path == "/api" and table["myllm"].auth_header == b"authorization"
    assert table["gemini"].auth_header == b"x-goog-api-key"
    assert "cohere" not in table and "azure_openai" not in table
    assert table["myllm"].target(b"/v1/x%2Fy") == b"/api/v1/x%2Fy"
    for bad in (b"/../x", b"/a/%2e%2e/b", b"/a/..%2f", b"/a\\b", b"/a/."):
        with pytest.raises(ValueError):
            table["myllm"].target(bad)


@pytest.mark.parametrize(
    "url",
    ["ftp://x", "http://", "http://user:pw@host", "http://host/?q=1", "http://host:99999"],
)
def test_bad_upstreams_are_refused_by_name(url: str) -> None:
    with pytest.raises(ConfigError, match="KEYPOOL_UPSTREAM_OPENAI"):
        load_upstreams({"KEYPOOL_UPSTREAM_OPENAI": url})
    with pytest.raises(ConfigError):
        load_upstreams({"KEYPOOL_UPSTREAM_BAD.NAME": "http://x"})


def test_tokens_in_every_place_and_constant_time_check() -> None:
    checker = TokenChecker(["t1", "t2"])
    assert "t1" not in repr(checker)
    headers = [(b"x-api-key", b"t2"), (b"authorization", b"Bearer nope")]
    assert checker.check(presented_tokens(headers, b""))
    assert not checker.check(presented_tokens([(b"authorization", b"Bearer t3")], b""))
    assert checker.check(presented_tokens([], b"alt=sse&key=t1"))
    assert strip_key_param(b"alt=sse&key=t1&monkey=3") == b"alt=sse&monkey=3"
    assert strip_key_param(b"a=1") == b"a=1"


def _tap(chunks: list[bytes], ctype: str, encoding: str = "") -> tuple[int | None, int | None]:
    tap = UsageMeter(ctype, encoding)  # the gateway's tap: the integrations' one parser
    for chunk in chunks:
        tap.feed(chunk)
    usage = tap.usage()
    return (None, None) if usage is None else (usage.input_tokens, usage.output_tokens)


def _split(data: bytes, size: int = 7) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def test_usage_of_openai_anthropic_gemini_ollama_streams_and_bodies() -> None:
    openai_sse = (
        b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}'
        b"\n\ndata: [DONE]\n\n"
    )
    assert _tap(_split(openai_sse), "text/event-stream") == (3, 4)
    anthropic_sse = (
        b'event: message_start\ndata: {"type":"message_start","message":{"usage":'
        b'{"input_tokens":25,"output_tokens":1}}}\n\n'
        b'event: content_block_delta\ndata: {"type":"content_block_delta"}\n\n'
        b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":15}}\n\n'
    )
    assert _tap(_split(anthropic_sse, 5), "text/event-stream; charset=utf-8") == (25, 15)
    gemini = json.dumps(
        {"usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": 6, "totalTokenCount": 11}}
    ).encode()
    assert _tap([gemini], "application/json") == (5, 6)
    ollama = b'{"done":false}\n{"done":true,"prompt_eval_count":8,"eval_count":9}'
    assert _tap(_split(ollama), "application/x-ndjson") == (8, 9)
    body = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}).encode()
    assert _tap(_split(gzip.compress(body)), "application/json", "gzip") == (1, 2)
    assert _tap([b"not json"], "application/json") == (None, None)
    assert _tap([b"\x00\x01"], "application/json", "br") == (None, None)


def test_model_and_estimate_from_the_request() -> None:
    body = json.dumps({"model": "gpt-4o", "max_tokens": 100, "messages": []}).encode()
    info = inspect_request(b"/v1/chat/completions", body, b"application/json")
    assert info.model == "gpt-4o" and info.tokens == len(body) // 4 + 100
    info = inspect_request(b"/v1beta/models/gemini-2.0-flash:generateContent", b"{}", b"")
    assert info.model == "gemini-2.0-flash"
    info = inspect_request(b"/openai/deployments/prod-4o/chat/completions", b"", b"")
    assert info.model == "prod-4o"
    assert inspect_request(b"/v1/x", b'{"model": ""}', b"application/json").model is None


def test_scopes_on_the_page_and_in_metrics_are_escaped_and_labelled() -> None:
    from keypool.server.metrics import GatewayMetrics
    from keypool.server.status import render_status_html, status_document
    from keypool.stats import ScopeStats

    now = 1_000.0
    cooling = ScopeStats(
        provider="openai",
        scope="key_model",
        account=None,
        key_id="k1",
        model="<b>m</b>",  # a model name comes from the client's request
        limits={},
        left={},
        in_flight=0,
        cooldown_until=now + 28,
        unavailable_reason="rate_limit",
        available_at=now + 28,
    )
    spent = ScopeStats(
        provider="openai",
        scope="account",
        account="proj-a",
        key_id=None,
        model=None,
        limits={"rpd": 100, "max_concurrency": 4},
        left={"rpd": 0},
        in_flight=1,
        cooldown_until=None,
        unavailable_reason="rpd",
        available_at=now + 600,
    )
    upstreams = load_upstreams({})
    page = render_status_html(
        [], upstreams, store="s", namespace="n", now=now, scopes=[cooling, spent]
    )
    assert "<b>m</b>" not in page and "&lt;b&gt;m&lt;/b&gt;" in page
    row = page.split('id="scope-openai-account-proj-a"', 1)[1].split("</tr>", 1)[0]
    assert 'class="state exhausted"' in row and "rpd 0 / 100" in row
    assert "concurrency 1 / 4" in row and "600.0 s" in row
    doc = status_document([], upstreams, now=now, scopes=[cooling, spent])["providers"]["openai"]
    assert [(c["scope"], c["owner"], c["state"], c["cooldown_left"]) for c in doc["scopes"]] == [
        ("account", "proj-a", "exhausted", 600.0),
        ("key_model", "k1", "cooling", 28.0),
    ]
    text = GatewayMetrics().render([], [cooling, spent]).decode()
    assert (
        'keypool_scope_state{account="proj-a",key_id="",model="",provider="openai",'
        'scope="account",state="exhausted"} 1.0' in text
    )
    assert (
        'keypool_scope_budget_left{account="proj-a",budget="max_concurrency",key_id="",'
        'model="",provider="openai",scope="account"} 3.0' in text
    )
    assert 'model="<b>m</b>",provider="openai",reason="rate_limit",scope="key_model"} 1.0' in text
