"""Official Google Gen AI clients (``google-genai``) whose every request leases a key.

Install with ``pip install keypool[genai]``; ``import keypool`` does not import google.

.. code-block:: python

    from keypool import KeyPool
    from keypool.integrations.google import genai_client

    pool = KeyPool.from_env()                        # GEMINI_API_KEYS="k1,k2"
    client = genai_client(pool)                      # a google.genai.Client
    reply = client.models.generate_content(model="gemini-2.0-flash", contents="Hello")
    for chunk in client.models.generate_content_stream(model="gemini-2.0-flash", contents="Hi"):
        print(chunk.text, end="")

The client's ``httpx2`` clients (``http_options.httpx_client`` and ``httpx_async_client``)
carry the pool's auth: each request leases a key, sends it as ``x-goog-api-key``, keeps the
lease alive while the request is outstanding and reports the outcome: a 429 cools the key
(``RetryInfo``'s delay; a spent per-day quota marks it exhausted), an invalid key
(``API_KEY_INVALID``) disables it, and a success counts the input and output tokens of
``usageMetadata``, of a stream too. google-genai does not retry unless asked
(``http_options.retry_options``); the pool's auth sends a request again at once with
another key on a rate limit, a spent quota or a rejected key, up to ``retries`` times.

``genai_client(pool)`` serves both ``client.models`` and ``client.aio.models`` from a
blocking :class:`~keypool.KeyPool` (asyncio calls report from a worker thread);
``async_genai_client(apool)`` serves ``client.aio`` from an :class:`~keypool.AsyncKeyPool`
(its blocking half refuses to be used). ``http_options`` (a dict or ``HttpOptions``: its
``base_url``, ``timeout``, ``headers``...) is kept; ``api_key``, ``credentials`` and
``vertexai`` are refused: the pool holds the keys, for the Gemini Developer API.
"""

from __future__ import annotations

from typing import Any

import httpx2
from google import genai
from google.genai import types

from ..aio import AsyncKeyPool
from ..pool import KeyPool
from ._sdk import PLACEHOLDER_KEY, acquire_options, pooled_auth, refuse

__all__ = ["async_genai_client", "genai_client"]

_REFUSED = ("api_key", "credentials", "vertexai", "enterprise", "project", "location")


def _client(
    sync_auth: httpx2.Auth,
    async_auth: httpx2.Auth,
    http_options: types.HttpOptions | types.HttpOptionsDict | None,
    kwargs: dict[str, Any],
) -> genai.Client:
    refuse(kwargs, _REFUSED, "google-genai")
    if http_options is None:
        options = types.HttpOptions()
    elif isinstance(http_options, types.HttpOptions):
        options = http_options.model_copy()
    else:
        options = types.HttpOptions.model_validate(http_options)
    if options.httpx_client is not None or options.httpx_async_client is not None:
        raise TypeError("google-genai: the pool brings its own httpx_client/httpx_async_client")
    timeout = options.timeout / 1000 if options.timeout is not None else None
    options.httpx_client = httpx2.Client(auth=sync_auth, timeout=timeout)
    options.httpx_async_client = httpx2.AsyncClient(auth=async_auth, timeout=timeout)
    return genai.Client(api_key=PLACEHOLDER_KEY, http_options=options, **kwargs)


def genai_client(
    pool: KeyPool,
    *,
    pool_provider: object = "gemini",
    model: str | None = None,
    strategy: str | None = None,
    tokens: int = 0,
    wait: float | None = None,
    retries: int = 2,
    http_options: types.HttpOptions | types.HttpOptionsDict | None = None,
    **kwargs: Any,
) -> genai.Client:
    """A ``google.genai.Client`` leasing a key from ``pool`` for every request, blocking
    (``client.models``) or asyncio (``client.aio.models``); see the module."""
    options = acquire_options(model, strategy, tokens, wait, retries)
    sync_auth = pooled_auth(pool, pool_provider, options, asyncio=False)
    return _client(sync_auth, sync_auth, http_options, kwargs)


# asyncio twin of genai_client (and of the openai/anthropic factories): the keyword
# arguments are spelled out in each for typed callers; the work is in _sdk and _client.
def async_genai_client(
    apool: AsyncKeyPool,
    *,
    pool_provider: object = "gemini",
    model: str | None = None,
    strategy: str | None = None,
    tokens: int = 0,
    wait: float | None = None,
    retries: int = 2,
    http_options: types.HttpOptions | types.HttpOptionsDict | None = None,
    **kwargs: Any,
) -> genai.Client:
    """A ``google.genai.Client`` whose ``client.aio`` leases a key from ``apool`` for every
    request; see the module."""
    options = acquire_options(model, strategy, tokens, wait, retries)
    async_auth = pooled_auth(apool, pool_provider, options, asyncio=True)
    return _client(async_auth, async_auth, http_options, kwargs)
