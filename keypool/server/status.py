"""``/status`` (a server-rendered HTML page that refreshes itself) and ``/status.json``:
every provider's keys, their state and why, cooldown left, in flight, budgets and errors.
Built from :meth:`AsyncKeyPool.snapshot`; no secret (nor fingerprint) is ever on them."""

from __future__ import annotations

import html
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import resources
from string import Template
from typing import Any

from ..log import redact
from ..stats import KeyStats
from .upstreams import Upstream

__all__ = ["render_status_html", "status_document"]

REFRESH_SECONDS = 5
_STATES = ("active", "cooling", "exhausted", "disabled")
_HIDDEN_FIELDS = ("fingerprint",)
_template: Template | None = None


def _page() -> Template:
    global _template
    if _template is None:
        text = resources.files(__package__).joinpath("templates/status.html").read_text("utf-8")
        _template = Template(text)
    return _template


def _left(until: float | None, now: float) -> float | None:
    return None if until is None or until <= now else round(until - now, 1)


def key_document(s: KeyStats, now: float) -> dict[str, Any]:
    """One key as JSON: every :class:`KeyStats` field but the fingerprint, plus
    ``cooldown_left`` (seconds)."""
    out = s.as_dict()
    for name in _HIDDEN_FIELDS:
        out.pop(name, None)
    if out.get("last_error"):
        out["last_error"] = redact(str(out["last_error"]))
    out["cooldown_left"] = _left(s.cooldown_until or s.available_at, now)
    return out


def _group(stats: Sequence[KeyStats], upstreams: Mapping[str, Upstream]) -> dict[str, list[Any]]:
    groups: dict[str, list[KeyStats]] = {p: [] for p in sorted(upstreams)}
    for s in stats:
        groups.setdefault(s.provider, []).append(s)
    return {p: sorted(keys, key=lambda k: k.key_id) for p, keys in sorted(groups.items())}


def status_document(
    stats: Sequence[KeyStats], upstreams: Mapping[str, Upstream], now: float | None = None
) -> dict[str, Any]:
    """What ``/status.json`` returns."""
    now = time.time() if now is None else now
    providers = {}
    for provider, keys in _group(stats, upstreams).items():
        upstream = upstreams.get(provider)
        providers[provider] = {
            "upstream": upstream.origin + upstream.base_path if upstream else None,
            "keys": [key_document(k, now) for k in keys],
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


def _row(s: KeyStats, now: float) -> str:
    e = html.escape
    left = _left(s.cooldown_until or s.available_at, now)
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s.errors_by_kind.items())) or "&ndash;"
    in_flight = str(s.in_flight) + (f" / {s.max_concurrency}" if s.max_concurrency else "")
    last = _short(redact(s.last_error), 30) if s.last_error else ""
    why = _short(_why(s))
    cells = [
        f"<td><code>{e(s.key_id)}</code></td>",
        f'<td><span class="state {e(s.status)}">{e(s.status)}</span> '
        f'<span class="why">{why}</span></td>',
        f'<td class="num">{"&ndash;" if left is None else f"{left:.1f} s"}</td>',
        f'<td class="num">{e(in_flight)}</td>',
        f'<td class="num">{s.total_requests}</td>',
        f'<td class="num">{s.success_count}</td>',
        f"<td>{e(errors) if s.errors_by_kind else errors}</td>",
        f'<td class="num">{_budget(s.rpm, s.rpm_left)}</td>',
        f'<td class="num">{_budget(s.tpm, s.tpm_left)}</td>',
        f'<td class="num">{_budget(s.rpd, s.rpd_left)}</td>',
        f'<td class="num">{s.tokens_used}</td>',
        f'<td class="last">{last}</td>',
    ]
    return f'<tr id="key-{e(s.provider)}-{e(s.key_id)}">' + "".join(cells) + "</tr>"


_HEAD = (
    "<tr><th>key</th><th>state</th><th>cooldown left</th><th>in flight</th>"
    "<th>requests</th><th>ok</th><th>errors</th><th>rpm left</th><th>tpm left</th>"
    "<th>rpd left</th><th>tokens</th><th>last error</th></tr>"
)


def render_status_html(
    stats: Sequence[KeyStats],
    upstreams: Mapping[str, Upstream],
    *,
    store: str,
    namespace: str,
    now: float | None = None,
) -> str:
    """The ``/status`` page."""
    now = time.time() if now is None else now
    e = html.escape
    sections = []
    idle = []
    for provider, keys in _group(stats, upstreams).items():
        upstream = upstreams.get(provider)
        target = e(upstream.origin + upstream.base_path) if upstream else "not routed"
        if not keys:
            idle.append(f"{e(provider)} &rarr; {target}")
            continue
        counts = Counter(k.status for k in keys)
        summary = " &middot; ".join(f"{counts[s]} {s}" for s in _STATES if counts[s])
        table = "<table>" + _HEAD + "".join(_row(k, now) for k in keys) + "</table>"
        sections.append(
            f'<section id="provider-{e(provider)}"><h2>{e(provider)} '
            f'<span class="why">&rarr; {target} &middot; {summary}</span></h2>{table}</section>'
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
