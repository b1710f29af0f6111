"""Provider names and validation of provider, key id and model arguments."""

from __future__ import annotations

import re
from enum import StrEnum

__all__ = [
    "LLMProvider",
    "Provider",
    "normalize_provider",
    "validate_key_id",
    "validate_model",
]


class Provider(StrEnum):
    """The providers keypool knows by name. Any string matching
    ``^[a-z0-9][a-z0-9_-]{0,63}$`` is accepted as a custom provider too."""

    HUGGINGFACE = "huggingface"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    COHERE = "cohere"
    AZURE_OPENAI = "azure_openai"
    OLLAMA = "ollama"
    GEMINI = "gemini"
    OPENROUTER = "openrouter"
    CUSTOM = "custom"


LLMProvider = Provider

PROVIDER_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
KEY_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MODEL_MAX_LEN = 256


def normalize_provider(provider: object) -> str:
    """Return the provider's name as stored in Redis, or raise ``ValueError``/``TypeError``."""
    if type(provider) is str and provider in _checked:
        return provider
    if isinstance(provider, Provider):
        return provider.value
    if not isinstance(provider, str):
        raise TypeError(
            f"invalid provider {provider!r}: expected a Provider or a str, "
            f"not {type(provider).__name__}"
        )
    if not PROVIDER_RE.fullmatch(provider):
        raise ValueError(
            f"invalid provider {provider!r}: expected a Provider or a name matching "
            r"^[a-z0-9][a-z0-9_-]{0,63}$"
        )
    if len(_checked) < 4096:
        _checked.add(provider)
    return provider


_checked: set[str] = set()  # provider names already found valid (checked once each)


def validate_key_id(key_id: object) -> str:
    """Return ``key_id`` if it is a valid key id, else raise ``ValueError``/``TypeError``."""
    if not isinstance(key_id, str):
        raise TypeError(f"invalid key_id {key_id!r}: expected a str, not {type(key_id).__name__}")
    if not KEY_ID_RE.fullmatch(key_id):
        raise ValueError(
            f"invalid key_id {key_id!r}: expected 1-64 characters matching "
            r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
        )
    return key_id


def validate_model(model: object) -> str:
    """Return ``model`` if it is a valid model name, else raise ``ValueError``/``TypeError``."""
    if not isinstance(model, str):
        raise TypeError(f"invalid model {model!r}: expected a str, not {type(model).__name__}")
    if not model or len(model) > MODEL_MAX_LEN:
        shown = model if len(model) <= 80 else model[:77] + "..."
        raise ValueError(
            f"invalid model {shown!r}: expected a non-empty string of at most 256 characters"
        )
    return model
