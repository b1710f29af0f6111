"""``httpx`` authentication backed by a key pool: every request leases a key.

Install with ``pip install keypool[httpx]``; ``import keypool`` does not import httpx.
The same implementation serves ``httpx2`` in :mod:`keypool.integrations.httpx2`.

The official OpenAI, Anthropic and Google SDKs are built on ``httpx2``: use
:mod:`keypool.integrations.httpx2` with them, or the one-line clients of
:mod:`keypool.integrations.openai`, :mod:`~keypool.integrations.anthropic` and
:mod:`~keypool.integrations.google`.

.. code-block:: python

    import httpx
    from keypool import KeyPool
    from keypool.integrations.httpx import KeyPoolAuth

    pool = KeyPool.from_env()                      # GEMINI_API_KEYS="k1,k2" ...
    with httpx.Client(auth=KeyPoolAuth(pool, "gemini"), timeout=60) as client:
        r = client.post(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
            json={"contents": [{"parts": [{"text": "Hello"}]}]},
        )

For every request the auth flow:

1. leases a key (``pool.acquire(provider, model=..., strategy=..., tokens=..., wait=...)``;
   :class:`~keypool.NoKeyAvailable` propagates from ``client.send`` when none is free) and
   keeps the lease alive (renewed every third of the pool's lease TTL, from a background
   thread, or an asyncio task for :class:`AsyncKeyPoolAuth`) for as long as the request is
   outstanding: while waiting for the headers and while the body is read;
2. puts the key in the provider's header (see :func:`auth_header_for`): ``Authorization:
   Bearer`` for openai, huggingface, openrouter, ollama, cohere and custom providers,
   ``x-api-key`` for anthropic (plus ``anthropic-version: 2023-06-01`` unless the request
   sets one), ``x-goog-api-key`` for gemini, ``api-key`` for azure_openai;
3. reports the outcome itself, exactly once:

   - a status below 400: success, with the time to the response headers as latency and
     the input and output tokens the provider reports, counted as the body passes (see
     :mod:`keypool.integrations._usage`): OpenAI's ``usage`` (in a stream, the chunk sent
     with ``stream_options={"include_usage": True}``), Anthropic's ``message_start`` and
     ``message_delta`` events, Gemini's ``usageMetadata``, Ollama's counts. The body is
     never read on your behalf: the lease is reported when the response is closed (which
     ``client.get``/``post`` do at once, ``client.stream`` when its block ends and the
     SDKs when their stream ends), or garbage-collected, with the usage seen until then,
     whether or not the body was read to its end;
   - any other status: failure, classified by :func:`keypool.classify` from the status, the
     response headers (``Retry-After``, ``x-ratelimit-reset-*``...) and a small JSON error
     body (OpenAI ``insufficient_quota`` means quota spent; Google's ``RetryInfo`` delay,
     per-day ``QuotaFailure`` and ``API_KEY_INVALID`` are understood too). The response is
     returned to you unchanged;
   - an exception while sending (connection refused, timeout, ...): failure with that
     exception, which the client then raises as usual. A cancelled request gives its key
     back.

   A report never fails your HTTP call: if the store is unreachable at that moment the
   pool logs ``pool_unavailable`` and the lease expires after its TTL (the next acquire
   raises :class:`~keypool.PoolUnavailable`).

With ``retry_on_rate_limit=N`` a 429 is not returned at once: the request is sent again
with another key, up to N times, as long as the pool has another key to give (the 429
responses are in ``response.history``; the request body is buffered to be re-sent).
``retries=N`` does the same for every failure that another key may not have: a rate
limit, a spent quota, a rejected key (401/403).

The response carries the key it used (never the secret) in ``response.extensions``:
``response.extensions["keypool_key_id"]`` and ``["keypool_provider"]``.

Mind that httpx strips only the ``Authorization`` header when a redirect leaves the origin:
with ``follow_redirects=True`` a key sent in another header (``x-goog-api-key``,
``x-api-key``, ``api-key``) would follow a redirect to another host. httpx follows no
redirects by default; keep it so for these providers.
"""

from __future__ import annotations

import httpx

from ._drivers import AsyncPoolAuth, SyncPoolAuth, library_of
from ._flow import (
    ANTHROPIC_VERSION,
    KEY_ID_EXTENSION,
    PROVIDER_EXTENSION,
    ErrorResponse,
    auth_header_for,
)
from ._usage import Usage, usage_of, usage_tokens

__all__ = [
    "ANTHROPIC_VERSION",
    "KEY_ID_EXTENSION",
    "PROVIDER_EXTENSION",
    "AsyncKeyPoolAuth",
    "ErrorResponse",
    "KeyPoolAuth",
    "Usage",
    "auth_header_for",
    "usage_of",
    "usage_tokens",
]

_LIBRARY = library_of(httpx)


class KeyPoolAuth(SyncPoolAuth, httpx.Auth):
    """``httpx.Auth`` leasing a key from a :class:`~keypool.KeyPool` for each request.

    ``provider`` picks the keys and the auth header; ``model``, ``strategy``, ``tokens``
    (the estimate reserved on the key's budget) and ``wait`` are passed to
    :meth:`KeyPool.acquire`. ``retry_on_rate_limit``: on a 429, re-send with another key up
    to that many times; ``retries``: the same on a 429 or a rejected key (401/403).
    ``header``/``scheme`` override where the key goes (e.g. ``header="X-Api-Token"``: the
    key alone in that header).

    Works with ``httpx.Client``; with ``httpx.AsyncClient`` too (the pool's calls then run
    in a worker thread), though :class:`AsyncKeyPoolAuth` is the natural fit there.
    """

    _lib = _LIBRARY


class AsyncKeyPoolAuth(AsyncPoolAuth, httpx.Auth):
    """``httpx.Auth`` for ``httpx.AsyncClient`` leasing keys from an
    :class:`~keypool.AsyncKeyPool`; the same arguments and behaviour as
    :class:`KeyPoolAuth`."""

    _lib = _LIBRARY
