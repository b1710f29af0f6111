"""Checks of every argument a caller passes, done before anything is sent to the store.

Each raises ``ValueError`` (or ``TypeError``) naming the argument and its bad value, so a
bad call writes nothing. The ranges (all inclusive):

=====================================  ==============================================
``tokens``, ``input_tokens``,          whole numbers, 0 .. 10**9 per call
``output_tokens``
``rpm``, ``tpm``, ``rpd``, ``tpd``,    whole numbers, 1 .. 10**12 (or None: no limit)
``itpm``, ``otpm``
``max_concurrency``                    whole number, 1 .. 10**6 (or None)
``weight``                             finite number, > 0 .. 10**6
``latency``                            finite seconds, 0 .. 86,400
``retry_after``                        finite seconds, 0 .. 10**9 (``classify`` checks it;
                                       then clamped to the ``max_cooldown`` setting)
``ttl`` (``renew``)                    finite seconds, > 0 .. 86,400
``wait``                               finite seconds, 0 .. 86,400
``max_attempts``                       whole number, 1 .. 1,000
=====================================  ==============================================
"""

from __future__ import annotations

import math

__all__ = [
    "MAX_LIMIT",
    "MAX_TOKENS",
    "check_secret",
    "limit_arg",
    "max_attempts_arg",
    "seconds_arg",
    "tokens_arg",
    "weight_arg",
]

MAX_TOKENS = 10**9
MAX_LIMIT = 10**12
MAX_CONCURRENCY = 10**6
MAX_WEIGHT = 10**6
DAY_SECONDS = 86_400.0
MAX_RETRY_AFTER = 1e9


def _whole(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
            shown = f"(an int of {len(str(abs(value)))} digits)"
        else:
            shown = repr(value)[:40]
        raise ValueError(f"invalid {name} {shown}: expected a whole number {low}..{high}")
    return value


def limit_arg(name: str, value: object, high: int = MAX_LIMIT, *, low: int = 1) -> int:
    """A limit: ``None`` (no limit, 0 in the store) or a whole number ``low``..``high``."""
    if value is None:
        return 0
    return _whole(name, value, low, high)


def tokens_arg(value: object, name: str = "tokens", *, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    return _whole(name, value, 0, MAX_TOKENS)


def _finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"invalid {name} {value!r}: expected a number of seconds")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"invalid {name}: the number is too large") from None
    if not math.isfinite(number):
        raise ValueError(f"invalid {name} {value!r}: expected a finite number")
    return number


def seconds_arg(
    name: str, value: object, high: float = DAY_SECONDS, *, positive: bool = False
) -> float | None:
    """``None``, or finite seconds in 0..``high`` (> 0 when ``positive``)."""
    if value is None:
        return None
    number = _finite(name, value)
    if number < 0 or number > high or (positive and number == 0):
        low = "> 0" if positive else ">= 0"
        raise ValueError(f"invalid {name} {value!r}: expected seconds {low} and <= {high:g}")
    return number


def weight_arg(value: object) -> float:
    number = _finite("weight", value)
    if not 0 < number <= MAX_WEIGHT:
        raise ValueError(f"invalid weight {value!r}: expected a number > 0 and <= {MAX_WEIGHT}")
    return number


def max_attempts_arg(value: object) -> int:
    return _whole("max_attempts", value, 1, 1000)


def check_secret(key_id: str, secret: object) -> str:
    if secret is None or secret == "":
        raise ValueError(f"missing secret for key {key_id!r}: expected a non-empty str")
    if not isinstance(secret, str):
        raise TypeError(f"secret for key {key_id!r} must be a str, not {type(secret).__name__}")
    if secret != secret.strip() or any(c in secret for c in "\r\n\x00"):
        raise ValueError(
            f"secret for key {key_id!r} has surrounding whitespace or a control character"
        )
    try:
        secret.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"secret for key {key_id!r} is not valid UTF-8") from None
    return secret
