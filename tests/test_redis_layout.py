"""The README's "Redis layout" table is what an operator finds with ``redis-cli``.

A live pool is built on the real Redis (keys active, cooling after a 429, disabled, with an
open lease under ``max_concurrency``, model assignments), then inspected with the real
``redis-cli`` binary and compared, key by key, with what the README says each key holds.
The table is read from the README itself, so the test follows the documentation.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from redis.crc import key_slot

from keypool import KeyPool, KeyPoolSettings, Provider
from keypool.keyspace import ProviderKeys
from tests.conftest import IN_CI

README = Path(__file__).resolve().parent.parent / "README.md"
OPENAI = Provider.OPENAI
COOLDOWN = 120.0  # seconds the 429 asks for
LEASE_TTL = 60.0
HI = 2**40


# --------------------------------------------------------------------------- the README table


@dataclass(frozen=True)
class Row:
    pattern: re.Pattern[str]
    kind: str
    holds: str
    names: tuple[str, ...]


def _regex(template: str, namespace: str) -> re.Pattern[str]:
    out = ""
    for part in re.split(r"(<[a-z_]+>)", template):
        if part == "<ns>":
            out += re.escape(namespace)
        elif part == "<p>":
            out += r"[a-z0-9][a-z0-9_-]*"
        elif part.startswith("<"):
            out += r".+"
        else:
            out += re.escape(part)
    return re.compile(out + r"\Z")


def readme_layout(namespace: str) -> list[Row]:
    """The rows of the README's "Redis layout" table."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Redis layout", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`([^`]+)`", cells[0])
        full = names[0]
        templates = [full] + [full.rsplit(":", 1)[0] + ":" + n for n in names[1:]]
        for template in templates:
            rows.append(Row(_regex(template, namespace), cells[1], cells[2], tuple(templates)))
    assert rows, "no Redis layout table in the README"
    return rows


def documented_fields(rows: list[Row], suffix: str) -> set[str]:
    """The backticked names in the "holds" cell of the row ending in ``suffix``."""
    row = next(r for r in rows if r.names[0].endswith(suffix))
    return set(re.findall(r"`([^`]+)`", row.holds))


# --------------------------------------------------------------------------- redis-cli


def _cli_base(url: str) -> list[str]:
    binary = shutil.which("redis-cli")
    if binary is None:
        if IN_CI:
            pytest.fail("CI=true but redis-cli is not installed", pytrace=False)
        pytest.skip("redis-cli is not installed")
    parsed = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    base = [binary, "-h", str(parsed.get("host", "127.0.0.1")), "-p", str(parsed.get("port"))]
    base += ["-n", str(parsed.get("db", 0))]
    if parsed.get("password"):
        base += ["--no-auth-warning", "-a", str(parsed["password"])]
    return base


class Cli:
    """The real ``redis-cli``, as an operator runs it."""

    def __init__(self, url: str) -> None:
        self.base = _cli_base(url)
        self.url = url

    def lines(self, *args: str) -> list[str]:
        done = subprocess.run(
            [*self.base, *args], capture_output=True, text=True, timeout=20, check=False
        )
        assert done.returncode == 0, done.stderr
        assert not done.stdout.startswith("(error)") and "ERR" not in done.stdout[:5], done.stdout
        out = done.stdout.removesuffix("\n")  # fields may be empty strings: keep them
        return out.split("\n") if out else []

    def scan(self, pattern: str) -> set[str]:
        return set(self.lines("--scan", "--pattern", pattern))

    def hgetall(self, key: str) -> dict[str, str]:
        """Every field as ``redis-cli HGETALL`` shows it: plain text."""
        out = self.lines("HGETALL", key)
        return dict(zip(out[0::2], out[1::2], strict=True))

    def zrange(self, key: str) -> dict[str, float]:
        out = self.lines("ZRANGE", key, "0", "-1", "WITHSCORES")
        return {m: float(s) for m, s in zip(out[0::2], out[1::2], strict=True)}

    def smembers(self, key: str) -> set[str]:
        return set(self.lines("SMEMBERS", key))

    def type(self, key: str) -> str:
        return self.lines("TYPE", key)[0]

    def now_ms(self) -> float:
        sec, usec = self.lines("TIME")
        return int(sec) * 1000 + int(usec) / 1000


# --------------------------------------------------------------------------- the live pool


@dataclass
class Live:
    pool: KeyPool
    ns: str
    keys: ProviderKeys
    lease_id: str
    cli: Cli
    start_ms: float


@pytest.fixture
def live(redis_url: str, namespace: str) -> Iterator[Live]:
    cli = Cli(redis_url)
    settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, lease_ttl=LEASE_TTL)
    pool = KeyPool(settings=settings)
    start = cli.now_ms()
    pool.add_key(OPENAI, "active-a", "sk-layout-test-aaaaaaaaaaaaaaaa", models=["gpt-4o"])
    pool.add_key(OPENAI, "cooling", "sk-layout-test-bbbbbbbbbbbbbbbb", rpm=100)
    pool.add_key(OPENAI, "off", "sk-layout-test-cccccccccccccccc")
    pool.add_key(
        OPENAI,
        "limited",
        "sk-layout-test-dddddddddddddddd",
        max_concurrency=2,
        models=["gpt-4o", "limited-only"],
    )
    pool.add_key(Provider.ANTHROPIC, "claude-a", "sk-ant-layout-test-eeeeeeeeeeee")
    pool.mark_failure(OPENAI, "cooling", 429, retry_after=COOLDOWN)
    pool.disable_key(OPENAI, "off", reason="rotating")
    lease = pool.acquire(model="limited-only")  # an open lease, on the limited key
    assert lease.key_id == "limited"
    try:
        yield Live(pool, namespace, ProviderKeys(namespace, "openai"), lease.lease_id, cli, start)
    finally:
        pool.close()


# --------------------------------------------------------------------------- the checks


def test_every_key_is_in_the_readme_table_with_its_type(live: Live) -> None:
    rows = readme_layout(live.ns)
    found = live.cli.scan(f"{live.ns}:*")
    p = live.keys.prefix
    a = ProviderKeys(live.ns, "anthropic").prefix
    expected = {
        f"{live.ns}:providers",
        f"{live.ns}:model:gpt-4o",
        f"{live.ns}:model:limited-only",
        *(p + s for s in ("meta", "all", "fps", "wait", "leases", "lease", "done", "rr", "mrs")),
        *(p + "k:" + k for k in ("active-a", "cooling", "off", "limited")),
        p + "m:gpt-4o",
        p + "m:limited-only",
        p + "mr:gpt-4o",
        p + "mr:limited-only",
        *(a + s for s in ("meta", "all", "fps", "rr", "k:claude-a")),
    }
    assert found == expected, (
        f"unexpected: {sorted(found - expected)}; missing: {sorted(expected - found)}"
    )
    for name in found:
        matches = [r for r in rows if r.pattern.match(name)]
        assert matches, f"{name} is not in the README's Redis layout table"
        assert live.cli.type(name) == matches[0].kind, f"{name}: README says {matches[0].kind}"


def test_a_cooling_key_is_in_wait_until_its_cooldown_ends(live: Live) -> None:
    k = live.cli.hgetall(live.keys.key_hash("cooling"))
    assert k["en"] == "1"
    assert k["why"] == "rate_limit"
    until = float(k["until"])
    assert live.start_ms + COOLDOWN * 1000 - 1000 <= until <= live.cli.now_ms() + COOLDOWN * 1000
    assert k["e:rate_limit"] == "1" and k["err"] == "1"
    assert k["last_error"].startswith("rate_limit")
    assert float(k["last_error_at"]) >= live.start_ms - 1000
    assert k["rpm"] == "100"
    wait = live.cli.zrange(live.keys.prefix + "wait")
    assert set(wait) == {"cooling"}, wait
    assert abs(wait["cooling"] - until) < 1.0  # score = cooldown end, ms
    assert "cooling" not in live.cli.zrange(live.keys.prefix + "rr")
    stats = live.pool.stats(OPENAI, "cooling")
    assert stats.status == "cooling" and stats.cooldown_until is not None
    assert abs(stats.cooldown_until * 1000 - until) < 2.0


def test_a_disabled_key_is_in_neither_set(live: Live) -> None:
    k = live.cli.hgetall(live.keys.key_hash("off"))
    assert k["en"] == "0"
    assert k["disabled_reason"] == "rotating"
    assert "off" not in live.cli.zrange(live.keys.prefix + "rr")
    assert "off" not in live.cli.zrange(live.keys.prefix + "wait")
    assert live.cli.smembers(live.keys.prefix + "all") == {"active-a", "cooling", "off", "limited"}


def test_an_open_lease_is_listed_with_its_expiry(live: Live) -> None:
    now = live.cli.now_ms()
    leases = live.cli.zrange(live.keys.prefix + "leases")
    member = live.lease_id
    assert set(leases) == {member}, leases
    record = live.cli.lines("HGET", live.keys.prefix + "lease", member)
    assert record[0] == "limited", record  # <key_id> \n <tokens> <in> <out> <ttl> \n <model>
    assert record[1] == f"0 0 0 {int(LEASE_TTL * 1000)} - -", record  # no account, no scope
    assert now < leases[member] <= now + LEASE_TTL * 1000
    assert leases[member] >= live.start_ms + LEASE_TTL * 1000 - 1000
    k = live.cli.hgetall(live.keys.key_hash("limited"))
    assert k["maxc"] == "2" and k["inflight"] == "1" and k["total"] == "1"
    assert float(k["last_used"]) >= live.start_ms - 1000
    # a key with max_concurrency under its limit stays available
    assert "limited" in live.cli.zrange(live.keys.prefix + "rr")
    # one set of open leases for the whole provider: no per-key lease set
    assert not live.cli.scan(live.keys.prefix + "kl:*")


def test_rotation_order_and_meta(live: Live) -> None:
    rr = live.cli.zrange(live.keys.prefix + "rr")
    assert set(rr) == {"active-a", "limited"}
    for key_id, score in rr.items():
        k = live.cli.hgetall(live.keys.key_hash(key_id))
        assert abs(float(k["pass"]) - score) < 1.0, (key_id, k["pass"], score)
    # `pass` counts µs since 2024-01-01: the limited key was served during the test
    served = float(live.cli.hgetall(live.keys.key_hash("limited"))["pass"]) / 1000 + 1704067200000
    assert live.start_ms - 1000 <= served <= live.cli.now_ms() + 1000
    meta = live.cli.hgetall(live.keys.prefix + "meta")
    assert meta.get("epoch") and meta.get("created")
    leases = live.cli.zrange(live.keys.prefix + "leases")
    wait = live.cli.zrange(live.keys.prefix + "wait")
    done = live.cli.zrange(live.keys.prefix + "done")  # records forgotten in batches
    first = min([*leases.values(), *wait.values(), *done.values()])
    assert first - 1.0 < float(meta["due"]) <= first + 1000, (meta["due"], first)
    # the other strategy sets exist only once their strategy is used
    assert not live.cli.scan(live.keys.prefix + "busy")
    lease = live.pool.acquire(OPENAI, strategy="least_busy")
    lease.release()
    busy = live.cli.zrange(live.keys.prefix + "busy")
    assert set(busy) == {"active-a", "limited"}
    for key_id, score in busy.items():  # in-flight·2^40 + last served
        inflight = int(live.cli.hgetall(live.keys.key_hash(key_id))["inflight"])
        assert int(score // HI) == inflight, (key_id, score, inflight)
    assert "4" in live.cli.hgetall(live.keys.prefix + "meta").get("zs", "")


def test_models_and_providers(live: Live) -> None:
    p = live.keys.prefix
    assert live.cli.smembers(p + "m:gpt-4o") == {"active-a", "limited"}
    assert live.cli.smembers(p + "m:limited-only") == {"limited"}
    assert live.cli.smembers(f"{live.ns}:model:gpt-4o") == {"openai"}
    assert live.cli.smembers(f"{live.ns}:providers") == {"openai", "anthropic"}
    k = live.cli.hgetall(live.keys.key_hash("limited"))
    assert sorted(json.loads(k["models"])) == ["gpt-4o", "limited-only"]


def test_every_field_of_a_key_hash_is_documented(live: Live) -> None:
    """An operator running HGETALL finds each field explained in the README."""
    rows = readme_layout(live.ns)
    documented = documented_fields(rows, ":k:<key_id>")
    prefixes = {d[: d.index("<")] for d in documented if "<" in d}
    seen: set[str] = set()
    lease = live.pool.acquire(OPENAI, model="gpt-4o", strategy="latency")
    lease.success(tokens=5, latency=0.02)
    settings = live.pool.settings.model_copy(update={"secret_key": SecretStr("s" * 32)})
    with KeyPool(settings=settings) as sealed:  # sealed mode adds the encrypted secret
        sealed.add_key(OPENAI, "sealed-k", "sk-layout-test-ffffffffffffffff")
    for key_id in ("active-a", "cooling", "off", "limited", "sealed-k"):
        seen |= set(live.cli.hgetall(live.keys.key_hash(key_id)))
    undocumented = {f for f in seen if f not in documented and not f.startswith(tuple(prefixes))}
    assert not undocumented, f"key hash fields missing from the README: {sorted(undocumented)}"
    meta = set(live.cli.hgetall(live.keys.prefix + "meta"))
    meta_doc = documented_fields(rows, ":meta")
    assert meta <= meta_doc, f"meta fields missing from the README: {sorted(meta - meta_doc)}"


def test_one_cluster_slot_per_provider(live: Live) -> None:
    """Every key a script touches shares the provider's hash tag: one slot per provider,
    different tags (here: different slots) for different providers."""
    found = live.cli.scan(f"{live.ns}:*")
    slots: dict[str, set[int]] = {}
    for name in found:
        tag = re.search(r"\{([^}]*)\}", name)
        if tag is None:  # namespace-level indexes, not touched by the scripts
            assert name in (
                f"{live.ns}:providers",
                f"{live.ns}:model:gpt-4o",
                f"{live.ns}:model:limited-only",
            )
            continue
        assert name.startswith(f"{live.ns}:{{{tag.group(1)}}}:")
        slots.setdefault(tag.group(1), set()).add(key_slot(name.encode()))
    assert set(slots) == {"openai", "anthropic"}
    assert all(len(s) == 1 for s in slots.values()), slots
    assert slots["openai"] != slots["anthropic"]
    # including the keys not created yet (other strategy sets, another key's hash)
    for provider in ("openai", "anthropic", "custom-llm"):
        space = ProviderKeys(live.ns, provider)
        names = [*space.keys, space.key_hash("x"), space.model_set("m")]
        assert len({key_slot(n.encode()) for n in names}) == 1
        assert {key_slot(n.encode()) for n in names} == {key_slot(f"{{{provider}}}".encode())}
