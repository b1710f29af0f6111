"""The core contract, on every store: names and validation, settings, keys from the
environment, acquire/leases, strategies, model routing, operator actions, stats, errors.

Every test runs twice through the ``store_url`` fixture: on the embedded store and on the
real Redis.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

import keypool
from keypool import (
    ConfigError,
    ErrorKind,
    KeyPool,
    KeyPoolError,
    KeyPoolSettings,
    KeyStats,
    LLMProvider,
    NoKeyAvailable,
    PoolUnavailable,
    Provider,
    UnknownKey,
)
from keypool.settings import load_settings

OPENAI = Provider.OPENAI


# --- helpers ------------------------------------------------------------------------------


def store_snapshot(raw: Any, namespace: str) -> dict[str, bytes]:
    """Every key of the namespace with its DUMP (byte-exact serialisation of its value)."""
    out: dict[str, bytes] = {}
    for name in raw.scan_iter(match=f"{namespace}:*", count=1000):
        dumped = raw.dump(name)
        assert dumped is not None, name
        out[name if isinstance(name, str) else name.decode()] = bytes(dumped)
    return out


def add_keys(pool: KeyPool, ids: Iterable[str], provider: object = OPENAI, **kw: Any) -> None:
    for key_id in ids:
        pool.add_key(provider, key_id, f"secret-value-{provider}-{key_id}", **kw)


def pick(pool: KeyPool, n: int, provider: object = OPENAI, **kw: Any) -> list[str]:
    """Acquire ``n`` times, reporting success each time; the key ids in order."""
    out = []
    for _ in range(n):
        with pool.acquire(provider, **kw) as lease:
            out.append(lease.key_id)
    return out


def assert_exact_rotation(seq: Sequence[str], keys: Sequence[str]) -> None:
    """Every run of M consecutive picks gives each of the K keys floor(M/K) or ceil(M/K)."""
    k = len(keys)
    assert set(seq) <= set(keys), f"picked keys outside {keys}: {seq}"
    for start in range(len(seq)):
        counts: Counter[str] = Counter()
        for end in range(start, len(seq)):
            counts[seq[end]] += 1
            m = end - start + 1
            lo, hi = m // k, -(-m // k)
            bad = {key: counts[key] for key in keys if not lo <= counts[key] <= hi}
            assert not bad, (
                f"picks {start}..{end} (M={m}, K={k}) give {dict(counts)}; "
                f"each should get {lo}..{hi}; sequence: {list(seq)}"
            )


def wait_until_active(pool: KeyPool, provider: object, key_id: str, limit: float = 1.5) -> None:
    deadline = time.monotonic() + limit
    while pool.stats(provider, key_id).status != "active":
        assert time.monotonic() < deadline, f"{key_id} did not come back within {limit}s"
        time.sleep(0.02)


# --- 2. names -----------------------------------------------------------------------------


def test_provider_names() -> None:
    assert LLMProvider is Provider
    assert {p.name: p.value for p in Provider} == {
        "HUGGINGFACE": "huggingface",
        "OPENAI": "openai",
        "ANTHROPIC": "anthropic",
        "COHERE": "cohere",
        "AZURE_OPENAI": "azure_openai",
        "OLLAMA": "ollama",
        "GEMINI": "gemini",
        "OPENROUTER": "openrouter",
        "CUSTOM": "custom",
    }
    assert Provider.OPENAI == "openai"


def test_enum_and_plain_string_name_the_same_provider(pool: KeyPool) -> None:
    pool.add_key(Provider.ANTHROPIC, "k1", "secret-anthropic-1")
    lease = pool.acquire("anthropic")
    assert (lease.provider, lease.key_id) == ("anthropic", "k1")
    lease.success()
    assert pool.stats(Provider.ANTHROPIC, "k1").total_requests == 1


def test_custom_provider_string_works(pool: KeyPool) -> None:
    name = "my-llm_2"
    pool.add_key(name, "k1", "secret-custom-1")
    with pool.acquire(name) as lease:
        assert (lease.provider, lease.key_id, lease.secret) == (name, "k1", "secret-custom-1")
    assert [s.key_id for s in pool.snapshot(name)] == ["k1"]
    assert name in pool.providers()


@pytest.mark.parametrize("key_id", ["a", "Z9", "k.1_x-y", "A" * 64, "0-0"])
def test_valid_edge_key_ids_are_accepted(pool: KeyPool, key_id: str) -> None:
    pool.add_key(OPENAI, key_id, "secret-edge-id")
    assert pool.stats(OPENAI, key_id).key_id == key_id
    with pool.acquire(OPENAI) as lease:
        assert lease.key_id == key_id


def test_valid_edge_model_names_are_accepted(pool: KeyPool) -> None:
    long_model = "m" * 256
    odd_model = "org/Model name:v1 é"
    pool.add_key(OPENAI, "k1", "secret-1")
    pool.add_key(OPENAI, "k2", "secret-2")
    pool.assign_model(long_model, OPENAI, "k1")
    pool.assign_model(odd_model, OPENAI, "k2")
    assert {pick(pool, 1, OPENAI, model=long_model)[0] for _ in range(4)} == {"k1"}
    assert {pick(pool, 1, None, model=odd_model)[0] for _ in range(4)} == {"k2"}


# --- 2/9. bad input is rejected and nothing is written -------------------------------------

_LONG = "a" * 65
_BAD_PROVIDERS: list[object] = ["OpenAI", "", _LONG, "-x", 3, None]
_BAD_KEY_IDS: list[object] = ["", "-a", "a b", "a/b", _LONG, "é"]
_BAD_MODELS: list[object] = ["", "m" * 257, 5]

Call = Callable[[KeyPool], object]


def _cases() -> list[Any]:
    cases: list[Any] = []

    def case(what: str, value: object, call: Call) -> None:
        shown = repr(value) if len(repr(value)) < 20 else repr(value)[:12] + "...'"
        cases.append(pytest.param(what, value, call, id=f"{what}={shown}"))

    for p in _BAD_PROVIDERS:
        case("add_key.provider", p, lambda pool, p=p: pool.add_key(p, "knew", "secret-new"))
        if p is not None:  # acquire(None) means "provider omitted"
            case("acquire.provider", p, lambda pool, p=p: pool.acquire(p))
        case("stats.provider", p, lambda pool, p=p: pool.stats(p, "k1"))
        case("disable_key.provider", p, lambda pool, p=p: pool.disable_key(p, "k1"))
        case("assign_model.provider", p, lambda pool, p=p: pool.assign_model("m1", p, "k1"))
        case("remove_key.provider", p, lambda pool, p=p: pool.remove_key(p, "k1"))
    for k in _BAD_KEY_IDS:
        case("add_key.key_id", k, lambda pool, k=k: pool.add_key(OPENAI, k, "secret-new"))
        case("stats.key_id", k, lambda pool, k=k: pool.stats(OPENAI, k))
        case("enable_key.key_id", k, lambda pool, k=k: pool.enable_key(OPENAI, k))
        case("reset_key.key_id", k, lambda pool, k=k: pool.reset_key(OPENAI, k))
        case("assign_model.key_id", k, lambda pool, k=k: pool.assign_model("m1", OPENAI, k))
        case("remove_key.key_id", k, lambda pool, k=k: pool.remove_key(OPENAI, k))
    for m in _BAD_MODELS:
        case(
            "add_key.models", m, lambda pool, m=m: pool.add_key(OPENAI, "knew", "s-new", models=[m])
        )
        case("assign_model.model", m, lambda pool, m=m: pool.assign_model(m, OPENAI, "k1"))
        case("acquire.model", m, lambda pool, m=m: pool.acquire(OPENAI, model=m))
        case("acquire.model_only", m, lambda pool, m=m: pool.acquire(model=m))
    for s in [None, "", 12]:
        case("add_key.secret", s, lambda pool, s=s: pool.add_key(OPENAI, "knew", s))
        case("add_key.secret_existing", s, lambda pool, s=s: pool.add_key(OPENAI, "k1", s))
    for w in [0, -1, math.nan, True]:
        case(
            "add_key.weight", w, lambda pool, w=w: pool.add_key(OPENAI, "k1", "secret-1", weight=w)
        )
    for r in [0, -5, 1.5, True]:
        case("add_key.rpm", r, lambda pool, r=r: pool.add_key(OPENAI, "k1", "secret-1", rpm=r))
    case("acquire.strategy", "fastest", lambda pool: pool.acquire(OPENAI, strategy="fastest"))
    case("acquire.tokens", -1, lambda pool: pool.acquire(OPENAI, tokens=-1))
    case("acquire.wait", -1, lambda pool: pool.acquire(OPENAI, wait=-1))
    return cases


def _names_value(message: str, value: object) -> bool:
    if repr(value) in message:
        return True
    if isinstance(value, str) and len(value) > 24:
        # a long value (maybe a secret passed by mistake) is shown cut, with its length
        return value[:6] in message and f"({len(value)} characters)" in message
    return isinstance(value, float) and math.isnan(value) and "nan" in message


@pytest.mark.parametrize(("what", "value", "call"), _cases())
def test_bad_argument_is_rejected_and_nothing_written(
    pool: KeyPool, raw: Any, namespace: str, what: str, value: object, call: Call
) -> None:
    pool.add_key(OPENAI, "k1", "secret-1", models=["m0"])
    pool.add_key(OPENAI, "k2", "secret-2")
    pick(pool, 3)
    before = store_snapshot(raw, namespace)
    assert before, "the set-up wrote nothing?"

    with pytest.raises((ValueError, TypeError)) as info:
        call(pool)

    after = store_snapshot(raw, namespace)
    assert len(after) == len(before)
    assert after == before, f"{what}={value!r} changed the store"
    message = str(info.value)
    if what.startswith("add_key.secret"):
        assert "secret" in message, message
    else:
        assert _names_value(message, value), f"{what}: message does not name {value!r}: {message}"


def test_acquire_without_provider_or_model_is_rejected(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-1")
    with pytest.raises(ValueError):
        pool.acquire()
    assert pool.stats(OPENAI, "k1").total_requests == 0


# --- 3. the store URL ---------------------------------------------------------------------


def test_same_store_and_namespace_is_one_pool(make_pool: Callable[..., KeyPool]) -> None:
    a, b = make_pool(), make_pool()
    add_keys(a, ["k1", "k2"])
    add_keys(b, ["k1", "k2"])
    seq = []
    for i in range(8):
        with (a if i % 2 else b).acquire(OPENAI) as lease:
            seq.append(lease.key_id)
    assert_exact_rotation(seq, ["k1", "k2"])
    assert a.stats(OPENAI, "k1").total_requests == 4
    assert b.stats(OPENAI, "k2").success_count == 4


def test_namespaces_are_separate(store_url: str, namespace: str, make_pool: Any) -> None:
    pool = make_pool()
    add_keys(pool, ["k1"])
    other = KeyPool(store_url, namespace=namespace + "x")
    try:
        assert other.namespace == namespace + "x"
        with pytest.raises(NoKeyAvailable):
            other.acquire(OPENAI)
        assert other.snapshot() == []
    finally:
        other.close()


def test_every_key_of_a_provider_shares_its_hash_tag(
    pool: KeyPool, raw: Any, namespace: str
) -> None:
    add_keys(pool, ["k1", "k2"], OPENAI, models=["gpt-4o"])
    add_keys(pool, ["a1"], Provider.ANTHROPIC)
    pick(pool, 2)
    leases = [pool.acquire(OPENAI), pool.acquire(Provider.ANTHROPIC)]
    names = list(store_snapshot(raw, namespace))
    tagged = [n for n in names if n.startswith(f"{namespace}:{{")]
    assert {n.split("}")[0] + "}" for n in tagged} == {
        f"{namespace}:{{openai}}",
        f"{namespace}:{{anthropic}}",
    }
    assert any(n.endswith("k1") and "{openai}" in n for n in tagged)
    for lease in leases:
        lease.release()


def test_state_lost_in_redis_is_rebuilt_from_the_keys_a_process_holds(
    pool: KeyPool, raw: Any, namespace: str
) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.assign_model("gpt-4o", OPENAI, "k2")
    pick(pool, 4)
    for name in store_snapshot(raw, namespace):  # like a restart without persistence
        raw.delete(name)
    assert set(pick(pool, 4)) == {"k1", "k2"}
    assert sum(s.total_requests for s in pool.snapshot(OPENAI)) == 4  # counters restarted
    assert set(pick(pool, 3, None, model="gpt-4o")) == {"k2"}


# --- 4. settings --------------------------------------------------------------------------


def test_settings_object_is_used(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool(lease_ttl=1.5, strategy="weighted")
    assert isinstance(pool.settings, KeyPoolSettings)
    assert pool.settings.lease_ttl == 1.5
    assert pool.settings.strategy == "weighted"


def test_settings_defaults() -> None:
    s = KeyPoolSettings()
    assert s.redis_url == "memory://"
    assert s.namespace == "keypool"
    assert isinstance(s.lease_ttl, float) and s.lease_ttl > 0
    assert s.strategy == "round_robin"


def test_settings_read_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYPOOL_LEASE_TTL", "2.5")
    monkeypatch.setenv("KEYPOOL_NAMESPACE", "from-env")
    s = KeyPoolSettings()
    assert (s.lease_ttl, s.namespace) == (2.5, "from-env")


@pytest.mark.parametrize("bad", [-1, 0, "abc", math.nan])
def test_invalid_lease_ttl_names_the_variable(bad: object) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(lease_ttl=bad)
    assert "KEYPOOL_LEASE_TTL" in str(info.value)
    with pytest.raises(ValueError, match="lease_ttl"):
        KeyPoolSettings(lease_ttl=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["-1", "0", "soon"])
def test_invalid_lease_ttl_in_environment_fails_at_start_up(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("KEYPOOL_LEASE_TTL", bad)
    with pytest.raises(ConfigError, match="KEYPOOL_LEASE_TTL"):
        KeyPool()


@pytest.mark.parametrize(
    "url",
    [
        "ftp://user:hunter2pass@127.0.0.1:6379/0",
        "redis://:hunter2pass@127.0.0.1:notaport/0",
        "redis+sentinel://:hunter2pass@127.0.0.1:26379",
        "nonsense",
    ],
)
def test_bad_store_url_is_a_config_error_without_the_password(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    with pytest.raises(ConfigError) as info:
        KeyPool(url)
    message = str(info.value)
    assert "hunter2pass" not in message and "hunter2pass" not in repr(info.value)
    if "@" in url:
        assert "***" in message, message
    assert url.split("://")[0] in message
    monkeypatch.setenv("KEYPOOL_REDIS_URL", url)
    with pytest.raises(ConfigError) as info:
        KeyPool()
    assert "KEYPOOL_REDIS_URL" in str(info.value)
    assert "hunter2pass" not in str(info.value)


def test_bad_namespace_is_rejected(store_url: str) -> None:
    with pytest.raises((ConfigError, ValueError), match="namespace"):
        KeyPool(store_url, namespace="bad namespace!")


def test_config_error_is_a_keypool_error() -> None:
    assert issubclass(ConfigError, KeyPoolError)
    for cls in (NoKeyAvailable, UnknownKey, PoolUnavailable, ConfigError):
        assert issubclass(cls, KeyPoolError)


# --- 5. keys from the environment ---------------------------------------------------------

LIST_SECRETS = ["sk-list-one-1111", "sk-list-two-2222", "sk-list-three-3333"]


def test_from_env_registers_the_documented_variables(store_url: str, namespace: str) -> None:
    environ = {
        "OPENAI_API_KEY": "sk-openai-default-0000",
        "HF_RESEARCH_KEY": "hf_research_secret_1",
        "OPENAI_API_KEYS": ",".join(LIST_SECRETS),
        "OLLAMA_API_URL": "http://127.0.0.1:11434",
        "GEMINI_API_KEY": "",
        "PATH": "/usr/bin",
    }
    pool = KeyPool.from_env(store_url, namespace=namespace, environ=environ)
    try:
        found = {(s.provider, s.key_id) for s in pool.snapshot()}
        assert ("openai", "default") in found
        assert ("huggingface", "research") in found
        list_ids = {k for p, k in found if p == "openai" and k != "default"}
        assert len(list_ids) == 3
        assert len(found) == 5, found
        assert pool.providers() == ["huggingface", "openai"]

        secrets_by_id: dict[str, str] = {}
        for _ in range(8):
            with pool.acquire(OPENAI) as lease:
                secrets_by_id[lease.key_id] = lease.secret
        assert secrets_by_id["default"] == "sk-openai-default-0000"
        assert sorted(v for k, v in secrets_by_id.items() if k != "default") == sorted(LIST_SECRETS)
        with pool.acquire(Provider.HUGGINGFACE) as lease:
            assert (lease.key_id, lease.secret) == ("research", "hf_research_secret_1")
        with pytest.raises(NoKeyAvailable):
            pool.acquire(Provider.OLLAMA)
        with pytest.raises(NoKeyAvailable):
            pool.acquire(Provider.GEMINI)
    finally:
        pool.close()


def test_list_ids_do_not_depend_on_order(store_url: str, namespace: str) -> None:
    one = {"OPENAI_API_KEYS": ",".join(LIST_SECRETS)}
    two = {"OPENAI_API_KEYS": "\n  ".join(reversed(LIST_SECRETS))}
    three = {"OPENAI_API_KEYS": " ".join([LIST_SECRETS[1], LIST_SECRETS[2], LIST_SECRETS[0]])}
    pools = [KeyPool(store_url, namespace=namespace) for _ in range(3)]
    try:
        ids = [
            sorted(pool.load_env(env)) for pool, env in zip(pools, (one, two, three), strict=True)
        ]
        assert len(ids[0]) == 3 and len({k for _, k in ids[0]}) == 3
        assert ids[0] == ids[1] == ids[2]
        assert {p for p, _ in ids[0]} == {"openai"}
        # the same ids map to the same secrets in every pool, and no extra key appeared
        mapping: list[dict[str, str]] = []
        for pool in pools:
            seen: dict[str, str] = {}
            for _ in range(3):
                with pool.acquire(OPENAI) as lease:
                    seen[lease.key_id] = lease.secret
            mapping.append(seen)
        assert mapping[0] == mapping[1] == mapping[2]
        assert len(pools[0].snapshot(OPENAI)) == 3
    finally:
        for pool in pools:
            pool.close()


def test_load_env_reads_os_environ(make_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-from-os-environ")
    monkeypatch.setenv("HF_PROD_KEY", "hf_prod_from_os_environ")
    pool = make_pool()
    assert set(pool.load_env()) == {("anthropic", "default"), ("huggingface", "prod")}
    with pool.acquire("anthropic") as lease:
        assert lease.secret == "sk-ant-from-os-environ"


# --- 6. acquire and leases ----------------------------------------------------------------


def test_acquire_returns_a_lease_and_counts_one_request(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-1")
    lease = pool.acquire(OPENAI, model="gpt-4o")
    assert (lease.provider, lease.key_id, lease.secret, lease.model) == (
        "openai",
        "k1",
        "secret-1",
        "gpt-4o",
    )
    held = pool.stats(OPENAI, "k1")
    assert held.total_requests == 1 and held.in_flight == 1
    lease.success()
    done = pool.stats(OPENAI, "k1")
    assert done.total_requests == 1 and done.in_flight == 0 and done.success_count == 1


def test_no_keys_at_all(pool: KeyPool) -> None:
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is None


def test_all_cooling_gives_the_earliest_retry_after(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.acquire(OPENAI).fail(ErrorKind.RATE_LIMIT, retry_after=30)
    pool.acquire(OPENAI).fail(ErrorKind.RATE_LIMIT, retry_after=5)
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is not None
    assert 3.5 < info.value.retry_after <= 5.0


def test_wait_sleeps_until_a_key_is_back(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    pool.acquire(OPENAI).fail(ErrorKind.RATE_LIMIT, retry_after=0.3)
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 0.3
    with pool.acquire(OPENAI, wait=1.0) as lease:
        assert lease.key_id == "k1"
    assert pool.stats(OPENAI, "k1").total_requests == 2


def test_wait_shorter_than_the_cooldown_still_raises(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    pool.acquire(OPENAI).fail(ErrorKind.RATE_LIMIT, retry_after=30)
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI, wait=0.2)
    assert info.value.retry_after is not None and info.value.retry_after > 20


def test_release_twice_is_a_no_op(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    lease = pool.acquire(OPENAI)
    lease.release()
    lease.release()
    lease.success()
    lease.fail(ErrorKind.SERVER)
    s = pool.stats(OPENAI, "k1")
    assert (s.total_requests, s.success_count, s.error_count, s.in_flight) == (1, 0, 0, 0)

    lease = pool.acquire(OPENAI)
    lease.success()
    lease.success()
    lease.release()
    lease.fail(ErrorKind.AUTH)
    s = pool.stats(OPENAI, "k1")
    assert (s.total_requests, s.success_count, s.error_count, s.in_flight) == (2, 1, 0, 0)
    assert s.status == "active"


def test_context_manager_reports_success(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    with pool.acquire(OPENAI) as lease:
        assert pool.stats(OPENAI, "k1").in_flight == 1
    assert lease.closed
    s = pool.stats(OPENAI, "k1")
    assert (s.success_count, s.error_count, s.in_flight) == (1, 0, 0)


def test_context_manager_reports_failure_and_reraises(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])

    class Boom(RuntimeError):
        pass

    with pytest.raises(Boom, match="provider exploded"), pool.acquire(OPENAI):
        raise Boom("provider exploded")
    s = pool.stats(OPENAI, "k1")
    assert (s.success_count, s.error_count, s.in_flight, s.total_requests) == (0, 1, 0, 1)
    assert s.last_error is not None


def test_context_manager_classifies_a_status_code(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])

    class RateLimited(Exception):
        status_code = 429

    with pytest.raises(RateLimited), pool.acquire(OPENAI) as lease:
        raise RateLimited("slow down")
    s = pool.stats(OPENAI, lease.key_id)
    assert s.is_rate_limited and s.status == "cooling"
    assert s.errors_by_kind == {"rate_limit": 1}


def test_expired_lease_frees_its_slot(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool(lease_ttl=0.3)
    pool.add_key(OPENAI, "k1", "secret-1", max_concurrency=1)
    pool.acquire(OPENAI)  # never reported: its holder "died"
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is not None and info.value.retry_after <= 0.3
    time.sleep(0.4)
    assert pool.stats(OPENAI, "k1").in_flight == 0
    with pool.acquire(OPENAI) as lease:
        assert lease.key_id == "k1"


def test_max_concurrency(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-1", max_concurrency=2)
    a, b = pool.acquire(OPENAI), pool.acquire(OPENAI)
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is not None  # when a lease expires at the latest
    assert pool.stats(OPENAI, "k1").in_flight == 2
    a.success()
    c = pool.acquire(OPENAI)
    b.release()
    c.release()
    assert pool.stats(OPENAI, "k1").in_flight == 0


def test_rpm_budget(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-1", rpm=3)
    assert pick(pool, 3) == ["k1"] * 3
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is not None and 0 < info.value.retry_after <= 20.0
    s = pool.stats(OPENAI, "k1")
    assert s.rpm == 3 and s.rpm_left == 0 and s.total_requests == 3


def test_tpm_budget(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-1", tpm=100)
    pool.acquire(OPENAI, tokens=60).success()
    with pytest.raises(NoKeyAvailable):
        pool.acquire(OPENAI, tokens=60)
    pool.acquire(OPENAI, tokens=30).success()
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI, tokens=101)
    assert info.value.retry_after is None  # larger than the key's whole budget
    assert pool.stats(OPENAI, "k1").tokens_used == 90


# --- 6. strategies ------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "m"), [(2, 7), (3, 10), (5, 23), (4, 40)])
def test_round_robin_is_exact(pool: KeyPool, k: int, m: int) -> None:
    keys = [f"k{i}" for i in range(k)]
    add_keys(pool, keys)
    seq = pick(pool, m)
    assert_exact_rotation(seq, keys)
    assert sum(s.total_requests for s in pool.snapshot(OPENAI)) == m


def test_round_robin_holds_without_reporting(pool: KeyPool) -> None:
    keys = ["k1", "k2", "k3"]
    add_keys(pool, keys)
    leases = [pool.acquire(OPENAI) for _ in range(9)]
    assert_exact_rotation([lease.key_id for lease in leases], keys)
    for lease in leases:
        lease.release()


@pytest.mark.parametrize("new_id", ["z-new", "a-new"])
def test_round_robin_after_a_key_is_added(pool: KeyPool, new_id: str) -> None:
    add_keys(pool, ["k1", "k2", "k3"])
    before = pick(pool, 10)
    assert_exact_rotation(before, ["k1", "k2", "k3"])
    add_keys(pool, [new_id])
    after = pick(pool, 20)
    assert_exact_rotation(after, ["k1", "k2", "k3", new_id])


@pytest.mark.parametrize(("picks_while_cooling", "cooldown"), [(6, 0.3), (7, 0.3), (30, 1.0)])
def test_round_robin_after_a_cooldown(
    pool: KeyPool, picks_while_cooling: int, cooldown: float
) -> None:
    keys = ["k1", "k2", "k3", "k4"]
    add_keys(pool, keys)
    lease = pool.acquire(OPENAI)
    assert lease.key_id == "k1"
    lease.fail(ErrorKind.RATE_LIMIT, retry_after=cooldown)
    during = pick(pool, picks_while_cooling)
    assert "k1" not in during
    assert_exact_rotation(during, keys[1:])
    wait_until_active(pool, OPENAI, "k1")
    after = pick(pool, 16)
    assert Counter(after)["k1"] <= 4, f"k1 gets more than its share after its cooldown: {after}"
    assert_exact_rotation(after, keys)


def test_weighted_follows_the_weights(pool: KeyPool) -> None:
    for key_id, weight in (("w1", 1), ("w2", 2), ("w3", 3)):
        pool.add_key(OPENAI, key_id, f"secret-{key_id}", weight=weight)
    seq = pick(pool, 180, strategy="weighted")
    for m in (60, 180):
        counts = Counter(seq[:m])
        for key_id, share in (("w1", 1), ("w2", 2), ("w3", 3)):
            assert abs(counts[key_id] - m * share // 6) <= 1, (m, counts)
    assert pool.stats(OPENAI, "w2").weight == 2.0


def test_weighted_as_the_default_strategy(make_pool: Callable[..., KeyPool]) -> None:
    pool = make_pool(strategy="weighted")
    pool.add_key(OPENAI, "heavy", "secret-heavy", weight=3.0)
    pool.add_key(OPENAI, "light", "secret-light", weight=1.0)
    counts = Counter(pick(pool, 80))
    assert abs(counts["heavy"] - 60) <= 1 and abs(counts["light"] - 20) <= 1, counts


def test_best_prefers_fewer_errors_then_least_used(pool: KeyPool) -> None:
    add_keys(pool, ["a", "b", "c"])
    first = pool.acquire(OPENAI, strategy="best")
    assert first.key_id == "a"
    first.fail(ErrorKind.SERVER)
    assert pool.stats(OPENAI, "a").consecutive_errors == 1
    seq = pick(pool, 20, strategy="best")
    assert "a" not in seq
    counts = Counter(seq)
    assert counts["b"] == counts["c"] == 10
    with pool.acquire(OPENAI) as lease:  # round robin: "a" is the furthest behind
        assert lease.key_id == "a"
    assert pool.stats(OPENAI, "a").consecutive_errors == 0
    assert pick(pool, 1, strategy="best") == ["a"]  # now the least used


def test_least_busy_prefers_fewer_leases(pool: KeyPool) -> None:
    add_keys(pool, ["a", "b", "c"])
    held = [pool.acquire(OPENAI, strategy="least_busy") for _ in range(3)]
    assert sorted(lease.key_id for lease in held) == ["a", "b", "c"]
    by_id = {lease.key_id: lease for lease in held}
    by_id["b"].success()
    extra = pool.acquire(OPENAI, strategy="least_busy")
    assert extra.key_id == "b"
    for lease in (by_id["a"], by_id["c"], extra):
        lease.release()


def test_latency_prefers_the_fastest(pool: KeyPool) -> None:
    add_keys(pool, ["a", "b", "c"])
    latencies = {"a": 0.5, "b": 0.05, "c": 0.3}
    for _ in range(3):
        lease = pool.acquire(OPENAI)
        lease.success(latency=latencies[lease.key_id])
    assert pool.stats(OPENAI, "b").latency_ms is not None
    for _ in range(5):
        lease = pool.acquire(OPENAI, strategy="latency")
        assert lease.key_id == "b"
        lease.release()


# --- 6. model routing ---------------------------------------------------------------------


def test_model_is_served_only_by_its_keys(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2", "k3", "k4"])
    pool.assign_model("gpt-4o", OPENAI, "k2")
    pool.assign_model("gpt-4o", OPENAI, "k4")
    seq = pick(pool, 20, model="gpt-4o")
    assert set(seq) == {"k2", "k4"}
    assert_exact_rotation(seq, ["k2", "k4"])
    seq = pick(pool, 20, None, model="gpt-4o")
    assert set(seq) == {"k2", "k4"}
    # a model without assigned keys is served by any key of the provider
    other = pick(pool, 8, model="gpt-3.5-turbo")
    assert {"k1", "k3"} <= set(other) <= {"k1", "k2", "k3", "k4"}


def test_add_key_models_assigns_the_model(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.add_key(OPENAI, "k3", "secret-3", models=["o1", "o3"])
    assert set(pick(pool, 6, None, model="o1")) == {"k3"}
    assert set(pick(pool, 6, OPENAI, model="o3")) == {"k3"}
    assert set(pool.stats(OPENAI, "k3").models) == {"o1", "o3"}


def test_model_keys_cooling_do_not_fall_back_to_other_keys(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.assign_model("gpt-4o", OPENAI, "k1")
    pool.acquire(OPENAI, model="gpt-4o").fail(ErrorKind.RATE_LIMIT, retry_after=0.3)
    for provider in (OPENAI, None):
        with pytest.raises(NoKeyAvailable) as info:
            pool.acquire(provider, model="gpt-4o")
        assert info.value.retry_after is not None and 0 < info.value.retry_after <= 0.3
    with pool.acquire(None, model="gpt-4o", wait=1.0) as lease:
        assert lease.key_id == "k1"


def test_model_keys_all_disabled_never_come_back(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.assign_model("gpt-4o", OPENAI, "k1")
    pool.disable_key(OPENAI, "k1")
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(model="gpt-4o")
    assert info.value.retry_after is None


def test_unknown_model_without_provider(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(model="no-such-model")
    assert info.value.retry_after is None
    assert pool.stats(OPENAI, "k1").total_requests == 0


def test_model_with_keys_elsewhere_uses_any_key_of_the_given_provider(pool: KeyPool) -> None:
    add_keys(pool, ["o1"], OPENAI)
    add_keys(pool, ["a1", "a2"], Provider.ANTHROPIC)
    pool.assign_model("shared-model", OPENAI, "o1")
    seq = pick(pool, 6, Provider.ANTHROPIC, model="shared-model")
    assert set(seq) == {"a1", "a2"}
    assert set(pick(pool, 4, None, model="shared-model")) == {"o1"}


def test_model_across_providers_without_provider(pool: KeyPool) -> None:
    add_keys(pool, ["o1", "o2"], OPENAI)
    add_keys(pool, ["r1", "r2"], Provider.OPENROUTER)
    pool.assign_model("llama-3", OPENAI, "o1")
    pool.assign_model("llama-3", Provider.OPENROUTER, "r2")
    got = set()
    for _ in range(6):
        with pool.acquire(model="llama-3") as lease:
            got.add((lease.provider, lease.key_id))
            assert lease.model == "llama-3"
    assert got <= {("openai", "o1"), ("openrouter", "r2")}
    pool.acquire(OPENAI, model="llama-3").fail(ErrorKind.RATE_LIMIT, retry_after=30)
    for _ in range(4):
        with pool.acquire(model="llama-3") as lease:
            assert (lease.provider, lease.key_id) == ("openrouter", "r2")


def test_model_whose_keys_were_removed_is_unknown_again(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.assign_model("gpt-4o", OPENAI, "k1")
    assert pick(pool, 1, None, model="gpt-4o") == ["k1"]
    pool.remove_key(OPENAI, "k1")
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(model="gpt-4o")
    assert info.value.retry_after is None
    assert pool.stats(OPENAI, "k2").total_requests == 0


def test_assign_model_to_unknown_key(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    with pytest.raises(UnknownKey):
        pool.assign_model("gpt-4o", OPENAI, "nope")
    with pytest.raises(NoKeyAvailable):
        pool.acquire(model="gpt-4o")


# --- 6. stats and snapshot ----------------------------------------------------------------


def test_stats_after_successes_and_failures(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-1", rpm=100, tpm=10_000, rpd=5000, max_concurrency=4)
    t0 = time.time()
    pool.acquire(OPENAI, tokens=50).success(tokens=40, latency=0.2)
    pool.acquire(OPENAI).success()
    pool.acquire(OPENAI).fail(ErrorKind.SERVER)
    pool.acquire(OPENAI).fail(400)
    pool.acquire(OPENAI).fail(ErrorKind.RATE_LIMIT, retry_after=30)
    s = pool.stats(OPENAI, "k1")
    assert isinstance(s, KeyStats)
    assert (s.provider, s.key_id) == ("openai", "k1")
    assert s.total_requests == 5
    assert s.success_count == 2
    assert s.error_count == 3
    assert s.errors_by_kind == {"server": 1, "bad_request": 1, "rate_limit": 1}
    assert s.consecutive_errors >= 1  # the server error after the last success
    assert s.in_flight == 0
    assert s.status == "cooling" and s.is_rate_limited
    assert s.cooldown_until is not None and abs(s.cooldown_until - (t0 + 30)) < 5
    assert s.last_used is not None and abs(s.last_used - t0) < 5
    assert s.last_error is not None and "rate_limit" in s.last_error
    assert (s.rpm, s.tpm, s.rpd, s.max_concurrency) == (100, 10_000, 5000, 4)
    assert s.tokens_used == 40
    assert s.weight == 1.0
    assert s.fingerprint and "secret-1" not in s.fingerprint


def test_stats_of_a_fresh_key(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    s = pool.stats(OPENAI, "k1")
    assert s.status == "active" and not s.is_rate_limited
    assert s.cooldown_until is None and s.last_used is None and s.last_error is None
    assert (s.total_requests, s.success_count, s.error_count, s.consecutive_errors) == (0, 0, 0, 0)
    assert s.errors_by_kind == {} and s.in_flight == 0
    assert (s.rpm, s.tpm, s.rpd, s.max_concurrency) == (None, None, None, None)


def test_snapshot_lists_every_key_sorted(pool: KeyPool) -> None:
    add_keys(pool, ["b", "a"], OPENAI)
    add_keys(pool, ["z"], Provider.ANTHROPIC)
    pick(pool, 3)
    everything = pool.snapshot()
    assert [(s.provider, s.key_id) for s in everything] == [
        ("anthropic", "z"),
        ("openai", "a"),
        ("openai", "b"),
    ]
    assert [s.key_id for s in pool.snapshot(OPENAI)] == ["a", "b"]
    assert sum(s.total_requests for s in everything) == 3
    assert pool.snapshot("cohere") == []


def test_stats_of_unknown_key(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    with pytest.raises(UnknownKey):
        pool.stats(OPENAI, "nope")
    with pytest.raises(UnknownKey):
        pool.stats(Provider.GEMINI, "k1")


# --- 6. operator actions ------------------------------------------------------------------


@pytest.mark.parametrize("action", ["disable_key", "enable_key", "reset_key", "remove_key"])
def test_operator_actions_on_an_unknown_key(pool: KeyPool, action: str) -> None:
    add_keys(pool, ["k1"])
    with pytest.raises(UnknownKey):
        getattr(pool, action)(OPENAI, "nope")
    with pytest.raises(UnknownKey):
        getattr(pool, action)(Provider.COHERE, "k1")
    assert isinstance(UnknownKey("x"), KeyPoolError)


def test_disabled_key_is_never_picked(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2", "k3"])
    pool.disable_key(OPENAI, "k2", reason="billing")
    seq = pick(pool, 12)
    assert "k2" not in seq
    assert_exact_rotation(seq, ["k1", "k3"])
    assert "k2" not in pick(pool, 6, strategy="best")
    assert "k2" not in pick(pool, 6, strategy="weighted")
    s = pool.stats(OPENAI, "k2")
    assert s.status == "disabled" and s.total_requests == 0
    assert s.disabled_reason is not None and "billing" in s.disabled_reason
    pool.enable_key(OPENAI, "k2")
    assert pool.stats(OPENAI, "k2").status == "active"
    assert "k2" in pick(pool, 3)


def test_all_disabled_means_retry_after_none(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.disable_key(OPENAI, "k1")
    pool.disable_key(OPENAI, "k2")
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI, wait=0.2)
    assert info.value.retry_after is None


def test_disabled_during_cooldown_says_never(pool: KeyPool) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.acquire(OPENAI).fail(ErrorKind.RATE_LIMIT, retry_after=30)
    pool.disable_key(OPENAI, "k2")
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is not None and info.value.retry_after > 20
    pool.disable_key(OPENAI, "k1")
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is None


def test_auth_failure_disables_until_enabled(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    pool.acquire(OPENAI).fail(401)
    s = pool.stats(OPENAI, "k1")
    assert s.status == "disabled"
    pool.reset_key(OPENAI, "k1")
    assert pool.stats(OPENAI, "k1").status == "disabled"  # reset keeps a disable
    with pytest.raises(NoKeyAvailable) as info:
        pool.acquire(OPENAI)
    assert info.value.retry_after is None
    pool.enable_key(OPENAI, "k1")
    assert pick(pool, 1) == ["k1"]


def test_reset_key_clears_cooldown_and_counters(pool: KeyPool) -> None:
    add_keys(pool, ["k1"])
    pool.acquire(OPENAI).success()
    pool.acquire(OPENAI).fail(ErrorKind.SERVER)
    pool.acquire(OPENAI).fail(ErrorKind.RATE_LIMIT, retry_after=60)
    assert pool.stats(OPENAI, "k1").status == "cooling"
    pool.reset_key(OPENAI, "k1")
    s = pool.stats(OPENAI, "k1")
    assert s.status == "active" and not s.is_rate_limited and s.cooldown_until is None
    assert (s.total_requests, s.success_count, s.error_count, s.consecutive_errors) == (0, 0, 0, 0)
    assert s.errors_by_kind == {}
    assert pick(pool, 1) == ["k1"]


def test_remove_key_forgets_it(pool: KeyPool, raw: Any, namespace: str) -> None:
    add_keys(pool, ["k1", "k2"])
    pool.assign_model("gpt-4o", OPENAI, "k1")
    pick(pool, 4)
    pool.remove_key(OPENAI, "k1")
    with pytest.raises(UnknownKey):
        pool.stats(OPENAI, "k1")
    assert [s.key_id for s in pool.snapshot(OPENAI)] == ["k2"]
    assert set(pick(pool, 6)) == {"k2"}
    assert not any(":k:k1" in name for name in store_snapshot(raw, namespace))
    with pytest.raises(UnknownKey):
        pool.remove_key(OPENAI, "k1")
    # a later add_key is a new key
    pool.add_key(OPENAI, "k1", "secret-again")
    assert pool.stats(OPENAI, "k1").total_requests == 0


def test_remove_key_while_a_lease_is_open(pool: KeyPool) -> None:
    """An operator removes a key while a worker's call with it is in flight: the worker's
    call succeeded, so leaving the ``with`` block must not raise, nor bring the key back."""
    add_keys(pool, ["k1", "k2"])
    with pool.acquire(OPENAI) as lease:
        pool.remove_key(OPENAI, lease.key_id)
    with pytest.raises(UnknownKey):
        pool.stats(OPENAI, lease.key_id)
    assert set(pick(pool, 4)) == {"k2"}


def test_add_key_is_an_idempotent_upsert(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-1", rpm=50)
    pool.acquire(OPENAI).success()
    pool.acquire(OPENAI).fail(ErrorKind.SERVER)
    pool.add_key(OPENAI, "k1", "secret-1", rpm=70, weight=2.0, max_concurrency=3)
    s = pool.stats(OPENAI, "k1")
    assert (s.total_requests, s.success_count, s.error_count) == (2, 1, 1)
    assert (s.rpm, s.weight, s.max_concurrency) == (70, 2.0, 3)
    pool.add_key(OPENAI, "k1", "secret-1")
    s = pool.stats(OPENAI, "k1")
    assert (s.rpm, s.weight, s.max_concurrency) == (None, 1.0, None)
    assert s.total_requests == 2
    assert len(pool.snapshot(OPENAI)) == 1


def test_add_key_with_a_new_secret_serves_the_new_secret(pool: KeyPool) -> None:
    pool.add_key(OPENAI, "k1", "secret-old")
    pool.acquire(OPENAI).success()
    pool.add_key(OPENAI, "k1", "secret-new")
    with pool.acquire(OPENAI) as lease:
        assert lease.secret == "secret-new"
    assert pool.stats(OPENAI, "k1").total_requests == 2


# --- 9. errors ----------------------------------------------------------------------------


def test_unreachable_redis_is_pool_unavailable() -> None:
    settings = KeyPoolSettings(
        redis_url="redis://127.0.0.1:1/0", socket_timeout=0.5, connect_timeout=0.5
    )
    pool = KeyPool(settings=settings)
    try:
        with pytest.raises(PoolUnavailable) as info:
            pool.add_key(OPENAI, "k1", "secret-1")
        assert "secret-1" not in str(info.value)
        with pytest.raises(PoolUnavailable):
            pool.acquire(OPENAI)
        with pytest.raises(PoolUnavailable):
            pool.snapshot()
    finally:
        pool.close()


def test_public_names_exist() -> None:
    for name in (
        "KeyPool",
        "AsyncKeyPool",
        "KeyPoolSettings",
        "Provider",
        "LLMProvider",
        "ErrorKind",
        "KeyStats",
        "Lease",
        "EnhancedAPIKeyManager",
        "KeyPoolError",
        "NoKeyAvailable",
        "UnknownKey",
        "PoolUnavailable",
        "ConfigError",
    ):
        assert hasattr(keypool, name), name


def test_model_index_forgets_models_whose_keys_are_gone(
    make_pool: Callable[..., KeyPool], raw: Any, namespace: str
) -> None:
    pool = make_pool()
    for i in range(3):
        pool.add_key("openai", f"k{i}", f"secret-model-index-{i}", models=[f"m{i}"])
    pool.assign_model("shared", "openai", "k0")
    pool.assign_model("shared", "openai", "k1")
    pool.remove_key("openai", "k2")
    pool.unassign_model("m1", "openai", "k1")
    pool.unassign_model("shared", "openai", "k0")  # k1 still serves "shared"
    left = sorted(raw.scan_iter(match=f"{namespace}:model:*"))
    assert left == [f"{namespace}:model:m0", f"{namespace}:model:shared"]
    assert raw.smembers(f"{namespace}:model:shared") == {"openai"}
    with pytest.raises(NoKeyAvailable) as missing:
        pool.acquire(model="m2")
    assert missing.value.retry_after is None


def test_a_key_removed_by_another_process_stays_removed(
    make_pool: Callable[..., KeyPool],
) -> None:
    operator, worker = make_pool(), make_pool()
    for pool in (operator, worker):
        pool.add_key("openai", "k1", "secret-removed-1")
        pool.add_key("openai", "k2", "secret-removed-2")
    lease = worker.acquire("openai")
    operator.remove_key("openai", lease.key_id)
    lease.success()  # the worker's call ends after the removal: no error, no resurrection
    with pytest.raises(UnknownKey):
        worker.stats("openai", lease.key_id)
    assert [s.key_id for s in operator.snapshot("openai")] == sorted({"k1", "k2"} - {lease.key_id})
    for _ in range(4):
        with worker.acquire("openai") as again:
            assert again.key_id != lease.key_id


def test_keys_this_process_cannot_use_are_skipped(make_pool: Callable[..., KeyPool]) -> None:
    operator, worker = make_pool(), make_pool()
    operator.add_key("openai", "added-elsewhere", "secret-only-the-operator-has")
    worker.add_key("openai", "mine", "secret-the-worker-has")
    for _ in range(6):
        with worker.acquire("openai") as lease:
            assert lease.key_id == "mine"
    manager = keypool.EnhancedAPIKeyManager(pool=worker)
    assert manager.get_next_key("openai") == ("mine", "secret-the-worker-has")
    worker.disable_key("openai", "mine")
    with pytest.raises(NoKeyAvailable) as none:
        worker.acquire("openai")
    assert none.value.retry_after is None
    assert isinstance(none.value, keypool.SecretUnavailable)
    assert "added-elsewhere" in str(none.value)
    assert manager.get_next_key("openai") == (None, None)


def test_keys_from_the_environment_keep_limits_set_for_them(
    make_pool: Callable[..., KeyPool],
) -> None:
    operator = make_pool()
    operator.add_key("openai", "default", "sk-env-limits-0123456789", rpm=100, weight=3.0)
    worker = make_pool()
    worker.load_env({"OPENAI_API_KEY": "sk-env-limits-0123456789"})
    stats = worker.stats("openai", "default")
    assert (stats.rpm, stats.weight) == (100, 3.0)
    operator.add_key("openai", "default", "sk-env-limits-0123456789")  # explicit: as given
    assert worker.stats("openai", "default").rpm is None


def test_wait_wakes_when_another_holder_gives_a_lease_back(
    make_pool: Callable[..., KeyPool],
) -> None:
    import threading

    pool = make_pool(lease_ttl=60)
    pool.add_key("openai", "only", "secret-wait-release", max_concurrency=1)
    held = pool.acquire("openai")
    threading.Timer(0.5, held.success).start()
    started = time.monotonic()
    with pool.acquire("openai", wait=5) as lease:
        waited = time.monotonic() - started
        assert lease.key_id == "only"
    assert 0.4 <= waited < 2.0, waited
