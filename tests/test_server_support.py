"""Shared pieces of the gateway tests (no tests here): a uvicorn server in a thread, a
streaming upstream stub under the test's control, and what the Node and Chromium tests
need to find their tools."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tests.servers import free_port

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
NODE_DIR = os.path.join(os.path.dirname(__file__), "node")

pytest.importorskip("uvicorn")
pytest.importorskip("httpx2")
pytest.importorskip("prometheus_client")

import uvicorn  # noqa: E402


def require_tool(name: str, path: str | None) -> str:
    """``path`` if it exists; else skip (fail under CI)."""
    if path and os.path.exists(path):
        return path
    if IN_CI:
        pytest.fail(f"CI=true but {name} is missing", pytrace=False)
    pytest.skip(f"{name} is not installed")


def node_path() -> str:
    """The node binary, with the openai npm package installed in tests/node."""
    node = require_tool("node", shutil.which("node"))
    require_tool("tests/node/node_modules/openai", os.path.join(NODE_DIR, "node_modules", "openai"))
    return node


def chromium_path() -> str:
    """Debian's chromium."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return require_tool("chromium", found or "/usr/bin/chromium")


class _Server(uvicorn.Server):
    loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: Any = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)


class ServerThread:
    """An ASGI app on uvicorn in a background thread, on a free port of 127.0.0.1."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        self.port = port or free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="error",
            server_header=False,
            date_header=False,
            lifespan="on",
        )
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self.server.loop is not None
        return self.server.loop

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class StreamStub:
    """An OpenAI-like upstream whose SSE stream the test paces: each chunk is sent when the
    test calls :meth:`release` (or at once with ``free=True``); ``endless=True`` streams
    until the client goes away. Chunked, no Content-Length, as real providers stream."""

    def __init__(self, *, endless: bool = False) -> None:
        self.endless = endless
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gate: asyncio.Semaphore | None = None
        self.keys: list[str] = []
        self.finished = threading.Event()
        self.cancelled = threading.Event()

    def release(self, n: int = 1) -> None:
        """Let ``n`` more chunks go."""
        assert self.loop is not None and self.gate is not None
        for _ in range(n):
            self.loop.call_soon_threadsafe(self.gate.release)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.loop = asyncio.get_running_loop()
                    self.gate = asyncio.Semaphore(0)
                    await send({"type": "lifespan.startup.complete"})
                    await receive()
                    await send({"type": "lifespan.shutdown.complete"})
            return
        assert self.gate is not None
        headers = dict(scope["headers"])
        self.keys.append(headers.get(b"authorization", b"").decode())
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        try:
            i = 0
            while not self.cancelled.is_set():
                await self.gate.acquire()
                if not self.endless and i == 3:
                    usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
                    last = {
                        "id": "c",
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": usage,
                    }
                    await send(_event(last))
                    await send(_body(b"data: [DONE]\n\n", more=False))
                    self.finished.set()
                    return
                delta = {
                    "id": "c",
                    "object": "chat.completion.chunk",
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"content": f"w{i} "}}],
                }
                await send(_event(delta))
                i += 1
        finally:
            watcher.cancel()

    async def _watch(self, receive: Any) -> None:
        message = await receive()
        if message["type"] == "http.disconnect" and not self.finished.is_set():
            self.cancelled.set()
            if self.gate is not None:
                self.gate.release()


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _event(payload: Any) -> dict[str, Any]:
    return _body(b"data: " + json.dumps(payload).encode() + b"\n\n")


def wait_for(check: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll until ``check()`` is truthy; returns its value (fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {check}")
        time.sleep(interval)


@contextmanager
def raw_connection(port: int) -> Iterator[socket.socket]:
    """A plain TCP connection to 127.0.0.1:port."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        yield sock
    finally:
        sock.close()
