"""Token usage found as a body passes (``keypool.integrations._usage``), and the optional
imports of the integrations. No server, no store."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keypool.integrations._usage import Usage, UsageMeter, usage_of

ROOT = Path(__file__).resolve().parent.parent


def sse(*events: dict[str, object], done: bool = False) -> bytes:
    out = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    return out + (b"data: [DONE]\n\n" if done else b"")


def fed(meter: UsageMeter, data: bytes, size: int) -> UsageMeter:
    for start in range(0, len(data), size):
        meter.feed(data[start : start + size])
    return meter


@pytest.mark.parametrize("size", [1, 7, 1 << 16])
def test_openai_stream_usage_chunk_in_any_chunking(size: int) -> None:
    body = sse(
        {"choices": [{"delta": {"content": "hi"}}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
        done=True,
    )
    meter = fed(UsageMeter("text/event-stream; charset=utf-8"), body, size)
    assert meter.usage() == Usage(3, 4, 7)


def test_anthropic_stream_adds_message_start_and_message_delta() -> None:
    start = {
        "type": "message_start",
        "message": {
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}
        },
    }
    delta = {"type": "message_delta", "usage": {"output_tokens": 42}}
    meter = UsageMeter("text/event-stream")
    meter.feed(b"event: message_start\n" + sse(start))
    assert meter.usage() == Usage(15, 1)  # a stream closed here reports what it saw
    meter.feed(b'event: content_block_delta\ndata: {"type": "content_block_delta"}\n\n')
    meter.feed(b"event: message_delta\n" + sse(delta))
    assert meter.usage() == Usage(15, 42)


def test_gemini_stream_keeps_the_last_usage_metadata() -> None:
    events = [
        {
            "usageMetadata": {
                "promptTokenCount": 5,
                "candidatesTokenCount": n,
                "totalTokenCount": 5 + n,
            }
        }
        for n in (1, 2, 9)
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\r\n\r\n" for e in events)
    assert fed(UsageMeter("text/event-stream"), body, 5).usage() == Usage(5, 9, 14)


def test_ollama_ndjson_last_line_without_newline() -> None:
    body = b'{"done": false}\n{"done": true, "prompt_eval_count": 11, "eval_count": 9}'
    assert fed(UsageMeter("application/x-ndjson"), body, 4).usage() == Usage(11, 9)


def test_gzip_json_and_gzip_stream() -> None:
    payload = {"usage": {"input_tokens": 2, "output_tokens": 3}}
    meter = UsageMeter("application/json", "gzip")
    meter.feed(gzip.compress(json.dumps(payload).encode()))
    assert meter.usage() == Usage(2, 3)
    body = gzip.compress(sse({"usage": {"prompt_tokens": 1, "completion_tokens": 1}}))
    assert fed(UsageMeter("text/event-stream", "gzip"), body, 3).usage() == Usage(1, 1)


def test_what_is_not_usage() -> None:
    assert UsageMeter("text/plain").usage() is None
    meter = UsageMeter("application/json")
    meter.feed(b'{"usage": {"total_tokens": tr')  # cut short
    assert meter.usage() is None
    assert usage_of({"usage": {"total_tokens": True}}) is None
    assert usage_of({"response": {"usage": {"input_tokens": 4, "output_tokens": 6}}}) == Usage(4, 6)
    assert Usage(total_tokens=9).total == 9 and Usage(2, None).total == 2


def test_importing_the_integrations_package_imports_no_http_library() -> None:
    code = (
        "import sys, keypool, keypool.integrations\n"
        "for name in ('httpx', 'httpx2', 'openai', 'anthropic', 'google.genai'):\n"
        "    assert name not in sys.modules, name\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_httpx2_module_does_not_import_httpx() -> None:
    pytest.importorskip("httpx2")
    code = (
        "import sys, keypool.integrations.httpx2, keypool.integrations.anthropic\n"
        "assert 'httpx' not in sys.modules, 'httpx imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
