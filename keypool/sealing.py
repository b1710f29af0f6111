"""Sealed mode: secrets stored in Redis encrypted (AES-256-GCM), so a key added by one
process (or the CLI) is usable by every process that has the sealing key."""

from __future__ import annotations

import base64
import hashlib
import os

from .errors import ConfigError, SecretUnavailable

__all__ = ["Sealer"]

_VERSION = "v1"


def _derive(passphrase: str) -> bytes:
    # A fixed-salt KDF is enough here: the sealing key is meant to be a long random value.
    return hashlib.pbkdf2_hmac("sha256", passphrase.encode("utf-8"), b"keypool-seal-v1", 10_000)


def key_id_of(key: bytes) -> str:
    return hashlib.sha256(b"keypool-seal-id" + key).hexdigest()[:8]


class Sealer:
    """Encrypts secrets with the current sealing key; decrypts with it or any old key, so
    a sealing key can be rotated (``KEYPOOL_OLD_SECRET_KEYS``) without downtime."""

    __slots__ = ("_current", "_keys")

    def __init__(self, secret_key: str, old_keys: tuple[str, ...] = ()) -> None:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        except ImportError:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "KEYPOOL_SECRET_KEY is set but the 'cryptography' package is missing: "
                "pip install 'keypool[sealed]'"
            ) from None
        if len(secret_key) < 16:
            raise ConfigError("KEYPOOL_SECRET_KEY is too short: use at least 16 characters")
        keys: dict[str, AESGCM] = {}
        current = _derive(secret_key)
        self._current = key_id_of(current)
        keys[self._current] = AESGCM(current)
        for old in old_keys:
            if old:
                raw = _derive(old)
                keys.setdefault(key_id_of(raw), AESGCM(raw))
        self._keys = keys

    def __repr__(self) -> str:
        return f"Sealer(current={self._current!r}, keys={len(self._keys)})"

    def seal(self, secret: str, context: str) -> str:
        """``secret`` encrypted and bound to ``context`` (namespace/provider/key id)."""
        nonce = os.urandom(12)
        blob = self._keys[self._current].encrypt(nonce, secret.encode("utf-8"), context.encode())
        payload = base64.b64encode(nonce + blob).decode("ascii")
        return f"{_VERSION}:{self._current}:{payload}"

    def needs_reseal(self, sealed: str) -> bool:
        """True when ``sealed`` was made with an old sealing key."""
        return sealed.split(":", 2)[1:2] != [self._current]

    def unseal(self, sealed: str, context: str) -> str:
        """The secret, or ``SecretUnavailable`` when no known sealing key opens it."""
        from cryptography.exceptions import InvalidTag

        try:
            version, kid, payload = sealed.split(":", 2)
            raw = base64.b64decode(payload, validate=True)
        except ValueError:
            raise SecretUnavailable(f"sealed secret for {context} is malformed") from None
        aead = self._keys.get(kid)
        if version != _VERSION or aead is None:
            raise SecretUnavailable(
                f"the secret of {context} was sealed with another sealing key (id {kid}): "
                "set KEYPOOL_SECRET_KEY (or KEYPOOL_OLD_SECRET_KEYS) to the key it was sealed with"
            )
        try:
            return aead.decrypt(raw[:12], raw[12:], context.encode()).decode("utf-8")
        except InvalidTag:
            raise SecretUnavailable(
                f"the sealed secret of {context} does not open with the configured sealing key"
            ) from None
