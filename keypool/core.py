"""What :class:`KeyPool` and :class:`AsyncKeyPool` share: validation, the pool's local
state, and every operation written once as a generator that yields the Redis work it needs
(sans-IO). The sync pool runs those generators with blocking calls, the async pool awaits.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import (
    ClusterError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import scripts
from .classify import Failure, classify
from .envload import scan_env
from .errors import (
    ConfigError,
    KeyPoolError,
    NoKeyAvailable,
    NoUsableKey,
    PoolUnavailable,
    SecretUnavailable,
    UnknownKey,
)
from .fingerprint import fingerprint
from .keyspace import ProviderKeys, model_providers_key, providers_key
from .kinds import ErrorKind
from .log import configure_logging, get_logger, redact, remember_secret
from .providers import normalize_provider, validate_key_id, validate_model
from .sealing import Sealer
from .settings import STRATEGIES, KeyPoolSettings, load_settings
from .stats import KeyStats, parse_stats_reply
from .store import parse_url, redact_url

__all__ = ["Cmd", "CmdMany", "Flow", "Invoke", "Picked", "PoolCore", "Run", "Sleep"]

_MODEL_CACHE_SECONDS = 5.0
_REGISTER_CHUNK = 1000


# ---------------------------------------------------------------------- the Redis work


@dataclass(slots=True)
class Run:
    """Run one script for one provider; the reply is sent back."""

    script: scripts.Script
    provider: str
    args: list[Any]


@dataclass(slots=True)
class Cmd:
    """One plain Redis command (a client method name and its arguments)."""

    name: str
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class CmdMany:
    """Plain commands in one pipeline (not a transaction). With ``raise_on_error`` False,
    a command's error comes back in its place among the replies."""

    cmds: list[tuple[str, tuple[Any, ...]]]
    raise_on_error: bool = True


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Invoke:
    """Run the caller's function with a lease on ``picked`` (for ``call``). The driver
    reports success itself and sends back ``(True, result)``, or reports the failure and
    sends back ``(False, (exception, failure))``; an interrupt releases the lease and
    propagates."""

    fn: Any
    picked: Picked


Op = Run | Cmd | CmdMany | Sleep | Invoke
Flow = Generator[Op, Any, Any]

STORE_DOWN = (RedisConnectionError, RedisTimeoutError, OSError)
# a cluster that is down (CLUSTERDOWN, MASTERDOWN, its retries spent) or moving a slot
STORE_BUSY = (ClusterError, TryAgainError)


# ---------------------------------------------------------------------- local state

# Lease ids: a random prefix per process (drawn again in a forked child) and a counter —
# unique across a fleet without a system call per lease, whatever the application does
# to the `random` module.
_lease_prefix = os.urandom(6).hex()
_lease_counter = itertools.count()


def _new_lease_prefix() -> None:
    global _lease_prefix, _lease_counter
    _lease_prefix = os.urandom(6).hex()
    _lease_counter = itertools.count()


os.register_at_fork(after_in_child=_new_lease_prefix)


def new_lease_id() -> str:
    """A lease id unique across processes and hosts (48 random bits, then a counter)."""
    return f"{_lease_prefix}{next(_lease_counter):x}"


@dataclass(slots=True)
class Held:
    """A key registered by this process: enough to re-register it if Redis loses it."""

    secret: str = field(repr=False)
    fp: str
    weight: float
    rpm: int
    tpm: int
    rpd: int
    maxc: int
    models: set[str]
    keep_config: bool = False  # weight and limits not given: keep what Redis has


@dataclass(frozen=True, slots=True)
class Picked:
    provider: str
    key_id: str
    secret: str = field(repr=False)
    lease_id: str
    model: str | None
    tokens: int


# ---------------------------------------------------------------------- validation


def positive_int(name: str, value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"invalid {name} {value!r}: expected a positive int or None")
    return value


def seconds_arg(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"invalid {name} {value!r}: expected a number of seconds")
    if value < 0:
        raise ValueError(f"invalid {name} {value!r}: expected seconds >= 0")
    return float(value)


def tokens_arg(value: object, *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"invalid tokens {value!r}: expected an int >= 0")
    return value


def check_secret(key_id: str, secret: object) -> str:
    if secret is None or secret == "":
        raise ValueError(f"missing secret for key {key_id!r}: expected a non-empty str")
    if not isinstance(secret, str):
        raise TypeError(f"secret for key {key_id!r} must be a str, not {type(secret).__name__}")
    if secret != secret.strip() or any(c in secret for c in "\r\n\x00"):
        raise ValueError(
            f"secret for key {key_id!r} has surrounding whitespace or a control character"
        )
    return secret


def call_plan(
    provider: object | None, model: str | None, fallbacks: Sequence[object]
) -> list[tuple[str | None, str | None]]:
    """The (provider, model) targets :meth:`KeyPool.call` tries, in order."""
    if provider is None and model is None:
        raise ValueError("call needs a provider, or a model with assigned keys")
    if model is not None:
        model = validate_model(model)
    plan: list[tuple[str | None, str | None]] = [
        (normalize_provider(provider) if provider is not None else None, model)
    ]
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


def max_attempts_arg(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid max_attempts {value!r}: expected an int >= 1")
    return value


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


# ---------------------------------------------------------------------- the shared core


class PoolCore:
    """State and operations shared by the sync and async pools."""

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
    ) -> None:
        settings = settings if settings is not None else load_settings()
        update: dict[str, Any] = {}
        if url is not None:
            parse_url(url)
            update["redis_url"] = url
        if namespace is not None:
            update["namespace"] = load_settings(
                namespace=namespace, redis_url=settings.redis_url
            ).namespace
        if update:
            settings = settings.model_copy(update=update)
        self.settings = settings
        self.namespace = settings.namespace
        self.url = settings.redis_url
        configure_logging(settings.log_format, settings.log_level)
        self._log = get_logger().bind(namespace=self.namespace)
        self._sealer: Sealer | None = None
        if settings.secret_key is not None:
            old = settings.old_secret_keys.get_secret_value() if settings.old_secret_keys else ""
            self._sealer = Sealer(
                settings.secret_key.get_secret_value(),
                tuple(k.strip() for k in old.split(",") if k.strip()),
            )
        self._lock = threading.RLock()
        self._held: dict[str, dict[str, Held]] = {}
        self._unusable: dict[str, set[str]] = {}  # keys picked here whose secret we lack
        self._unusable_why: dict[str, str] = {}
        self._epochs: dict[str, str] = {}
        self._spaces: dict[str, ProviderKeys] = {}
        self._model_cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._lease_ttl_ms = int(settings.lease_ttl * 1000)
        self._report_args = [
            str(int(settings.rate_limit_cooldown * 1000)),
            str(int(settings.rate_limit_max_cooldown * 1000)),
            str(int(settings.quota_cooldown * 1000)),
            str(settings.error_threshold),
            str(int(settings.circuit_cooldown * 1000)),
            str(int(settings.circuit_max_cooldown * 1000)),
        ]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={redact_url(self.url)!r}, namespace={self.namespace!r})"

    # ------------------------------------------------------------------ plumbing

    def _space(self, provider: str) -> ProviderKeys:
        space = self._spaces.get(provider)
        if space is None:
            space = self._spaces[provider] = ProviderKeys(self.namespace, provider)
        return space

    def _unavailable(self, exc: BaseException) -> PoolUnavailable:
        self._log.error("pool_unavailable", url=redact_url(self.url), error=type(exc).__name__)
        return PoolUnavailable(
            f"Redis at {redact_url(self.url)} is unreachable or timed out ({type(exc).__name__})"
        )

    def _translate(self, exc: BaseException) -> BaseException:
        """The error a caller should see for a failure of the store."""
        if isinstance(exc, RedisAuthenticationError):
            return ConfigError(
                f"Redis at {redact_url(self.url)}: authentication failed "
                "(check the user name and password in the store URL)"
            )
        if isinstance(exc, STORE_DOWN):
            return self._unavailable(exc)
        if isinstance(exc, RedisError):
            text = str(exc)
            if isinstance(exc, NoPermissionError) or "NOPERM" in text or "can't run" in text:
                return ConfigError(
                    f"the Redis user of {redact_url(self.url)} may not do what keypool needs "
                    f"in namespace {self.namespace!r}: it needs ~{self.namespace}:* and the "
                    "commands EVALSHA, SCRIPT, TIME, HSET/HMGET, ZADD/ZRANGE, SADD/SMEMBERS "
                    f"({type(exc).__name__})"
                )
            # redis-py strips the code from the messages of the errors it has classes for
            # (ClusterDownError, MasterDownError, TryAgainError): test the classes too
            if isinstance(exc, STORE_BUSY) or text.startswith(
                ("BUSY", "LOADING", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN")
            ):
                return self._unavailable(exc)
        if isinstance(exc, SlotNotCoveredError) or (
            # a slot nobody serves now, or no node of the cluster answering
            isinstance(exc, RedisClusterException) and "cannot be connected" in str(exc)
        ):
            return self._unavailable(exc)
        return exc

    # ------------------------------------------------------------------ registration

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
    ) -> Flow:
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"invalid weight {weight!r}: expected a number > 0")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"invalid weight {weight!r}: expected a number > 0")
        limits = (
            positive_int("rpm", rpm),
            positive_int("tpm", tpm),
            positive_int("rpd", rpd),
            positive_int("max_concurrency", max_concurrency),
        )
        if isinstance(models, str):
            models = [models]
        model_list = list(dict.fromkeys(validate_model(m) for m in models))
        checked: list[tuple[str, str, Held]] = []
        for provider, key_id, secret in entries:
            name = normalize_provider(provider)
            key_id = validate_key_id(key_id)
            secret = check_secret(key_id, secret)
            held = Held(
                secret, fingerprint(secret), float(weight), *limits, set(model_list), keep_config
            )
            checked.append((name, key_id, held))
        for start in range(0, len(checked), _REGISTER_CHUNK):
            yield from self._register_flow(checked[start : start + _REGISTER_CHUNK])
        return len(checked)

    def _register_flow(self, batch: list[tuple[str, str, Held]]) -> Flow:
        if not batch:
            return None
        with self._lock:
            for provider, key_id, held in batch:
                previous = self._held.setdefault(provider, {}).get(key_id)
                if previous is not None and previous.fp == held.fp:
                    held.models |= previous.models
                if previous is not None and held.keep_config and not previous.keep_config:
                    held.weight, held.rpm, held.tpm = previous.weight, previous.rpm, previous.tpm
                    held.rpd, held.maxc, held.keep_config = previous.rpd, previous.maxc, False
                self._held[provider][key_id] = held
                self._unusable.get(provider, set()).discard(key_id)
                remember_secret(held.secret)
        calls = [(p, self._register_args(p, k, h)) for p, k, h in batch]
        if len(calls) == 1:
            replies = [(yield Run(scripts.REGISTER, *calls[0]))]
        else:
            replies = yield from self._run_many_flow(scripts.REGISTER, calls)
        index: list[tuple[str, tuple[Any, ...]]] = [
            ("sadd", (providers_key(self.namespace), *sorted({p for p, _, _ in batch})))
        ]
        model_providers: dict[str, set[str]] = {}
        for provider, _, held in batch:
            for model in held.models:
                model_providers.setdefault(model, set()).add(provider)
        for model, names in model_providers.items():
            index.append(("sadd", (model_providers_key(self.namespace, model), *sorted(names))))
            self._model_cache.pop(model, None)
        yield CmdMany(index)
        for (provider, key_id, held), (epoch, result) in zip(batch, replies, strict=True):
            self._epochs[provider] = epoch
            self._log.info(
                "key_registered",
                provider=provider,
                key_id=key_id,
                fingerprint=held.fp,
                result=result,
            )
        return None

    def _register_args(self, provider: str, key_id: str, held: Held) -> list[Any]:
        sealed = ""
        if self._sealer is not None:
            sealed = self._sealer.seal(held.secret, self._seal_context(provider, key_id))
        config: list[Any] = [repr(held.weight), held.rpm, held.tpm, held.rpd, held.maxc]
        if held.keep_config:
            config = [""] * 5
        return [
            key_id,
            held.fp,
            *config,
            sealed,
            uuid.uuid4().hex[:12],
            json.dumps(sorted(held.models)),
        ]

    def _run_many_flow(self, script: scripts.Script, calls: list[tuple[str, list[Any]]]) -> Flow:
        """Every call in one pipeline of EVALSHA (not a transaction; on a cluster each call
        goes to the node that owns its keys' slot). When a server lost the script (NOSCRIPT:
        a restart, a failover, SCRIPT FLUSH), load it and send those calls again."""
        commands: list[tuple[str, tuple[Any, ...]]] = []
        for provider, argv in calls:
            space = self._space(provider)
            keys = space.keys
            # execute_command, not pipe.evalsha: cluster pipelines refuse evalsha, while an
            # EVALSHA command is routed by its keys like any other
            commands.append(
                ("execute_command", ("EVALSHA", script.sha, len(keys), *keys, space.prefix, *argv))
            )
        replies: list[Any] = [None] * len(commands)
        todo = list(range(len(commands)))
        for _attempt in range(3):
            answered = yield CmdMany([commands[i] for i in todo], raise_on_error=False)
            for i, reply in zip(todo, answered, strict=True):
                replies[i] = reply
            todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
            if not todo:
                break
            yield Cmd("script_load", (script.source,))  # on a cluster: on every primary
        for reply in replies:
            if isinstance(reply, Exception):
                raise self._translate(reply)
        return replies

    def _seal_context(self, provider: str, key_id: str) -> str:
        return f"{self.namespace}/{provider}/{key_id}"

    def _reregister_flow(self, provider: str) -> Flow:
        """Redis lost this provider's state (restart, failover, flush): put back every key
        this process holds. Returns False when it holds none."""
        with self._lock:
            held = list(self._held.get(provider, {}).items())
        if not held:
            return False
        self._log.warning("pool_state_lost", provider=provider, reregistered=len(held))
        for start in range(0, len(held), _REGISTER_CHUNK):
            chunk = held[start : start + _REGISTER_CHUNK]
            yield from self._register_flow([(provider, key_id, h) for key_id, h in chunk])
        return True

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

    # ------------------------------------------------------------------ admin

    def _remove_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        reply = yield Run(scripts.ADMIN, name, [key_id, "remove", ""])
        with self._lock:
            self._held.get(name, {}).pop(key_id, None)
        if reply[0] == "UNKNOWN":
            raise UnknownKey(f"no key {key_id!r} for provider {name!r}")
        yield from self._forget_models_flow(name, reply)
        self._log.info("key_removed", provider=name, key_id=key_id)

    def _forget_models_flow(self, provider: str, reply: list[Any]) -> Flow:
        """Models left with no key of ``provider`` no longer list it (nothing accumulates)."""
        emptied = reply[2] if len(reply) > 2 else []
        if emptied:
            yield CmdMany(
                [("srem", (model_providers_key(self.namespace, m), provider)) for m in emptied]
            )
            for model in emptied:
                self._model_cache.pop(model, None)

    def _recover_flow(self, provider: str, *key_ids: str) -> Flow:
        """Redis does not know keys this process holds. Either Redis lost the pool's state
        (the epoch changed): put every held key back, True. Or another process (an operator)
        removed them: forget them here too so they are not brought back, False."""
        with self._lock:
            held = self._held.get(provider, {})
            missing = [k for k in key_ids if k in held]
        if not missing:
            return False
        epoch = yield Cmd("hget", (self._space(provider).keys[0], "epoch"))
        if epoch is not None and epoch == self._epochs.get(provider):
            with self._lock:
                for key_id in missing:
                    self._held.get(provider, {}).pop(key_id, None)
            return False
        yield from self._reregister_flow(provider)
        return True

    def _admin_flow(self, provider: str, key_id: str, action: str, *args: Any) -> Flow:
        argv = [key_id, action, *args] if args else [key_id, action, ""]
        reply = yield Run(scripts.ADMIN, provider, argv)
        if reply[0] == "UNKNOWN" and (yield from self._recover_flow(provider, key_id)):
            reply = yield Run(scripts.ADMIN, provider, argv)
        if reply[0] == "UNKNOWN":
            raise UnknownKey(f"no key {key_id!r} for provider {provider!r}")
        return reply

    def _assign_flow(self, model: str, provider: object, key_id: str, assign: bool) -> Flow:
        model = validate_model(model)
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        reply = yield from self._admin_flow(name, key_id, "assign" if assign else "unassign", model)
        if not assign:
            yield from self._forget_models_flow(name, reply)
        with self._lock:
            held = self._held.get(name, {}).get(key_id)
            if held is not None:
                (held.models.add if assign else held.models.discard)(model)
        if assign:
            yield Cmd("sadd", (model_providers_key(self.namespace, model), name))
            self._log.info("model_assigned", provider=name, key_id=key_id, model=model)
        self._model_cache.pop(model, None)

    def _disable_flow(self, provider: object, key_id: str, reason: str) -> Flow:
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        if not isinstance(reason, str) or len(reason) > 200:
            raise ValueError(f"invalid reason {reason!r}: expected a str of at most 200 characters")
        reason = redact(reason)  # an operator may paste an error text that holds a key
        if int((yield from self._admin_flow(name, key_id, "disable", reason))[1]):
            self._log.warning(
                "key_disabled", provider=name, key_id=key_id, reason=reason or "manual"
            )

    def _enable_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        if int((yield from self._admin_flow(name, key_id, "enable"))[1]):
            self._log.info("key_enabled", provider=name, key_id=key_id)

    def _reset_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        yield from self._admin_flow(name, key_id, "reset")
        self._log.info("key_reset", provider=name, key_id=key_id)

    # ------------------------------------------------------------------ reading

    def _stats_flow(self, provider: object, key_id: str) -> Flow:
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        found = parse_stats_reply(name, (yield Run(scripts.STATS, name, [key_id])))
        if not found and (yield from self._recover_flow(name, key_id)):
            found = parse_stats_reply(name, (yield Run(scripts.STATS, name, [key_id])))
        if not found:
            raise UnknownKey(f"no key {key_id!r} for provider {name!r}")
        return found[0]

    def _snapshot_flow(self, provider: object | None) -> Flow:
        if provider is not None:
            names = [normalize_provider(provider)]
        else:
            names = yield from self._providers_flow()
        out: list[KeyStats] = []
        for name in names:
            found = parse_stats_reply(name, (yield Run(scripts.STATS, name, [])))
            with self._lock:
                missing = set(self._held.get(name, {})) - {s.key_id for s in found}
            if missing and (yield from self._recover_flow(name, *sorted(missing))):
                found = parse_stats_reply(name, (yield Run(scripts.STATS, name, [])))
            out.extend(found)
        return out

    def _providers_flow(self) -> Flow:
        found = set((yield Cmd("smembers", (providers_key(self.namespace),))))
        with self._lock:
            found |= {p for p, keys in self._held.items() if keys}
        return sorted(found)

    def _providers_for_model_flow(self, model: str) -> Flow:
        cached = self._model_cache.get(model)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        members = yield Cmd("smembers", (model_providers_key(self.namespace, model),))
        with self._lock:  # and the providers of the keys this process holds for the model:
            # when Redis lost its state, trying them re-registers those keys
            held = {
                p for p, keys in self._held.items() if any(model in h.models for h in keys.values())
            }
        found = tuple(sorted(set(members) | held))
        if found:
            self._model_cache[model] = (time.monotonic() + _MODEL_CACHE_SECONDS, found)
        return found

    # ------------------------------------------------------------------ acquiring

    def _acquire_flow(
        self,
        provider: object | None,
        model: str | None,
        strategy: str | None,
        tokens: int,
        wait: float | None,
        lease: bool,
        avoid: tuple[str, str] | None = None,
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
        tokens_arg(tokens)
        wait_s = seconds_arg("wait", wait)
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
                    candidate, model, strategy, tokens, lease, avoid, name is None
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
            if earliest is None and any(self._unusable.get(c) for c in candidates):
                if not rechecked:
                    # maybe re-added or re-sealed since: look at those keys once more
                    rechecked = True
                    with self._lock:
                        for c in candidates:
                            self._unusable.pop(c, None)
                    continue
                skipped = sorted(k for c in candidates for k in self._unusable.get(c, ()))
                why_not = "; ".join(
                    self._unusable_why[c] for c in candidates if c in self._unusable_why
                )
                raise NoUsableKey(
                    f"no key of {name or 'any provider'!r} is usable by this process (skipped: "
                    f"{', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}): {why_not}",
                    retry_after=None,
                    provider=name,
                    model=model,
                )
            raise self._no_key(name, model, earliest, why)

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
        tokens: int,
        lease: bool,
        avoid: tuple[str, str] | None,
        model_only: bool = False,
    ) -> Flow:
        lease_id = new_lease_id() if lease else ""
        args = [
            strategy,
            tokens,
            self._lease_ttl_ms if lease else 0,
            lease_id,
            model or "",
            avoid[1] if avoid is not None and avoid[0] == provider else "",
            "",
            "1" if model_only else "",
            "",
        ]
        lost = 0
        for _attempt in range(16):
            args[6] = self._epochs.get(provider, "")
            args[8] = " ".join(sorted(self._unusable.get(provider, ())))
            reply = yield Run(scripts.ACQUIRE, provider, args)
            status = reply[0]
            if status == "OK":
                key_id, fp, sealed = reply[1], reply[2], reply[3]
                held = self._held.get(provider, {}).get(key_id)
                if held is not None and held.fp == fp:  # the usual case: a key held here
                    return Picked(provider, key_id, held.secret, lease_id, model, tokens)
                try:
                    secret = yield from self._secret_flow(
                        provider, key_id, fp, sealed, lease_id, held
                    )
                except SecretUnavailable as exc:
                    # a key this process cannot use (registered elsewhere without sealing,
                    # or sealed with another sealing key): never pick it here again
                    with self._lock:
                        self._unusable.setdefault(provider, set()).add(key_id)
                        self._unusable_why[provider] = str(exc)
                    self._log.warning(
                        "key_unusable_here", provider=provider, key_id=key_id, reason=str(exc)
                    )
                    continue
                return Picked(provider, key_id, secret, lease_id, model, tokens)
            if status == "NONE":
                ms = float(reply[1])
                return (None if ms < 0 else ms / 1000.0), str(reply[2])
            # LOST: the pool was flushed or re-created; put our keys back and try again. The
            # old epoch is kept while they go back: another thread of this process meanwhile
            # gets LOST too (and re-registers, an idempotent upsert) instead of finding the
            # pool empty and answering NoKeyAvailable.
            lost += 1
            if lost > 3:
                break
            if not (yield from self._reregister_flow(provider)):
                self._epochs.pop(provider, None)
        raise KeyPoolError(f"the pool state of provider {provider!r} keeps changing; giving up")

    def _secret_flow(
        self, provider: str, key_id: str, fp: str, sealed: str, lease_id: str, held: Held | None
    ) -> Flow:
        """The secret of a picked key this process does not hold as it is in Redis (``held``:
        what it holds, if anything): unsealed, or the key is given back."""
        if sealed and self._sealer is not None:
            try:
                secret = self._sealer.unseal(sealed, self._seal_context(provider, key_id))
                if fingerprint(secret) != fp:
                    raise SecretUnavailable(
                        f"the sealed secret of key {key_id!r} of provider {provider!r} is "
                        f"older than the key (fingerprint {fp}): add the key again"
                    )
            except SecretUnavailable:
                yield from self._give_back_flow(provider, key_id, lease_id)
                raise
            remember_secret(secret)
            return secret
        yield from self._give_back_flow(provider, key_id, lease_id)
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

    def _give_back_flow(self, provider: str, key_id: str, lease_id: str) -> Flow:
        yield Run(scripts.REPORT, provider, self._mark_args(key_id, lease_id, "release", 0))

    # ------------------------------------------------------------------ reporting

    def _mark_args(
        self,
        key_id: str,
        lease_id: str,
        outcome: str,
        est: int,
        actual: int | None = None,
        latency: float | None = None,
        failure: Failure | None = None,
    ) -> list[Any]:
        retry_ms = ""
        detail = ""
        if failure is not None:
            detail = failure.detail[:120]
            if failure.retry_after is not None:
                retry_ms = str(int(failure.retry_after * 1000))
        return [
            key_id,
            lease_id,
            outcome,
            est,
            "" if actual is None else actual,
            "" if latency is None else f"{latency * 1000:.3f}",
            retry_ms,
            detail,
            *self._report_args,
        ]

    def _mark_flow(
        self,
        provider: str,
        key_id: str,
        outcome: str,
        *,
        lease_id: str = "",
        est: int = 0,
        tokens: int | None = None,
        latency: float | None = None,
        failure: Failure | None = None,
    ) -> Flow:
        args = self._mark_args(key_id, lease_id, outcome, est, tokens, latency, failure)
        reply = yield Run(scripts.REPORT, provider, args)
        yield from self._marked_flow(provider, key_id, outcome, lease_id, failure, args, reply)

    def _marked_flow(
        self,
        provider: str,
        key_id: str,
        outcome: str,
        lease_id: str,
        failure: Failure | None,
        args: list[Any],
        reply: list[Any],
    ) -> Flow:
        """What follows a report's reply: a key unknown here is recovered (or, for a lease,
        was removed meanwhile), an event is logged."""
        if reply[0] == "UNKNOWN" and (yield from self._recover_flow(provider, key_id)):
            reply = yield Run(scripts.REPORT, provider, args)
        if reply[0] == "UNKNOWN":
            if lease_id:
                return None  # the key was removed while the call was in flight
            raise UnknownKey(f"no key {key_id!r} for provider {provider!r}")
        event = reply[1]
        if event:
            at = float(reply[3])
            warn = event in ("key_disabled", "circuit_opened", "key_exhausted")
            (self._log.warning if warn else self._log.info)(
                event,
                provider=provider,
                key_id=key_id,
                kind=outcome,
                detail=failure.detail if failure else None,
                until=round(at / 1000, 3) if at > 0 else None,
                reason=reply[2] or None,
            )

    def _mark_success_flow(
        self, provider: object, key_id: str, tokens: int | None, latency: float | None
    ) -> Flow:
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
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
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        failure = classify(error, retry_after=retry_after, headers=headers)
        yield from self._mark_flow(name, key_id, failure.kind.value, failure=failure)
        return failure

    def _lease_report_flow(
        self,
        picked: Picked,
        outcome: str,
        tokens: int | None = None,
        latency: float | None = None,
        failure: Failure | None = None,
    ) -> Flow:
        yield from self._mark_flow(
            picked.provider,
            picked.key_id,
            outcome,
            lease_id=picked.lease_id,
            est=picked.tokens,
            tokens=tokens,
            latency=latency,
            failure=failure,
        )

    def _renew_flow(self, picked: Picked, ttl: float | None) -> Flow:
        seconds = seconds_arg("ttl", ttl)
        ms = int((seconds if seconds is not None else self.settings.lease_ttl) * 1000)
        reply = yield Run(
            scripts.ADMIN, picked.provider, [picked.key_id, "renew", picked.lease_id, ms]
        )
        return reply[0] == "OK" and int(reply[1]) == 1

    # ------------------------------------------------------------------ calling with retries

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
                succeeded, outcome = yield Invoke(fn, picked)
                if succeeded:
                    return outcome
                error, failure = outcome
                if failure.kind is ErrorKind.BAD_REQUEST:
                    raise error
                last_error = error
                avoid = (picked.provider, picked.key_id)
        raise spent(last_error, no_key, ended_without_key)
