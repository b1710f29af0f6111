"""Keys found in environment variables and key files.

Environment variables (``<ALIAS>`` is one of :data:`ALIASES`, upper case):

* ``<ALIAS>_API_KEY`` -- one key, key id ``default``;
* ``<ALIAS>_API_KEYS`` -- a list separated by commas, whitespace or newlines; each secret gets
  the key id :func:`keypool.fingerprint.derived_key_id` of it, so ids do not depend on order;
* ``<ALIAS>_<NAME>_KEY`` -- one key, key id ``NAME`` lower-cased.

The longest alias that prefixes a variable name decides its provider, so
``AZURE_OPENAI_API_KEY`` is ``(azure_openai, default)``. Nothing here ever puts a secret in a
``repr``, a skip reason or an exception message.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .fingerprint import derived_key_id
from .providers import Provider, validate_key_id

__all__ = [
    "ALIASES",
    "EnvKey",
    "EnvScan",
    "parse_key_file",
    "scan_env",
    "split_key_list",
]

ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "HF": Provider.HUGGINGFACE.value,
        "HUGGINGFACE": Provider.HUGGINGFACE.value,
        "OPENAI": Provider.OPENAI.value,
        "ANTHROPIC": Provider.ANTHROPIC.value,
        "COHERE": Provider.COHERE.value,
        "AZURE_OPENAI": Provider.AZURE_OPENAI.value,
        "OLLAMA": Provider.OLLAMA.value,
        "GEMINI": Provider.GEMINI.value,
        "GOOGLE": Provider.GEMINI.value,
        "OPENROUTER": Provider.OPENROUTER.value,
    }
)
"""Variable-name prefix -> provider value."""

# Longest first, so that a prefix which is itself inside a longer alias never wins.
_ALIASES_LONGEST_FIRST: tuple[str, ...] = tuple(sorted(ALIASES, key=lambda a: (-len(a), a)))

_SEPARATORS = re.compile(r"[\s,]+")
_BAD_SINGLE = re.compile(r"[\s,]")

_SINGLE = 0  # <ALIAS>_API_KEY
_NAMED = 1  # <ALIAS>_<NAME>_KEY
_LIST = 2  # <ALIAS>_API_KEYS

_DEFAULT_KEY_ID = "default"
_MAX_SHOWN_KEY_ID = 64


@dataclass(frozen=True, slots=True)
class EnvKey:
    """One key found in the environment. Its ``repr`` never shows the secret."""

    provider: str
    key_id: str
    secret: str = field(repr=False)
    source: str


@dataclass(frozen=True, slots=True)
class EnvScan:
    """What :func:`scan_env` found.

    ``keys`` is sorted by ``(provider, key_id)``. ``skipped`` holds, sorted, one
    ``"VAR: 'reason'"`` entry per variable (or list entry) that looked like a key but was not
    used; it never contains a secret.
    """

    keys: tuple[EnvKey, ...]
    skipped: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Candidate:
    key: EnvKey
    kind: int
    canonical: bool

    @property
    def id_rank(self) -> tuple[int, int, str]:
        """Order among variables giving the same (provider, key_id): best first."""
        return (0 if self.canonical else 1, self.kind, self.key.source)

    @property
    def secret_rank(self) -> tuple[int, int, int, str]:
        """Order among key ids of one provider holding the same secret: best first."""
        return (1 if self.kind == _LIST else 0, *self.id_rank)


def split_key_list(value: str) -> list[str]:
    """Split a list of secrets on commas, whitespace and newlines.

    Empty items are dropped, the first occurrence of each secret is kept, order is preserved.
    """
    seen: set[str] = set()
    out: list[str] = []
    for item in _SEPARATORS.split(value):
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def _classify(name: str) -> tuple[str, int, str | None] | None:
    """``(alias, kind, raw key id)`` for a key-like variable name, else ``None``.

    The raw key id is ``"default"`` for ``_API_KEY``, ``None`` for ``_API_KEYS`` and the
    lower-cased ``NAME`` (not yet validated) for ``<ALIAS>_<NAME>_KEY``.
    """
    for alias in _ALIASES_LONGEST_FIRST:
        if not name.startswith(alias + "_"):
            continue
        rest = name[len(alias) + 1 :]
        if rest == "API_KEY":
            return alias, _SINGLE, _DEFAULT_KEY_ID
        if rest == "API_KEYS":
            return alias, _LIST, None
        if rest.endswith("_KEY"):
            return alias, _NAMED, rest[: -len("_KEY")].lower()
        return None
    return None


def _skip(source: str, reason: str) -> str:
    return f"{source}: {reason!r}"


def _candidates(name: str, value: str, skipped: list[str]) -> list[_Candidate]:
    """The keys one variable gives; reasons for anything unusable go to ``skipped``."""
    found = _classify(name)
    if found is None:
        return []
    alias, kind, raw_id = found
    provider = ALIASES[alias]
    canonical = alias.lower() == provider
    value = value.strip()
    if not value:
        return []

    if kind == _LIST:
        out: list[_Candidate] = []
        for secret in split_key_list(value):
            key_id = derived_key_id(secret)
            try:
                validate_key_id(key_id)
            except ValueError:  # pragma: no cover - derived ids are always valid
                skipped.append(_skip(name, "derived key id is not a valid key id"))
                continue
            out.append(_Candidate(EnvKey(provider, key_id, secret, name), kind, canonical))
        return out

    assert raw_id is not None
    try:
        validate_key_id(raw_id)
    except ValueError:
        skipped.append(_skip(name, "name is not a valid key id"))
        return []
    if _BAD_SINGLE.search(value):
        skipped.append(
            _skip(name, f"value contains a comma or whitespace; list keys in {alias}_API_KEYS")
        )
        return []
    return [_Candidate(EnvKey(provider, raw_id, value, name), kind, canonical)]


def _resolve(candidates: Iterable[_Candidate], skipped: list[str]) -> list[EnvKey]:
    """Keep one key per (provider, key_id), then one key id per (provider, secret)."""
    by_id: dict[tuple[str, str], list[_Candidate]] = {}
    for cand in candidates:
        by_id.setdefault((cand.key.provider, cand.key.key_id), []).append(cand)

    kept: list[_Candidate] = []
    for group in by_id.values():
        group.sort(key=lambda c: c.id_rank)
        winner = group[0]
        kept.append(winner)
        for other in group[1:]:
            if other.key.secret != winner.key.secret:
                skipped.append(_skip(other.key.source, f"duplicate of {winner.key.source}"))

    by_secret: dict[tuple[str, str], list[_Candidate]] = {}
    for cand in kept:
        by_secret.setdefault((cand.key.provider, cand.key.secret), []).append(cand)

    keys: list[EnvKey] = []
    for group in by_secret.values():
        group.sort(key=lambda c: c.secret_rank)
        winner = group[0]
        keys.append(winner.key)
        for other in group[1:]:
            skipped.append(
                _skip(
                    other.key.source,
                    f"key id {other.key.key_id!r} has the same secret as {winner.key.source}",
                )
            )
    keys.sort(key=lambda k: (k.provider, k.key_id))
    return keys


def scan_env(environ: Mapping[str, str] | None = None) -> EnvScan:
    """Find the provider keys in ``environ`` (default :data:`os.environ`).

    Never raises on a bad variable: it is left out and reported in :attr:`EnvScan.skipped`.
    When two variables give the same ``(provider, key_id)`` with different secrets, the one
    using the canonical provider name (``HUGGINGFACE_*`` over ``HF_*``, ``GEMINI_*`` over
    ``GOOGLE_*``) wins, then ``_API_KEY`` over ``_<NAME>_KEY``, then the smaller variable name.
    A secret given under several key ids of one provider is registered once, preferring an
    explicit id over a derived one (same order otherwise). The result does not depend on the
    order of ``environ``.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    skipped: list[str] = []
    candidates: list[_Candidate] = []
    for name in sorted(env):
        candidates.extend(_candidates(name, env[name], skipped))
    keys = _resolve(candidates, skipped)
    return EnvScan(keys=tuple(keys), skipped=tuple(sorted(set(skipped))))


def _shown_key_id(key_id: str) -> str:
    if len(key_id) > _MAX_SHOWN_KEY_ID:
        return f"of {len(key_id)} characters"
    return repr(key_id)


def parse_key_file(text: str) -> list[tuple[str | None, str]]:
    """Parse a file of keys, one per line.

    Blank lines and lines starting with ``#`` are ignored; whitespace around a line and around
    either side of ``=`` is stripped. ``KEY_ID=SECRET`` gives ``(key_id, secret)`` (split on
    the first ``=``, so the secret may contain ``=``); a bare ``SECRET`` gives
    ``(None, secret)``. Raises ``ValueError`` naming the line number (and the key id, but
    never the secret) for an invalid key id, an empty secret, or a secret containing
    whitespace.
    """
    out: list[tuple[str | None, str]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key_id: str | None
        if "=" in line:
            left, _, right = line.partition("=")
            key_id, secret = left.strip(), right.strip()
            try:
                validate_key_id(key_id)
            except ValueError:
                raise ValueError(
                    f"line {lineno}: invalid key id {_shown_key_id(key_id)}: expected 1-64 "
                    r"characters matching ^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
                ) from None
            if not secret or secret.startswith("="):
                raise ValueError(
                    f"line {lineno}: no secret after '=' (a bare secret ending in '=' must "
                    "be written as KEY_ID=SECRET)"
                )
        else:
            key_id, secret = None, line
        if len(secret) >= 2 and secret[0] == secret[-1] and secret[0] in "\"'":
            secret = secret[1:-1].strip()  # KEY="..." as in a .env file
        if re.search(r"\s", secret):
            where = "" if key_id is None else f" for key id {key_id!r}"
            raise ValueError(
                f"line {lineno}: secret{where} contains whitespace "
                "(write one key per line, as SECRET or KEY_ID=SECRET)"
            )
        out.append((key_id, secret))
    return out
