"""What a request asks for: its model (for model routing) and a token estimate (reserved
at acquire when a key has a ``tpm`` budget, reconciled with the reported usage)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from ..providers import MODEL_MAX_LEN

__all__ = ["RequestInfo", "inspect_request"]

_PATH_MODEL = re.compile(rb"/(?:models|deployments)/([^/:?]+)")
_MAX_OUT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_ESTIMATE_CAP = 2_000_000


class RequestInfo:
    """The model a request names (``None``: not found) and its token estimate."""

    __slots__ = ("model", "tokens")

    def __init__(self, model: str | None, tokens: int) -> None:
        self.model = model
        self.tokens = tokens


def _int(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return 0


def _max_output(payload: Mapping[str, object]) -> int:
    for name in _MAX_OUT_FIELDS:
        found = _int(payload.get(name))
        if found:
            return found
    config = payload.get("generationConfig")  # Gemini
    if isinstance(config, Mapping):
        found = _int(config.get("maxOutputTokens"))
        if found:
            return found
    options = payload.get("options")  # Ollama
    if isinstance(options, Mapping):
        return _int(options.get("num_predict"))
    return 0


def inspect_request(path: bytes, body: bytes, content_type: bytes) -> RequestInfo:
    """The model from the JSON body's ``model`` field (OpenAI, Anthropic, Ollama, ...) or
    from the path (``/models/{model}:...`` of Gemini, ``/deployments/{name}/`` of Azure);
    the estimate is the body's length / 4 plus the largest output it allows."""
    model: str | None = None
    tokens = len(body) // 4
    if body[:1] == b"{" or (b"json" in content_type and body.lstrip()[:1] == b"{"):
        try:
            payload = json.loads(body)
        except ValueError:
            payload = None
        if isinstance(payload, Mapping):
            found = payload.get("model")
            if isinstance(found, str) and 0 < len(found) <= MODEL_MAX_LEN:
                model = found
            tokens += _max_output(payload)
    if model is None:
        match = _PATH_MODEL.search(path)
        if match:
            from urllib.parse import unquote

            found_path = unquote(match.group(1).decode("latin-1"))
            if 0 < len(found_path) <= MODEL_MAX_LEN:
                model = found_path
    return RequestInfo(model, min(tokens, _ESTIMATE_CAP))
