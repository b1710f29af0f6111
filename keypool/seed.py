"""``EnhancedAPIKeyManager``: the original manager's API, now backed by the shared pool."""

from __future__ import annotations

from typing import Any

from .errors import NoKeyAvailable
from .kinds import ErrorKind
from .pool import KeyPool
from .providers import normalize_provider, validate_key_id, validate_model
from .settings import KeyPoolSettings

__all__ = ["EnhancedAPIKeyManager"]


class EnhancedAPIKeyManager:
    """Drop-in for the original key manager. Every call reads and changes the shared pool,
    so all processes see one rotation, one set of counters and one set of cooldowns.

    ``get_next_key``/``get_best_key``/``get_key_for_model`` count one request and hold no
    lease; they return ``(None, None)`` when no key is available.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        namespace: str | None = None,
        settings: KeyPoolSettings | None = None,
        pool: KeyPool | None = None,
        load_env: bool = True,
    ) -> None:
        self.pool = (
            pool if pool is not None else KeyPool(url, namespace=namespace, settings=settings)
        )
        if load_env and pool is None:
            self.pool.load_env()

    def __repr__(self) -> str:
        return f"EnhancedAPIKeyManager({self.pool!r})"

    def add_key(self, provider: object, key_id: str, api_key: str, **options: Any) -> None:
        """Register (or update) a key."""
        self.pool.add_key(provider, key_id, api_key, **options)

    def remove_key(self, provider: object, key_id: str) -> None:
        self.pool.remove_key(provider, key_id)

    def _pick(
        self, provider: object | None, model: str | None, strategy: str
    ) -> tuple[str | None, str | None]:
        try:
            return self.pool.next_key(provider, model=model, strategy=strategy)
        except NoKeyAvailable:
            return None, None

    def get_next_key(self, provider: object) -> tuple[str | None, str | None]:
        """The next key in the shared round-robin: ``(key_id, api_key)``."""
        return self._pick(normalize_provider(provider), None, "round_robin")

    def get_best_key(self, provider: object) -> tuple[str | None, str | None]:
        """The key with the fewest recent errors, then the least used."""
        return self._pick(normalize_provider(provider), None, "best")

    def assign_model_to_key(self, model_id: str, provider: object, key_id: str) -> None:
        """Let ``model_id`` be served by this key (call once per key of the model)."""
        self.pool.assign_model(model_id, provider, key_id)

    def get_key_for_model(self, model_id: str) -> tuple[str | None, str | None]:
        """A key among those assigned to ``model_id`` (round-robin)."""
        return self._pick(None, validate_model(model_id), self.pool.settings.strategy)

    def mark_key_error(
        self,
        provider: object,
        key_id: str,
        is_rate_limit: bool = False,
        retry_after: float | None = None,
    ) -> None:
        """Count an error; a rate limit cools the key down for ``retry_after`` seconds (or
        the backoff when not given)."""
        kind = ErrorKind.RATE_LIMIT if is_rate_limit else ErrorKind.OTHER
        self.pool.mark_failure(provider, validate_key_id(key_id), kind, retry_after=retry_after)

    def mark_key_success(self, provider: object, key_id: str) -> None:
        """Count a success: consecutive errors and backoff reset."""
        self.pool.mark_success(provider, key_id)

    def get_key_usage_stats(self, provider: object, key_id: str) -> dict[str, Any]:
        """Every :class:`KeyStats` field as a dict (``total_requests``, ``error_count``,
        ``is_rate_limited``, ...)."""
        return self.pool.stats(provider, key_id).as_dict()
