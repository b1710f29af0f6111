"""The status page opened in headless Chromium: its DOM and a screenshot show every key
and its state, the models a key cools for, every limit scope (and no secret)."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_server_support import ServerThread, chromium_path

httpx = pytest.importorskip("httpx")

from keypool import KeyPool, KeyPoolSettings  # noqa: E402
from keypool.server import GatewaySettings, create_app  # noqa: E402
from tests.stub_llm_server import (  # noqa: E402
    StubLLMServer,
    openai_429,
    openai_insufficient_quota,
)

TOKEN = "kp-status-token-0123456789"
SECRETS = {
    "OPENAI_SERVING_KEY": "sk-serving-1111",
    "OPENAI_COOLING_KEY": "sk-cooling-2222",
    "OPENAI_SPENT_KEY": "sk-spent-3333",
    "OPENAI_REVOKED_KEY": "sk-revoked-4444",  # unknown to the upstream: 401
    "ANTHROPIC_TEAM_KEY": "sk-ant-team-5555",
}
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--window-size=1500,560",
]


@pytest.fixture
def status_url(namespace: str) -> Iterator[str]:
    known = {SECRETS[n]: n for n in SECRETS if n != "OPENAI_REVOKED_KEY"}
    with StubLLMServer(known) as stub:
        stub.plan(SECRETS["OPENAI_COOLING_KEY"], openai_429(reset_requests=None, retry_after=300))
        stub.plan(SECRETS["OPENAI_SPENT_KEY"], openai_insufficient_quota())
        environ = {
            **SECRETS,
            "KEYPOOL_UPSTREAM_OPENAI": stub.base_url,
            "KEYPOOL_UPSTREAM_ANTHROPIC": stub.base_url,
        }
        settings = KeyPoolSettings(redis_url=f"memory://{namespace}", namespace=namespace)
        with KeyPool(settings=settings) as pool:  # budgets, kept when the gateway loads keys
            pool.add_key(
                "openai",
                "serving",
                SECRETS["OPENAI_SERVING_KEY"],
                rpm=60,
                tpm=90_000,
                account="proj-a",
            )
            pool.set_limits("openai", account="proj-a", model="gpt-4o", rpm=10, tpm=30_000)
            pool.add_key(
                "anthropic",
                "team",
                SECRETS["ANTHROPIC_TEAM_KEY"],
                rpm=50,
                rpd=1000,
                account="org-1",
            )
            pool.set_limits(
                "anthropic", account="org-1", model="claude", rpm=50, itpm=40_000, otpm=8_000
            )
        gateway = GatewaySettings(proxy_tokens=TOKEN, status_public=True)
        with ServerThread(create_app(settings, gateway=gateway, environ=environ)) as server:
            auth = {"Authorization": f"Bearer {TOKEN}"}
            chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "status page"}]}
            for _ in range(4):
                httpx.post(server.url + "/openai/v1/chat/completions", json=chat, headers=auth)
            msg = {
                "model": "claude",
                "max_tokens": 64,
                "messages": [{"role": "user", "content": "hi"}],
            }
            httpx.post(
                server.url + "/anthropic/v1/messages",
                json=msg,
                headers={"x-api-key": TOKEN, "anthropic-version": "2023-06-01"},
            )
            yield server.url + "/status"


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        timeout=120,
    )


def _png_pixels(data: bytes) -> tuple[int, int, int, bytes]:
    """Width, height, bytes per pixel and the (filtered) pixel rows of an 8-bit PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
            channels = {0: 1, 2: 3, 4: 2, 6: 4}[chunk[9]]
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, channels, zlib.decompress(idat)


def test_status_page_in_headless_chromium(status_url: str, tmp_path: Path) -> None:
    dom = _chromium(["--dump-dom", status_url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = dom.stdout.decode()
    for key_id, state in (
        ("serving", "active"),
        ("cooling", "active"),  # a 429 for gpt-4o: the key cools for that model only
        ("spent", "exhausted"),
        ("revoked", "disabled"),
        ("team", "active"),
    ):
        assert f"<code>{key_id}</code>" in text, key_id
        provider = "anthropic" if key_id == "team" else "openai"
        row = text.split(f'id="key-{provider}-{key_id}"', 1)[1].split("</tr>", 1)[0]
        assert f'class="state {state}"' in row, (key_id, row)
    assert "rate_limit" in text and "quota" in text
    serving = text.split('id="key-openai-serving"', 1)[1].split("</tr>", 1)[0]
    assert re.search(r">5[6-9] / 60<", serving), serving  # rpm left / limit after 4 requests
    assert "proj-a" in serving  # its account
    cooling = text.split('id="key-openai-cooling"', 1)[1].split("</tr>", 1)[0]
    assert re.search(r"cooling for gpt-4o, (2\d\d|300) s", cooling), cooling
    # every limit scope: the accounts' for a model, the cooling key's for gpt-4o
    scopes = {
        # the serving key's requests (one back each 6 s)
        "scope-openai-account_model-proj-a-gpt-4o": ("active", r"rpm [5-9] / 10\b"),
        "scope-openai-key_model-cooling-gpt-4o": ("cooling", "none"),
        "scope-anthropic-account_model-org-1-claude": ("active", "itpm 4\\d+ / 40000"),
    }
    for ident, (state, limits) in scopes.items():
        row = text.split(f'id="{ident}"', 1)[1].split("</tr>", 1)[0]
        assert f'class="state {state}"' in row, (ident, row)
        assert re.search(limits, row), (ident, row)
    for secret in SECRETS.values():
        assert secret not in text

    shot = tmp_path / "status.png"
    done = _chromium([f"--screenshot={shot}", status_url], tmp_path / "profile-shot")
    assert done.returncode == 0, done.stderr[-2000:]
    data = shot.read_bytes()
    width, height, channels, pixels = _png_pixels(data)
    assert (width, height) == (1500, 560)
    assert len(data) > 20_000  # text and colours, not a blank page
    stride = 1 + width * channels
    rows = [pixels[i * stride + 1 : (i + 1) * stride] for i in range(height)]
    assert len(set(rows)) > 60  # many different lines of pixels
    colours = {row[x : x + 3] for row in rows[::4] for x in range(0, len(row), channels * 7)}
    assert len(colours) > 8  # more than black on white (the state badges)
    target = os.environ.get("STATUS_PAGE_SCREENSHOT")
    if target:  # how docs/status-page.png is made
        shutil.copyfile(shot, target)
