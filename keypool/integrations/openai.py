"""Official OpenAI clients whose every request leases a key from the pool.

Install with ``pip install keypool[openai]``; ``import keypool`` does not import openai.

.. code-block:: python

    from keypool import KeyPool
    from keypool.integrations.openai import openai_client

    pool = KeyPool.from_env()                        # OPENAI_API_KEYS="sk-1,sk-2"
    client = openai_client(pool)                     # an openai.OpenAI
    reply = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Hello"}]
    )

Each request (each attempt) leases a key, sends it as ``Authorization: Bearer``, keeps
the lease alive while the request is outstanding and reports the outcome: a 429 cools the
key for the time its headers give, a 401 disables it, and a success counts the input and
output tokens of the reply or of the stream as it passes (ask for them in a stream with
``stream_options={"include_usage": True}``). The SDK's own retries are off by default
(``max_retries=0``): on a rate limit, a spent quota or a rejected key the request is sent
again at once with another key, up to ``retries`` times; give ``max_retries=N`` to let the
SDK retry timeouts and server errors too (each of its attempts leases a key again).

``pool_provider`` (default ``"openai"``) picks the pool's keys: any OpenAI-compatible
provider (``"openrouter"``, ``"ollama"``, a custom one) with its ``base_url``. ``model``,
``strategy``, ``tokens`` and ``wait`` are passed to :meth:`~keypool.KeyPool.acquire`; every
other keyword goes to ``openai.OpenAI`` (``api_key`` is refused: the pool holds the keys).
When no key is free :class:`~keypool.NoKeyAvailable` is raised from the call.
"""

from __future__ import annotations

from typing import Any

import openai

from ..aio import AsyncKeyPool
from ..pool import KeyPool
from ._sdk import acquire_options, sdk_client_kwargs

__all__ = ["async_openai_client", "openai_client"]

_REFUSED = ("api_key", "admin_api_key", "workload_identity")


def openai_client(
    pool: KeyPool,
    *,
    pool_provider: object = "openai",
    model: str | None = None,
    strategy: str | None = None,
    tokens: int = 0,
    wait: float | None = None,
    retries: int = 2,
    **kwargs: Any,
) -> openai.OpenAI:
    """An ``openai.OpenAI`` leasing a key from ``pool`` for every request (see the module).
    An ``http_client=`` given is used with its ``auth`` replaced by the pool's."""
    options = acquire_options(model, strategy, tokens, wait, retries)
    return openai.OpenAI(
        **sdk_client_kwargs(openai, _REFUSED, pool, pool_provider, options, kwargs, asyncio=False)
    )


# asyncio twin of openai_client (and of the anthropic/google factories): the keyword
# arguments are spelled out in each for typed callers; the work is in _sdk.
def async_openai_client(
    apool: AsyncKeyPool | KeyPool,
    *,
    pool_provider: object = "openai",
    model: str | None = None,
    strategy: str | None = None,
    tokens: int = 0,
    wait: float | None = None,
    retries: int = 2,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    """An ``openai.AsyncOpenAI`` leasing a key from ``apool`` for every request. A blocking
    :class:`~keypool.KeyPool` works too (its calls then run in a worker thread)."""
    options = acquire_options(model, strategy, tokens, wait, retries)
    return openai.AsyncOpenAI(
        **sdk_client_kwargs(openai, _REFUSED, apool, pool_provider, options, kwargs, asyncio=True)
    )
