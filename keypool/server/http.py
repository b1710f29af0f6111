"""Small ASGI helpers: send a whole response, read a bounded request body."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

__all__ = [
    "BodyTooLarge",
    "ClientGone",
    "Receive",
    "Scope",
    "Send",
    "error_response",
    "read_body",
    "respond",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(Exception):
    """The request body is larger than allowed."""


class ClientGone(Exception):
    """The client disconnected before its request was read."""


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """Send a complete response."""
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def error_response(
    send: Send,
    status: int,
    message: str,
    code: str,
    *,
    retry_after: float | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """A JSON error in the shape the OpenAI and Anthropic SDKs read (``error.message``)."""
    extra = list(headers)
    if retry_after is not None:
        extra.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
        extra.append((b"retry-after-ms", str(max(1, math.ceil(retry_after * 1000))).encode()))
    payload = {"error": {"message": message, "type": "keypool_error", "code": code}}
    await respond(send, status, json.dumps(payload).encode(), b"application/json", extra)


async def read_body(receive: Receive, limit: int, declared: int | None) -> bytes:
    """The whole request body, at most ``limit`` bytes (``BodyTooLarge`` beyond)."""
    if declared is not None and declared > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    if len(chunks) == 1:
        return chunks[0]
    return b"".join(chunks)
