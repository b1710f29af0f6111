"""``httpx2`` authentication backed by a key pool: every request leases a key.

Install with ``pip install keypool[httpx2]``; ``import keypool`` does not import httpx2.
This module is the ``httpx2`` binding of the one implementation behind
:mod:`keypool.integrations.httpx` (see there for what the auth flow does, step by step):
the same classes, arguments and behaviour, on ``httpx2.Auth``.

The official OpenAI, Anthropic and Google SDKs are built on ``httpx2``; the one-line
clients of :mod:`keypool.integrations.openai`, :mod:`~keypool.integrations.anthropic`
and :mod:`~keypool.integrations.google` use this module.

.. code-block:: python

    import httpx2
    from keypool import KeyPool
    from keypool.integrations.httpx2 import KeyPoolAuth

    pool = KeyPool.from_env()                      # GEMINI_API_KEYS="k1,k2" ...
    with httpx2.Client(auth=KeyPoolAuth(pool, "gemini"), timeout=60) as client:
        r = client.post(
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent",
            json={"contents": [{"parts": [{"text": "Hello"}]}]},
        )

As with httpx, only ``Authorization`` is stripped on a redirect to another origin: keep
``follow_redirects`` off for providers whose key goes in another header.
"""

from __future__ import annotations

import httpx2

# the same names as keypool.integrations.httpx exports: this module must not import httpx
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

_LIBRARY = library_of(httpx2)


class KeyPoolAuth(SyncPoolAuth, httpx2.Auth):
    """``httpx2.Auth`` twin of :class:`keypool.integrations.httpx.KeyPoolAuth` (the same
    arguments and behaviour), for ``httpx2.Client`` (or ``httpx2.AsyncClient``, the pool's
    calls then run in a worker thread)."""

    _lib = _LIBRARY


class AsyncKeyPoolAuth(AsyncPoolAuth, httpx2.Auth):
    """``httpx2.Auth`` twin of :class:`keypool.integrations.httpx.AsyncKeyPoolAuth`, for
    ``httpx2.AsyncClient`` with an :class:`~keypool.AsyncKeyPool`."""

    _lib = _LIBRARY
