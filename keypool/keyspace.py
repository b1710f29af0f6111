"""Redis key names. Every key of one (namespace, provider) carries the hash tag
``{<provider>}`` so a script touches one cluster slot; ``lua/lib.lua`` and the README list
what each holds."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PROVIDER_KEYS", "ProviderKeys", "model_providers_key", "providers_key"]

# The provider-level keys, after the prefix "<ns>:{<provider>}:" (see lua/lib.lua).
PROVIDER_KEYS = (
    "meta",
    "all",
    "fps",
    "wait",
    "leases",
    "lease",
    "done",
    "rr",
    "wrr",
    "best",
    "busy",
    "lat",
)
KEY_HASH = "k:"  # <prefix>k:<key_id>   hash: one key's configuration and state
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
    prefix: str = field(init=False)
    meta: str = field(init=False)
    keys: list[str] = field(init=False)  # KEYS of every script: [meta]

    def __post_init__(self) -> None:
        prefix = f"{self.namespace}:{{{self.provider}}}:"
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "meta", prefix + "meta")
        object.__setattr__(self, "keys", [prefix + "meta"])

    def key(self, name: str) -> str:
        """A provider-level key by its name in :data:`PROVIDER_KEYS`."""
        return self.prefix + name

    def key_hash(self, key_id: str) -> str:
        return self.prefix + KEY_HASH + key_id

    def model_set(self, model: str) -> str:
        return self.prefix + MODEL_SET + model
