"""The README's "Using the official SDKs" snippets run as written, against the local stub.

Each snippet is read from the README and run in a fresh interpreter, with keys in the
environment (``<PROVIDER>_API_KEYS``) and the SDKs pointed at the stub by their own
``*_BASE_URL`` variables, on the real Redis.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("anthropic")
pytest.importorskip("google.genai")

from tests.stub_llm_server import StubLLMServer, fake_secret

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Using the official SDKs"


def snippets() -> list[tuple[str, str]]:
    """(the ### heading it is under, the code) of every python block of the section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    found = []
    heading = ""
    for part in re.split(r"(?m)^(### .*)$", text[start:end]):
        if part.startswith("### "):
            heading = part[4:].strip()
            continue
        found += [(heading, code) for code in re.findall(r"```python\n(.*?)```", part, re.S)]
    return found


SNIPPETS = snippets()
PROVIDER = {"OpenAI": "openai", "Anthropic": "anthropic", "Any other SDK": "gemini"}


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    with StubLLMServer() as server:
        yield server


def test_every_sdk_has_a_snippet() -> None:
    headings = {heading for heading, _ in SNIPPETS}
    assert {"OpenAI", "Anthropic", "Google Gemini (`google-genai`)"} <= headings


@pytest.mark.parametrize(
    ("heading", "code"), SNIPPETS, ids=[f"{h}-{i}" for i, (h, _) in enumerate(SNIPPETS)]
)
def test_snippet_runs(
    heading: str, code: str, stub: StubLLMServer, redis_url: str, namespace: str
) -> None:
    provider = PROVIDER.get(heading, "gemini")
    secrets = [fake_secret(provider, f"env{i}") for i in range(2)]
    for i, secret in enumerate(secrets):
        stub.add_key(secret, f"env{i}")
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("KEYPOOL_") and not name.endswith(("_KEY", "_KEYS", "_BASE_URL"))
    }
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            f"{provider.upper()}_API_KEYS": ",".join(secrets),
            "KEYPOOL_REDIS_URL": redis_url,
            "KEYPOOL_NAMESPACE": namespace,
            "OPENAI_BASE_URL": stub.base_url + "/v1",
            "ANTHROPIC_BASE_URL": stub.base_url,
            "GOOGLE_GEMINI_BASE_URL": stub.base_url,
        }
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for secret in secrets:
        assert secret not in output
    if heading == "Any other SDK":
        assert "called with key" in proc.stdout
        return
    assert "stub answer" in proc.stdout
    assert stub.calls and all(c.status == 200 for c in stub.calls)
    assert set(Counter(stub.key_ids())) == {"env0", "env1"}  # rotated over both keys
    if "snapshot" in code:  # the stats it printed: every request counted, with tokens
        rows = [line.split() for line in proc.stdout.splitlines()]
        rows = [r for r in rows if len(r) == 4 and r[1] == "active"]
        assert len(rows) == 2, proc.stdout
        assert sum(int(r[2]) for r in rows) == len(stub.calls)
        assert sum(int(r[3]) for r in rows) == sum(c.total_tokens or 0 for c in stub.calls)
