"""The keypool gateway: an HTTP proxy in front of the LLM providers in which every replica
is one more process of the pool. ``pip install 'keypool[server]'``; run ``keypool serve``,
or any ASGI server on :func:`create_app` (``uvicorn --factory keypool.server:create_app``).
"""

from .app import Gateway, create_app
from .settings import GatewaySettings

__all__ = ["Gateway", "GatewaySettings", "create_app"]
