"""Chat with an Ollama server N times through an httpx client whose keys come from a pool.

Ollama itself takes no key, but Ollama's cloud API (https://ollama.com) and Ollama servers
behind an authenticating proxy take ``Authorization: Bearer <key>``: every request here
leases the next key of the pool (shared round-robin), sends it, and reports the answer back
(tokens from ``prompt_eval_count + eval_count``, 429s cool the key down, a rejected key is
disabled).

A local Ollama (http://localhost:11434, the default; it ignores the keys)::

    pip install "keypool[httpx]"            # or, from the repository: pip install -e ".[httpx]"
    ollama pull llama3.2
    python examples/ollama_chat.py --model llama3.2 --prompt "Say hello" --requests 3

Ollama's cloud, or a proxy, with several keys::

    export OLLAMA_API_KEYS="first-key,second-key"           # or OLLAMA_API_KEY=...
    python examples/ollama_chat.py --base-url https://ollama.com --model gpt-oss:120b

Keys come from the environment (``OLLAMA_API_KEYS``, ``OLLAMA_API_KEY``,
``OLLAMA_<NAME>_KEY``); without any, two demo keys are registered (fine for a local Ollama,
which ignores them). The pool lives in ``KEYPOOL_REDIS_URL`` (default ``memory://``: this
process only; point several processes at one Redis to share one rotation) under
``KEYPOOL_NAMESPACE``. Only key ids are printed, never a key. ``--stream`` reads the answer
as Ollama streams it (NDJSON); the key stays leased until the stream ends. Exit status: 0
when at least one request succeeded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx

from keypool import KeyPool, NoKeyAvailable, Provider
from keypool.integrations.httpx import KeyPoolAuth

OLLAMA_URL = "http://localhost:11434"
DEFAULT_MODEL = "llama3.2"
DEMO_KEYS = {"demo-1": "demo-ollama-key-not-real-1", "demo-2": "demo-ollama-key-not-real-2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base-url", default=OLLAMA_URL, help=f"API root (default {OLLAMA_URL})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument("--prompt", default="Write one sentence about key rotation.")
    parser.add_argument("--requests", type=int, default=3, metavar="N", help="calls to make")
    parser.add_argument("--stream", action="store_true", help="read the answers as streams")
    parser.add_argument(
        "--wait", type=float, default=5.0, help="seconds a request may wait for a cooling key"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="HTTP timeout, seconds")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return args


def make_pool() -> KeyPool:
    """A pool with the Ollama keys of the environment, or demo keys when there are none."""
    pool = KeyPool()  # KEYPOOL_REDIS_URL, KEYPOOL_NAMESPACE... or memory://
    found = pool.load_env()
    if not any(provider == Provider.OLLAMA for provider, _ in found):
        print("no OLLAMA_API_KEYS in the environment: using demo keys")
        for key_id, secret in DEMO_KEYS.items():
            pool.add_key(Provider.OLLAMA, key_id, secret)
    return pool


def chat_once(client: httpx.Client, model: str, prompt: str, stream: bool) -> tuple[str, bool, str]:
    """One chat turn: (the key id used, whether it succeeded, the answer or the status)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": stream}
    if not stream:
        response = client.post("/api/chat", json=body)
        key_id = str(response.extensions.get("keypool_key_id", "?"))
        if not response.is_success:
            return key_id, False, f"HTTP {response.status_code}"
        return key_id, True, str(response.json().get("message", {}).get("content", "")).strip()
    with client.stream("POST", "/api/chat", json=body) as response:
        key_id = str(response.extensions.get("keypool_key_id", "?"))
        if not response.is_success:
            response.read()
            return key_id, False, f"HTTP {response.status_code}"
        pieces = []
        for line in response.iter_lines():
            if line.strip():
                pieces.append(str(json.loads(line).get("message", {}).get("content", "")))
        return key_id, True, "".join(pieces).strip()


def print_stats(pool: KeyPool) -> None:
    print("\nper-key stats:")
    print(f"  {'key':<24} {'status':<10} {'requests':>8} {'ok':>4} {'errors':>6} {'tokens':>7}")
    now = time.time()
    for s in pool.snapshot(Provider.OLLAMA):
        line = (
            f"  {s.key_id:<24} {s.status:<10} {s.total_requests:>8} {s.success_count:>4} "
            f"{s.error_count:>6} {s.tokens_used:>7}"
        )
        if s.cooldown_until:
            line += f"  cooling for {max(0.0, s.cooldown_until - now):.0f}s"
        if s.disabled_reason:
            line += f"  disabled: {s.disabled_reason}"
        if s.errors_by_kind:
            line += "  " + ", ".join(f"{k}={v}" for k, v in sorted(s.errors_by_kind.items()))
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pool = make_pool()
    auth = KeyPoolAuth(pool, Provider.OLLAMA, wait=args.wait, retry_on_rate_limit=1)
    succeeded = 0
    with httpx.Client(base_url=args.base_url, auth=auth, timeout=args.timeout) as client:
        for n in range(1, args.requests + 1):
            try:
                key_id, ok, text = chat_once(client, args.model, args.prompt, args.stream)
            except NoKeyAvailable as exc:
                when = f"in {exc.retry_after:.0f}s" if exc.retry_after is not None else "never"
                print(f"[{n}] no key available (next one free {when})")
                continue
            except httpx.HTTPError as exc:
                print(f"[{n}] request failed: {type(exc).__name__}")
                continue
            succeeded += ok
            print(f"[{n}] key {key_id}: {text}")
    print_stats(pool)
    pool.close()
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
