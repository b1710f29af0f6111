"""Official Anthropic clients whose every request leases a key from the pool.

Install with ``pip install keypool[anthropic]``; ``import keypool`` does not import
anthropic. (The Anthropic SDK is built on ``httpx2`` and refuses ``httpx`` objects: this
is :mod:`keypool.integrations.httpx2` underneath.)

.. code-block:: python

    from keypool import KeyPool
    from keypool.integrations.anthropic import anthropic_client

    pool = KeyPool.from_env()                        # ANTHROPIC_API_KEYS="sk-ant-1,..."
    client = anthropic_client(pool)                  # an anthropic.Anthropic
    message = client.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=256,
        messages=[{"role": "user", "content": "Hello"}],
    )

Each request (each attempt) leases a key, sends it as ``x-api-key``, keeps the lease alive
while the request is outstanding and reports the outcome: a 429 cools the key for the time
its ``retry-after``/``anthropic-ratelimit-*-reset`` headers give, a 401 disables it, and a
success counts the input and output tokens, of a stream too (``message_start`` and
``message_delta``), whether or not it is read to its end. The SDK's own retries are off by
default (``max_retries=0``): on a rate limit, a spent quota or a rejected key the request
is sent again at once with another key, up to ``retries`` times.

``pool_provider`` (default ``"anthropic"``), ``model``, ``strategy``, ``tokens`` and ``wait``
pick the key (see :meth:`~keypool.KeyPool.acquire`); every other keyword goes to
``anthropic.Anthropic`` (``api_key``, ``auth_token`` and ``credentials`` are refused: the
pool holds the keys). When no key is free :class:`~keypool.NoKeyAvailable` is raised from
the call, not wrapped in the SDK's connection error.
"""

from __future__ import annotations

from typing import Any

import anthropic

from ..aio import AsyncKeyPool
from ..errors import KeyPoolError
from ..pool import KeyPool
from ._sdk import acquire_options, sdk_client_kwargs

__all__ = ["anthropic_client", "async_anthropic_client"]

_REFUSED = ("api_key", "auth_token", "credentials")


def _unwrapped(exc: anthropic.APIConnectionError) -> BaseException:
    cause = exc.__cause__
    return cause if isinstance(cause, KeyPoolError) else exc


class _PooledAnthropic(anthropic.Anthropic):
    """``anthropic.Anthropic`` raising the pool's own errors (``NoKeyAvailable``) as they
    are, rather than as a connection error."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().request(*args, **kwargs)
        except anthropic.APIConnectionError as exc:
            raise _unwrapped(exc) from None


# asyncio twin of _PooledAnthropic: the SDK's request differs only in await
class _PooledAsyncAnthropic(anthropic.AsyncAnthropic):
    """The asyncio twin of :class:`_PooledAnthropic`."""

    async def request(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().request(*args, **kwargs)
        except anthropic.APIConnectionError as exc:
            raise _unwrapped(exc) from None


def anthropic_client(
    pool: KeyPool,
    *,
    pool_provider: object = "anthropic",
    model: str | None = None,
    strategy: str | None = None,
    tokens: int = 0,
    wait: float | None = None,
    retries: int = 2,
    **kwargs: Any,
) -> anthropic.Anthropic:
    """An ``anthropic.Anthropic`` leasing a key from ``pool`` for every request (see the
    module). An ``http_client=`` given is used with its ``auth`` replaced by the pool's."""
    options = acquire_options(model, strategy, tokens, wait, retries)
    return _PooledAnthropic(
        **sdk_client_kwargs(
            anthropic, _REFUSED, pool, pool_provider, options, kwargs, asyncio=False
        )
    )


# asyncio twin of anthropic_client (and of the openai/google factories): the keyword
# arguments are spelled out in each for typed callers; the work is in _sdk.
def async_anthropic_client(
    apool: AsyncKeyPool | KeyPool,
    *,
    pool_provider: object = "anthropic",
    model: str | None = None,
    strategy: str | None = None,
    tokens: int = 0,
    wait: float | None = None,
    retries: int = 2,
    **kwargs: Any,
) -> anthropic.AsyncAnthropic:
    """An ``anthropic.AsyncAnthropic`` leasing a key from ``apool`` for every request. A
    blocking :class:`~keypool.KeyPool` works too (its calls then run in a worker thread)."""
    options = acquire_options(model, strategy, tokens, wait, retries)
    return _PooledAsyncAnthropic(
        **sdk_client_kwargs(
            anthropic, _REFUSED, apool, pool_provider, options, kwargs, asyncio=True
        )
    )
