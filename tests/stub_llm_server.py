"""A small local HTTP server that answers like LLM provider APIs, for tests and examples.

Runs on 127.0.0.1 (a free port by default) in a background thread::

    with StubLLMServer({"secret-1": "k1", "secret-2": "k2"}) as stub:
        stub.plan("secret-1", gemini_429(retry_after=20))   # k1's next answer
        httpx.post(stub.base_url + "/v1beta/models/m:generateContent", ...)
        stub.key_ids()                                       # ["k1", ...]: who called

Routes (all ``POST``, JSON in and out):

- Ollama ``/api/chat``: ``{"model", "messages", "stream"}``; ``stream`` missing or true gives
  NDJSON chunks, the last with ``done`` and the counts. Ollama takes no key, but this one
  stands for an Ollama behind a proxy: it wants ``Authorization: Bearer`` unless the server
  was made with ``ollama_needs_key=False``.
- Gemini ``/v1beta/models/{model}:generateContent`` (or ``/v1/``): key in
  ``x-goog-api-key`` (or ``?key=``); reply with ``candidates`` and ``usageMetadata``.
  ``:streamGenerateContent`` (``?alt=sse``) gives one SSE event per word, each with the
  ``usageMetadata`` so far.
- OpenAI-like ``/v1/chat/completions`` (Bearer): a ``chat.completion`` with ``usage``;
  ``"stream": true`` gives SSE chunks, the last one with ``usage``, then ``[DONE]``.
- Anthropic-like ``/v1/messages`` (``x-api-key``; ``anthropic-version`` required);
  ``"stream": true`` gives the Messages API's events: the input tokens in
  ``message_start``, the output tokens in ``message_delta``.
- ``/echo``: 200 ``{"ok": true}`` for a known key in any of the usual auth headers, to look
  at the headers other providers get.

``gzip=True``: bodies are gzip-compressed for clients that accept it, as real APIs do.

A key unknown to the server gets a 401 in the route's error shape. Planned replies (per key,
in order) replace the normal answer: see :class:`Reply` and the helpers below. Every request
is recorded as a :class:`Call` (the keys are fake, so the record holds them).

Run it by hand: ``python tests/stub_llm_server.py --port 8080 --key demo=secret``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "Call",
    "Reply",
    "StubLLMServer",
    "anthropic_429",
    "drop_connection",
    "fake_secret",
    "gemini_429",
    "gemini_daily_quota",
    "gemini_invalid_key",
    "gemini_rate_limit_retry_info",
    "openai_429",
    "openai_insufficient_quota",
    "register",
    "server_error",
    "slow",
]

AUTH_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "api-key")
_GEMINI = re.compile(
    r"/v1(?:beta)?/models/(?P<model>[^/:]+):(?P<method>generateContent|streamGenerateContent)"
)


@dataclass(frozen=True)
class Reply:
    """A planned answer. ``body`` None: the route's normal answer (status 200) or its error
    shape (other statuses). ``delay``: seconds to wait first. ``chunk_delay``: seconds
    between the chunks of a streamed answer. ``drop``: close the connection without
    answering (the client sees a transport error)."""

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    chunk_delay: float = 0.0
    drop: bool = False


@dataclass(frozen=True)
class Call:
    """One request as the server saw it."""

    method: str
    path: str
    route: str  # "ollama" | "gemini" | "openai" | "anthropic" | "echo" | "unknown"
    key: str | None  # the key the route's auth header carried
    key_id: str | None  # the label given with the key, None when unknown to the server
    auth_headers: tuple[str, ...]  # which of the usual auth headers were present
    headers: dict[str, str]  # lower-cased names
    body: Any
    status: int
    total_tokens: int | None


# --------------------------------------------------------------------------- planned replies


def gemini_429(retry_after: float | None = 2) -> Reply:
    """Gemini's rate-limit answer; ``Retry-After`` when given."""
    headers = {} if retry_after is None else {"Retry-After": _num(retry_after)}
    body = {
        "error": {
            "code": 429,
            "message": "Resource has been exhausted (e.g. check quota).",
            "status": "RESOURCE_EXHAUSTED",
        }
    }
    return Reply(429, body, headers)


def gemini_daily_quota(retry_delay: str = "30s") -> Reply:
    """Gemini's answer when a per-day quota is spent (no header; the delay is in the body)."""
    body = {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota, please check your plan and billing.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": "generativelanguage.googleapis.com/"
                            "generate_content_free_tier_requests",
                            "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                        }
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
            ],
        }
    }
    return Reply(429, body)


def gemini_rate_limit_retry_info(retry_delay: str = "20s") -> Reply:
    """Gemini's per-minute limit answer, with the delay only in ``RetryInfo``."""
    body = {
        "error": {
            "code": 429,
            "message": "You exceeded your current quota.",
            "status": "RESOURCE_EXHAUSTED",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {"quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"}
                    ],
                },
                {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": retry_delay},
            ],
        }
    }
    return Reply(429, body)


def gemini_invalid_key() -> Reply:
    """What Gemini really answers for a bad key: 400 INVALID_ARGUMENT, reason API_KEY_INVALID."""
    body = {
        "error": {
            "code": 400,
            "message": "API key not valid. Please pass a valid API key.",
            "status": "INVALID_ARGUMENT",
            "details": [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ],
        }
    }
    return Reply(400, body)


def openai_429(reset_requests: str | None = "2s", retry_after: float | None = 2) -> Reply:
    """OpenAI's rate-limit answer with its ``x-ratelimit-*`` headers."""
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-limit-requests": "60"}
    if reset_requests is not None:
        headers["x-ratelimit-reset-requests"] = reset_requests
    if retry_after is not None:
        headers["retry-after"] = _num(retry_after)
    body = {
        "error": {
            "message": "Rate limit reached for requests",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    return Reply(429, body, headers)


def anthropic_429(retry_after: float = 2) -> Reply:
    """Anthropic's rate-limit answer, with ``retry-after`` and its reset headers."""
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + retry_after))
    headers = {
        "retry-after": _num(retry_after),
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset,
    }
    body = {"type": "error", "error": {"type": "rate_limit_error", "message": "rate limited"}}
    return Reply(429, body, headers)


def openai_insufficient_quota() -> Reply:
    """OpenAI's 429 when the account's credit is spent."""
    body = {
        "error": {
            "message": "You exceeded your current quota, please check your plan and billing.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        }
    }
    return Reply(429, body)


def server_error(status: int = 500) -> Reply:
    return Reply(status, {"error": {"message": "internal error", "type": "server_error"}})


def slow(seconds: float) -> Reply:
    """The normal answer, after ``seconds``."""
    return Reply(delay=seconds)


def drop_connection() -> Reply:
    return Reply(drop=True)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# --------------------------------------------------------------------------- answers


def _words(text: object) -> int:
    return len(str(text).split()) if text else 0


def _reply_text(prompt: str) -> str:
    return f"stub answer to: {prompt}" if prompt else "stub answer"


def _last_user_text(messages: object) -> tuple[str, int]:
    """(the last user message, the words of all messages)."""
    last, count = "", 0
    for message in messages if isinstance(messages, list) else ():
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, list):  # content blocks
            content = " ".join(str(b.get("text", "")) for b in content if isinstance(b, Mapping))
        count += _words(content)
        if message.get("role") == "user":
            last = str(content or "")
    return last, count


def _gemini_prompt(body: Mapping[str, Any]) -> tuple[str, int]:
    last, count = "", 0
    for content in body.get("contents") or ():
        if not isinstance(content, Mapping):
            continue
        text = " ".join(
            str(p.get("text", "")) for p in content.get("parts") or () if isinstance(p, Mapping)
        )
        count += _words(text)
        if content.get("role", "user") == "user":
            last = text
    return last, count


def _error_body(route: str, status: int, message: str) -> Any:
    if route == "gemini":
        names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED"}
        names.update({404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"})
        return {"error": {"code": status, "message": message, "status": names.get(status, "")}}
    if route == "anthropic":
        kinds = {401: "authentication_error", 429: "rate_limit_error", 500: "api_error"}
        kind = kinds.get(status, "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    if route == "ollama":
        return {"error": message}
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


# --------------------------------------------------------------------------- the server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.server.stub._serve(self)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], stub: StubLLMServer) -> None:
        self.stub = stub
        super().__init__(address, _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the client went away first (a timeout, a cancelled request)
        super().handle_error(request, client_address)


class StubLLMServer:
    """The server. ``keys`` maps each known secret to a label (or is a list of secrets,
    labelled by themselves). Use it as a context manager, or :meth:`start`/:meth:`stop`."""

    def __init__(
        self,
        keys: Mapping[str, str] | Iterable[str] = (),
        *,
        port: int = 0,
        ollama_needs_key: bool = True,
        gzip: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}
        self._plans: dict[str, deque[Reply]] = {}
        self._calls: list[Call] = []
        self._port = port
        self.ollama_needs_key = ollama_needs_key
        self.gzip = gzip
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        items = keys.items() if isinstance(keys, Mapping) else ((k, k) for k in keys)
        for secret, label in items:
            self.add_key(secret, label)

    # ------------------------------------------------------------------ control

    def start(self) -> StubLLMServer:
        self._server = _Server(("127.0.0.1", self._port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> StubLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "the server is not running"
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_key(self, secret: str, key_id: str | None = None) -> None:
        with self._lock:
            self._keys[secret] = key_id or secret

    def remove_key(self, secret: str) -> None:
        with self._lock:
            self._keys.pop(secret, None)

    def plan(self, secret: str, *replies: Reply) -> None:
        """Queue answers for requests made with ``secret`` (the key must be known)."""
        with self._lock:
            self._plans.setdefault(secret, deque()).extend(replies)

    @property
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def key_ids(self, route: str | None = None) -> list[str | None]:
        """The label of the key each request used, in order (None: unknown key)."""
        return [c.key_id for c in self.calls if route is None or c.route == route]

    def clear(self) -> None:
        with self._lock:
            self._calls.clear()

    # ------------------------------------------------------------------ serving

    def _serve(self, handler: _Handler) -> None:
        parts = urlsplit(handler.path)
        path = parts.path
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {name.lower(): value for name, value in handler.headers.items()}
        route = self._route(handler.command, path)
        key = self._key_for(route, headers, parse_qs(parts.query))
        present = tuple(h for h in AUTH_HEADERS if h in headers)
        with self._lock:
            key_id = self._keys.get(key) if key is not None else None
            planned = self._plans.get(key) if key_id is not None and key is not None else None
            reply = planned.popleft() if planned else None

        status, payload, extra, stream, tokens = self._answer(
            route, path, body, headers, key_id, reply
        )
        call = Call(
            method=handler.command,
            path=path,
            route=route,
            key=key,
            key_id=key_id,
            auth_headers=present,
            headers=headers,
            body=body,
            status=status,
            total_tokens=tokens,
        )
        with self._lock:
            self._calls.append(call)

        if reply is not None and reply.delay:
            time.sleep(reply.delay)
        if reply is not None and reply.drop:
            handler.close_connection = True
            return
        compress = self.gzip and "gzip" in headers.get("accept-encoding", "")
        pause = reply.chunk_delay if reply is not None else 0.0
        self._send(handler, status, payload, extra, stream, compress, pause)

    @staticmethod
    def _route(method: str, path: str) -> str:
        if method != "POST":
            return "unknown"
        if path == "/api/chat":
            return "ollama"
        if _GEMINI.fullmatch(path):
            return "gemini"
        if path == "/v1/chat/completions":
            return "openai"
        if path == "/v1/messages":
            return "anthropic"
        if path == "/echo":
            return "echo"
        return "unknown"

    def _key_for(
        self, route: str, headers: Mapping[str, str], query: Mapping[str, list[str]]
    ) -> str | None:
        bearer = headers.get("authorization", "")
        bearer_key = bearer[7:].strip() if bearer[:7].lower() == "bearer " else None
        if route == "gemini":
            in_query = query.get("key") or []
            return headers.get("x-goog-api-key") or (in_query[0] if in_query else None)
        if route == "anthropic":
            return headers.get("x-api-key")
        if route in ("ollama", "openai"):
            return bearer_key
        for name in AUTH_HEADERS[1:]:
            if name in headers:
                return headers[name]
        scheme_and_key = bearer.split()
        return scheme_and_key[-1] if scheme_and_key else None  # any scheme on /echo

    def _answer(
        self,
        route: str,
        path: str,
        body: Any,
        headers: Mapping[str, str],
        key_id: str | None,
        reply: Reply | None,
    ) -> tuple[int, Any, Mapping[str, str], list[bytes] | None, int | None]:
        """(status, JSON payload, extra headers, stream chunks or None, total tokens)."""
        if route == "unknown":
            return 404, {"error": {"message": "no such route", "code": 404}}, {}, None, None
        needs_key = route != "ollama" or self.ollama_needs_key
        if key_id is None and (needs_key or "authorization" in headers):
            return 401, _error_body(route, 401, "invalid or missing API key"), {}, None, None
        if reply is not None and reply.status != 200:
            payload = reply.body if reply.body is not None else _error_body(route, reply.status, "")
            return reply.status, payload, reply.headers, None, None
        extra = reply.headers if reply is not None else {}
        if reply is not None and reply.body is not None:
            return 200, reply.body, extra, None, usage_of(reply.body)
        if not isinstance(body, Mapping):
            return 400, _error_body(route, 400, "the body must be a JSON object"), {}, None, None
        if route == "anthropic" and "anthropic-version" not in headers:
            message = "anthropic-version header is required"
            return 400, _error_body(route, 400, message), {}, None, None
        if route == "echo":
            return 200, {"ok": True}, extra, None, None
        if route == "gemini":
            return self._gemini(body, extra, stream="streamGenerateContent" in path)
        if route == "ollama":
            return self._ollama(body, extra)
        if route == "openai":
            return self._openai(body, extra)
        return self._anthropic(body, extra)

    @staticmethod
    def _gemini(
        body: Mapping[str, Any], extra: Mapping[str, str], stream: bool = False
    ) -> tuple[int, Any, Mapping[str, str], list[bytes] | None, int | None]:
        prompt, prompt_tokens = _gemini_prompt(body)
        text = _reply_text(prompt)
        out = _words(text)
        if stream:
            chunks = []
            words = text.split()
            for i, word in enumerate(words, 1):
                event: dict[str, Any] = {
                    "candidates": [
                        {"content": {"parts": [{"text": word + " "}], "role": "model"}, "index": 0}
                    ],
                    "usageMetadata": {
                        "promptTokenCount": prompt_tokens,
                        "candidatesTokenCount": i,
                        "totalTokenCount": prompt_tokens + i,
                    },
                    "modelVersion": "stub",
                }
                if i == len(words):
                    event["candidates"][0]["finishReason"] = "STOP"
                chunks.append(b"data: " + json.dumps(event).encode() + b"\r\n\r\n")
            headers = {"Content-Type": "text/event-stream", **extra}
            return 200, None, headers, chunks, prompt_tokens + out
        payload = {
            "candidates": [
                {
                    "content": {"parts": [{"text": text}], "role": "model"},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": out,
                "totalTokenCount": prompt_tokens + out,
            },
            "modelVersion": "stub",
        }
        return 200, payload, extra, None, prompt_tokens + out

    @staticmethod
    def _ollama(
        body: Mapping[str, Any], extra: Mapping[str, str]
    ) -> tuple[int, Any, Mapping[str, str], list[bytes] | None, int | None]:
        model = str(body.get("model") or "")
        if not model:
            return 400, {"error": "model is required"}, {}, None, None
        prompt, prompt_tokens = _last_user_text(body.get("messages"))
        text = _reply_text(prompt)
        out = _words(text)
        final = {
            "model": model,
            "created_at": "2024-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1000,
            "prompt_eval_count": prompt_tokens,
            "eval_count": out,
        }
        if body.get("stream", True) is False:
            return 200, final, extra, None, prompt_tokens + out
        chunks = []
        for word in text.split():
            piece = {
                "model": model,
                "created_at": "2024-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": word + " "},
                "done": False,
            }
            chunks.append(json.dumps(piece).encode() + b"\n")
        final["message"] = {"role": "assistant", "content": ""}
        chunks.append(json.dumps(final).encode() + b"\n")
        headers = {"Content-Type": "application/x-ndjson", **extra}
        return 200, None, headers, chunks, prompt_tokens + out

    @staticmethod
    def _openai(
        body: Mapping[str, Any], extra: Mapping[str, str]
    ) -> tuple[int, Any, Mapping[str, str], list[bytes] | None, int | None]:
        model = str(body.get("model") or "stub-model")
        prompt, prompt_tokens = _last_user_text(body.get("messages"))
        text = _reply_text(prompt)
        out = _words(text)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": out,
            "total_tokens": prompt_tokens + out,
        }
        ident = "chatcmpl-" + uuid.uuid4().hex[:12]
        if not body.get("stream"):
            payload = {
                "id": ident,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            return 200, payload, extra, None, prompt_tokens + out
        chunks = []
        for word in text.split():
            piece = {
                "id": ident,
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": {"content": word + " "}}],
            }
            chunks.append(b"data: " + json.dumps(piece).encode() + b"\n\n")
        tail: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [],
        }
        if (body.get("stream_options") or {}).get("include_usage"):
            tail["usage"] = usage
        chunks.append(b"data: " + json.dumps(tail).encode() + b"\n\n")
        chunks.append(b"data: [DONE]\n\n")
        headers = {"Content-Type": "text/event-stream", **extra}
        return 200, None, headers, chunks, prompt_tokens + out

    @staticmethod
    def _anthropic(
        body: Mapping[str, Any], extra: Mapping[str, str]
    ) -> tuple[int, Any, Mapping[str, str], list[bytes] | None, int | None]:
        prompt, prompt_tokens = _last_user_text(body.get("messages"))
        text = _reply_text(prompt)
        out = _words(text)
        payload = {
            "id": "msg_" + uuid.uuid4().hex[:12],
            "type": "message",
            "role": "assistant",
            "model": body.get("model"),
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": out},
        }
        if not body.get("stream"):
            return 200, payload, extra, None, prompt_tokens + out
        start = {**payload, "content": [], "stop_reason": None}
        start["usage"] = {"input_tokens": prompt_tokens, "output_tokens": 1}
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
        ]
        for word in text.split():
            delta = {"type": "text_delta", "text": word + " "}
            events.append(
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": out},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        chunks = [f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events]
        headers = {"Content-Type": "text/event-stream", **extra}
        return 200, None, headers, chunks, prompt_tokens + out

    @staticmethod
    def _send(
        handler: _Handler,
        status: int,
        payload: Any,
        extra: Mapping[str, str],
        stream: list[bytes] | None,
        compress: bool,
        pause: float = 0.0,
    ) -> None:
        handler.send_response(status)
        names = {name.lower() for name in extra}
        data = b"".join(stream) if stream is not None else json.dumps(payload).encode()
        if compress:
            data = gzip.compress(data)
            stream = None
            handler.send_header("Content-Encoding", "gzip")
        if "content-type" not in names:
            handler.send_header("Content-Type", "application/json; charset=utf-8")
        for name, value in extra.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if stream is None:
            handler.wfile.write(data)
        else:
            for i, chunk in enumerate(stream):
                if i and pause:
                    time.sleep(pause)
                handler.wfile.write(chunk)
                handler.wfile.flush()


def usage_of(payload: Any) -> int | None:
    """Total tokens in a planned JSON body (same fields as the real APIs)."""
    if not isinstance(payload, Mapping):
        return None
    usage = payload.get("usage")
    if isinstance(usage, Mapping) and isinstance(usage.get("total_tokens"), int):
        return int(usage["total_tokens"])
    meta = payload.get("usageMetadata")
    if isinstance(meta, Mapping) and isinstance(meta.get("totalTokenCount"), int):
        return int(meta["totalTokenCount"])
    if isinstance(payload.get("eval_count"), int):
        return int(payload["eval_count"]) + int(payload.get("prompt_eval_count") or 0)
    return None


def fake_secret(provider: str, key_id: str) -> str:
    """A made-up key, unique to one test."""
    return f"fake-{provider}-{key_id}-{uuid.uuid4().hex[:16]}"


def register(pool: Any, stub: StubLLMServer | None, provider: str, *key_ids: str) -> dict[str, str]:
    """Add made-up keys to a pool (``pool.add_key``) and to the stub, so that it accepts
    them; key id -> secret."""
    secrets = {key_id: fake_secret(provider, key_id) for key_id in key_ids}
    for key_id, secret in secrets.items():
        pool.add_key(provider, key_id, secret)
        if stub is not None:
            stub.add_key(secret, key_id)
    return secrets


def main() -> None:
    parser = argparse.ArgumentParser(description="a local stub of LLM provider APIs")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--key", action="append", default=[], help="LABEL=SECRET, a key the server knows"
    )
    args = parser.parse_args()
    keys = {}
    for item in args.key:
        label, _, secret = item.partition("=")
        keys[secret] = label
    with StubLLMServer(keys, port=args.port) as stub:
        print(f"serving on {stub.base_url}; Ctrl-C to stop")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
