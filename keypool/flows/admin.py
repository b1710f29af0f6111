"""Operator actions on one key: remove, assign/unassign a model, disable, enable, reset."""

from __future__ import annotations

from ..errors import UnknownKey
from ..keyspace import model_providers_key
from ..local import new_lease_id
from ..log import redact
from ..ops import Cmd, CmdMany, Flow, Run
from ..protocol import Admin, AdminReply, parse_admin
from ..providers import validate_model
from .register import RegisterFlows

__all__ = ["AdminFlows"]


class AdminFlows(RegisterFlows):
    def _admin_flow(self, provider: str, key_id: str, action: str, arg: str = "") -> Flow:
        raw = yield from self._known_flow(
            provider, key_id, Admin(new_lease_id(), key_id, action, arg)
        )
        return parse_admin(raw)

    def _remove_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = self._checked_key(provider, key_id)
        reply = parse_admin((yield Run(name, Admin(new_lease_id(), key_id, "remove"))))
        self._state.drop(name, key_id)
        if not reply.known:
            raise UnknownKey(f"no key {key_id!r} for provider {name!r}")
        yield from self._forget_models_flow(name, reply)
        self._log.info("key_removed", provider=name, key_id=key_id)

    def _forget_models_flow(self, provider: str, reply: AdminReply) -> Flow:
        """Models left with no key of ``provider`` no longer list it (nothing accumulates)."""
        if reply.emptied:
            yield CmdMany(
                [
                    ("srem", (model_providers_key(self.namespace, m), provider))
                    for m in reply.emptied
                ]
            )
            for model in reply.emptied:
                self._state.forget_model(model)

    def _assign_flow(self, model: str, provider: object, key_id: str, assign: bool) -> Flow:
        model = validate_model(model)
        name, key_id = self._checked_key(provider, key_id)
        reply = yield from self._admin_flow(name, key_id, "assign" if assign else "unassign", model)
        if not assign:
            yield from self._forget_models_flow(name, reply)
        self._state.set_models(name, key_id, model, assign)
        if assign:
            yield Cmd("sadd", (model_providers_key(self.namespace, model), name))
            self._log.info("model_assigned", provider=name, key_id=key_id, model=model)
        self._state.forget_model(model)

    def _disable_flow(self, provider: object, key_id: str, reason: str) -> Flow:
        name, key_id = self._checked_key(provider, key_id)
        if not isinstance(reason, str) or len(reason) > 200:
            raise ValueError("invalid reason: expected a str of at most 200 characters")
        try:
            reason.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("invalid reason: expected valid UTF-8") from None
        reason = redact(reason)  # an operator may paste an error text that holds a key
        if (yield from self._admin_flow(name, key_id, "disable", reason)).changed:
            self._log.warning(
                "key_disabled", provider=name, key_id=key_id, reason=reason or "manual"
            )

    def _enable_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = self._checked_key(provider, key_id)
        if (yield from self._admin_flow(name, key_id, "enable")).changed:
            self._log.info("key_enabled", provider=name, key_id=key_id)

    def _reset_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = self._checked_key(provider, key_id)
        yield from self._admin_flow(name, key_id, "reset")
        self._log.info("key_reset", provider=name, key_id=key_id)
