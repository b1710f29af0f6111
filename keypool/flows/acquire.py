"""Acquiring: pick a key (one script call), with the process's secret for it."""

from __future__ import annotations

import time

from ..errors import KeyPoolError, NoKeyAvailable, NoUsableKey, SecretUnavailable
from ..fingerprint import fingerprint
from ..keyspace import model_providers_key
from ..local import Held, new_lease_id
from ..log import remember_secret
from ..ops import Cmd, CmdMany, Flow, Picked, Run, Sleep
from ..protocol import Acquire, Granted, Lost, parse_acquire
from ..providers import normalize_provider, validate_model
from ..settings import STRATEGIES
from ..validate import seconds_arg, tokens_arg
from .report import ReportFlows

__all__ = ["AcquireFlows"]

MAX_WAIT = 7 * 86_400.0


class AcquireFlows(ReportFlows):
    def _acquire_flow(
        self,
        provider: object | None,
        model: str | None,
        strategy: str | None,
        tokens: int,
        wait: float | None,
        lease: bool,
        avoid: tuple[str, str] | None = None,
        input_tokens: int = 0,
        output_tokens: int = 0,
    ) -> Flow:
        name = normalize_provider(provider) if provider is not None else None
        if model is not None:
            model = validate_model(model)
        if strategy is None:
            strategy = self.settings.strategy
        elif strategy not in STRATEGIES:
            raise ValueError(
                f"invalid strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}"
            )
        sizes = (
            tokens_arg(tokens) or 0,
            tokens_arg(input_tokens, "input_tokens") or 0,
            tokens_arg(output_tokens, "output_tokens") or 0,
        )
        wait_s = seconds_arg("wait", wait, MAX_WAIT)
        if name is None and model is None:
            raise ValueError("acquire needs a provider, or a model with assigned keys")
        deadline = time.monotonic() + (wait_s or 0.0)
        poll = 0.005
        rechecked = False
        while True:
            if name is not None:
                candidates: tuple[str, ...] = (name,)
            else:
                assert model is not None
                candidates = yield from self._providers_for_model_flow(model)
            earliest: float | None = None
            why = "no_keys"
            for candidate in candidates:
                result = yield from self._acquire_once_flow(
                    candidate, model, strategy, sizes, lease, avoid, name is None
                )
                if isinstance(result, Picked):
                    return result
                retry_after, why = result
                if retry_after is not None and (earliest is None or retry_after < earliest):
                    earliest = retry_after
            remaining = deadline - time.monotonic()
            if wait_s and remaining > 0 and earliest is not None:
                if earliest <= remaining:
                    yield Sleep(earliest + 0.001)
                    continue
                if why == "concurrency":
                    # a lease may be given back any moment, earlier than it would expire
                    poll = min(poll * 2, 0.25, remaining)
                    yield Sleep(poll)
                    continue
            if earliest is None and any(self._state.unusable(c) for c in candidates):
                if not rechecked:
                    # maybe re-added or re-sealed since: look at those keys once more
                    rechecked = True
                    self._state.clear_unusable(candidates)
                    continue
                raise self._no_usable_key(name, model, candidates)
            raise self._no_key(name, model, earliest, why)

    def _no_usable_key(
        self, name: str | None, model: str | None, candidates: tuple[str, ...]
    ) -> NoUsableKey:
        skipped = sorted(k for c in candidates for k in self._state.unusable(c))
        why_not = "; ".join(w for c in candidates if (w := self._state.unusable_why(c)))
        return NoUsableKey(
            f"no key of {name or 'any provider'!r} is usable by this process (skipped: "
            f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}): {why_not}",
            retry_after=None,
            provider=name,
            model=model,
        )

    @staticmethod
    def _no_key(
        provider: str | None, model: str | None, retry_after: float | None, why: str
    ) -> NoKeyAvailable:
        what = f"provider {provider!r}" if provider else "any provider"
        if model is not None:
            what += f" for model {model!r}"
        if retry_after is not None:
            hint = f"; retry after {retry_after:.3f}s"
        elif why == "no_keys":
            hint = "; no keys are registered for it (check the provider or model name)"
        else:
            hint = "; none will become available by itself"
        return NoKeyAvailable(
            f"no key of {what} is available ({why}){hint}",
            retry_after=retry_after,
            provider=provider,
            model=model,
        )

    def _acquire_once_flow(
        self,
        provider: str,
        model: str | None,
        strategy: str,
        sizes: tuple[int, int, int],
        lease: bool,
        avoid: tuple[str, str] | None,
        model_only: bool = False,
    ) -> Flow:
        # One id for every try of this pick: a try repeated after a dropped connection, or
        # after the state was put back, is recognised by the script.
        call_id = new_lease_id()
        tokens, input_tokens, output_tokens = sizes
        lost = 0
        for _attempt in range(16):
            unusable, ids = self._state.unusable_set(provider)
            if ids is not None:
                # a set of this process's: an acquire names it (one argument, whatever the
                # count) and the script asks it only about the keys it considers
                name = self._space(provider).key("u:" + unusable)
                yield CmdMany(
                    [("delete", (name,)), ("sadd", (name, *ids)), ("expire", (name, 86400))]
                )
            call = Acquire(
                call_id=call_id,
                strategy=strategy,
                tokens=tokens,
                input_tokens=input_tokens,
                output_tokens=output_tokens,
                ttl_ms=self._lease_ttl_ms if lease else 0,
                model=model or "",
                avoid=avoid[1] if avoid is not None and avoid[0] == provider else "",
                epoch=self._state.epoch(provider),
                model_only=model_only,
                unusable=unusable,
            )
            reply = parse_acquire((yield Run(provider, call)))
            if isinstance(reply, Granted):
                picked = yield from self._picked_flow(provider, model, call_id, reply, sizes)
                if picked is None:  # a key this process cannot use: never picked here again
                    call_id = new_lease_id()
                    continue
                return picked
            if isinstance(reply, Lost):
                # The pool was flushed or re-created: put our keys back and try again. The
                # old epoch is kept while they go back: another thread of this process
                # meanwhile gets LOST too (and re-registers, an idempotent upsert) instead of
                # finding the pool empty and answering NoKeyAvailable.
                lost += 1
                if lost > 3:
                    break
                if not (yield from self._reregister_flow(provider)):
                    self._state.forget_epoch(provider)
                continue
            return reply.retry_after, reply.why
        raise KeyPoolError(f"the pool state of provider {provider!r} keeps changing; giving up")

    def _picked_flow(
        self,
        provider: str,
        model: str | None,
        call_id: str,
        granted: Granted,
        sizes: tuple[int, int, int],
    ) -> Flow:
        """The lease for a granted key, with its secret; None when this process cannot use
        the key (it was given back)."""
        key_id = granted.key_id
        held = self._state.held(provider, key_id)
        if held is not None and held.fp == granted.fingerprint:  # the usual case
            return Picked(provider, key_id, held.secret, call_id, model, *sizes)
        try:
            secret = yield from self._secret_flow(provider, granted, call_id, held)
        except SecretUnavailable as exc:
            self._state.mark_unusable(provider, key_id, str(exc))
            self._log.warning(
                "key_unusable_here", provider=provider, key_id=key_id, reason=str(exc)
            )
            return None
        return Picked(provider, key_id, secret, call_id, model, *sizes)

    def _secret_flow(
        self, provider: str, granted: Granted, call_id: str, held: Held | None
    ) -> Flow:
        """The secret of a picked key this process does not hold as it is in the store
        (``held``: what it holds, if anything): unsealed, or the key is given back."""
        key_id, fp, sealed = granted.key_id, granted.fingerprint, granted.sealed
        if sealed and self._sealer is not None:
            try:
                secret = self._sealer.unseal(sealed, self._seal_context(provider, key_id))
                if fingerprint(secret) != fp:
                    raise SecretUnavailable(
                        f"the sealed secret of key {key_id!r} of provider {provider!r} is "
                        f"older than the key (fingerprint {fp}): add the key again"
                    )
            except SecretUnavailable:
                yield from self._give_back_flow(provider, key_id, call_id)
                raise
            remember_secret(secret)
            return secret
        yield from self._give_back_flow(provider, key_id, call_id)
        if held is not None:
            raise SecretUnavailable(
                f"key {key_id!r} of provider {provider!r} was re-registered with another secret "
                f"(fingerprint {fp}) than this process holds; reload the keys here"
            )
        raise SecretUnavailable(
            f"key {key_id!r} of provider {provider!r} was picked but its secret is not registered "
            "in this process: register the same keys in every process, or use sealed mode "
            "(KEYPOOL_SECRET_KEY)"
        )

    def _give_back_flow(self, provider: str, key_id: str, call_id: str) -> Flow:
        yield Run(provider, self._report_call(call_id, key_id, "release", leased=True))

    def _providers_for_model_flow(self, model: str) -> Flow:
        cached = self._state.providers_of_model(model)
        if cached is not None:
            return cached
        members = yield Cmd("smembers", (model_providers_key(self.namespace, model),))
        # and the providers of the keys this process holds for the model: when the store
        # lost its state, trying them re-registers those keys
        found = tuple(sorted(set(members) | self._state.holding_model(model)))
        if found:
            self._state.remember_model(model, found)
        return found
