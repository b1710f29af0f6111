"""``/status`` (a server-rendered HTML page that refreshes itself) and ``/status.json``:
every provider's keys (their state and why, cooldown left, the models a key cools for, in
flight, budgets and errors) and its limit scopes (accounts, accounts for a model, keys for a
model: limits, budgets left, in flight, state). Built from :meth:`AsyncKeyPool.snapshot`
and :meth:`AsyncKeyPool.scopes`; no secret (nor fingerprint) is ever on them."""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import resources
from string import Template
from typing import Any

from ..log import redact
from ..stats import KeyStats, ScopeStats
from .upstreams import Upstream

__all__ = ["render_status_html", "scope_document", "scope_state", "status_document"]

REFRESH_SECONDS = 5
_STATES = ("active", "cooling", "exhausted", "disabled")
_HIDDEN_FIELDS = ("fingerprint",)
_SCOPE_ORDER = {"account": 0, "account_model": 1, "key_model": 2}
_SCOPE_EXHAUSTED = frozenset({"quota", "rpd", "tpd"})
_SCOPE_COOLING = frozenset({"rate_limit", "circuit", "probe", "rpm", "tpm", "itpm", "otpm"})
_KEY_BUDGETS = ("rpm", "tpm", "rpd", "tpd", "itpm", "otpm")
_template: Template | None = None


def _page() -> Template:
    global _template
    if _template is None:
        text = resources.files(__package__).joinpath("templates/status.html").read_text("utf-8")
        _template = Template(text)
    return _template


def _left(until: float | None, now: float) -> float | None:
    return None if until is None or until <= now else round(until - now, 1)


def scope_state(s: ScopeStats) -> str:
    """``active``, ``cooling`` or ``exhausted``, as for a key: why the scope holds requests
    back decides (a concurrency limit reached leaves it ``active``, its reason beside)."""
    why = s.unavailable_reason
    if why in _SCOPE_EXHAUSTED:
        return "exhausted"
    if why in _SCOPE_COOLING:
        return "cooling"
    return "active"


def scope_owner(s: ScopeStats) -> str:
    """The account of an account scope, the key of a key scope."""
    return (s.account if s.scope in ("account", "account_model") else s.key_id) or ""


def _cooling_models(s: KeyStats, now: float) -> dict[str, float]:
    """The models the key cools for now, with the seconds left, soonest first."""
    left = {m: _left(until, now) for m, until in s.cooling_models.items()}
    return {m: v for m, v in sorted(left.items(), key=lambda i: (i[1] or 0, i[0])) if v}


def key_document(s: KeyStats, now: float) -> dict[str, Any]:
    """One key as JSON: every :class:`KeyStats` field but the fingerprint, plus
    ``cooldown_left`` and ``cooling_models_left`` (model -> seconds)."""
    out = s.as_dict()
    for name in _HIDDEN_FIELDS:
        out.pop(name, None)
    if out.get("last_error"):
        out["last_error"] = redact(str(out["last_error"]))
    out["cooldown_left"] = _left(s.cooldown_until or s.available_at, now)
    out["cooling_models_left"] = _cooling_models(s, now)
    return out


def scope_document(s: ScopeStats, now: float) -> dict[str, Any]:
    """One limit scope as JSON: every :class:`ScopeStats` field, plus ``owner``, ``state``
    and ``cooldown_left`` (seconds until it admits a request again)."""
    out = s.as_dict()
    out["owner"] = scope_owner(s)
    out["state"] = scope_state(s)
    out["cooldown_left"] = _left(s.available_at or s.cooldown_until, now)
    return out


def _scope_sort(s: ScopeStats) -> tuple[int, str, str]:
    return (_SCOPE_ORDER.get(s.scope, 9), scope_owner(s), s.model or "")


def _group(
    stats: Sequence[KeyStats], scopes: Sequence[ScopeStats], upstreams: Mapping[str, Upstream]
) -> dict[str, tuple[list[KeyStats], list[ScopeStats]]]:
    groups: dict[str, tuple[list[KeyStats], list[ScopeStats]]] = {
        p: ([], []) for p in sorted(upstreams)
    }
    for s in stats:
        groups.setdefault(s.provider, ([], []))[0].append(s)
    for c in scopes:
        groups.setdefault(c.provider, ([], []))[1].append(c)
    return {
        p: (sorted(keys, key=lambda k: k.key_id), sorted(limits, key=_scope_sort))
        for p, (keys, limits) in sorted(groups.items())
    }


def status_document(
    stats: Sequence[KeyStats],
    upstreams: Mapping[str, Upstream],
    now: float | None = None,
    scopes: Sequence[ScopeStats] = (),
) -> dict[str, Any]:
    """What ``/status.json`` returns."""
    now = time.time() if now is None else now
    providers = {}
    for provider, (keys, limits) in _group(stats, scopes, upstreams).items():
        upstream = upstreams.get(provider)
        providers[provider] = {
            "upstream": upstream.origin + upstream.base_path if upstream else None,
            "keys": [key_document(k, now) for k in keys],
            "scopes": [scope_document(c, now) for c in limits],
        }
    return {"generated_at": now, "providers": providers}


def _why(s: KeyStats) -> str:
    if s.status == "disabled":
        return s.disabled_reason or "manual"
    if s.unavailable_reason:
        return s.unavailable_reason
    if s.circuit != "closed":
        return f"circuit {s.circuit}"
    return ""


def _short(text: str, width: int = 40) -> str:
    """Escaped ``text``, cut to ``width`` characters (all of it in the title)."""
    if len(text) <= width:
        return html.escape(text)
    return f'<span title="{html.escape(text)}">{html.escape(text[: width - 1])}&hellip;</span>'


def _budget(cap: int | None, left: int | None) -> str:
    if cap is None:
        return "&ndash;"
    return f"{'?' if left is None else left} / {cap}"


def _seconds(left: float | None) -> str:
    return "&ndash;" if left is None else f"{left:.1f} s"


def _more_budgets(s: KeyStats) -> str:
    """The key's tpd, itpm and otpm budgets (those set), left / limit."""
    parts = [
        f"{name} {_budget(cap, rest)}"
        for name, cap, rest in (
            ("tpd", s.tpd, s.tpd_left),
            ("itpm", s.itpm, s.itpm_left),
            ("otpm", s.otpm, s.otpm_left),
        )
        if cap is not None
    ]
    return " &middot; ".join(parts) or "&ndash;"


def _model_cooling(s: KeyStats, now: float) -> str:
    e = html.escape
    return "".join(
        f' <span class="model-cooling" data-model="{e(model)}">cooling for {_short(model, 32)}, '
        f"{left:.0f} s</span>"
        for model, left in _cooling_models(s, now).items()
    )


def _row(s: KeyStats, now: float) -> str:
    e = html.escape
    left = _left(s.cooldown_until or s.available_at, now)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors_by_kind.items())) or "&ndash;"
    in_flight = str(s.in_flight) + (f" / {s.max_concurrency}" if s.max_concurrency else "")
    last = _short(redact(s.last_error), 30) if s.last_error else ""
    why = _short(_why(s))
    tokens = str(s.tokens_used)
    if s.tokens_in or s.tokens_out:
        tokens += f' <span class="why">({s.tokens_in} in, {s.tokens_out} out)</span>'
    cells = [
        f"<td><code>{e(s.key_id)}</code></td>",
        f"<td>{_short(s.account, 24) if s.account else '&ndash;'}</td>",
        f'<td><span class="state {e(s.status)}">{e(s.status)}</span> '
        f'<span class="why">{why}</span>{_model_cooling(s, now)}</td>',
        f'<td class="num">{_seconds(left)}</td>',
        f'<td class="num">{e(in_flight)}</td>',
        f'<td class="num">{s.total_requests}</td>',
        f'<td class="num">{s.success_count}</td>',
        f"<td>{e(errors) if s.errors_by_kind else errors}</td>",
        f'<td class="num">{_budget(s.rpm, s.rpm_left)}</td>',
        f'<td class="num">{_budget(s.tpm, s.tpm_left)}</td>',
        f'<td class="num">{_budget(s.rpd, s.rpd_left)}</td>',
        f"<td>{_more_budgets(s)}</td>",
        f'<td class="num">{tokens}</td>',
        f'<td class="last">{last}</td>',
    ]
    return f'<tr id="key-{e(s.provider)}-{e(s.key_id)}">' + "".join(cells) + "</tr>"


_HEAD = (
    "<tr><th>key</th><th>account</th><th>state</th><th>cooldown left</th><th>in flight</th>"
    "<th>requests</th><th>ok</th><th>errors</th><th>rpm left</th><th>tpm left</th>"
    "<th>rpd left</th><th>other budgets left</th><th>tokens</th><th>last error</th></tr>"
)
_SCOPE_HEAD = (
    "<tr><th>scope</th><th>owner</th><th>model</th><th>state</th><th>cooldown left</th>"
    "<th>in flight</th><th>limits: left / limit</th></tr>"
)


def _scope_limits(s: ScopeStats) -> str:
    parts = []
    for name in _KEY_BUDGETS:
        if name in s.limits:
            parts.append(f"{name} {_budget(s.limits[name], s.left.get(name))}")
    if "max_concurrency" in s.limits:
        parts.append(f"concurrency {s.in_flight} / {s.limits['max_concurrency']}")
    return " &middot; ".join(parts) or "none (cooldown only)"


def _scope_row(s: ScopeStats, now: float) -> str:
    e = html.escape
    owner = scope_owner(s)
    state = scope_state(s)
    why = _short(s.unavailable_reason or "")
    model = s.model or ""
    cells = [
        f"<td>{e(s.scope)}</td>",
        f"<td><code>{_short(owner, 32)}</code></td>",
        f"<td>{_short(model, 32) if model else '&ndash;'}</td>",
        f'<td><span class="state {state}">{state}</span> <span class="why">{why}</span></td>',
        f'<td class="num">{_seconds(_left(s.available_at or s.cooldown_until, now))}</td>',
        f'<td class="num">{s.in_flight}</td>',
        f"<td>{_scope_limits(s)}</td>",
    ]
    ident = "-".join(e(part) for part in (s.provider, s.scope, owner, model) if part)
    return f'<tr id="scope-{ident}">' + "".join(cells) + "</tr>"


def render_status_html(
    stats: Sequence[KeyStats],
    upstreams: Mapping[str, Upstream],
    *,
    store: str,
    namespace: str,
    now: float | None = None,
    scopes: Sequence[ScopeStats] = (),
) -> str:
    """The ``/status`` page."""
    now = time.time() if now is None else now
    e = html.escape
    sections = []
    idle = []
    for provider, (keys, limits) in _group(stats, scopes, upstreams).items():
        upstream = upstreams.get(provider)
        target = e(upstream.origin + upstream.base_path) if upstream else "not routed"
        if not keys and not limits:
            idle.append(f"{e(provider)} &rarr; {target}")
            continue
        counts = Counter(k.status for k in keys)
        summary = " &middot; ".join(f"{counts[s]} {s}" for s in _STATES if counts[s])
        cooling = sum(1 for k in keys if _cooling_models(k, now))
        if cooling:
            summary += f" &middot; {cooling} cooling for a model"
        table = ""
        if keys:
            table = "<table>" + _HEAD + "".join(_row(k, now) for k in keys) + "</table>"
        if limits:
            table += (
                '<h3>limit scopes</h3><table class="scopes">'
                + _SCOPE_HEAD
                + "".join(_scope_row(c, now) for c in limits)
                + "</table>"
            )
        sections.append(
            f'<section id="provider-{e(provider)}"><h2>{e(provider)} '
            f'<span class="why">&rarr; {target} &middot; {summary or "no keys"}</span></h2>'
            f"{table}</section>"
        )
    if idle:
        sections.append('<p class="empty">no keys: ' + ", ".join(idle) + "</p>")
    return _page().substitute(
        refresh=REFRESH_SECONDS,
        store=e(store),
        namespace=e(namespace),
        total_keys=len(stats),
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)),
        sections="".join(sections),
    )
