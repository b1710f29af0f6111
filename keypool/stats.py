"""What a key is doing: :class:`KeyStats`, built from the stats script's reply."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .kinds import ErrorKind

__all__ = ["KeyStats", "ScopeStats", "parse_scopes_reply", "parse_stats_reply"]

_COOLING_WHY = {"rate_limit", "circuit", "rpm", "tpm", "probe"}
_EXHAUSTED_WHY = {"quota", "rpd"}
_RATE_LIMITED_WHY = {"rate_limit", "quota", "rpm", "tpm", "rpd"}


@dataclass(frozen=True, slots=True)
class KeyStats:
    """One key's configuration and state, as every process sees it. Times are epoch seconds."""

    provider: str
    key_id: str
    status: str  # "active" | "cooling" | "exhausted" | "disabled"
    is_rate_limited: bool
    cooldown_until: float | None
    total_requests: int
    success_count: int
    error_count: int
    errors_by_kind: dict[str, int]
    consecutive_errors: int
    in_flight: int
    last_used: float | None
    last_error: str | None
    last_error_at: float | None
    unavailable_reason: str | None  # why it cannot serve now, e.g. "rate_limit", "rpm"
    available_at: float | None  # None: now (or never, when disabled)
    disabled_reason: str | None
    circuit: str  # "closed" | "open" | "half_open"
    weight: float
    rpm: int | None
    tpm: int | None
    rpd: int | None
    max_concurrency: int | None
    rpm_left: int | None
    tpm_left: int | None
    rpd_left: int | None
    latency_ms: float | None
    tokens_used: int
    models: tuple[str, ...]
    fingerprint: str
    created_at: float | None = field(default=None)
    account: str | None = None
    tpd: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    tpd_left: int | None = None
    itpm_left: int | None = None
    otpm_left: int | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    # models this key cools for (a rate limit for that model only): model -> until (epoch s)
    cooling_models: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A plain, JSON-ready dict of every field."""
        out = asdict(self)
        out["models"] = list(self.models)
        return out


def _int(raw: dict[str, str], name: str) -> int:
    try:
        return int(float(raw.get(name) or 0))
    except ValueError:
        return 0


def _limit(raw: dict[str, str], name: str) -> int | None:
    value = _int(raw, name)
    return value if value > 0 else None


def _seconds(raw: dict[str, str], name: str) -> float | None:
    value = raw.get(name)
    if not value:
        return None
    ms = float(value)
    return ms / 1000 if ms > 0 else None


def _left(value: Any) -> int | None:
    number = int(value)
    return None if number < 0 else number


def build_stats(
    provider: str,
    key_id: str,
    raw: dict[str, str],
    extra: list[Any],
    now_ms: float,
    cooling: list[Any] | None = None,
) -> KeyStats:
    at_ms, why, rpm_left, tpm_left, rpd_left, in_flight = extra[:6]
    tpd_left, itpm_left, otpm_left = ([*list(extra[6:9]), -1, -1, -1])[:3]
    cooling = cooling or []
    cooling_models = {
        str(cooling[i]): float(cooling[i + 1]) / 1000 for i in range(0, len(cooling) - 2, 3)
    }
    at = float(at_ms)
    enabled = raw.get("en") != "0"
    waiting = at > now_ms
    if not enabled:
        status = "disabled"
    elif waiting and why in _EXHAUSTED_WHY:
        status = "exhausted"
    elif waiting and why in _COOLING_WHY:
        status = "cooling"
    else:
        status = "active"
    errors = {kind.value: _int(raw, "e:" + kind.value) for kind in ErrorKind}
    circ = raw.get("circ") or ""
    circuit = {"": "closed", "open": "open", "half": "half_open"}.get(circ, circ)
    until = float(raw.get("until") or 0)
    cooldown_until: float | None = None
    if enabled and waiting and why != "concurrency":
        cooldown_until = at / 1000
    elif enabled and until > now_ms:
        cooldown_until = until / 1000
    latency = raw.get("lat")
    models_raw = raw.get("models")
    models: tuple[str, ...] = tuple(json.loads(models_raw)) if models_raw else ()
    return KeyStats(
        provider=provider,
        key_id=key_id,
        status=status,
        is_rate_limited=enabled and waiting and why in _RATE_LIMITED_WHY,
        cooldown_until=cooldown_until,
        total_requests=_int(raw, "total"),
        success_count=_int(raw, "ok"),
        error_count=_int(raw, "err"),
        errors_by_kind={k: v for k, v in errors.items() if v},
        consecutive_errors=_int(raw, "consec"),
        in_flight=int(in_flight),
        last_used=_seconds(raw, "last_used"),
        last_error=raw.get("last_error") or None,
        last_error_at=_seconds(raw, "last_error_at"),
        unavailable_reason=(why or None) if (waiting or not enabled) else None,
        available_at=at / 1000 if waiting else None,
        disabled_reason=(raw.get("disabled_reason") or "manual") if not enabled else None,
        circuit=circuit,
        weight=float(raw.get("weight") or 1),
        rpm=_limit(raw, "rpm"),
        tpm=_limit(raw, "tpm"),
        rpd=_limit(raw, "rpd"),
        max_concurrency=_limit(raw, "maxc"),
        rpm_left=_left(rpm_left),
        tpm_left=_left(tpm_left),
        rpd_left=_left(rpd_left),
        latency_ms=float(latency) if latency and _int(raw, "lat_n") > 0 else None,
        tokens_used=_int(raw, "tokens"),
        models=models,
        fingerprint=raw.get("fp", ""),
        created_at=_seconds(raw, "created"),
        account=raw.get("acct") or None,
        tpd=_limit(raw, "tpd"),
        itpm=_limit(raw, "itpm"),
        otpm=_limit(raw, "otpm"),
        tpd_left=_left(tpd_left),
        itpm_left=_left(itpm_left),
        otpm_left=_left(otpm_left),
        tokens_in=_int(raw, "tokens_in"),
        tokens_out=_int(raw, "tokens_out"),
        cooling_models=cooling_models,
    )


def parse_stats_reply(provider: str, reply: list[Any]) -> list[KeyStats]:
    """Turn the stats script's reply into :class:`KeyStats`, in the reply's order."""
    now_ms = float(reply[0])
    out = []
    for i in range(1, len(reply), 4):
        key_id, flat, extra, cooling = reply[i], reply[i + 1], reply[i + 2], reply[i + 3]
        raw = dict(zip(flat[0::2], flat[1::2], strict=True))
        out.append(build_stats(provider, key_id, raw, extra, now_ms, cooling))
    return out


@dataclass(frozen=True, slots=True)
class ScopeStats:
    """One limit scope: an account, an account for one model, or a key for one model."""

    provider: str
    scope: str  # "account" | "account_model" | "key_model"
    account: str | None
    key_id: str | None
    model: str | None
    limits: dict[str, int]  # rpm, tpm, rpd, tpd, itpm, otpm, max_concurrency: those set
    left: dict[str, int]  # what each limited budget admits now
    in_flight: int
    cooldown_until: float | None
    unavailable_reason: str | None
    available_at: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_SCOPE_KINDS = {"a": "account", "am": "account_model", "km": "key_model"}
_BUDGETS = ("rpm", "tpm", "rpd", "tpd", "itpm", "otpm")


def parse_scopes_reply(provider: str, reply: list[Any]) -> list[ScopeStats]:
    """Turn the limits script's ``show`` reply into :class:`ScopeStats`."""
    now_ms = float(reply[0])
    out = []
    for i in range(1, len(reply), 3):
        name, flat, extra = str(reply[i]), reply[i + 1], reply[i + 2]
        raw = dict(zip(flat[0::2], flat[1::2], strict=True))
        kind, _, rest = name.partition(":")
        owner, model = ([*rest.split(":", 1), ""])[:2] if kind != "a" else (rest, "")
        limits = {n: _int(raw, n) for n in _BUDGETS if _int(raw, n) > 0}
        if _int(raw, "maxc") > 0:
            limits["max_concurrency"] = _int(raw, "maxc")
        left = {n: int(v) for n, v in zip(_BUDGETS, extra[2:8], strict=True) if int(v) >= 0}
        at = float(extra[0])
        until = float(raw.get("until") or 0)
        out.append(
            ScopeStats(
                provider=provider,
                scope=_SCOPE_KINDS.get(kind, kind),
                account=owner if kind in ("a", "am") else None,
                key_id=owner if kind == "km" else None,
                model=model or None,
                limits=limits,
                left=left,
                in_flight=_int(raw, "inflight"),
                cooldown_until=until / 1000 if until > now_ms else None,
                unavailable_reason=(extra[1] or None) if at > now_ms else None,
                available_at=at / 1000 if at > now_ms else None,
            )
        )
    return out
