"""Where each provider's requests go, and which header carries the leased key.

Every known provider has its official base URL by default; ``KEYPOOL_UPSTREAM_<PROVIDER>``
(for example ``KEYPOOL_UPSTREAM_OLLAMA=http://127.0.0.1:11434``) overrides it or adds a
custom provider, and ``KEYPOOL_UPSTREAM_<PROVIDER>=off`` removes one. Nothing else is
reachable: the host always comes from this table, never from the request.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError
from ..providers import PROVIDER_RE

__all__ = ["DEFAULT_UPSTREAMS", "Upstream", "load_upstreams"]

DEFAULT_UPSTREAMS: dict[str, str] = {
    "openai": "https://api.openai.com",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "openrouter": "https://openrouter.ai",
    "huggingface": "https://router.huggingface.co",
    "cohere": "https://api.cohere.com",
    "ollama": "http://127.0.0.1:11434",
    # azure_openai has no default: every resource has its own host
}

_AUTH_HEADERS: dict[str, tuple[bytes, bytes]] = {
    "anthropic": (b"x-api-key", b""),
    "gemini": (b"x-goog-api-key", b""),
    "azure_openai": (b"api-key", b""),
}
_BEARER = (b"authorization", b"Bearer ")
_EXTRA_HEADERS: dict[str, tuple[tuple[bytes, bytes], ...]] = {
    "anthropic": ((b"anthropic-version", b"2023-06-01"),),
}
_PREFIX = "KEYPOOL_UPSTREAM_"
_DOT_SEGMENT = re.compile(r"(^|/)\.{1,2}(/|$)")


@dataclass(frozen=True, slots=True)
class Upstream:
    """One provider's upstream: origin, base path and how the key is sent."""

    provider: str
    scheme: str
    host: str
    port: int | None
    base_path: str  # "" or "/prefix" without a trailing slash
    auth_header: bytes
    auth_prefix: bytes
    extra_headers: tuple[tuple[bytes, bytes], ...]

    @property
    def origin(self) -> str:
        """``scheme://host[:port]``: what the status page shows."""
        port = f":{self.port}" if self.port else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}{port}"

    @property
    def host_header(self) -> bytes:
        """The ``Host`` header for this upstream."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (host + (f":{self.port}" if self.port else "")).encode("ascii")

    def target(self, raw_path: bytes) -> bytes:
        """The request target (path and no query) on this upstream for the part of the
        client's path after ``/{provider}``, unchanged (still percent-encoded). Raises
        ``ValueError`` for a path that could leave the base path (dot segments, a
        backslash, an encoded slash before a dot segment...)."""
        if not raw_path.startswith(b"/"):
            raw_path = b"/" + raw_path
        text = raw_path.decode("latin-1")
        decoded = unquote(text)
        if _DOT_SEGMENT.search(decoded) or "\\" in decoded or "\x00" in decoded:
            raise ValueError("path with dot segments")
        if any(c in text for c in " \r\n\t#?"):
            raise ValueError("bad path")
        return self.base_path.encode("ascii") + raw_path


def _parse(provider: str, url: str) -> Upstream:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{_PREFIX}{provider.upper()}: expected an http:// or https:// URL with a host"
        )
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ConfigError(
            f"{_PREFIX}{provider.upper()}: no credentials, query or fragment in an upstream URL"
        )
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{_PREFIX}{provider.upper()}: bad port") from None
    header, prefix = _AUTH_HEADERS.get(provider, _BEARER)
    return Upstream(
        provider=provider,
        scheme=parts.scheme,
        host=parts.hostname,
        port=port,
        base_path=parts.path.rstrip("/"),
        auth_header=header,
        auth_prefix=prefix,
        extra_headers=_EXTRA_HEADERS.get(provider, ()),
    )


def load_upstreams(environ: Mapping[str, str] | None = None) -> dict[str, Upstream]:
    """The upstream of every reachable provider: the defaults, then every
    ``KEYPOOL_UPSTREAM_<PROVIDER>`` (``off``/empty removes a provider)."""
    env = os.environ if environ is None else environ
    urls = dict(DEFAULT_UPSTREAMS)
    for name, value in env.items():
        if not name.upper().startswith(_PREFIX):
            continue
        provider = name[len(_PREFIX) :].lower()
        if not PROVIDER_RE.fullmatch(provider):
            raise ConfigError(f"{name}: {provider!r} is not a valid provider name")
        if value.strip().lower() in ("", "off", "none", "disabled"):
            urls.pop(provider, None)
        else:
            urls[provider] = value
    return {provider: _parse(provider, url) for provider, url in urls.items()}
