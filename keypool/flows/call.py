"""``call``: run the caller's function with a key, moving to another key after a failure,
then through the fallbacks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import NoKeyAvailable
from ..kinds import ErrorKind
from ..ops import Flow, Invoke, Picked
from ..providers import normalize_provider, validate_model
from ..validate import max_attempts_arg
from .acquire import AcquireFlows

__all__ = ["CallFlows", "call_plan"]

Target = tuple[str | None, str | None]


def call_plan(
    provider: object | None, model: str | None, fallbacks: Sequence[object]
) -> list[Target]:
    """The (provider, model) targets :meth:`KeyPool.call` tries, in order."""
    if provider is None and model is None:
        raise ValueError("call needs a provider, or a model with assigned keys")
    if model is not None:
        model = validate_model(model)
    plan: list[Target] = [(normalize_provider(provider) if provider is not None else None, model)]
    items: Sequence[object] = [fallbacks] if isinstance(fallbacks, str) else fallbacks
    for item in items:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(
                    f"invalid fallback {item!r}: expected a provider or (provider, model)"
                )
            plan.append((normalize_provider(item[0]), validate_model(item[1])))
        else:
            plan.append((normalize_provider(item), model))
    return plan


def function_for(fn: Any, picked: Picked) -> Callable[..., Any]:
    """The caller's function for a lease: ``fn`` itself, or from a mapping keyed by
    ``(provider, model)``, ``provider`` or ``model`` (most specific first)."""
    if not isinstance(fn, Mapping):
        return fn  # type: ignore[no-any-return]
    for key in ((picked.provider, picked.model), picked.provider, picked.model):
        if key is not None and key in fn:
            return fn[key]  # type: ignore[no-any-return]
    raise ValueError(
        f"no function for provider {picked.provider!r} / model {picked.model!r} in call's "
        "mapping: key it by provider, model or (provider, model)"
    )


def check_functions(fn: Any) -> None:
    if isinstance(fn, Mapping):
        for key, value in fn.items():
            if not callable(value):
                raise TypeError(f"call's function for {key!r} is not callable")
    elif not callable(fn):
        raise TypeError("call's fn must be callable, or a mapping of callables")


def earlier(a: NoKeyAvailable | None, b: NoKeyAvailable) -> NoKeyAvailable:
    """Of two NoKeyAvailable, the one whose keys free up first (None = never is last)."""
    if a is None:
        return b
    if b.retry_after is not None and (a.retry_after is None or b.retry_after < a.retry_after):
        return b
    return a


def spent(
    last_error: Exception | None, no_key: NoKeyAvailable | None, ended_without_key: bool
) -> Exception:
    """What ``call`` raises when every target is spent: ``NoKeyAvailable`` (with the
    earliest retry_after over all targets) when the last target ran out of keys, else the
    last provider error."""
    if no_key is not None and (ended_without_key or last_error is None):
        if last_error is not None:
            no_key.__cause__ = last_error
        return no_key
    assert last_error is not None
    return last_error


class CallFlows(AcquireFlows):
    def _call_flow(
        self,
        fn: Any,
        provider: object | None,
        model: str | None,
        fallbacks: Sequence[object],
        max_attempts: int,
        wait: float | None,
        strategy: str | None,
        tokens: int,
    ) -> Flow:
        """The retry loop of ``call``: another key after a failure (never the one that just
        failed while another is available), then the fallbacks; a BAD_REQUEST at once."""
        check_functions(fn)
        attempts = max_attempts_arg(max_attempts)
        plan = call_plan(provider, model, fallbacks)
        last_error: Exception | None = None
        no_key: NoKeyAvailable | None = None
        ended_without_key = False
        for target, target_model in plan:
            avoid: tuple[str, str] | None = None
            ended_without_key = False
            for _ in range(attempts):
                try:
                    picked = yield from self._acquire_flow(
                        target, target_model, strategy, tokens, wait, True, avoid
                    )
                except NoKeyAvailable as exc:
                    no_key = earlier(no_key, exc)
                    ended_without_key = True
                    break
                try:
                    function = function_for(fn, picked)
                except ValueError:
                    yield from self._lease_report_flow(picked, "release")
                    raise
                succeeded, outcome = yield Invoke(function, picked)
                if succeeded:
                    return outcome
                error, failure = outcome
                if failure.kind is ErrorKind.BAD_REQUEST:
                    raise error
                last_error = error
                avoid = (picked.provider, picked.key_id)
        raise spent(last_error, no_key, ended_without_key)
