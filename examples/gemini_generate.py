"""Call Gemini's generateContent N times through an httpx client whose keys come from a pool.

Every request leases the next key of the pool (shared round-robin), sends it in
``x-goog-api-key`` and reports the answer back: a 429 cools that key down for as long as
Gemini asks, a rejected key is disabled, tokens are counted from ``usageMetadata``.

Against the real API (https://generativelanguage.googleapis.com, the default)::

    pip install "keypool[httpx]"            # or, from the repository: pip install -e ".[httpx]"
    export GEMINI_API_KEYS="AIza...first,AIza...second"     # or GEMINI_API_KEY=...
    python examples/gemini_generate.py --prompt "Say hello" --requests 4

Against anything that speaks the same API (a proxy, a local stub)::

    python examples/gemini_generate.py --base-url http://127.0.0.1:8080 --requests 4

Keys come from the environment (``GEMINI_API_KEYS``, ``GEMINI_API_KEY``, ``GOOGLE_API_KEY``,
``GEMINI_<NAME>_KEY``...); without any, two demo keys are registered, which only a stub
accepts. The pool lives in ``KEYPOOL_REDIS_URL`` (default ``memory://``: this process only;
point several processes at one Redis to share one rotation) under ``KEYPOOL_NAMESPACE``.
Only key ids are printed, never a key. Exit status: 0 when at least one request succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time

import httpx

from keypool import KeyPool, NoKeyAvailable, Provider
from keypool.integrations.httpx import KeyPoolAuth

GEMINI_URL = "https://generativelanguage.googleapis.com"
DEFAULT_MODEL = "gemini-2.0-flash"
DEMO_KEYS = {"demo-1": "demo-gemini-key-not-real-1", "demo-2": "demo-gemini-key-not-real-2"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base-url", default=GEMINI_URL, help=f"API root (default {GEMINI_URL})")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    parser.add_argument("--prompt", default="Write one sentence about key rotation.")
    parser.add_argument("--requests", type=int, default=3, metavar="N", help="calls to make")
    parser.add_argument(
        "--wait", type=float, default=5.0, help="seconds a request may wait for a cooling key"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="HTTP timeout, seconds")
    args = parser.parse_args(argv)
    if args.requests < 1:
        parser.error("--requests must be at least 1")
    return args


def make_pool() -> KeyPool:
    """A pool with the Gemini keys of the environment, or demo keys when there are none."""
    pool = KeyPool()  # KEYPOOL_REDIS_URL, KEYPOOL_NAMESPACE... or memory://
    found = pool.load_env()
    if not any(provider == Provider.GEMINI for provider, _ in found):
        print("no GEMINI_API_KEYS in the environment: using demo keys (only a stub takes them)")
        for key_id, secret in DEMO_KEYS.items():
            pool.add_key(Provider.GEMINI, key_id, secret)
    return pool


def answer_text(payload: object) -> str:
    """The text of the first candidate of a generateContent reply."""
    try:
        parts = payload["candidates"][0]["content"]["parts"]  # type: ignore[index]
        return "".join(str(part.get("text", "")) for part in parts).strip()
    except (KeyError, IndexError, TypeError, AttributeError):
        return "(no text in the reply)"


def print_stats(pool: KeyPool) -> None:
    print("\nper-key stats:")
    print(f"  {'key':<24} {'status':<10} {'requests':>8} {'ok':>4} {'errors':>6} {'tokens':>7}")
    now = time.time()
    for s in pool.snapshot(Provider.GEMINI):
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
    auth = KeyPoolAuth(
        pool, Provider.GEMINI, model=args.model, wait=args.wait, retry_on_rate_limit=1
    )
    path = f"/v1beta/models/{args.model}:generateContent"
    body = {"contents": [{"role": "user", "parts": [{"text": args.prompt}]}]}
    succeeded = 0
    with httpx.Client(base_url=args.base_url, auth=auth, timeout=args.timeout) as client:
        for n in range(1, args.requests + 1):
            try:
                response = client.post(path, json=body)
            except NoKeyAvailable as exc:
                when = f"in {exc.retry_after:.0f}s" if exc.retry_after is not None else "never"
                print(f"[{n}] no key available (next one free {when})")
                continue
            except httpx.HTTPError as exc:
                print(f"[{n}] request failed: {type(exc).__name__}")
                continue
            key_id = response.extensions.get("keypool_key_id", "?")
            if response.is_success:
                succeeded += 1
                print(f"[{n}] key {key_id}: {answer_text(response.json())}")
            else:
                print(f"[{n}] key {key_id}: HTTP {response.status_code}")
    print_stats(pool)
    pool.close()
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main())
