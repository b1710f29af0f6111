"""A tap on a response body that finds the token usage the provider reports, as the bytes
flow past (nothing is held back from the client).

Understands a JSON body and the events of an SSE or NDJSON stream: OpenAI ``usage``
(``prompt_tokens``/``completion_tokens``; in a stream, the last chunk when the client asked
``stream_options.include_usage``), Anthropic ``usage`` (``input_tokens`` in
``message_start``, ``output_tokens`` in ``message_delta``), Gemini ``usageMetadata``,
Cohere ``usage.billed_units``/``usage.tokens`` and Ollama ``prompt_eval_count``/
``eval_count``. gzip and deflate bodies are decompressed for the tap only.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Usage", "UsageTap"]

_JSON_MAX = 8 * 1024 * 1024  # a JSON body kept (decoded) to read its usage at the end
_LINE_MAX = 1024 * 1024  # one stream line longer than this is skipped
_MARKERS = (b'"usage', b"eval_count", b"billed_units")


@dataclass(slots=True)
class Usage:
    """Tokens a provider reported; any part may be unknown."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None

    @property
    def known(self) -> bool:
        """True when the provider reported anything."""
        return (
            self.input_tokens is not None
            or self.output_tokens is not None
            or self.total_tokens is not None
        )

    @property
    def total(self) -> int | None:
        """The total tokens, from the parts when no total was given."""
        if self.total_tokens is not None:
            return self.total_tokens
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _merge(found: Usage, table: Mapping[str, object], inp: str, out: str, tot: str) -> bool:
    a, b, c = _count(table.get(inp)), _count(table.get(out)), _count(table.get(tot))
    if a is not None:
        found.input_tokens = a
    if b is not None:
        found.output_tokens = b
    if c is not None:
        found.total_tokens = c
    return a is not None or b is not None or c is not None


def read_usage(found: Usage, payload: object) -> None:
    """Merge the usage a provider's JSON object reports into ``found`` (later events win
    field by field: Anthropic's ``message_delta`` adds the output to ``message_start``)."""
    if not isinstance(payload, Mapping):
        return
    message = payload.get("message")  # Anthropic message_start
    if isinstance(message, Mapping) and isinstance(message.get("usage"), Mapping):
        _merge(found, message["usage"], "input_tokens", "output_tokens", "")
    usage = payload.get("usage")
    if (
        isinstance(usage, Mapping)
        and not _merge(found, usage, "prompt_tokens", "completion_tokens", "total_tokens")
        and not _merge(found, usage, "input_tokens", "output_tokens", "")
    ):
        for nested in ("billed_units", "tokens"):
            inner = usage.get(nested)
            if isinstance(inner, Mapping) and _merge(
                found, inner, "input_tokens", "output_tokens", ""
            ):
                break
    meta = payload.get("usageMetadata")
    if isinstance(meta, Mapping):
        _merge(found, meta, "promptTokenCount", "candidatesTokenCount", "totalTokenCount")
    if "eval_count" in payload or "prompt_eval_count" in payload:
        _merge(found, payload, "prompt_eval_count", "eval_count", "")


class UsageTap:
    """Feed it the raw body chunks; :attr:`usage` is what was found so far."""

    __slots__ = ("_body", "_decoder", "_dropped", "_partial", "_stream", "usage")

    def __init__(self, content_type: str, content_encoding: str) -> None:
        ctype = content_type.split(";", 1)[0].strip().lower()
        self._stream = ctype in ("text/event-stream", "application/x-ndjson") or ctype.endswith(
            "+ndjson"
        )
        encoding = content_encoding.strip().lower()
        self._decoder: zlib._Decompress | None = None
        self._dropped = False
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("", "identity"):
            self._dropped = True  # br, zstd: not counted
        self._body = bytearray()
        self._partial = b""
        self.usage = Usage()

    def feed(self, chunk: bytes) -> None:
        """One more piece of the body, as sent to the client."""
        if self._dropped or not chunk:
            return
        if self._decoder is not None:
            try:
                chunk = self._decoder.decompress(chunk, _JSON_MAX)
            except zlib.error:
                self._dropped = True
                return
        if not self._stream:
            if len(self._body) + len(chunk) > _JSON_MAX:
                self._dropped = True
                self._body = bytearray()
                return
            self._body += chunk
            return
        data = self._partial + chunk
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > _LINE_MAX:
            self._partial = b""
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not any(marker in line for marker in _MARKERS):
            return
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line.startswith(b"{"):
            return
        try:
            read_usage(self.usage, json.loads(line))
        except ValueError:
            return

    def finish(self) -> Usage:
        """The body is complete: read what is left and return the usage."""
        if self._dropped:
            return self.usage
        if self._stream:
            if self._partial:
                self._line(self._partial)
                self._partial = b""
            return self.usage
        if self._body and any(marker in self._body for marker in _MARKERS):
            with contextlib.suppress(ValueError):
                read_usage(self.usage, json.loads(bytes(self._body)))
        self._body = bytearray()
        return self.usage
