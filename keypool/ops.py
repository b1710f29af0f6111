"""The work a flow asks its driver for (sans-IO): a flow is a generator that yields these
and is sent back each reply. :class:`~keypool.pool.KeyPool` runs flows with blocking calls,
:class:`~keypool.aio.AsyncKeyPool` awaits them, so every operation is written once."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from .protocol import ScriptCall

__all__ = ["Cmd", "CmdMany", "Flow", "Invoke", "Op", "Picked", "Run", "RunMany", "Sleep"]


@dataclass(frozen=True, slots=True)
class Run:
    """Run one script for one provider; the raw reply is sent back. With ``confirm``
    False the driver may send it without waiting (then ``None`` is sent back): only for
    calls whose repeat changes nothing and whose reply the flow does not need."""

    provider: str
    call: ScriptCall
    confirm: bool = True


@dataclass(frozen=True, slots=True)
class RunMany:
    """Run many script calls in one pipeline (each routed to its slot on a cluster);
    the replies come back in order."""

    calls: list[tuple[str, ScriptCall]]


@dataclass(frozen=True, slots=True)
class Cmd:
    """One plain Redis command (a client method name and its arguments)."""

    name: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class CmdMany:
    """Plain commands in one pipeline (not a transaction)."""

    cmds: list[tuple[str, tuple[Any, ...]]]


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Picked:
    """A key handed out for one call (what a lease holds)."""

    provider: str
    key_id: str
    secret: str = field(repr=False)
    lease_id: str
    model: str | None
    tokens: int
    input_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Invoke:
    """Run the caller's function with a lease on ``picked`` (for ``call``). The driver
    reports success itself and sends back ``(True, result)``, or reports the failure and
    sends back ``(False, (exception, failure))``; an interrupt releases the lease and
    propagates."""

    fn: Any
    picked: Picked


Op = Run | RunMany | Cmd | CmdMany | Sleep | Invoke
Flow = Generator[Op, Any, Any]
