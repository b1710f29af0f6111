"""Token usage in provider replies, found as the body goes by (no HTTP library needed).

:func:`usage_of` reads one JSON object (a whole reply, or one event of a stream);
:class:`UsageMeter` is fed a response body chunk by chunk and keeps what the events said so
far, so a stream closed early is still reported with what was seen:

- OpenAI: ``usage`` (``prompt_tokens``/``completion_tokens``), in the reply or in the last
  chunk of a stream made with ``stream_options={"include_usage": True}``; the Responses
  API's ``usage`` (``input_tokens``/``output_tokens``), also inside ``response.completed``;
- Anthropic: ``usage`` of a message; in a stream, ``message_start`` carries the input
  tokens (in ``message.usage``) and each ``message_delta`` the output tokens so far;
- Gemini: ``usageMetadata``, repeated (cumulative) on every event of a stream;
- Cohere: ``usage.billed_units``/``usage.tokens``; Ollama: ``prompt_eval_count`` and
  ``eval_count`` of the reply or of the last NDJSON line.

Counts are cumulative in every provider's stream, so a later figure replaces an earlier
one. Anthropic's cached input (``cache_creation_input_tokens``, ``cache_read_input_tokens``)
is counted as input.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Usage", "UsageMeter", "usage_of", "usage_tokens"]

_WHOLE_MAX = 4 * 1024 * 1024  # a JSON body larger than this (as received) is not parsed
_LINE_MAX = 4 * 1024 * 1024  # one stream event larger than this is skipped
_MARKERS = (b"sage", b"eval_count")  # "usage", "usageMetadata", Ollama's counts


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens a reply reports: ``input_tokens`` (prompt), ``output_tokens`` (completion)
    and ``total_tokens`` when the provider states it; any of them may be unknown."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None

    @property
    def total(self) -> int | None:
        """The stated total, else the sum of the known parts, else ``None``."""
        if self.total_tokens is not None:
            return self.total_tokens
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    def updated(self, newer: Usage) -> Usage:
        """This usage with every figure ``newer`` knows replaced by it."""
        return Usage(
            newer.input_tokens if newer.input_tokens is not None else self.input_tokens,
            newer.output_tokens if newer.output_tokens is not None else self.output_tokens,
            newer.total_tokens if newer.total_tokens is not None else self.total_tokens,
        )


def _count(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _sum(*values: int | None) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _from_usage_table(usage: Mapping[str, Any]) -> Usage | None:
    total = _count(usage.get("total_tokens"))
    prompt, completion = _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens"))
    if prompt is not None or completion is not None:
        return Usage(prompt, completion, total)
    inp, out = _count(usage.get("input_tokens")), _count(usage.get("output_tokens"))
    if inp is not None:
        cached = _sum(
            _count(usage.get("cache_creation_input_tokens")),
            _count(usage.get("cache_read_input_tokens")),
        )
        inp += cached or 0
    if inp is not None or out is not None:
        return Usage(inp, out, total)
    for nested in ("billed_units", "tokens"):  # Cohere
        table = usage.get(nested)
        if isinstance(table, Mapping):
            found = Usage(_count(table.get("input_tokens")), _count(table.get("output_tokens")))
            if found.total is not None:
                return found
    return Usage(total_tokens=total) if total is not None else None


def _from_usage_metadata(meta: Mapping[str, Any]) -> Usage | None:
    prompt = _count(meta.get("promptTokenCount"))
    total = _count(meta.get("totalTokenCount"))
    if total is not None and prompt is not None and total >= prompt:
        output: int | None = total - prompt  # candidates, thoughts and tool-use prompts
    else:
        output = _sum(
            _count(meta.get("candidatesTokenCount")), _count(meta.get("thoughtsTokenCount"))
        )
    if prompt is None and output is None and total is None:
        return None
    return Usage(prompt, output, total)


def usage_of(payload: object) -> Usage | None:
    """The tokens one JSON object from a provider reports (a reply or one stream event),
    or ``None``. See the module's description for the shapes understood."""
    if not isinstance(payload, Mapping):
        return None
    for holder in (payload, payload.get("message"), payload.get("response")):
        usage = holder.get("usage") if isinstance(holder, Mapping) else None
        if isinstance(usage, Mapping):
            found = _from_usage_table(usage)
            if found is not None:
                return found
    meta = payload.get("usageMetadata")
    if isinstance(meta, Mapping):
        found = _from_usage_metadata(meta)
        if found is not None:
            return found
    produced = _count(payload.get("eval_count"))
    if produced is not None:
        return Usage(_count(payload.get("prompt_eval_count")), produced)
    return None


def usage_tokens(payload: object) -> int | None:
    """The total tokens a provider's JSON reply reports, or ``None`` (see :func:`usage_of`)."""
    found = usage_of(payload)
    return found.total if found is not None else None


def _incremental_decoder(encoding: str) -> Any:
    if encoding == "gzip":
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS)
    return None


class UsageMeter:
    """Watches a response body go by and keeps the usage its events report.

    ``content_type``/``content_encoding`` are the response's headers. Server-sent events
    and NDJSON are read event by event as they pass (only events mentioning usage are
    parsed); a JSON body is kept (up to 4 MiB) and parsed when asked. ``decode`` turns a
    whole body in another encoding (``br``, ``zstd``) into bytes; streams in such an
    encoding are not counted. Never raises: on anything unexpected it stops counting.
    """

    __slots__ = ("_buf", "_decode", "_decoder", "_encoding", "_mode", "_pending", "_skip", "_usage")

    def __init__(
        self,
        content_type: str,
        content_encoding: str = "",
        decode: Callable[[bytes, str], bytes] | None = None,
    ) -> None:
        ctype = content_type.lower()
        encoding = content_encoding.strip().lower()
        self._encoding = "" if encoding == "identity" else encoding
        self._decode = decode
        self._decoder: Any = None
        if any(kind in ctype for kind in ("event-stream", "ndjson", "jsonl")):
            self._mode = "events"
            if self._encoding:
                self._decoder = _incremental_decoder(self._encoding)
                if self._decoder is None:
                    self._mode = ""
        elif "json" in ctype:
            self._mode = "whole"
        else:
            self._mode = ""
        self._buf = bytearray()
        self._pending = bytearray()
        self._skip = False
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> None:
        """One more chunk of the body, as received."""
        try:
            if self._mode == "events":
                data = self._decoder.decompress(chunk) if self._decoder is not None else chunk
                self._lines(data)
            elif self._mode == "whole":
                self._buf += chunk
                if len(self._buf) > _WHOLE_MAX:
                    self._mode, self._buf = "", bytearray()
        except Exception:
            self._mode = ""

    def usage(self) -> Usage | None:
        """What the body said so far (a JSON body: once it is all there)."""
        try:
            if self._mode == "events":
                if self._pending and not self._skip:
                    self._line(bytes(self._pending))
                self._pending.clear()
            elif self._mode == "whole" and self._buf:
                data = bytes(self._buf)
                if self._encoding:
                    data = self._decoded(data)
                self._usage = usage_of(json.loads(data))
                self._buf.clear()
        except Exception:
            self._mode = ""
        return self._usage

    def _decoded(self, data: bytes) -> bytes:
        decoder = _incremental_decoder(self._encoding)
        if decoder is not None:
            return bytes(decoder.decompress(data))
        if self._decode is None:
            raise ValueError("no decoder")
        return self._decode(data, self._encoding)

    def _lines(self, data: bytes) -> None:
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if self._skip:
                self._skip = False
            else:
                self._pending += data[start:end]
                self._line(bytes(self._pending))
            self._pending.clear()
            start = end + 1
        if not self._skip:
            self._pending += data[start:]
            if len(self._pending) > _LINE_MAX:  # skip the rest of this event
                self._pending.clear()
                self._skip = True

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line.startswith(b"{") or not any(m in line for m in _MARKERS):
            return
        try:
            found = usage_of(json.loads(line))
        except ValueError:
            return
        if found is not None:
            self._usage = found if self._usage is None else self._usage.updated(found)
