"""What the one-line SDK clients share: the pooled ``httpx2`` auth and argument checks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..aio import AsyncKeyPool
from ..pool import KeyPool
from .httpx2 import AsyncKeyPoolAuth, KeyPoolAuth

__all__ = ["PLACEHOLDER_KEY", "acquire_options", "pooled_auth", "refuse", "sdk_client_kwargs"]

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


def acquire_options(
    model: str | None, strategy: str | None, tokens: int, wait: float | None, retries: int
) -> dict[str, Any]:
    """The auth's arguments from a client factory's own (passed on to ``pool.acquire``)."""
    return {
        "model": model,
        "strategy": strategy,
        "tokens": tokens,
        "wait": wait,
        "retries": retries,
    }


def sdk_client_kwargs(
    sdk: Any,
    refused: tuple[str, ...],
    pool: KeyPool | AsyncKeyPool,
    provider: object,
    options: Mapping[str, Any],
    kwargs: dict[str, Any],
    *,
    asyncio: bool,
) -> dict[str, Any]:
    """The keywords of an httpx2-based SDK client (``openai``, ``anthropic``: the module is
    ``sdk``) whose every request leases a key: its own ``http_client`` with the pool's auth
    (or the one given, its ``auth`` replaced), a placeholder key, the SDK's retries off."""
    refuse(kwargs, refused, sdk.__name__)
    auth = pooled_auth(pool, provider, options, asyncio=asyncio)
    client = kwargs.pop("http_client", None)
    if client is None:
        make = sdk.DefaultAsyncHttpxClient if asyncio else sdk.DefaultHttpxClient
        # no redirects: a key in another header than Authorization would follow one
        client = make(auth=auth, follow_redirects=False)
    else:
        client.auth = auth
    kwargs.setdefault("max_retries", 0)
    return {"api_key": PLACEHOLDER_KEY, "http_client": client, **kwargs}
