"""keypool's structured log: stable event names, and no secret ever rendered.

Events go through structlog to the standard-library logger ``keypool``, so applications
route and filter them as usual. Every event passes :func:`redact_secrets` first: it
replaces each secret registered in this process, and anything shaped like a provider key,
with ``[REDACTED]``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog

__all__ = [
    "EVENTS",
    "configure_logging",
    "forget_secret",
    "get_logger",
    "redact",
    "redact_secrets",
    "remember_secret",
]

# Stable names of the events keypool logs; dashboards and alerts may rely on them.
EVENTS = (
    "key_registered",
    "key_removed",
    "key_disabled",
    "key_enabled",
    "key_reset",
    "key_exhausted",
    "cooldown_set",
    "cooldown_extended",
    "circuit_opened",
    "circuit_closed",
    "model_assigned",
    "pool_state_lost",
    "pool_unavailable",
    "report_unconfirmed",
)

REDACTED = "[REDACTED]"
_KEY_SHAPES = re.compile(
    r"(sk-ant-[A-Za-z0-9_\-]{8,}|sk-(?:proj-)?[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{16,}"
    r"|AIza[0-9A-Za-z_\-]{20,}|sk-or-v1-[A-Za-z0-9]{16,}|gsk_[A-Za-z0-9]{16,}"
    r"|Bearer\s+[A-Za-z0-9._\-]{12,})"
)
_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_pattern: re.Pattern[str] | None = None


def remember_secret(secret: str) -> None:
    """Register a secret so that it is redacted wherever it would be logged."""
    global _pattern
    if len(secret) < 4:
        return
    with _secrets_lock:
        if secret not in _secrets:
            _secrets.add(secret)
            _pattern = None


def forget_secret(secret: str) -> None:
    global _pattern
    with _secrets_lock:
        _secrets.discard(secret)
        _pattern = None


def _secret_pattern() -> re.Pattern[str] | None:
    global _pattern
    with _secrets_lock:
        if _pattern is None and _secrets:
            ordered = sorted(_secrets, key=len, reverse=True)
            _pattern = re.compile("|".join(re.escape(s) for s in ordered))
        return _pattern


def redact(text: str) -> str:
    """``text`` with registered secrets and key-shaped strings replaced."""
    pattern = _secret_pattern()
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return _KEY_SHAPES.sub(REDACTED, text)


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: scrub every value of the event."""
    for key, value in list(event_dict.items()):
        event_dict[key] = _scrub(value)
    return event_dict


_configured: dict[str, str] = {}
_config_lock = threading.Lock()


def configure_logging(fmt: str = "console", level: str = "warning") -> None:
    """Choose how keypool renders its events (``console`` or ``json``) and the level of the
    ``keypool`` logger. Called by every pool with its settings; the last call wins."""
    with _config_lock:
        _configured["format"] = fmt
        logging.getLogger("keypool").setLevel(level.upper())


def _render(logger: Any, method_name: str, event_dict: MutableMapping[str, Any]) -> str:
    if _configured.get("format") == "json":
        return structlog.processors.JSONRenderer(sort_keys=True)(logger, method_name, event_dict)  # type: ignore[return-value]
    return structlog.processors.KeyValueRenderer(key_order=["event"], sort_keys=True)(
        logger, method_name, event_dict
    )


def get_logger() -> Any:
    """keypool's bound logger: redacting, timestamped, rendered as configured."""
    return structlog.wrap_logger(
        logging.getLogger("keypool"),
        processors=[
            structlog.stdlib.filter_by_level,
            redact_secrets,
            structlog.stdlib.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _render,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
    )
