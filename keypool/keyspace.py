"""Redis key names. Every key of one (namespace, provider) carries the hash tag
``{<provider>}`` so a script touches one cluster slot; the README lists what each holds."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "PACKED_FIELDS",
    "STRATEGY_SUFFIXES",
    "ProviderKeys",
    "decode_state",
    "model_providers_key",
    "providers_key",
]

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


# A key hash's numbers, packed into its field ``st`` in this order (``PACKED`` in
# lua/lib.lua): little-endian doubles, or space-separated text where the server's Lua has
# no ``struct`` library (the embedded store).
PACKED_FIELDS = (
    "en",
    "until",
    "rpm",
    "tpm",
    "rpd",
    "t_rpm",
    "t_tpm",
    "t_rpd",
    "maxc",
    "inflight",
    "circ",
    "probe_until",
    "pass",
    "wpass",
    "consec",
    "total",
    "lat",
    "weight",
    "loc",
    "ok",
    "err",
    "lat_n",
    "tokens",
    "rl_strikes",
    "opens",
    "last_used",
    "last_ok",
)
_TEXT_STATES = {
    "en": {0: "0", 1: "1"},
    "circ": {0: "", 1: "open", 2: "half"},
    "loc": {0: "", 1: "r", 2: "w"},
}


def decode_state(raw: bytes) -> dict[str, str]:
    """The fields packed in a key hash's ``st``, by name (``redis-cli HGET ... st`` gives the
    bytes). Numbers come back as text, ``en``/``circ``/``loc`` as their words."""
    if len(raw) == 8 * len(PACKED_FIELDS):
        numbers = list(struct.unpack("<" + "d" * len(PACKED_FIELDS), raw))
    else:
        numbers = [float(w) for w in raw.split()]
    out: dict[str, str] = {}
    for name, value in zip(PACKED_FIELDS, numbers, strict=True):
        words = _TEXT_STATES.get(name)
        if words is not None:
            out[name] = words.get(int(value), "")
        else:
            out[name] = str(int(value)) if value == int(value) else repr(value)
    return out


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
    keys: list[str] = field(init=False)  # KEYS[1..9] of every script, in order

    def __post_init__(self) -> None:
        prefix = f"{self.namespace}:{{{self.provider}}}:"
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "keys", [prefix + suffix for suffix in PROVIDER_SUFFIXES])

    def key_hash(self, key_id: str) -> str:
        return self.prefix + KEY_HASH + key_id

    def key_leases(self, key_id: str) -> str:
        return self.prefix + KEY_LEASES + key_id

    def model_set(self, model: str) -> str:
        return self.prefix + MODEL_SET + model
