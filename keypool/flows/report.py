"""Reporting how a call went: the one report path of every lease (sync and async) and of
the calls made without one (``mark_success`` / ``mark_failure``)."""

from __future__ import annotations

from collections.abc import Mapping

from ..classify import Failure, classify
from ..lane import Late
from ..local import new_lease_id
from ..ops import Flow, Picked, Run
from ..protocol import Admin, Report, ReportReply, parse_admin, parse_report
from ..validate import DAY_SECONDS, seconds_arg, tokens_arg
from .register import RegisterFlows

__all__ = ["ReportFlows", "scope_arg"]

SCOPES = ("key", "model", "account")


def scope_arg(scope: object) -> str:
    """The scope a failure cools: None (as the failure says), "key", "model", "account"."""
    if scope is None:
        return ""
    if scope not in SCOPES:
        raise ValueError(f"invalid scope {scope!r}: expected one of {', '.join(SCOPES)} or None")
    return str(scope)


_WARN_EVENTS = ("key_disabled", "circuit_opened", "key_exhausted")


def _scope_of(scope: str | None, failure: Failure | None) -> str:
    """What a failure cools: the caller's scope, else the limit the provider named."""
    return scope_arg(scope) or (failure.scope if failure is not None and failure.scope else "")


class ReportFlows(RegisterFlows):
    def _report_call(
        self,
        call_id: str,
        key_id: str,
        outcome: str,
        *,
        leased: bool,
        tokens: int | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        latency: float | None = None,
        failure: Failure | None = None,
        scope: str = "",
    ) -> Report:
        retry_ms = None
        detail = ""
        if failure is not None:
            detail = failure.detail[:120]
            if failure.retry_after is not None:
                # providers' hints are clamped: a bad header never cools a key for years
                seconds = min(failure.retry_after, self.settings.max_cooldown)
                retry_ms = int(max(0.0, seconds) * 1000)
        return Report(
            call_id=call_id,
            key_id=key_id,
            outcome=outcome,
            leased=leased,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency_ms=None if latency is None else latency * 1000,
            retry_after_ms=retry_ms,
            detail=detail,
            cooldowns=self._cooldowns,
            scope=scope,
        )

    def _lease_report_flow(
        self,
        picked: Picked,
        outcome: str,
        tokens: int | None = None,
        latency: float | None = None,
        failure: Failure | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        scope: str | None = None,
    ) -> Flow:
        """Close a lease with its outcome. A success or a release may go out without
        waiting for its reply (the driver decides: see ``Run.confirm``): the script counts
        it once whatever happens to the connection, and its reply is only logged."""
        call = self._report_call(
            picked.lease_id,
            picked.key_id,
            outcome,
            leased=True,
            tokens=tokens,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            latency=latency,
            failure=failure,
            scope=_scope_of(scope, failure),
        )
        raw = yield Run(picked.provider, call, confirm=failure is not None)
        if raw is None:
            return
        reply = parse_report(raw)
        # The store lost the pool's state since the acquire: the lease is gone with it, but
        # what the provider said of the key still counts once the key is back.
        if (
            reply.status == "UNKNOWN"
            and failure is not None
            and (yield from self._recover_flow(picked.provider, picked.key_id))
        ):
            again = self._report_call(
                picked.lease_id,
                picked.key_id,
                outcome,
                leased=False,
                failure=failure,
                scope=_scope_of(scope, failure),
            )
            reply = parse_report((yield Run(picked.provider, again)))
        self._log_report(picked.provider, picked.key_id, outcome, failure, reply)

    def _log_late(self, late: list[Late]) -> None:
        """Replies of reports a lane sent without waiting (sync or asyncio): logged (events,
        errors), never raised."""
        for item in late:
            provider, call = item.tag
            if not isinstance(call, Report):
                continue
            if item.error is not None:
                self._log.warning(
                    "report_unconfirmed",
                    provider=provider,
                    key_id=call.key_id,
                    outcome=call.outcome,
                    error=type(item.error).__name__,
                )
            elif item.reply is not None:
                self._log_report(
                    provider, call.key_id, call.outcome, None, parse_report(item.reply)
                )

    def _mark_flow(
        self,
        provider: str,
        key_id: str,
        outcome: str,
        *,
        tokens: int | None = None,
        latency: float | None = None,
        failure: Failure | None = None,
    ) -> Flow:
        """A report without a lease: its own call id makes a repeat count once."""
        call = self._report_call(
            new_lease_id(),
            key_id,
            outcome,
            leased=False,
            tokens=tokens,
            latency=latency,
            failure=failure,
            scope=_scope_of(None, failure),
        )
        reply = parse_report((yield from self._known_flow(provider, key_id, call)))
        self._log_report(provider, key_id, outcome, failure, reply)

    def _log_report(
        self,
        provider: str,
        key_id: str,
        outcome: str,
        failure: Failure | None,
        reply: ReportReply,
    ) -> None:
        if not reply.event:
            return
        at = reply.available_at_ms
        (self._log.warning if reply.event in _WARN_EVENTS else self._log.info)(
            reply.event,
            provider=provider,
            key_id=key_id,
            kind=outcome,
            detail=failure.detail if failure else None,
            until=round(at / 1000, 3) if at > 0 else None,
            reason=reply.why or None,
        )

    def _mark_success_flow(
        self, provider: object, key_id: str, tokens: int | None, latency: float | None
    ) -> Flow:
        name, key_id = self._checked_key(provider, key_id)
        tokens = tokens_arg(tokens, allow_none=True)
        latency = seconds_arg("latency", latency)
        yield from self._mark_flow(name, key_id, "success", tokens=tokens, latency=latency)

    def _mark_failure_flow(
        self,
        provider: object,
        key_id: str,
        error: object,
        retry_after: float | None,
        headers: Mapping[str, str] | None,
    ) -> Flow:
        name, key_id = self._checked_key(provider, key_id)
        failure = classify(error, retry_after=retry_after, headers=headers)
        yield from self._mark_flow(name, key_id, failure.kind.value, failure=failure)
        return failure

    def _renew_flow(self, picked: Picked, ttl: float | None) -> Flow:
        seconds = seconds_arg("ttl", ttl, DAY_SECONDS, positive=True)
        ms = int((seconds if seconds is not None else self.settings.lease_ttl) * 1000)
        call = Admin(new_lease_id(), picked.key_id, "renew", picked.lease_id, ms)
        reply = parse_admin((yield Run(picked.provider, call)))
        return reply.known and reply.changed
