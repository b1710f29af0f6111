"""What one process knows that the store does not: the secrets it registered (to put them
back if the store loses its state), the keys it cannot use, the epochs it registered under
and a short cache of model routing. One object, one lock."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Held", "LocalState", "new_lease_id"]

MODEL_CACHE_SECONDS = 5.0

# Lease ids: a random prefix per process (drawn again in a forked child) and a counter —
# unique across a fleet without a system call per lease, whatever the application does
# to the `random` module.
_lease_prefix = os.urandom(6).hex()
_lease_counter = itertools.count()


_serials = itertools.count()


def _new_lease_prefix() -> None:
    global _lease_prefix, _lease_counter
    _lease_prefix = os.urandom(6).hex()
    _lease_counter = itertools.count()


os.register_at_fork(after_in_child=_new_lease_prefix)


def new_lease_id() -> str:
    """An id unique across processes and hosts (48 random bits, then a counter): names a
    lease, or any one call whose repeat must be recognised."""
    return f"{_lease_prefix}{next(_lease_counter):x}"


@dataclass(slots=True)
class Held:
    """A key registered by this process: enough to register it again."""

    secret: str = field(repr=False)
    fp: str
    weight: float
    rpm: int
    tpm: int
    rpd: int
    maxc: int
    models: set[str]
    keep_config: bool = False  # weight and limits not given: keep what the store has
    account: str = ""  # '' : keep the key's account in the store


class LocalState:
    """This process's own knowledge of the pool; every method takes the one lock."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held: dict[str, dict[str, Held]] = {}
        self._unusable: dict[str, set[str]] = {}
        self._unusable_why: dict[str, str] = {}
        self._unusable_written: dict[str, tuple[str, float]] = {}  # name+digest, when
        self._serial = next(_serials)
        self._epochs: dict[str, str] = {}
        self._models: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._limits: dict[str, dict[tuple[str, str, str], Any]] = {}

    # ---------------------------------------------------------------- held keys

    def hold(self, provider: str, key_id: str, held: Held) -> Held:
        """Keep ``held`` for the key, merged with what was held for it before (same secret:
        its models too; config not given: the config given earlier). Returns it."""
        with self._lock:
            keys = self._held.setdefault(provider, {})
            previous = keys.get(key_id)
            if previous is not None and previous.fp == held.fp:
                held.models |= previous.models
            if previous is not None and not held.account:
                held.account = previous.account
            if previous is not None and held.keep_config and not previous.keep_config:
                held.weight, held.rpm, held.tpm = previous.weight, previous.rpm, previous.tpm
                held.rpd, held.maxc, held.keep_config = previous.rpd, previous.maxc, False
            keys[key_id] = held
            self._unusable.get(provider, set()).discard(key_id)
            return held

    def drop(self, provider: str, key_id: str) -> None:
        with self._lock:
            self._held.get(provider, {}).pop(key_id, None)

    def held(self, provider: str, key_id: str) -> Held | None:
        with self._lock:
            return self._held.get(provider, {}).get(key_id)

    def held_keys(self, provider: str) -> list[tuple[str, Held]]:
        with self._lock:
            return list(self._held.get(provider, {}).items())

    def held_providers(self) -> set[str]:
        with self._lock:
            return {p for p, keys in self._held.items() if keys}

    def holding_model(self, model: str) -> set[str]:
        """Providers of the keys held here for ``model``."""
        with self._lock:
            return {
                p for p, keys in self._held.items() if any(model in h.models for h in keys.values())
            }

    def set_models(self, provider: str, key_id: str, model: str, assigned: bool) -> None:
        with self._lock:
            held = self._held.get(provider, {}).get(key_id)
            if held is not None:
                (held.models.add if assigned else held.models.discard)(model)

    # ---------------------------------------------------------------- limit scopes set here

    def remember_limits(self, provider: str, where: tuple[str, str, str], call: Any) -> None:
        """Keep a ``set_limits`` made here, to set again if the store loses its state."""
        with self._lock:
            self._limits.setdefault(provider, {})[where] = call

    def limits_set(self, provider: str) -> list[Any]:
        with self._lock:
            return list(self._limits.get(provider, {}).values())

    # ---------------------------------------------------------------- unusable keys

    def mark_unusable(self, provider: str, key_id: str, why: str) -> None:
        with self._lock:
            self._unusable.setdefault(provider, set()).add(key_id)
            self._unusable_why[provider] = why
            self._unusable_written.pop(provider, None)

    def unusable_set(self, provider: str) -> tuple[str, list[str] | None]:
        """The name (after ``u:``) of this process's store set of the keys it cannot use
        ('' when none), and the ids to write there first when its content changed, it was
        written by another process (a fork) or an hour ago (else None). One set per process
        and pool: it is rewritten in place, and expires a day after its process is gone."""
        with self._lock:
            ids = sorted(self._unusable.get(provider, ()))
            if not ids:
                return "", None
            name = f"{_lease_prefix}.{self._serial}"
            digest = hashlib.sha1("\n".join(ids).encode("utf-8")).hexdigest()
            written = self._unusable_written.get(provider)
            if (
                written is not None
                and written[0] == name + digest
                and time.monotonic() - written[1] < 3600
            ):
                return name, None
            self._unusable_written[provider] = (name + digest, time.monotonic())
            return name, ids

    def unusable(self, provider: str) -> list[str]:
        with self._lock:
            return sorted(self._unusable.get(provider, ()))

    def unusable_why(self, provider: str) -> str | None:
        with self._lock:
            return self._unusable_why.get(provider)

    def clear_unusable(self, providers: tuple[str, ...]) -> None:
        with self._lock:
            for provider in providers:
                self._unusable.pop(provider, None)
                self._unusable_written.pop(provider, None)

    # ---------------------------------------------------------------- epochs

    def epoch(self, provider: str) -> str:
        with self._lock:
            return self._epochs.get(provider, "")

    def set_epoch(self, provider: str, epoch: str) -> None:
        with self._lock:
            self._epochs[provider] = epoch

    def forget_epoch(self, provider: str) -> None:
        with self._lock:
            self._epochs.pop(provider, None)

    # ---------------------------------------------------------------- model routing

    def providers_of_model(self, model: str) -> tuple[str, ...] | None:
        with self._lock:
            cached = self._models.get(model)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        return None

    def remember_model(self, model: str, providers: tuple[str, ...]) -> None:
        with self._lock:
            self._models[model] = (time.monotonic() + MODEL_CACHE_SECONDS, providers)

    def forget_model(self, model: str) -> None:
        with self._lock:
            self._models.pop(model, None)
