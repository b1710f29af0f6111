"""Optional integrations with HTTP clients and the official provider SDKs.

Each integration lives in its own module and imports its third-party library itself, so
``import keypool`` never needs them. Install the matching extra to use one:

- :mod:`keypool.integrations.httpx` (``pip install keypool[httpx]``) and
  :mod:`keypool.integrations.httpx2` (``keypool[httpx2]``): ``KeyPoolAuth`` and
  ``AsyncKeyPoolAuth``, auth classes that lease a key for every request, keep the lease
  alive while the request is outstanding, put the key in the provider's auth header and
  report the response (and the tokens it used) back to the pool. One implementation
  serves both libraries.
- :mod:`keypool.integrations.openai` (``keypool[openai]``): ``openai_client(pool)`` and
  ``async_openai_client(apool)``, official ``openai.OpenAI``/``AsyncOpenAI`` clients whose
  every request leases a key.
- :mod:`keypool.integrations.anthropic` (``keypool[anthropic]``): ``anthropic_client`` and
  ``async_anthropic_client``, the same for ``anthropic.Anthropic``/``AsyncAnthropic``.
- :mod:`keypool.integrations.google` (``keypool[genai]``): ``genai_client`` and
  ``async_genai_client``, the same for ``google.genai.Client``.
"""
