"""Redis key names. Every key of one (namespace, provider) carries the hash tag
``{<provider>}`` so a script touches one cluster slot; the README lists what each holds."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["STRATEGY_SUFFIXES", "ProviderKeys", "model_providers_key", "providers_key"]

# In the order the Lua scripts expect them as KEYS[1..9] (see lua/lib.lua).
PROVIDER_SUFFIXES = ("meta", "all", "wait", "leases", "rr", "wrr", "best", "busy", "lat")
STRATEGY_SUFFIXES = {
    "round_robin": "rr",
    "weighted": "wrr",
    "best": "best",
    "least_busy": "busy",
    "latency": "lat",
}
KEY_HASH = "k:"  # <prefix>k:<key_id>   hash: one key's configuration and state
KEY_LEASES = "kl:"  # <prefix>kl:<key_id>  zset: its open leases
MODEL_SET = "m:"  # <prefix>m:<model>    set: key ids assigned to the model


def providers_key(namespace: str) -> str:
    """Set of the providers that have keys in this namespace."""
    return f"{namespace}:providers"


def model_providers_key(namespace: str, model: str) -> str:
    """Set of the providers that have keys assigned to ``model``."""
    return f"{namespace}:model:{model}"


@dataclass(frozen=True, slots=True)
class ProviderKeys:
    """The key names of one (namespace, provider)."""

    namespace: str
    provider: str

    @property
    def prefix(self) -> str:
        return f"{self.namespace}:{{{self.provider}}}:"

    @property
    def keys(self) -> list[str]:
        prefix = self.prefix
        return [prefix + suffix for suffix in PROVIDER_SUFFIXES]

    def key_hash(self, key_id: str) -> str:
        return self.prefix + KEY_HASH + key_id

    def key_leases(self, key_id: str) -> str:
        return self.prefix + KEY_LEASES + key_id

    def model_set(self, model: str) -> str:
        return self.prefix + MODEL_SET + model
