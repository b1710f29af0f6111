"""``keypool limits set|show`` and ``add --account``: what an operator sees."""

from __future__ import annotations

import json

import pytest

from keypool import KeyPool, NoKeyAvailable
from tests.test_cli import feed_stdin, live, run, store  # noqa: F401 - fixtures

SECRET = "sk-cli-limits-0123456789abcdef"


def test_limits_set_then_show_then_enforced(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    store: list[str],  # noqa: F811
    live: KeyPool,  # noqa: F811
) -> None:
    feed_stdin(monkeypatch, SECRET + "\n")
    code, out, _ = run(capsys, "add", "openai", "k1", "--account", "org-a")
    assert code == 0, out
    code, out, err = run(
        capsys, "limits", "set", "openai", "--account", "org-a", "--model", "gpt-4o", "--rpm", "2"
    )
    assert code == 0, err
    assert "rpm=2" in out and "org-a" in out
    code, out, _ = run(capsys, "limits", "show", "openai")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("account_model"))
    assert "org-a" in row and "gpt-4o" in row and "rpm=2" in row
    live.add_key("openai", "k1", SECRET)  # a worker holding the same key
    for _ in range(2):
        live.acquire("openai", model="gpt-4o").success()
    with pytest.raises(NoKeyAvailable):
        live.acquire("openai", model="gpt-4o")
    code, out, _ = run(capsys, "limits", "show", "openai", "--json")
    [scope] = json.loads(out)
    assert scope["left"] == {"rpm": 0} and scope["account"] == "org-a"
    assert live.stats("openai", "k1").account == "org-a"
    assert SECRET not in out


def test_limits_set_refuses_bad_input_with_nothing_written(
    capsys: pytest.CaptureFixture[str],
    store: list[str],  # noqa: F811
    live: KeyPool,  # noqa: F811
) -> None:
    code, _, err = run(capsys, "limits", "set", "openai", "--account", "a", "--key", "k")
    assert code == 2, err
    code, _, err = run(capsys, "limits", "set", "openai", "--account", "a")
    assert code == 2, err
    assert "at least one" in err
    code, _, err = run(capsys, "limits", "set", "opnai", "--account", "a", "--rpm", "1")
    assert code == 2 and "openai" in err
    assert live.scopes("openai") == []
