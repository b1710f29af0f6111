"""The Lua interface, named: one small typed description per script.

Each call class holds a script's ``ARGV`` after the prefix (``ARGV[1]``, which the driver
adds with ``KEYS[1]``), in the order the script's header lists them, and builds that list
in :meth:`argv`; each reply class reads one of the script's replies. Nothing else in the
package indexes script arguments or replies by position. The headers of ``lua/*.lua`` are
the other half of each description.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from . import scripts

__all__ = [
    "Acquire",
    "Admin",
    "AdminReply",
    "Duplicate",
    "Granted",
    "Lost",
    "NoneFree",
    "Register",
    "Registered",
    "Report",
    "ReportReply",
    "ScriptCall",
    "SetLimits",
    "ShowLimits",
    "Stats",
    "parse_acquire",
    "parse_admin",
    "parse_register",
    "parse_report",
]


def _flag(value: bool) -> str:
    return "1" if value else ""


def _optional(value: float | int | None) -> str | float | int:
    return "" if value is None else value


class ScriptCall:
    """A call of one script: which script, and its arguments after the prefix."""

    script: ClassVar[scripts.Script]

    def argv(self) -> list[Any]:
        raise NotImplementedError


# ---------------------------------------------------------------------- acquire.lua


@dataclass(frozen=True, slots=True)
class Acquire(ScriptCall):
    """``acquire.lua``: pick a key, charge it, open a lease (once per ``call_id``)."""

    script: ClassVar[scripts.Script] = scripts.ACQUIRE

    call_id: str
    strategy: str
    tokens: int
    input_tokens: int
    output_tokens: int
    ttl_ms: int  # 0: count the request, hold no lease
    model: str  # '' for any key of the provider
    avoid: str  # key id to avoid while another is available, ''
    epoch: str  # '' to skip the check
    model_only: bool
    unusable: str  # '' or the name of this process's set <prefix>u:<name> of keys it cannot use

    def argv(self) -> list[Any]:
        return [
            self.call_id,
            self.strategy,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
            self.ttl_ms,
            self.model,
            self.avoid,
            self.epoch,
            _flag(self.model_only),
            self.unusable,
        ]


@dataclass(frozen=True, slots=True)
class Granted:
    key_id: str
    fingerprint: str
    sealed: str
    now_ms: int


@dataclass(frozen=True, slots=True)
class NoneFree:
    retry_after: float | None  # seconds; None: no key ever will by itself
    why: str


@dataclass(frozen=True, slots=True)
class Lost:
    """The pool's state is gone or was re-created: re-register, then call again."""

    epoch: str


def parse_acquire(reply: list[Any]) -> Granted | NoneFree | Lost:
    status = reply[0]
    if status == "OK":
        return Granted(reply[1], reply[2], reply[3], int(reply[4]))
    if status == "NONE":
        ms = float(reply[1])
        return NoneFree(None if ms < 0 else ms / 1000.0, str(reply[2]))
    if status == "LOST":
        return Lost(str(reply[1]))
    raise ValueError(f"unexpected acquire reply {status!r}")


# ---------------------------------------------------------------------- report.lua


@dataclass(frozen=True, slots=True)
class Report(ScriptCall):
    """``report.lua``: a call's outcome; closes its lease (once per ``call_id``)."""

    script: ClassVar[scripts.Script] = scripts.REPORT

    call_id: str
    key_id: str
    outcome: str
    leased: bool
    tokens: int | None
    input_tokens: int | None
    output_tokens: int | None
    latency_ms: float | None
    retry_after_ms: int | None
    detail: str
    cooldowns: tuple[int, int, int, int, int, int]  # ARGV[12..17] of report.lua
    scope: str = ""  # key | model | account; '' as the failure says

    def argv(self) -> list[Any]:
        head = [
            self.call_id,
            self.key_id,
            self.outcome,
            _flag(self.leased),
            _optional(self.tokens),
            _optional(self.input_tokens),
            _optional(self.output_tokens),
            "" if self.latency_ms is None else f"{self.latency_ms:.3f}",
            _optional(self.retry_after_ms),
            self.detail,
        ]
        if self.outcome in _NO_FAILURE and not self.scope:
            return head  # the script reads the failure settings only for a failure
        return [*head, *self.cooldowns, self.scope]


_NO_FAILURE = frozenset({"success", "release"})


@dataclass(frozen=True, slots=True)
class ReportReply:
    status: str  # "OK" | "DONE" (already reported: nothing changed) | "UNKNOWN"
    event: str = ""
    why: str = ""
    available_at_ms: int = 0  # 0: now; -1: never
    now_ms: int = 0


def parse_report(reply: list[Any]) -> ReportReply:
    if reply[0] == "OK":
        return ReportReply("OK", reply[1], reply[2], int(reply[3]), int(reply[4]))
    return ReportReply(str(reply[0]))


# ---------------------------------------------------------------------- register.lua


@dataclass(frozen=True, slots=True)
class Register(ScriptCall):
    """``register.lua``: add a key or update it in place."""

    script: ClassVar[scripts.Script] = scripts.REGISTER

    key_id: str
    fingerprint: str
    weight: str  # '' keeps the key's value (each of the five)
    rpm: str | int
    tpm: str | int
    rpd: str | int
    max_concurrency: str | int
    sealed: str
    new_epoch: str
    models_json: str
    budgets_spent: bool
    account: str  # '' keeps the key's account

    def argv(self) -> list[Any]:
        return [
            self.key_id,
            self.fingerprint,
            self.weight,
            self.rpm,
            self.tpm,
            self.rpd,
            self.max_concurrency,
            self.sealed,
            self.new_epoch,
            self.models_json,
            _flag(self.budgets_spent),
            self.account,
        ]


@dataclass(frozen=True, slots=True)
class Registered:
    epoch: str
    result: str  # "created" | "updated" | "rekeyed"


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The secret is already registered under another key id of the provider."""

    holder: str


def parse_register(reply: list[Any]) -> Registered | Duplicate:
    if reply[0] == "DUP":
        return Duplicate(str(reply[1]))
    return Registered(str(reply[0]), str(reply[1]))


# ---------------------------------------------------------------------- admin.lua


@dataclass(frozen=True, slots=True)
class Admin(ScriptCall):
    """``admin.lua``: an operator action on one key."""

    script: ClassVar[scripts.Script] = scripts.ADMIN

    call_id: str
    key_id: str
    action: str  # disable | enable | reset | remove | assign | unassign | renew
    arg: str = ""  # reason, model or lease id
    ttl_ms: int | None = None  # renew only

    def argv(self) -> list[Any]:
        out: list[Any] = [self.call_id, self.key_id, self.action, self.arg]
        if self.ttl_ms is not None:
            out.append(self.ttl_ms)
        return out


@dataclass(frozen=True, slots=True)
class AdminReply:
    known: bool
    changed: bool = False
    emptied: tuple[str, ...] = ()  # models left with no key of the provider


def parse_admin(reply: list[Any]) -> AdminReply:
    if reply[0] == "UNKNOWN":
        return AdminReply(False)
    emptied = tuple(reply[2]) if len(reply) > 2 else ()
    return AdminReply(True, bool(int(reply[1])), emptied)


# ---------------------------------------------------------------------- limits.lua

LIMIT_NAMES = ("rpm", "tpm", "rpd", "tpd", "itpm", "otpm", "max_concurrency")


@dataclass(frozen=True, slots=True)
class SetLimits(ScriptCall):
    """``limits.lua`` set: the limits of one scope (``None`` keeps a limit, 0 removes it)."""

    script: ClassVar[scripts.Script] = scripts.LIMITS

    scope: str  # key | key_model | account | account_model
    owner: str  # the key id, or the account
    model: str
    limits: tuple[int | None, ...]  # in LIMIT_NAMES' order

    def argv(self) -> list[Any]:
        return ["set", self.scope, self.owner, self.model, *(_optional(v) for v in self.limits)]


@dataclass(frozen=True, slots=True)
class ShowLimits(ScriptCall):
    """``limits.lua`` show: every limit scope of the provider."""

    script: ClassVar[scripts.Script] = scripts.LIMITS

    def argv(self) -> list[Any]:
        return ["show"]


# ---------------------------------------------------------------------- stats.lua


@dataclass(frozen=True, slots=True)
class Stats(ScriptCall):
    """``stats.lua``: keys' state (every key of the provider when ``key_ids`` is empty)."""

    script: ClassVar[scripts.Script] = scripts.STATS

    key_ids: tuple[str, ...] = ()

    def argv(self) -> list[Any]:
        return list(self.key_ids)
