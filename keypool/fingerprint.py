"""Non-reversible fingerprints of secrets: what Redis and logs may show instead of them."""

from __future__ import annotations

import hashlib

__all__ = ["derived_key_id", "fingerprint"]

_FP_DOMAIN = b"keypool-fingerprint-v1\x00"


def fingerprint(secret: str) -> str:
    """A short, stable, non-reversible fingerprint of ``secret`` (16 hex characters)."""
    return hashlib.sha256(_FP_DOMAIN + secret.encode("utf-8")).hexdigest()[:16]


def derived_key_id(secret: str) -> str:
    """The key id given to a secret listed without a name (``<PROVIDER>_API_KEYS``)."""
    return "k-" + fingerprint(secret)[:12]
