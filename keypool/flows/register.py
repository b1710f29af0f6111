"""Registering keys, and putting them back when the store lost the pool's state."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from ..envload import scan_env
from ..errors import UnknownKey
from ..fingerprint import fingerprint
from ..keyspace import model_providers_key, providers_key
from ..local import Held
from ..log import remember_secret
from ..ops import Cmd, CmdMany, Flow, Run, RunMany
from ..protocol import Duplicate, Register, parse_register
from ..providers import normalize_provider, validate_account, validate_key_id, validate_model
from ..validate import MAX_CONCURRENCY, check_secret, limit_arg, weight_arg
from .base import FlowBase

__all__ = ["RegisterFlows"]

_REGISTER_CHUNK = 1000


class RegisterFlows(FlowBase):
    def _add_keys_flow(
        self,
        entries: Iterable[tuple[object, str, str]],
        weight: float,
        rpm: int | None,
        tpm: int | None,
        rpd: int | None,
        max_concurrency: int | None,
        models: Iterable[str] | str,
        keep_config: bool = False,
        account: str | None = None,
    ) -> Flow:
        weight = weight_arg(weight)
        account_name = validate_account(account) if account is not None else ""
        limits = (
            limit_arg("rpm", rpm),
            limit_arg("tpm", tpm),
            limit_arg("rpd", rpd),
            limit_arg("max_concurrency", max_concurrency, MAX_CONCURRENCY),
        )
        if isinstance(models, str):
            models = [models]
        model_list = list(dict.fromkeys(validate_model(m) for m in models))
        checked: list[tuple[str, str, Held]] = []
        seen: dict[tuple[str, str], str] = {}
        for provider, key_id, secret in entries:
            name = normalize_provider(provider)
            key_id = validate_key_id(key_id)
            secret = check_secret(key_id, secret)
            held = Held(
                secret,
                fingerprint(secret),
                weight,
                *limits,
                set(model_list),
                keep_config,
                account_name,
            )
            other = seen.setdefault((name, held.fp), key_id)
            if other != key_id and keep_config:  # from the environment: the first one wins
                self._log.warning(
                    "env_key_skipped", detail=f"{name}/{key_id}: same secret as {other!r}"
                )
                continue
            if other != key_id:
                raise ValueError(
                    f"keys {other!r} and {key_id!r} of provider {name!r} have the same secret: "
                    "one secret is one key"
                )
            checked.append((name, key_id, held))
        for start in range(0, len(checked), _REGISTER_CHUNK):
            yield from self._register_flow(checked[start : start + _REGISTER_CHUNK])
        return len(checked)

    def _register_flow(self, batch: list[tuple[str, str, Held]], after_loss: bool = False) -> Flow:
        if not batch:
            return None
        # held before the store is asked: keys whose registration fails for an outage are
        # put back with the others once the store answers again
        previous = [self._state.held(p, k) for p, k, _ in batch]
        batch = [(p, k, self._state.hold(p, k, h)) for p, k, h in batch]
        for _, _, kept in batch:
            remember_secret(kept.secret)
        calls = [(p, self._register_call(p, k, h, after_loss)) for p, k, h in batch]
        if len(calls) == 1:
            replies = [(yield Run(*calls[0]))]
        else:
            replies = yield RunMany(list(calls))
        index: list[tuple[str, tuple[Any, ...]]] = []
        refused: list[str] = []
        model_providers: dict[str, set[str]] = {}
        for (provider, key_id, held), raw, before in zip(batch, replies, previous, strict=True):
            reply = parse_register(raw)
            if isinstance(reply, Duplicate):
                if before is None:
                    self._state.drop(provider, key_id)
                else:
                    self._state.hold(provider, key_id, before)
                refused.append(
                    f"key {key_id!r} of provider {provider!r} has the secret of key "
                    f"{reply.holder!r}: one secret is one key (use that key id)"
                )
                continue
            self._state.set_epoch(provider, reply.epoch)
            for model in held.models:
                model_providers.setdefault(model, set()).add(provider)
            self._log.info(
                "key_registered",
                provider=provider,
                key_id=key_id,
                fingerprint=held.fp,
                result=reply.result,
            )
        providers = sorted({p for p, _, _ in batch})
        index.append(("sadd", (providers_key(self.namespace), *providers)))
        for model, names in model_providers.items():
            index.append(("sadd", (model_providers_key(self.namespace, model), *sorted(names))))
            self._state.forget_model(model)
        yield CmdMany(index)
        if refused and not batch[0][2].keep_config:
            raise ValueError("; ".join(refused))
        for detail in refused:  # keys from the environment: skipped, as other bad entries
            self._log.warning("env_key_skipped", detail=detail)
        return None

    def _register_call(self, provider: str, key_id: str, held: Held, after_loss: bool) -> Register:
        sealed = ""
        if self._sealer is not None:
            sealed = self._sealer.seal(held.secret, self._seal_context(provider, key_id))
        keep = held.keep_config
        return Register(
            key_id=key_id,
            fingerprint=held.fp,
            weight="" if keep else repr(held.weight),
            rpm="" if keep else held.rpm,
            tpm="" if keep else held.tpm,
            rpd="" if keep else held.rpd,
            max_concurrency="" if keep else held.maxc,
            sealed=sealed,
            new_epoch=uuid.uuid4().hex[:12],
            models_json=json.dumps(sorted(held.models)),
            budgets_spent=after_loss and self.settings.restart_budgets == "spent",
            account=held.account,
        )

    def _reregister_flow(self, provider: str) -> Flow:
        """The store lost this provider's state (restart, failover, flush): put back every
        key this process holds, budgets spent. Returns False when it holds none."""
        held = self._state.held_keys(provider)
        if not held:
            return False
        self._log.warning("pool_state_lost", provider=provider, reregistered=len(held))
        for start in range(0, len(held), _REGISTER_CHUNK):
            chunk = held[start : start + _REGISTER_CHUNK]
            yield from self._register_flow([(provider, k, h) for k, h in chunk], after_loss=True)
        for call in self._state.limits_set(provider):  # the limit scopes set here, again
            yield Run(provider, call)
        return True

    def _recover_flow(self, provider: str, *key_ids: str) -> Flow:
        """The store does not know keys this process holds. Either it lost the pool's state
        (the epoch changed): put every held key back, True. Or another process (an
        operator) removed them: forget them here too so they are not brought back, False."""
        missing = [k for k in key_ids if self._state.held(provider, k) is not None]
        if not missing:
            return False
        epoch = yield Cmd("hget", (self._space(provider).meta, "epoch"))
        if epoch is not None and epoch == self._state.epoch(provider):
            for key_id in missing:
                self._state.drop(provider, key_id)
            return False
        yield from self._reregister_flow(provider)
        return True

    def _known_flow(self, provider: str, key_id: str, call: Any) -> Flow:
        """Run a script call about one key; when the store does not know the key, recover
        (see :meth:`_recover_flow`) and run it once more. ``UnknownKey`` if still unknown."""
        reply = yield Run(provider, call)
        if reply[0] == "UNKNOWN" and (yield from self._recover_flow(provider, key_id)):
            reply = yield Run(provider, call)
        if reply[0] == "UNKNOWN":
            raise UnknownKey(f"no key {key_id!r} for provider {provider!r}")
        return reply

    def _load_env_entries(
        self, environ: Mapping[str, str] | None
    ) -> tuple[list[tuple[object, str, str]], list[tuple[str, str]]]:
        scan = scan_env(environ)
        for skipped in scan.skipped:
            self._log.warning("env_key_skipped", detail=skipped)
        entries: list[tuple[object, str, str]] = [
            (k.provider, k.key_id, k.secret) for k in scan.keys
        ]
        return entries, [(k.provider, k.key_id) for k in scan.keys]

    def _checked_key(self, provider: object, key_id: object) -> tuple[str, str]:
        return normalize_provider(provider), validate_key_id(key_id)
