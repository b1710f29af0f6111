"""The ``keypool`` command line, against the real Redis.

Most tests call :func:`keypool.cli.main` in-process; a few run ``python -m keypool`` as a
separate process, the way an operator does.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from keypool import KeyPool, KeyPoolSettings, UnknownKey, cli
from keypool.envload import scan_env
from keypool.fingerprint import derived_key_id, fingerprint
from keypool.stats import KeyStats

REPO = Path(__file__).resolve().parents[1]
SECRET_A = "sk-cli-test-AAAA-0123456789abcdef"
SECRET_B = "sk-cli-test-BBBB-0123456789abcdef"
SECRET_C = "sk-cli-test-CCCC-0123456789abcdef"
SEALING_KEY = "cli-test-sealing-key-0123456789"


@pytest.fixture
def live(redis_url: str, namespace: str) -> Iterator[KeyPool]:
    """A pool on the real Redis, in the test's namespace: what a worker would see."""
    pool = KeyPool(settings=KeyPoolSettings(redis_url=redis_url, namespace=namespace))
    yield pool
    pool.close()


@pytest.fixture
def store(redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The CLI reads KEYPOOL_REDIS_URL / KEYPOOL_NAMESPACE like the library; also return the
    equivalent global options."""
    monkeypatch.setenv("KEYPOOL_REDIS_URL", redis_url)
    monkeypatch.setenv("KEYPOOL_NAMESPACE", namespace)
    return ["--url", redis_url, "--namespace", namespace]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def feed_stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def table_rows(out: str) -> dict[str, dict[str, str]]:
    """The status table as {key id: {column: cell}}."""
    lines = [line for line in out.splitlines() if line.startswith("  ")]
    header = re.split(r"\s{2,}", lines[0].strip())
    rows = {}
    for line in lines[1:]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        row = dict(zip(header, cells, strict=True))
        rows[row["KEY"]] = row
    return rows


def no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (SECRET_A, SECRET_B, SECRET_C):
            assert secret not in text


def three_keys(live: KeyPool) -> None:
    """k-active (rpm 5, one lease open), k-cool (429, retry after 60 s), k-off (disabled)."""
    live.add_key("openai", "k-active", SECRET_A, rpm=5)
    live.add_key("openai", "k-cool", SECRET_B)
    live.add_key("openai", "k-off", SECRET_C)
    live.mark_failure("openai", "k-cool", 429, retry_after=60)
    live.disable_key("openai", "k-off", reason="leaked in a log")
    lease = live.acquire("openai")
    assert lease.key_id == "k-active"  # held open: in flight


# ----------------------------------------------------------------------------- status


def test_status_table_shows_state_why_cooldown_and_budgets(
    live: KeyPool, store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    three_keys(live)
    code, out, err = run(capsys, "status", "--provider", "openai")
    assert code == 0, err
    assert "openai: 3 keys (1 active, 1 cooling, 1 disabled)" in out
    rows = table_rows(out)
    assert set(rows) == {"k-active", "k-cool", "k-off"}

    active = rows["k-active"]
    assert (active["STATUS"], active["WHY"], active["COOLDOWN"]) == ("active", "-", "-")
    assert active["IN-FLIGHT"] == "1"
    assert active["REQUESTS"] == "1"
    assert active["RPM LEFT"] == "4/5"
    assert active["TPM LEFT"] == "-"

    cool = rows["k-cool"]
    assert (cool["STATUS"], cool["WHY"]) == ("cooling", "rate_limit")
    left = float(cool["COOLDOWN"].rstrip("s"))
    assert 45 < left <= 60
    assert cool["ERRORS"] == "1 (rate_limit=1)"
    assert "429" in cool["LAST ERROR"]

    off = rows["k-off"]
    assert (off["STATUS"], off["WHY"], off["COOLDOWN"]) == ("disabled", "leaked in a log", "-")
    no_secret(out, err)


def test_status_json_document(
    live: KeyPool, store: list[str], namespace: str, capsys: pytest.CaptureFixture[str]
) -> None:
    three_keys(live)
    code, out, err = run(capsys, "status", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["namespace"] == namespace
    assert set(doc["providers"]) == {"openai"}
    keys = {k["key_id"]: k for k in doc["providers"]["openai"]}
    assert {k: v["status"] for k, v in keys.items()} == {
        "k-active": "active",
        "k-cool": "cooling",
        "k-off": "disabled",
    }
    assert keys["k-active"]["in_flight"] == 1
    assert keys["k-active"]["rpm_left"] == 4
    assert 45 < keys["k-cool"]["cooldown_until"] - doc["now"] <= 60
    assert keys["k-cool"]["unavailable_reason"] == "rate_limit"
    assert keys["k-cool"]["errors_by_kind"] == {"rate_limit": 1}
    assert keys["k-off"]["disabled_reason"] == "leaked in a log"
    assert keys["k-active"]["fingerprint"] == fingerprint(SECRET_A)
    no_secret(out, err)


def test_status_of_a_provider_without_keys(
    live: KeyPool, store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    live.add_key("openai", "k1", SECRET_A)
    code, out, _ = run(capsys, "status", "--provider", "gemini", "--json")
    assert code == 0
    assert json.loads(out)["providers"] == {"gemini": []}
    code, out, _ = run(capsys, "status", "--provider", "gemini")
    assert code == 0
    assert "gemini: 0 keys" in out
    assert "k1" not in out


def test_status_takes_the_provider_as_an_argument(
    live: KeyPool, store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    live.add_key("openai", "k1", SECRET_A, rpm=9)
    live.add_key("anthropic", "a1", SECRET_B)
    with live.acquire("openai") as lease:
        lease.success(tokens=12)

    def body(out: str) -> str:  # without the first line, which holds the time
        return out.split("\n", 1)[1]

    code, positional, err = run(capsys, "status", "openai")
    assert code == 0, err
    code, option, err = run(capsys, "status", "--provider", "openai")
    assert code == 0, err
    assert body(positional) == body(option)
    assert "openai: 1 key (1 active)" in positional
    assert set(table_rows(positional)) == {"k1"}
    assert "anthropic" not in positional

    code, positional, _ = run(capsys, "status", "openai", "--json")
    assert code == 0
    code, option, _ = run(capsys, "status", "--json", "--provider", "openai")
    assert code == 0
    assert json.loads(positional)["providers"] == json.loads(option)["providers"]
    assert set(json.loads(positional)["providers"]) == {"openai"}

    # both ways at once: fine when they agree, a usage error when they differ
    code, out, err = run(capsys, "status", "openai", "--provider", "openai")
    assert code == 0, err
    assert set(table_rows(out)) == {"k1"}
    code, out, err = run(capsys, "status", "openai", "--provider", "anthropic")
    assert (code, out) == (2, "")
    assert "PROVIDER 'openai' and --provider 'anthropic' differ" in err


MANY_MODELS = [f"vendor/model-{i:02d}" for i in range(6)]


def test_status_table_shows_tokens_and_models(
    live: KeyPool, store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    live.add_key("openai", "k-chat", SECRET_A, models=["gpt-4o", "gpt-4o-mini"])
    live.add_key("openai", "k-many", SECRET_B, models=MANY_MODELS)
    live.add_key("openai", "k-idle", SECRET_C)
    for used in (100, 23):
        with live.acquire("openai", model="gpt-4o", tokens=500) as lease:
            lease.success(tokens=used)
    with live.acquire("openai", model=MANY_MODELS[3]) as lease:
        lease.success(input_tokens=40, output_tokens=2)

    code, out, err = run(capsys, "status", "openai")
    assert code == 0, err
    rows = table_rows(out)
    split = getattr(live.stats("openai", "k-many"), "tokens_in", None) is not None
    assert rows["k-chat"]["TOKENS"].split()[0] == "123"
    assert rows["k-many"]["TOKENS"] == ("42 (40 in, 2 out)" if split else "42")
    assert rows["k-idle"]["TOKENS"].split()[0] == "0"
    assert rows["k-chat"]["MODELS"] == "gpt-4o,gpt-4o-mini"
    assert rows["k-idle"]["MODELS"] == "-"
    many = rows["k-many"]["MODELS"]
    assert len(many) <= 40
    shown = many.split(" +")[0].split(",")
    assert shown == MANY_MODELS[:2]  # as many as fit, in order
    assert many.endswith(f" +{len(MANY_MODELS) - len(shown)} more")

    # --json carries every field of KeyStats, models whole
    code, out, err = run(capsys, "status", "openai", "--json")
    assert code == 0, err
    keys = {k["key_id"]: k for k in json.loads(out)["providers"]["openai"]}
    every = {f.name for f in dataclasses.fields(KeyStats)}
    assert all(set(k) == every for k in keys.values())
    assert keys["k-chat"]["tokens_used"] == 123
    assert keys["k-many"]["tokens_used"] == 42
    assert keys["k-many"]["models"] == MANY_MODELS
    assert keys["k-chat"]["models"] == ["gpt-4o", "gpt-4o-mini"]


def test_status_tokens_column_shows_the_input_output_split_when_known(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    @dataclasses.dataclass(frozen=True)
    class SplitStats(KeyStats):
        tokens_in: int | None = None
        tokens_out: int | None = None

    live.add_key("openai", "k1", SECRET_A)
    live.add_key("openai", "k2", SECRET_B)
    snapshot = KeyPool.snapshot

    def with_split(pool: KeyPool, provider: object | None = None) -> list[KeyStats]:
        out: list[KeyStats] = []
        for stats in snapshot(pool, provider):
            values = {f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}
            if stats.key_id == "k1":
                values.update(tokens_used=1234, tokens_in=1000, tokens_out=234)
            else:
                values.update(tokens_used=7, tokens_in=None, tokens_out=None)
            out.append(SplitStats(**values))
        return out

    monkeypatch.setattr(KeyPool, "snapshot", with_split)
    code, out, err = run(capsys, "status", "openai")
    assert code == 0, err
    rows = table_rows(out)
    assert rows["k1"]["TOKENS"] == "1234 (1000 in, 234 out)"
    assert rows["k2"]["TOKENS"] == "7"


def test_status_watch_redraws_until_ctrl_c(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    live.add_key("openai", "k1", SECRET_A)
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 1:
            live.disable_key("openai", "k1", reason="between frames")
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_sleep", fake_sleep)
    code, out, err = run(capsys, "status", "--watch", "0.5")
    assert code == 0, err
    assert sleeps == [0.5, 0.5]
    frames = out.split("keypool namespace")[1:]
    assert len(frames) == 2
    assert table_rows(frames[0])["k1"]["STATUS"] == "active"
    assert table_rows(frames[1])["k1"]["STATUS"] == "disabled"
    assert "\x1b[" not in out  # not a terminal: no screen control codes

    # On a terminal each frame clears the screen; --watch alone means every 2 seconds.
    sleeps.clear()
    sleeps.append(0.0)  # next call interrupts
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    code, out, _ = run(capsys, "status", "--watch")
    assert code == 0
    assert sleeps[-1] == 2.0
    assert out.startswith("\x1b[H\x1b[2J")


# ----------------------------------------------------------------------------- add


def test_add_reads_the_secret_from_stdin(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feed_stdin(monkeypatch, SECRET_A + "\n")
    argv = ["add", "openai", "prod-1", "--rpm", "7", "--max-concurrency", "3"]
    argv += ["--weight", "2.5", "--model", "gpt-4o", "gpt-4o-mini"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "added openai/prod-1" in out
    stats = live.stats("openai", "prod-1")
    assert stats.fingerprint == fingerprint(SECRET_A)
    assert (stats.rpm, stats.max_concurrency, stats.weight) == (7, 3, 2.5)
    assert set(stats.models) == {"gpt-4o", "gpt-4o-mini"}
    assert SECRET_A not in argv
    no_secret(out, err)


def test_add_reads_the_secret_from_a_named_env_variable(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MY_OPENAI_SECRET", SECRET_B)
    feed_stdin(monkeypatch, "not this one\n")
    code, out, err = run(capsys, "add", "openai", "from-env", "--from-env", "MY_OPENAI_SECRET")
    assert code == 0, err
    assert live.stats("openai", "from-env").fingerprint == fingerprint(SECRET_B)
    no_secret(out, err)

    code, _, err = run(capsys, "add", "openai", "nope", "--from-env", "NO_SUCH_VARIABLE_X")
    assert code == 2
    assert "NO_SUCH_VARIABLE_X" in err
    with pytest.raises(UnknownKey):
        live.stats("openai", "nope")


@pytest.mark.parametrize("text", ["", "\n", "   \n"])
def test_add_refuses_an_empty_secret(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    text: str,
) -> None:
    feed_stdin(monkeypatch, text)
    code, _, err = run(capsys, "add", "openai", "k1")
    assert code == 2
    assert "empty secret" in err
    assert live.snapshot("openai") == []


def test_add_refuses_several_lines(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feed_stdin(monkeypatch, f"{SECRET_A}\n{SECRET_B}\n")
    code, out, err = run(capsys, "add", "openai", "k1")
    assert code == 2
    assert live.snapshot("openai") == []
    no_secret(out, err)


def test_a_secret_on_the_command_line_is_refused_and_not_echoed(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feed_stdin(monkeypatch, SECRET_C + "\n")
    code, out, err = run(capsys, "add", "openai", "k1", SECRET_A)
    assert code == 2
    assert "never taken from the command line" in err
    no_secret(out, err)

    # Given where the key id goes, a key-shaped value is refused too, and not echoed.
    code, out, err = run(capsys, "add", "openai", SECRET_A)
    assert code == 2
    no_secret(out, err)
    assert live.snapshot("openai") == []


def test_memory_store_warns_that_it_is_this_process_only(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    feed_stdin(monkeypatch, SECRET_A)
    code, _, err = run(capsys, "--url", f"memory://{namespace}", "add", "openai", "k1")
    assert code == 0
    assert "memory:// is this process only; set KEYPOOL_REDIS_URL" in err
    no_secret(err)


# ----------------------------------------------------------------------------- import


def clear_provider_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in scan_env().keys:
        monkeypatch.delenv(key.source, raising=False)


def test_import_from_the_environment(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clear_provider_env(monkeypatch)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_A)
    monkeypatch.setenv("OPENAI_API_KEYS", f"{SECRET_B}, {SECRET_C}")
    monkeypatch.setenv("HF_RESEARCH_KEY", "hf_cliTestResearch0123456789")
    code, out, err = run(capsys, "import", "--env", "--rpm", "30")
    assert code == 0, err
    assert "imported 4 keys (huggingface: 1, openai: 3)" in out
    openai = {s.key_id: s for s in live.snapshot("openai")}
    assert set(openai) == {"default", derived_key_id(SECRET_B), derived_key_id(SECRET_C)}
    assert openai["default"].fingerprint == fingerprint(SECRET_A)
    assert all(s.rpm == 30 for s in openai.values())
    assert [s.key_id for s in live.snapshot("huggingface")] == ["research"]
    no_secret(out, err)
    assert "hf_cliTestResearch0123456789" not in out + err

    # --provider keeps only that provider's keys
    code, out, _ = run(capsys, "import", "--env", "--provider", "huggingface")
    assert code == 0
    assert "imported 1 key (huggingface: 1)" in out


def test_import_ten_thousand_keys_from_a_file(
    live: KeyPool,
    store: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = ["# generated keys", ""]
    expected: dict[str, str] = {}
    for i in range(10_000):
        secret = f"sk-bulk-{i:05d}-secretvalue"
        if i % 2:
            key_id = f"named-{i:05d}"
            lines.append(f"{key_id} = {secret}")
        else:
            key_id = derived_key_id(secret)
            lines.append(secret)
        expected[key_id] = secret
    path = tmp_path / "keys.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # shows the progress bar
    code, out, err = run(
        capsys,
        "import",
        "--file",
        str(path),
        "--provider",
        "bulk",
        "--new-provider",
        "--tpm",
        "1000",
    )
    assert code == 0, err
    assert "imported 10000 keys (bulk: 10000)" in out
    assert "1000/10000" in err
    assert "10000/10000" in err
    snapshot = live.snapshot("bulk")
    assert len(snapshot) == 10_000
    assert {s.key_id: s.fingerprint for s in snapshot} == {
        k: fingerprint(v) for k, v in expected.items()
    }
    assert all(s.tpm == 1000 for s in snapshot[:50])
    assert "secretvalue" not in out + err


def test_import_a_file_from_stdin(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feed_stdin(monkeypatch, f"alpha={SECRET_A}\n{SECRET_B}\n")
    code, out, err = run(capsys, "import", "--file", "-", "--provider", "anthropic")
    assert code == 0, err
    assert "imported 2 keys (anthropic: 2)" in out
    assert {s.key_id for s in live.snapshot("anthropic")} == {"alpha", derived_key_id(SECRET_B)}
    assert "importing [" not in err  # stderr is not a terminal: no progress bar


def test_import_errors_write_nothing(
    live: KeyPool, store: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"good={SECRET_A}\nbad id!={SECRET_B}\n", encoding="utf-8")
    code, out, err = run(capsys, "import", "--file", str(path), "--provider", "openai")
    assert code == 2
    assert "line 2" in err
    no_secret(out, err)
    assert live.snapshot("openai") == []

    code, _, err = run(capsys, "import", "--file", str(path))
    assert code == 2
    assert "--provider" in err

    code, _, err = run(capsys, "import")
    assert code == 2
    assert "nothing to import" in err

    code, _, err = run(capsys, "import", "--file", str(tmp_path / "missing.txt"), "--provider", "x")
    assert code == 2
    assert "missing.txt" in err


# ----------------------------------------------------------------------------- actions


def test_disable_enable_reset_remove_and_assign_model(
    live: KeyPool, store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    live.add_key("openai", "k1", SECRET_A)
    live.add_key("openai", "k2", SECRET_B)
    live.mark_failure("openai", "k1", 429, retry_after=60)

    assert run(capsys, "disable", "openai", "k2", "--reason", "rotating")[0] == 0
    stats = live.stats("openai", "k2")
    assert (stats.status, stats.disabled_reason) == ("disabled", "rotating")

    assert run(capsys, "enable", "openai", "k2")[0] == 0
    assert live.stats("openai", "k2").status == "active"

    assert live.stats("openai", "k1").status == "cooling"
    assert run(capsys, "reset", "openai", "k1")[0] == 0
    stats = live.stats("openai", "k1")
    assert (stats.status, stats.error_count, stats.cooldown_until) == ("active", 0, None)

    code, out, _ = run(capsys, "assign-model", "gpt-4o", "openai", "k2")
    assert code == 0
    assert "gpt-4o" in out
    assert live.stats("openai", "k2").models == ("gpt-4o",)
    for _ in range(3):  # a model with assigned keys is served only by them
        with live.acquire(model="gpt-4o") as lease:
            assert lease.key_id == "k2"

    assert run(capsys, "unassign-model", "gpt-4o", "openai", "k2")[0] == 0
    assert live.stats("openai", "k2").models == ()

    assert run(capsys, "remove", "openai", "k1")[0] == 0
    assert [s.key_id for s in live.snapshot("openai")] == ["k2"]


def test_global_options_go_before_or_after_the_command(
    live: KeyPool,
    redis_url: str,
    namespace: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # no KEYPOOL_* in the environment here: only the options point at the pool
    live.add_key("openai", "k1", SECRET_A)
    for argv in (
        ["--url", redis_url, "--namespace", namespace, "disable", "openai", "k1"],
        ["enable", "openai", "k1", "--url", redis_url, "--namespace", namespace],
        ["--url", redis_url, "disable", "openai", "k1", "--namespace", namespace],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 0, err
    assert live.stats("openai", "k1").status == "disabled"


# ----------------------------------------------------------------------------- provider typos

TYPO = "provider 'opnai' has no keys in this pool and is not a keypool provider"


def test_add_refuses_a_provider_typo_unless_declared_new(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    feed_stdin(monkeypatch, SECRET_A + "\n")
    code, out, err = run(capsys, "add", "opnai", "k1")
    assert (code, out) == (2, "")
    assert f"{TYPO}; did you mean 'openai'? (give --new-provider" in err
    assert len(err.strip().splitlines()) == 1
    assert live.providers() == []
    assert sys.stdin.read() == SECRET_A + "\n"  # refused before the secret is read
    no_secret(out, err)

    # declared new, it is created; from then on it is a provider of the pool
    feed_stdin(monkeypatch, SECRET_A + "\n")
    code, out, err = run(capsys, "add", "opnai", "k1", "--new-provider")
    assert code == 0, err
    assert "added opnai/k1" in out
    feed_stdin(monkeypatch, SECRET_B + "\n")
    code, _, err = run(capsys, "add", "opnai", "k2")
    assert code == 0, err
    assert [s.key_id for s in live.snapshot("opnai")] == ["k1", "k2"]
    code, out, err = run(capsys, "status", "opnai")
    assert code == 0, err
    assert set(table_rows(out)) == {"k1", "k2"}

    # every keypool provider is accepted without keys; custom ones match against the pool
    feed_stdin(monkeypatch, SECRET_C + "\n")
    assert run(capsys, "add", "cohere", "c1")[0] == 0
    feed_stdin(monkeypatch, SECRET_C + "\n")
    code, _, err = run(capsys, "add", "cohre", "k3")
    assert code == 2
    assert "did you mean 'cohere'?" in err
    feed_stdin(monkeypatch, SECRET_C + "\n")
    code, _, err = run(capsys, "add", "onpai", "k3")
    assert code == 2
    assert "did you mean 'opnai'?" in err  # the closest name, here one of the pool's
    feed_stdin(monkeypatch, SECRET_C + "\n")
    code, _, err = run(capsys, "add", "zzzz", "k3")
    assert code == 2
    assert "provider 'zzzz' has no keys" in err
    assert "did you mean" not in err
    assert live.providers() == ["cohere", "opnai"]


@pytest.mark.parametrize(("alias", "provider"), [("hf", "huggingface"), ("google", "gemini")])
def test_environment_aliases_are_not_provider_names(
    live: KeyPool,
    store: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    alias: str,
    provider: str,
) -> None:
    feed_stdin(monkeypatch, SECRET_A + "\n")
    code, _, err = run(capsys, "add", alias, "k1")
    assert code == 2
    assert f"provider '{alias}' has no keys" in err
    assert f"did you mean '{provider}'?" in err
    code, _, err = run(capsys, "status", alias)
    assert code == 2
    assert f"did you mean '{provider}'?" in err
    assert live.providers() == []


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "opnai"],
        ["status", "--provider", "opnai", "--json"],
        ["status", "opnai", "--watch", "1"],
        ["disable", "opnai", "k1", "--reason", "x"],
        ["enable", "opnai", "k1"],
        ["reset", "opnai", "k1"],
        ["remove", "opnai", "k1"],
        ["assign-model", "gpt-4o", "opnai", "k1"],
        ["unassign-model", "gpt-4o", "opnai", "k1"],
    ],
)
def test_commands_on_keys_refuse_a_provider_typo(
    live: KeyPool, store: list[str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    live.add_key("openai", "k1", SECRET_A)
    code, out, err = run(capsys, *argv)
    assert (code, out) == (2, "")
    assert f"keypool: {TYPO}; did you mean 'openai'?" in err
    assert "--new-provider" not in err  # these commands never create a provider
    assert live.stats("openai", "k1").status == "active"
    assert live.providers() == ["openai"]


def test_a_key_shaped_provider_is_refused_and_not_echoed(
    live: KeyPool, store: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "sk-proj-abcdefghij0123456789abcdefghij"
    for argv in (["status", secret], ["status", "--provider", secret], ["remove", secret, "k1"]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, "")
        assert "has no keys in this pool" in err
        assert secret not in err
        assert "abcdefghij0123456789" not in err


def test_import_refuses_a_provider_typo_unless_declared_new(
    live: KeyPool,
    store: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"a={SECRET_A}\nb={SECRET_B}\n", encoding="utf-8")
    code, out, err = run(capsys, "import", "--file", str(path), "--provider", "opnai")
    assert (code, out) == (2, "")
    assert f"{TYPO}; did you mean 'openai'? (give --new-provider" in err
    assert live.providers() == []

    clear_provider_env(monkeypatch)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET_C)
    code, _, err = run(capsys, "import", "--env", "--provider", "opnai")
    assert code == 2
    assert "did you mean 'openai'?" in err
    code, out, err = run(capsys, "import", "--env", "--provider", "openai")  # keypool's own
    assert code == 0, err
    assert "imported 1 key (openai: 1)" in out

    argv = ["import", "--file", str(path), "--provider", "opnai", "--new-provider"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert "imported 2 keys (opnai: 2)" in out
    assert live.providers() == ["openai", "opnai"]


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "argv",
    [
        ["disable", "openai", "ghost"],
        ["enable", "openai", "ghost"],
        ["reset", "openai", "ghost"],
        ["remove", "openai", "ghost"],
        ["assign-model", "gpt-4o", "openai", "ghost"],
    ],
)
def test_unknown_key_exits_5(
    store: list[str], capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (5, "")
    assert "ghost" in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["disable", "Not A Provider", "k1"], "invalid provider 'Not A Provider'"),
        (["status", "--provider", "UPPER"], "invalid provider 'UPPER'"),
        (["remove", "openai", "bad/id"], "invalid key_id 'bad/id'"),
        (["assign-model", "", "openai", "k1"], "invalid model"),
        (["add", "openai", "k1", "--rpm", "0"], "--rpm"),
        (["status", "--watch", "-1"], "--watch"),
        ([], "required"),
    ],
)
def test_bad_values_exit_2(
    store: list[str], capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert named in err
    assert "Traceback" not in err


def test_bad_url_exits_3_with_the_password_redacted(
    namespace: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run(capsys, "--url", "foo://admin:hunter2@db.example:6379", "status")
    assert code == 3
    assert "foo://admin:***@db.example:6379" in err
    assert "hunter2" not in err
    assert len(err.strip().splitlines()) == 1

    monkeypatch.setenv("KEYPOOL_REDIS_URL", "redis://:hunter2@127.0.0.1:notaport/0")
    code, _, err = run(capsys, "disable", "openai", "k1")
    assert code == 3
    assert "KEYPOOL_REDIS_URL" in err
    assert "hunter2" not in err


# ----------------------------------------------------------------------------- processes


def cli_process(
    *argv: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "keypool", *argv],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def test_process_adds_a_sealed_key_that_a_worker_can_use(redis_url: str, namespace: str) -> None:
    env = {
        "KEYPOOL_REDIS_URL": redis_url,
        "KEYPOOL_NAMESPACE": namespace,
        "KEYPOOL_SECRET_KEY": SEALING_KEY,
    }
    argv = ("add", "openai", "shared", "--rpm", "60")
    done = cli_process(*argv, stdin=SECRET_A + "\n", env=env)
    assert done.returncode == 0, done.stderr
    assert SECRET_A not in " ".join(done.args)
    no_secret(done.stdout, done.stderr)
    assert "KEYPOOL_SECRET_KEY is not set" not in done.stderr

    settings = KeyPoolSettings(
        redis_url=redis_url, namespace=namespace, secret_key=SecretStr(SEALING_KEY)
    )
    with KeyPool(settings=settings) as worker, worker.acquire("openai") as lease:
        assert (lease.key_id, lease.secret) == ("shared", SECRET_A)

    status = cli_process("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    keys = json.loads(status.stdout)["providers"]["openai"]
    assert [(k["key_id"], k["total_requests"], k["rpm"]) for k in keys] == [("shared", 1, 60)]
    no_secret(status.stdout, status.stderr)


def test_process_reports_an_unreachable_redis_with_exit_4(namespace: str) -> None:
    # a hang would trip the subprocess timeout; the connect timeout comes from settings
    done = cli_process(
        "--url",
        "redis://127.0.0.1:1/0",
        "--namespace",
        namespace,
        "status",
        env={"KEYPOOL_CONNECT_TIMEOUT": "1"},
    )
    assert done.returncode == 4
    assert "redis://127.0.0.1:1/0" in done.stderr
    assert "unreachable" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_process_exit_codes_for_unknown_key_and_usage(redis_url: str, namespace: str) -> None:
    base = ("--url", redis_url, "--namespace", namespace)
    done = cli_process(*base, "remove", "openai", "ghost")
    assert (done.returncode, done.stdout) == (5, "")
    assert "ghost" in done.stderr
    assert "Traceback" not in done.stderr

    done = cli_process(*base, "frobnicate")
    assert done.returncode == 2
    assert "invalid choice" in done.stderr


def test_process_refuses_a_provider_typo(redis_url: str, namespace: str) -> None:
    env = {"KEYPOOL_REDIS_URL": redis_url, "KEYPOOL_NAMESPACE": namespace}
    done = cli_process("add", "opnai", "k1", stdin=SECRET_A + "\n", env=env)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"keypool: {TYPO}; did you mean 'openai'? "
        "(give --new-provider to add keys of a new provider)\n"
    )
    done = cli_process("add", "opnai", "k1", "--new-provider", stdin=SECRET_A + "\n", env=env)
    assert done.returncode == 0, done.stderr
    done = cli_process("status", "opnai", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert [k["key_id"] for k in json.loads(done.stdout)["providers"]["opnai"]] == ["k1"]
    no_secret(done.stdout, done.stderr)


def test_process_watch_stops_cleanly_on_ctrl_c(
    live: KeyPool, redis_url: str, namespace: str
) -> None:
    live.add_key("openai", "k1", SECRET_A)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = ["--url", redis_url, "--namespace", namespace, "status", "--watch", "0.2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "keypool", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        # a child of a non-interactive shell may inherit SIGINT ignored; Ctrl-C must reach it
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = proc.stdout.readline()  # the first frame is drawn
        assert first.startswith("keypool namespace")
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        out, err = first + proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert "k1" in out
