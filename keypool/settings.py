"""Settings, read from ``KEYPOOL_*`` environment variables and a ``.env`` file."""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, SecretStr, ValidationError, field_serializer, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .errors import ConfigError

__all__ = ["STRATEGIES", "KeyPoolSettings", "load_settings"]

# the strategies, named once on this side (lua/lib.lua's STRATEGY_INDEX is the other side)
Strategy = Literal["round_robin", "weighted", "least_busy", "best", "latency"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)


class KeyPoolSettings(BaseSettings):
    """Every knob of a pool. Each field reads ``KEYPOOL_<FIELD>`` (e.g. ``KEYPOOL_LEASE_TTL``)."""

    model_config = SettingsConfigDict(
        env_prefix="KEYPOOL_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
        hide_input_in_errors=True,
    )

    redis_url: str = Field(
        default="memory://",
        description="memory://, redis://, rediss://, unix://, redis+cluster://, redis+sentinel://",
    )
    namespace: str = Field(default="keypool", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    lease_ttl: float = Field(default=60.0, gt=0, le=86_400, description="seconds a lease lives")
    strategy: Strategy = Field(default="round_robin", description="default selection strategy")
    rate_limit_cooldown: float = Field(
        default=30.0, gt=0, description="seconds of the first cooldown after a 429 without a hint"
    )
    rate_limit_max_cooldown: float = Field(
        default=600.0, gt=0, description="cap of the exponential 429 backoff, seconds"
    )
    quota_cooldown: float = Field(
        default=3600.0, gt=0, description="seconds a key stays exhausted when no reset is given"
    )
    error_threshold: int = Field(
        default=3, ge=1, le=1000, description="consecutive failures that open the circuit"
    )
    circuit_cooldown: float = Field(
        default=10.0, gt=0, description="first circuit-open cooldown, seconds (doubles each time)"
    )
    circuit_max_cooldown: float = Field(
        default=300.0, gt=0, description="cap of the circuit-open backoff, seconds"
    )
    max_cooldown: float = Field(
        default=86_400.0,
        gt=0,
        le=366 * 86_400,
        description="cap of any cooldown a provider's hint or a caller's retry_after asks for",
    )
    restart_budgets: Literal["spent", "full"] = Field(
        default="spent",
        description="keys put back after the store lost the pool's state start with their "
        "budgets spent (the budget bound holds across the loss) or full (more throughput)",
    )
    socket_timeout: float = Field(default=5.0, gt=0, description="Redis socket timeout, seconds")
    connect_timeout: float = Field(default=2.0, gt=0, description="Redis connect timeout, seconds")
    secret_key: SecretStr | None = Field(
        default=None, description="sealing key: when set, secrets are stored encrypted in Redis"
    )
    old_secret_keys: SecretStr | None = Field(
        default=None, description="comma-separated previous sealing keys, for rotation"
    )
    log_format: Literal["console", "json"] = Field(default="console")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(default="warning")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error_from(exc) from None

    @field_validator("redis_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        from .store import parse_url  # local import: store imports redis

        parse_url(value)
        return value

    @field_serializer("redis_url")
    def _hide_password(self, value: str) -> str:
        # model_dump() and model_dump_json() show the URL as messages do: password as ***
        from .store import redact_url

        return redact_url(value)

    @field_validator("secret_key", "old_secret_keys", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def __repr_args__(self) -> Any:
        from .store import redact_url

        for name, value in super().__repr_args__():
            if name == "redis_url" and isinstance(value, str):
                value = redact_url(value)
            yield name, value

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value


def load_settings(**overrides: object) -> KeyPoolSettings:
    """Build settings from the environment, turning validation errors into ``ConfigError``
    that names each bad ``KEYPOOL_*`` variable."""
    return KeyPoolSettings(**overrides)


def config_error_from(exc: ValidationError) -> ConfigError:
    parts = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err.get("loc", ())) or "?"
        parts.append(f"KEYPOOL_{field.upper()} ({field}): {err.get('msg', 'invalid')}")
    return ConfigError("invalid keypool settings: " + "; ".join(parts))
