"""What the one-line SDK clients share: the pooled ``httpx2`` auth and argument checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..aio import AsyncKeyPool
from ..pool import KeyPool
from .httpx2 import AsyncKeyPoolAuth, KeyPoolAuth

__all__ = ["PLACEHOLDER_KEY", "pooled_auth", "refuse"]

# What the SDK is given as its own key: it only fills the header the pool's key replaces.
PLACEHOLDER_KEY = "keypool-leases-a-key-per-request"


def refuse(kwargs: Mapping[str, Any], names: tuple[str, ...], sdk: str) -> None:
    """TypeError for the SDK arguments that would bring credentials of their own."""
    for name in names:
        if name in kwargs:
            raise TypeError(
                f"{sdk}: {name}= is not accepted here: every request takes its key from the pool"
            )


def pooled_auth(
    pool: KeyPool | AsyncKeyPool,
    provider: object,
    options: Mapping[str, Any],
    *,
    asyncio: bool,
) -> KeyPoolAuth | AsyncKeyPoolAuth:
    """The ``httpx2`` auth of a client: :class:`KeyPoolAuth` for a :class:`KeyPool` (an
    asyncio client then reports from a worker thread), :class:`AsyncKeyPoolAuth` for an
    :class:`AsyncKeyPool` (asyncio clients only)."""
    if isinstance(pool, KeyPool):
        return KeyPoolAuth(pool, provider, **options)
    if isinstance(pool, AsyncKeyPool):
        if not asyncio:
            raise TypeError("a blocking client needs a KeyPool, not an AsyncKeyPool")
        return AsyncKeyPoolAuth(pool, provider, **options)
    raise TypeError(f"pool must be a KeyPool or an AsyncKeyPool, not {type(pool).__name__}")
