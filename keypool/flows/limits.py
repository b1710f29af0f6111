"""Limit scopes: the limits of a key, a key for one model, an account, or an account for one
model; and what each scope is doing."""

from __future__ import annotations

from collections.abc import Mapping

from ..ops import Flow, Run
from ..protocol import LIMIT_NAMES, SetLimits, ShowLimits
from ..providers import normalize_provider, validate_account, validate_key_id, validate_model
from ..stats import ScopeStats, parse_scopes_reply
from ..validate import MAX_CONCURRENCY, MAX_LIMIT, limit_arg
from .register import RegisterFlows

__all__ = ["LimitFlows"]


def _limit_or_keep(name: str, value: object) -> int | None:
    """None keeps the limit; 0 removes it; else a whole number in range."""
    if value is None:
        return None
    high = MAX_CONCURRENCY if name == "max_concurrency" else MAX_LIMIT
    return limit_arg(name, value, high, low=0)


class LimitFlows(RegisterFlows):
    def _set_limits_flow(
        self,
        provider: object,
        key_id: str | None,
        account: str | None,
        model: str | None,
        limits: Mapping[str, object],
    ) -> Flow:
        name = normalize_provider(provider)
        if (key_id is None) == (account is None):
            raise ValueError("set_limits needs exactly one of key_id and account")
        owner = validate_key_id(key_id) if key_id is not None else validate_account(account)
        model_name = validate_model(model) if model is not None else ""
        values = tuple(_limit_or_keep(n, limits.get(n)) for n in LIMIT_NAMES)
        if all(v is None for v in values):
            raise ValueError(f"set_limits needs at least one of {', '.join(LIMIT_NAMES)}")
        kind = ("key" if key_id is not None else "account") + ("_model" if model_name else "")
        call = SetLimits(kind, owner, model_name, values)
        where = (kind, owner, model_name)
        before = next(
            (c for c in self._state.limits_set(name) if (c.scope, c.owner, c.model) == where),
            None,
        )
        if before is not None:  # what this process set before, merged: all set again on loss
            merged = tuple(
                v if v is not None else b for v, b in zip(values, before.limits, strict=True)
            )
            remembered = SetLimits(kind, owner, model_name, merged)
        else:
            remembered = call
        yield from self._known_flow(name, owner, call)
        self._state.remember_limits(name, where, remembered)
        self._log.info(
            "limits_set", provider=name, scope=kind, owner=owner, model=model_name or None
        )

    def _scopes_flow(self, provider: object) -> Flow:
        name = normalize_provider(provider)
        scopes: list[ScopeStats] = parse_scopes_reply(name, (yield Run(name, ShowLimits())))
        return scopes
