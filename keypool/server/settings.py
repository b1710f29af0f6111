"""The gateway's own settings (``KEYPOOL_PROXY_*``, ``KEYPOOL_STATUS_PUBLIC``), read like
:class:`keypool.KeyPoolSettings` from the environment and a ``.env`` file."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ..settings import config_error_from

__all__ = ["GatewaySettings"]

_TOKEN_SPLIT = re.compile(r"[\s,]+")


class GatewaySettings(BaseSettings):
    """What the gateway reads besides the pool's settings. Each field reads
    ``KEYPOOL_<FIELD>``, e.g. ``KEYPOOL_PROXY_TOKENS``."""

    model_config = SettingsConfigDict(
        env_prefix="KEYPOOL_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        hide_input_in_errors=True,
    )

    proxy_tokens: SecretStr | None = Field(
        default=None, description="client tokens, separated by commas or whitespace"
    )
    proxy_no_auth: bool = Field(
        default=False, description="serve without tokens (loopback clients only)"
    )
    proxy_max_body: int = Field(
        default=32 * 1024 * 1024, ge=1024, le=1024**3, description="largest request body, bytes"
    )
    proxy_max_attempts: int = Field(
        default=3, ge=1, le=20, description="upstream attempts per request, on different keys"
    )
    proxy_wait: float = Field(
        default=0.0, ge=0, le=600, description="seconds to wait for a key before answering 429"
    )
    proxy_connect_timeout: float = Field(default=10.0, gt=0, le=600)
    proxy_read_timeout: float = Field(
        default=300.0, gt=0, le=3600, description="longest silence from the upstream, seconds"
    )
    proxy_total_timeout: float = Field(
        default=1800.0, gt=0, le=86_400, description="longest upstream exchange, seconds"
    )
    proxy_max_connections: int = Field(default=512, ge=1, le=100_000)
    status_public: bool = Field(
        default=False, description="serve /status, /status.json and /metrics without a token"
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error_from(exc) from None

    @field_validator("proxy_tokens", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def tokens(self) -> list[str]:
        """The configured client tokens."""
        if self.proxy_tokens is None:
            return []
        raw = self.proxy_tokens.get_secret_value()
        return [t for t in _TOKEN_SPLIT.split(raw) if t]
