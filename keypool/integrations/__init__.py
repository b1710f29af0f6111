"""Optional integrations with HTTP clients and frameworks.

Each integration lives in its own module and imports its third-party library itself, so
``import keypool`` never needs them. Install the matching extra to use one:

- :mod:`keypool.integrations.httpx` (``pip install keypool[httpx]``): ``KeyPoolAuth`` and
  ``AsyncKeyPoolAuth``, ``httpx.Auth`` classes that lease a key for every request, put it
  in the provider's auth header and report the response back to the pool.
"""
