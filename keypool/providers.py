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
        raise TypeError(
            f"invalid key_id {_typed(key_id)}: expected a str, not {type(key_id).__name__}"
        )
    if not KEY_ID_RE.fullmatch(key_id):
        raise ValueError(
            f"invalid key_id {shown(key_id)}: expected 1-64 characters matching "
            r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
        )
    return key_id


def validate_account(account: object) -> str:
    """Return ``account`` if it is a valid account name (the key id rules), else raise."""
    if not isinstance(account, str):
        raise TypeError(f"invalid account {_typed(account)}: expected a str")
    if not KEY_ID_RE.fullmatch(account):
        raise ValueError(
            f"invalid account {shown(account)}: expected 1-64 characters matching "
            r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
        )
    return account


def validate_model(model: object) -> str:
    """Return ``model`` if it is a valid model name, else raise ``ValueError``/``TypeError``."""
    if not isinstance(model, str):
        raise TypeError(
            f"invalid model {_typed(model)}: expected a str, not {type(model).__name__}"
        )
    if not model or len(model) > MODEL_MAX_LEN or not _encodable(model):
        raise ValueError(
            f"invalid model {shown(model)}: expected a non-empty string of at most 256 "
            "characters, valid UTF-8"
        )
    return model


def _typed(value: object) -> str:
    # bytes may hold a secret passed by mistake: never shown
    return "of type bytes" if isinstance(value, bytes | bytearray) else repr(value)[:40]


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def shown(value: str) -> str:
    """A bad value as an error message may show it: short ones whole (key-shaped parts
    masked), long ones cut, so a secret passed by mistake is never echoed whole."""
    from .log import redact

    text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) <= 24:
        return repr(redact(text))
    return f"{redact(text[:6])!r}... ({len(value)} characters)"
