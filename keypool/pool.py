"""KeyPool: the typed facade over the Lua scripts. Every decision is one script call."""

from __future__ import annotations

import math
import secrets as _random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import scripts
from .classify import Failure, classify
from .envload import scan_env
from .errors import KeyPoolError, NoKeyAvailable, PoolUnavailable, SecretUnavailable, UnknownKey
from .fingerprint import fingerprint
from .keyspace import ProviderKeys, model_providers_key, providers_key
from .kinds import ErrorKind
from .lease import Lease
from .log import configure_logging, get_logger, remember_secret
from .providers import normalize_provider, validate_key_id, validate_model
from .sealing import Sealer
from .settings import STRATEGIES, KeyPoolSettings, load_settings
from .stats import KeyStats, parse_stats_reply
from .store import open_store, parse_url, redact_url

__all__ = ["KeyPool"]

T = TypeVar("T")
_MODEL_CACHE_SECONDS = 5.0


@dataclass(slots=True)
class _Held:
    """A key registered by this process: enough to re-register it if Redis loses it."""

    secret: str = field(repr=False)
    fp: str
    weight: float
    rpm: int
    tpm: int
    rpd: int
    maxc: int
    models: set[str]


@dataclass(frozen=True, slots=True)
class _Picked:
    provider: str
    key_id: str
    secret: str = field(repr=False)
    lease_id: str


def _positive_int(name: str, value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"invalid {name} {value!r}: expected a positive int or None")
    return value


def _seconds(name: str, value: object, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"invalid {name} {value!r}: expected a number of seconds")
    if value < 0:
        raise ValueError(f"invalid {name} {value!r}: expected seconds >= 0")
    return float(value)


def _check_secret(key_id: str, secret: object) -> str:
    if secret is None or secret == "":
        raise ValueError(f"missing secret for key {key_id!r}: expected a non-empty str")
    if not isinstance(secret, str):
        raise TypeError(f"secret for key {key_id!r} must be a str, not {type(secret).__name__}")
    if secret != secret.strip() or any(c in secret for c in "\r\n\x00"):
        raise ValueError(
            f"secret for key {key_id!r} has surrounding whitespace or a control character"
        )
    return secret


class KeyPool:
    """One pool of API keys shared by every process that points at the same store.

    ``url`` (default: ``KEYPOOL_REDIS_URL``, else ``memory://``) picks the store;
    ``namespace`` separates pools on one Redis; ``settings`` overrides the environment.
    Thread-safe; safe across ``fork`` (connections are reopened in the child).
    """

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
        self._client = open_store(
            settings.redis_url,
            socket_timeout=settings.socket_timeout,
            connect_timeout=settings.connect_timeout,
        )
        self._sealer: Sealer | None = None
        if settings.secret_key is not None:
            old = settings.old_secret_keys.get_secret_value() if settings.old_secret_keys else ""
            self._sealer = Sealer(
                settings.secret_key.get_secret_value(),
                tuple(k.strip() for k in old.split(",") if k.strip()),
            )
        self._lock = threading.RLock()
        self._held: dict[str, dict[str, _Held]] = {}
        self._epochs: dict[str, str] = {}
        self._spaces: dict[str, ProviderKeys] = {}
        self._model_cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._report_args = [
            str(int(settings.rate_limit_cooldown * 1000)),
            str(int(settings.rate_limit_max_cooldown * 1000)),
            str(int(settings.quota_cooldown * 1000)),
            str(settings.error_threshold),
            str(int(settings.circuit_cooldown * 1000)),
            str(int(settings.circuit_max_cooldown * 1000)),
        ]

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_env(
        cls,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KeyPool:
        """A pool with every key found in the environment registered (see :meth:`load_env`)."""
        pool = cls(url, namespace=namespace, settings=settings)
        pool.load_env(environ)
        return pool

    def load_env(self, environ: Mapping[str, str] | None = None) -> list[tuple[str, str]]:
        """Register the keys found in the environment (``OPENAI_API_KEY``,
        ``OPENAI_API_KEYS``, ``HF_<NAME>_KEY``, ...). Returns their (provider, key_id)."""
        scan = scan_env(environ)
        for skipped in scan.skipped:
            self._log.warning("env_key_skipped", detail=skipped)
        self.add_keys((k.provider, k.key_id, k.secret) for k in scan.keys)
        return [(k.provider, k.key_id) for k in scan.keys]

    def __repr__(self) -> str:
        return f"KeyPool(url={redact_url(self.url)!r}, namespace={self.namespace!r})"

    def close(self) -> None:
        """Close the connections to the store."""
        self._client.close()

    def __enter__(self) -> KeyPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _space(self, provider: str) -> ProviderKeys:
        space = self._spaces.get(provider)
        if space is None:
            space = self._spaces[provider] = ProviderKeys(self.namespace, provider)
        return space

    @contextmanager
    def _store_errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            self._log.error("pool_unavailable", url=redact_url(self.url), error=type(exc).__name__)
            raise PoolUnavailable(
                f"Redis at {redact_url(self.url)} is unreachable or timed out "
                f"({type(exc).__name__})"
            ) from None
        except RedisError as exc:
            if "BUSY" in str(exc) or "LOADING" in str(exc) or "CLUSTERDOWN" in str(exc):
                raise PoolUnavailable(
                    f"Redis at {redact_url(self.url)} cannot serve now ({type(exc).__name__})"
                ) from None
            raise

    def _run(self, script: scripts.Script, provider: str, args: list[Any]) -> Any:
        space = self._space(provider)
        with self._store_errors():
            return script(self._client, space.keys, [space.prefix, *args])

    # ------------------------------------------------------------------ registration

    def add_key(
        self,
        provider: object,
        key_id: str,
        secret: str,
        *,
        weight: float = 1.0,
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        max_concurrency: int | None = None,
        models: Iterable[str] | str = (),
    ) -> None:
        """Register a key, or update it in place (idempotent upsert: its counters and state
        are kept). Limits: requests per minute, tokens per minute, requests per day, leases
        at once. ``models``: models this key serves (see :meth:`assign_model`)."""
        self.add_keys(
            [(provider, key_id, secret)],
            weight=weight,
            rpm=rpm,
            tpm=tpm,
            rpd=rpd,
            max_concurrency=max_concurrency,
            models=models,
        )

    def add_keys(
        self,
        entries: Iterable[tuple[object, str, str]],
        *,
        weight: float = 1.0,
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        max_concurrency: int | None = None,
        models: Iterable[str] | str = (),
    ) -> int:
        """Register many keys at once, pipelined, with the same options; every entry is
        checked before anything is written. Returns how many were registered."""
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"invalid weight {weight!r}: expected a number > 0")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"invalid weight {weight!r}: expected a number > 0")
        limits = (
            _positive_int("rpm", rpm),
            _positive_int("tpm", tpm),
            _positive_int("rpd", rpd),
            _positive_int("max_concurrency", max_concurrency),
        )
        model_list = [models] if isinstance(models, str) else list(models)
        model_list = list(dict.fromkeys(validate_model(m) for m in model_list))
        checked: list[tuple[str, str, _Held]] = []
        for provider, key_id, secret in entries:
            name = normalize_provider(provider)
            key_id = validate_key_id(key_id)
            secret = _check_secret(key_id, secret)
            held = _Held(secret, fingerprint(secret), float(weight), *limits, set(model_list))
            checked.append((name, key_id, held))
        for start in range(0, len(checked), 1000):
            self._register(checked[start : start + 1000])
        return len(checked)

    def _register(self, batch: list[tuple[str, str, _Held]]) -> None:
        if not batch:
            return
        with self._lock:
            for provider, key_id, held in batch:
                previous = self._held.setdefault(provider, {}).get(key_id)
                if previous is not None and previous.fp == held.fp:
                    held.models |= previous.models
                self._held[provider][key_id] = held
                remember_secret(held.secret)
        with self._store_errors():
            if len(batch) == 1:
                provider, key_id, held = batch[0]
                replies = [
                    self._run(
                        scripts.REGISTER, provider, self._register_args(provider, key_id, held)
                    )
                ]
            else:
                self._client.script_load(scripts.REGISTER.source)
                pipe = self._client.pipeline(transaction=False)
                for provider, key_id, held in batch:
                    space = self._space(provider)
                    args = [space.prefix, *self._register_args(provider, key_id, held)]
                    pipe.evalsha(scripts.REGISTER.sha, len(space.keys), *space.keys, *args)
                replies = pipe.execute()
            index = self._client.pipeline(transaction=False)
            providers = {p for p, _, _ in batch}
            index.sadd(providers_key(self.namespace), *providers)
            for provider, _, held in batch:
                for model in held.models:
                    index.sadd(model_providers_key(self.namespace, model), provider)
            index.execute()
        for (provider, key_id, held), (epoch, result) in zip(batch, replies, strict=True):
            self._epochs[provider] = epoch
            self._log.info(
                "key_registered",
                provider=provider,
                key_id=key_id,
                fingerprint=held.fp,
                result=result,
            )
        for _, _, held in batch:
            for model in held.models:
                self._model_cache.pop(model, None)

    def _register_args(self, provider: str, key_id: str, held: _Held) -> list[Any]:
        sealed = ""
        if self._sealer is not None:
            sealed = self._sealer.seal(held.secret, self._seal_context(provider, key_id))
        models = "[" + ",".join(_json_str(m) for m in sorted(held.models)) + "]"
        return [
            key_id,
            held.fp,
            repr(held.weight),
            held.rpm,
            held.tpm,
            held.rpd,
            held.maxc,
            sealed,
            uuid.uuid4().hex[:12],
            models,
        ]

    def _seal_context(self, provider: str, key_id: str) -> str:
        return f"{self.namespace}/{provider}/{key_id}"

    def _reregister(self, provider: str) -> bool:
        """Redis lost this provider's state (restart, failover, flush): put back every key
        this process holds. False when it holds none."""
        with self._lock:
            held = list(self._held.get(provider, {}).items())
        if not held:
            return False
        self._log.warning("pool_state_lost", provider=provider, reregistered=len(held))
        self._register([(provider, key_id, h) for key_id, h in held])
        return True

    def remove_key(self, provider: object, key_id: str) -> None:
        """Forget a key: its state, leases and model assignments. ``UnknownKey`` if absent."""
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        reply = self._run(scripts.ADMIN, name, [key_id, "remove", ""])
        with self._lock:
            self._held.get(name, {}).pop(key_id, None)
        if reply[0] == "UNKNOWN":
            raise UnknownKey(f"no key {key_id!r} for provider {name!r}")
        self._log.info("key_removed", provider=name, key_id=key_id)

    def assign_model(self, model: str, provider: object, key_id: str) -> None:
        """Let ``model`` be served by this key. Call it for every key of the model: a model
        with assigned keys is served only by them."""
        model = validate_model(model)
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        self._admin(name, key_id, "assign", model)
        with self._lock:
            held = self._held.get(name, {}).get(key_id)
            if held is not None:
                held.models.add(model)
        with self._store_errors():
            self._client.sadd(model_providers_key(self.namespace, model), name)
        self._model_cache.pop(model, None)
        self._log.info("model_assigned", provider=name, key_id=key_id, model=model)

    def unassign_model(self, model: str, provider: object, key_id: str) -> None:
        """Undo :meth:`assign_model` for one key."""
        model = validate_model(model)
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        self._admin(name, key_id, "unassign", model)
        with self._lock:
            held = self._held.get(name, {}).get(key_id)
            if held is not None:
                held.models.discard(model)
        self._model_cache.pop(model, None)

    def _admin(self, provider: str, key_id: str, action: str, arg: str = "", *extra: Any) -> int:
        reply = self._run(scripts.ADMIN, provider, [key_id, action, arg, *extra])
        if reply[0] == "UNKNOWN":
            if self._reregister_key(provider, key_id):
                reply = self._run(scripts.ADMIN, provider, [key_id, action, arg, *extra])
            if reply[0] == "UNKNOWN":
                raise UnknownKey(f"no key {key_id!r} for provider {provider!r}")
        return int(reply[1])

    def _reregister_key(self, provider: str, key_id: str) -> bool:
        with self._lock:
            held = self._held.get(provider, {}).get(key_id)
        if held is None:
            return False
        self._reregister(provider)
        return True

    # ------------------------------------------------------------------ operator actions

    def disable_key(self, provider: object, key_id: str, reason: str = "") -> None:
        """Take a key out of service until :meth:`enable_key`."""
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        if not isinstance(reason, str) or len(reason) > 200:
            raise ValueError(f"invalid reason {reason!r}: expected a str of at most 200 characters")
        if self._admin(name, key_id, "disable", reason):
            self._log.warning(
                "key_disabled", provider=name, key_id=key_id, reason=reason or "manual"
            )

    def enable_key(self, provider: object, key_id: str) -> None:
        """Put a disabled key back in service."""
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        if self._admin(name, key_id, "enable"):
            self._log.info("key_enabled", provider=name, key_id=key_id)

    def reset_key(self, provider: object, key_id: str) -> None:
        """Clear a key's cooldown, circuit, error and usage counters and budgets
        (a disabled key stays disabled)."""
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        self._admin(name, key_id, "reset")
        self._log.info("key_reset", provider=name, key_id=key_id)

    # ------------------------------------------------------------------ reading state

    def stats(self, provider: object, key_id: str) -> KeyStats:
        """One key's state as every process sees it. ``UnknownKey`` if absent."""
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        found = parse_stats_reply(name, self._run(scripts.STATS, name, [key_id]))
        if not found:
            if self._reregister_key(name, key_id):
                found = parse_stats_reply(name, self._run(scripts.STATS, name, [key_id]))
            if not found:
                raise UnknownKey(f"no key {key_id!r} for provider {name!r}")
        return found[0]

    def snapshot(self, provider: object | None = None) -> list[KeyStats]:
        """Every key's state, of one provider or of all, sorted by provider and key id."""
        names = [normalize_provider(provider)] if provider is not None else self.providers()
        out: list[KeyStats] = []
        for name in names:
            out.extend(parse_stats_reply(name, self._run(scripts.STATS, name, [])))
        return out

    def providers(self) -> list[str]:
        """The providers that have keys in this namespace."""
        with self._store_errors():
            found = self._client.smembers(providers_key(self.namespace))
        with self._lock:
            found = set(found) | {p for p, keys in self._held.items() if keys}
        return sorted(found)

    def _providers_for_model(self, model: str) -> tuple[str, ...]:
        cached = self._model_cache.get(model)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        with self._store_errors():
            found = tuple(sorted(self._client.smembers(model_providers_key(self.namespace, model))))
        if found:
            self._model_cache[model] = (time.monotonic() + _MODEL_CACHE_SECONDS, found)
        return found

    # ------------------------------------------------------------------ acquiring

    def acquire(
        self,
        provider: object | None = None,
        *,
        model: str | None = None,
        strategy: str | None = None,
        tokens: int = 0,
        wait: float | None = None,
    ) -> Lease:
        """Lease an available key: counts the request, reserves ``tokens`` on its budget and
        holds an in-flight lease until you report (or the lease TTL passes).

        ``provider`` may be omitted when ``model`` has assigned keys. Raises
        :class:`NoKeyAvailable` (with ``retry_after``) when no key can serve now; with
        ``wait=seconds`` it first sleeps until a key frees up, if that is soon enough.
        """
        picked = self._acquire(provider, model, strategy, tokens, wait, lease=True)
        return Lease(
            self, picked.provider, picked.key_id, picked.secret, model, picked.lease_id, tokens
        )

    def _acquire(
        self,
        provider: object | None,
        model: str | None,
        strategy: str | None,
        tokens: int,
        wait: float | None,
        *,
        lease: bool,
        avoid: tuple[str, str] | None = None,
    ) -> _Picked:
        name = normalize_provider(provider) if provider is not None else None
        if model is not None:
            model = validate_model(model)
        strategy = strategy if strategy is not None else self.settings.strategy
        if strategy not in STRATEGIES:
            raise ValueError(
                f"invalid strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}"
            )
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0:
            raise ValueError(f"invalid tokens {tokens!r}: expected an int >= 0")
        wait_s = _seconds("wait", wait)
        if name is None and model is None:
            raise ValueError("acquire needs a provider, or a model with assigned keys")
        deadline = time.monotonic() + (wait_s or 0.0)
        while True:
            if name is not None:
                candidates: tuple[str, ...] = (name,)
            else:
                assert model is not None
                candidates = self._providers_for_model(model)
            earliest: float | None = None
            why = "no_keys"
            for candidate in candidates:
                result = self._acquire_once(candidate, model, strategy, tokens, lease, avoid)
                if isinstance(result, _Picked):
                    return result
                retry_after, why = result
                if retry_after is not None and (earliest is None or retry_after < earliest):
                    earliest = retry_after
            remaining = deadline - time.monotonic()
            if wait_s and earliest is not None and earliest <= remaining:
                time.sleep(earliest + 0.001)
                continue
            raise self._no_key(name, model, earliest, why if candidates else "no_keys")

    @staticmethod
    def _no_key(
        provider: str | None, model: str | None, retry_after: float | None, why: str
    ) -> NoKeyAvailable:
        what = f"provider {provider!r}" if provider else "any provider"
        if model is not None:
            what += f" for model {model!r}"
        hint = f"; retry after {retry_after:.3f}s" if retry_after is not None else "; none will be"
        return NoKeyAvailable(
            f"no key of {what} is available ({why}){hint}",
            retry_after=retry_after,
            provider=provider,
            model=model,
        )

    def _acquire_once(
        self,
        provider: str,
        model: str | None,
        strategy: str,
        tokens: int,
        lease: bool,
        avoid: tuple[str, str] | None,
    ) -> _Picked | tuple[float | None, str]:
        lease_id = _random.token_hex(8) if lease else ""
        ttl_ms = int(self.settings.lease_ttl * 1000) if lease else 0
        avoid_id = avoid[1] if avoid is not None and avoid[0] == provider else ""
        for _attempt in range(3):
            reply = self._run(
                scripts.ACQUIRE,
                provider,
                [
                    strategy,
                    tokens,
                    ttl_ms,
                    lease_id,
                    model or "",
                    avoid_id,
                    self._epochs.get(provider, ""),
                ],
            )
            status = reply[0]
            if status == "OK":
                key_id, fp, sealed = reply[1], reply[2], reply[3]
                return _Picked(
                    provider,
                    key_id,
                    self._secret_for(provider, key_id, fp, sealed, lease_id),
                    lease_id,
                )
            if status == "NONE":
                ms = float(reply[1])
                return (None if ms < 0 else ms / 1000.0), str(reply[2])
            # LOST: the pool was flushed or re-created; put our keys back and try again
            self._epochs.pop(provider, None)
            if not self._reregister(provider):
                self._epochs.pop(provider, None)
        raise KeyPoolError(f"the pool state of provider {provider!r} keeps changing; giving up")

    def _secret_for(self, provider: str, key_id: str, fp: str, sealed: str, lease_id: str) -> str:
        held = self._held.get(provider, {}).get(key_id)
        if held is not None and held.fp == fp:
            return held.secret
        if sealed and self._sealer is not None:
            try:
                secret = self._sealer.unseal(sealed, self._seal_context(provider, key_id))
            except SecretUnavailable:
                self._give_back(provider, key_id, lease_id)
                raise
            remember_secret(secret)
            return secret
        self._give_back(provider, key_id, lease_id)
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

    def _give_back(self, provider: str, key_id: str, lease_id: str) -> None:
        args = self._mark_args(key_id, lease_id, "release", 0, None, None, None)
        self._run(scripts.REPORT, provider, args)

    # ------------------------------------------------------------------ reporting

    def _mark_args(
        self,
        key_id: str,
        lease_id: str,
        outcome: str,
        est: int,
        actual: int | None,
        latency: float | None,
        failure: Failure | None,
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

    def _mark(
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
    ) -> None:
        args = self._mark_args(key_id, lease_id, outcome, est, tokens, latency, failure)
        reply = self._run(scripts.REPORT, provider, args)
        if reply[0] == "UNKNOWN":
            if not self._reregister_key(provider, key_id):
                raise UnknownKey(f"no key {key_id!r} for provider {provider!r}")
            reply = self._run(scripts.REPORT, provider, args)
            if reply[0] == "UNKNOWN":
                raise UnknownKey(f"no key {key_id!r} for provider {provider!r}")
        event = reply[1]
        if event:
            at = float(reply[3])
            level = (
                "warning"
                if event in ("key_disabled", "circuit_opened", "key_exhausted")
                else "info"
            )
            getattr(self._log, level)(
                event,
                provider=provider,
                key_id=key_id,
                kind=outcome,
                detail=failure.detail if failure else None,
                until=round(at / 1000, 3) if at > 0 else None,
                reason=reply[2] or None,
            )

    def _report(
        self,
        lease: Lease,
        outcome: str,
        *,
        tokens: int | None = None,
        latency: float | None = None,
        failure: Failure | None = None,
    ) -> None:
        self._mark(
            lease.provider,
            lease.key_id,
            outcome,
            lease_id=lease.lease_id,
            est=lease.tokens,
            tokens=tokens,
            latency=latency,
            failure=failure,
        )

    def _renew(self, lease: Lease, ttl: float | None) -> bool:
        seconds = _seconds("ttl", ttl) if ttl is not None else self.settings.lease_ttl
        assert seconds is not None
        reply = self._run(
            scripts.ADMIN,
            lease.provider,
            [lease.key_id, "renew", lease.lease_id, int(seconds * 1000)],
        )
        return reply[0] == "OK" and int(reply[1]) == 1

    def mark_success(
        self,
        provider: object,
        key_id: str,
        *,
        tokens: int | None = None,
        latency: float | None = None,
    ) -> None:
        """Report a successful call made with a key that was not leased."""
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        if tokens is not None:
            _positive_int("tokens", tokens) if tokens else None
        self._mark(name, key_id, "success", tokens=tokens, latency=_seconds("latency", latency))

    def mark_failure(
        self,
        provider: object,
        key_id: str,
        error: object,
        *,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Failure:
        """Report a failed call made with a key that was not leased (see :meth:`Lease.fail`)."""
        name, key_id = normalize_provider(provider), validate_key_id(key_id)
        failure = classify(error, retry_after=retry_after, headers=headers)
        self._mark(name, key_id, failure.kind.value, failure=failure)
        return failure

    # ------------------------------------------------------------------ calling with retries

    def call(
        self,
        fn: Callable[[Lease], T],
        provider: object | None = None,
        *,
        model: str | None = None,
        fallbacks: Sequence[object] = (),
        max_attempts: int = 3,
        wait: float | None = None,
        strategy: str | None = None,
        tokens: int = 0,
    ) -> T:
        """Run ``fn(lease)`` with a key, moving to another key after a failure (never the one
        that just failed while another is available), then through ``fallbacks`` (providers
        or ``(provider, model)`` pairs). A ``BAD_REQUEST`` is raised at once. When all is
        spent: the last provider error, or ``NoKeyAvailable`` with the earliest retry_after."""
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
            raise ValueError(f"invalid max_attempts {max_attempts!r}: expected an int >= 1")
        plan = _call_plan(provider, model, fallbacks)
        last_error: BaseException | None = None
        earliest: NoKeyAvailable | None = None
        for target, target_model in plan:
            avoid: tuple[str, str] | None = None
            for _ in range(max_attempts):
                try:
                    picked = self._acquire(
                        target, target_model, strategy, tokens, wait, lease=True, avoid=avoid
                    )
                except NoKeyAvailable as exc:
                    if earliest is None or (
                        exc.retry_after is not None
                        and (earliest.retry_after is None or exc.retry_after < earliest.retry_after)
                    ):
                        earliest = exc
                    break
                lease = Lease(
                    self,
                    picked.provider,
                    picked.key_id,
                    picked.secret,
                    target_model,
                    picked.lease_id,
                    tokens,
                )
                try:
                    result = fn(lease)
                except Exception as exc:
                    failure = lease.fail(exc)
                    if failure.kind is ErrorKind.BAD_REQUEST:
                        raise
                    last_error = exc
                    avoid = (picked.provider, picked.key_id)
                    continue
                lease.success()
                return result
        if last_error is not None:
            raise last_error
        assert earliest is not None
        raise earliest


def _call_plan(
    provider: object | None, model: str | None, fallbacks: Sequence[object]
) -> list[tuple[str | None, str | None]]:
    plan: list[tuple[str | None, str | None]] = [
        (normalize_provider(provider) if provider is not None else None, model)
    ]
    if provider is None and model is None:
        raise ValueError("call needs a provider, or a model with assigned keys")
    if isinstance(fallbacks, str | bytes):
        fallbacks = [fallbacks]
    for item in fallbacks:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(
                    f"invalid fallback {item!r}: expected a provider or (provider, model)"
                )
            fb_provider, fb_model = item
            plan.append((normalize_provider(fb_provider), validate_model(fb_model)))
        else:
            plan.append((normalize_provider(item), model))
    return plan


def _json_str(text: str) -> str:
    import json

    return json.dumps(text)
