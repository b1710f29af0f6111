"""Client authentication: the proxy token, wherever the client's SDK puts its API key.

The token is looked for in ``Authorization: Bearer``, ``x-api-key``, ``x-goog-api-key``,
``api-key`` and (Gemini's REST form) the ``key`` query parameter; every one of them is
removed before the request goes upstream. Tokens are compared in constant time (SHA-256
digests through :func:`hmac.compare_digest`, every configured token each time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode

__all__ = ["CLIENT_CREDENTIAL_HEADERS", "TokenChecker", "presented_tokens", "strip_key_param"]

CLIENT_CREDENTIAL_HEADERS = frozenset(
    {b"authorization", b"x-api-key", b"x-goog-api-key", b"api-key", b"proxy-authorization"}
)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class TokenChecker:
    """Knows the configured tokens by digest only."""

    __slots__ = ("_digests",)

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(t) for t in tokens)

    def __repr__(self) -> str:
        return f"TokenChecker({len(self._digests)} tokens)"

    def __bool__(self) -> bool:
        return bool(self._digests)

    def check(self, candidates: Iterable[str]) -> bool:
        """True when any candidate is a configured token (constant time per comparison)."""
        ok = False
        for candidate in candidates:
            presented = _digest(candidate)
            for known in self._digests:
                ok |= hmac.compare_digest(presented, known)
        return ok


def presented_tokens(headers: Iterable[tuple[bytes, bytes]], query: bytes) -> list[str]:
    """Every credential the client sent (at most a few), in the usual places."""
    found: list[str] = []
    for name, value in headers:
        if name not in CLIENT_CREDENTIAL_HEADERS or name == b"proxy-authorization":
            continue
        text = value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, rest = text.partition(" ")
            if scheme.lower() == "bearer":
                text = rest.strip()
            elif scheme.lower() == "basic":  # a browser: any user name, the token as password
                try:
                    text = base64.b64decode(rest.strip(), validate=True).decode().partition(":")[2]
                except (ValueError, UnicodeDecodeError):
                    continue
            else:
                continue
        if text:
            found.append(text)
    if b"key=" in query:
        found.extend(v for k, v in parse_qsl(query.decode("latin-1")) if k == "key" and v)
    return found[:8]


def strip_key_param(query: bytes) -> bytes:
    """The query string without ``key=`` parameters (unchanged when it has none)."""
    if b"key=" not in query:
        return query
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    return urlencode([(k, v) for k, v in pairs if k != "key"]).encode("latin-1")
