"""The ``keypool`` command line: look at a pool and act on its keys.

Every command reads the same settings as the library (``KEYPOOL_REDIS_URL``,
``KEYPOOL_NAMESPACE``, ...); ``--url`` and ``--namespace`` override them. Secrets are read from
stdin or from a named environment variable, never from the command line, and never printed.
A provider name must be a :class:`~keypool.Provider` value or a provider the pool already has
keys of; any other name is refused as a probable typo (with the closest known name), unless
``add`` or ``import`` is given ``--new-provider``.

Exit codes: 0 ok, 1 other error, 2 usage error or bad value, 3 bad configuration (e.g. the
store URL), 4 store unreachable, 5 unknown key, 130 interrupted.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any, NoReturn, TypeAlias

from redis.exceptions import RedisError

from . import __version__
from .envload import ALIASES, parse_key_file, scan_env
from .errors import ConfigError, KeyPoolError, PoolUnavailable, UnknownKey
from .fingerprint import derived_key_id, fingerprint
from .log import redact
from .pool import KeyPool
from .providers import Provider, normalize_provider, shown, validate_key_id
from .settings import load_settings
from .stats import KeyStats
from .store import redact_url

__all__ = [
    "EXIT_CONFIG",
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_UNAVAILABLE",
    "EXIT_UNKNOWN_KEY",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_UNAVAILABLE = 4
EXIT_UNKNOWN_KEY = 5
EXIT_INTERRUPTED = 130

_PROVIDER_VALUES = frozenset(p.value for p in Provider)

IMPORT_CHUNK = 1000
DEFAULT_WATCH_SECONDS = 2.0
_CLEAR_SCREEN = "\x1b[H\x1b[2J"
_LAST_ERROR_WIDTH = 48
_MODELS_WIDTH = 40
MEMORY_WARNING = (
    "memory:// is this process only; set KEYPOOL_REDIS_URL (or --url) to act on a shared pool"
)

# Indirection so that tests can stop a --watch loop.
_sleep: Callable[[float], None] = time.sleep


class UsageError(Exception):
    """A bad value on the command line or in its input: exit code 2."""


# --------------------------------------------------------------------------- small helpers


def _err(message: str) -> None:
    """One line on stderr, with anything secret-shaped redacted."""
    print(f"keypool: {redact(message)}", file=sys.stderr)


def _warn(message: str) -> None:
    _err(f"warning: {message}")


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


# --------------------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with exit code 2 and redacted messages (a value may be a misplaced secret)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {redact(message)}\n")


def _common_options() -> _Parser:
    # SUPPRESS defaults: the options work before and after the command without the
    # sub-command's defaults overwriting what was given before it.
    common = _Parser(add_help=False)
    group = common.add_argument_group("store options")
    group.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        metavar="URL",
        help="store URL (default: KEYPOOL_REDIS_URL, else memory://)",
    )
    group.add_argument(
        "--namespace",
        default=argparse.SUPPRESS,
        metavar="NS",
        help="pool namespace (default: KEYPOOL_NAMESPACE, else keypool)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show keypool's log events on stderr",
    )
    return common


def _key_option_parser() -> _Parser:
    options = _Parser(add_help=False)
    group = options.add_argument_group("key options")
    group.add_argument(
        "--weight", type=_positive_float, default=1.0, metavar="W", help="weight (default 1)"
    )
    group.add_argument("--rpm", type=_positive_int, metavar="N", help="requests per minute")
    group.add_argument("--tpm", type=_positive_int, metavar="N", help="tokens per minute")
    group.add_argument("--rpd", type=_positive_int, metavar="N", help="requests per day")
    group.add_argument(
        "--max-concurrency", type=_positive_int, metavar="N", help="in-flight leases at once"
    )
    group.add_argument(
        "--model",
        dest="models",
        action="extend",
        nargs="+",
        default=[],
        metavar="M",
        help="model(s) the key serves (repeatable)",
    )
    group.add_argument(
        "--account", metavar="NAME", help="account the key belongs to (shares its limits)"
    )
    return options


def _key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("provider", metavar="PROVIDER", help="provider, e.g. openai")
    parser.add_argument("key_id", metavar="KEY_ID", help="key id, e.g. prod-1")


def _new_provider_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--new-provider",
        action="store_true",
        help="accept a provider that is neither a keypool provider nor in the pool yet "
        "(without it such a name is refused as a probable typo)",
    )


@dataclass(frozen=True)
class _Parents:
    """Option groups shared by sub-commands (argparse ``parents``)."""

    common: _Parser
    key_options: _Parser


# what ``add_subparsers`` returns
_Commands: TypeAlias = "argparse._SubParsersAction[_Parser]"


def _status_command(sub: _Commands, parents: _Parents) -> None:
    status = sub.add_parser(
        "status",
        parents=[parents.common],
        help="every key's state, cooldown, in-flight leases, counters, tokens and budgets",
        description="Show every key: state and why, cooldown left, in-flight leases, "
        "requests, errors, tokens used, budgets left, models and the last error. Never a "
        "secret.",
    )
    status.add_argument(
        "provider_name",
        nargs="?",
        metavar="PROVIDER",
        help="only this provider (the same as --provider)",
    )
    status.add_argument("--provider", metavar="P", help="only this provider")
    status.add_argument("--json", action="store_true", help="print a JSON document")
    status.add_argument(
        "--watch",
        nargs="?",
        type=_positive_float,
        const=DEFAULT_WATCH_SECONDS,
        default=None,
        metavar="SECONDS",
        help=f"redraw every SECONDS (default {DEFAULT_WATCH_SECONDS:g}) until Ctrl-C",
    )
    status.set_defaults(handler=cmd_status)


def _add_command(sub: _Commands, parents: _Parents) -> None:
    add = sub.add_parser(
        "add",
        parents=[parents.common, parents.key_options],
        help="add (or update) one key; the secret comes from stdin or an env variable",
        description="Add or update one key. The secret is read from stdin (prompted for "
        "without echo on a terminal) or from --from-env VAR; never from the command line.",
    )
    _key_arguments(add)
    source = add.add_mutually_exclusive_group()
    source.add_argument(
        "--from-env", metavar="VAR", help="read the secret from environment variable VAR"
    )
    source.add_argument(
        "--stdin", action="store_true", help="read the secret from stdin (the default)"
    )
    _new_provider_option(add)
    add.set_defaults(handler=cmd_add)


def _import_command(sub: _Commands, parents: _Parents) -> None:
    imp = sub.add_parser(
        "import",
        parents=[parents.common, parents.key_options],
        help="add many keys from the environment and/or a file",
        description="Add many keys at once: --env registers the keys found in provider "
        "variables (OPENAI_API_KEY, OPENAI_API_KEYS, HF_<NAME>_KEY, ...); --file reads one "
        "key per line, as SECRET or KEY_ID=SECRET (# comments and blank lines ignored; a bare "
        "secret gets an id derived from its fingerprint).",
    )
    imp.add_argument("--env", action="store_true", help="keys from the environment")
    imp.add_argument("--file", metavar="PATH", help="keys from PATH, one per line ('-': stdin)")
    imp.add_argument(
        "--provider",
        metavar="P",
        help="provider of the file's keys (required with --file); with --env, only this one",
    )
    _new_provider_option(imp)
    imp.set_defaults(handler=cmd_import)


def _key_action_commands(sub: _Commands, parents: _Parents) -> None:
    disable = sub.add_parser(
        "disable", parents=[parents.common], help="take a key out of service until enabled"
    )
    _key_arguments(disable)
    disable.add_argument("--reason", default="", metavar="TEXT", help="why (shown by status)")
    disable.set_defaults(handler=cmd_disable)

    for name, text, handler in (
        ("enable", "put a disabled key back in service", cmd_enable),
        ("reset", "clear a key's cooldown, circuit, counters and budgets", cmd_reset),
        ("remove", "forget a key, its leases and model assignments", cmd_remove),
    ):
        action = sub.add_parser(name, parents=[parents.common], help=text, description=text)
        _key_arguments(action)
        action.set_defaults(handler=handler)


def _model_commands(sub: _Commands, parents: _Parents) -> None:
    for name, text, handler in (
        ("assign-model", "let MODEL be served by this key", cmd_assign_model),
        ("unassign-model", "stop serving MODEL with this key", cmd_unassign_model),
    ):
        action = sub.add_parser(name, parents=[parents.common], help=text, description=text)
        action.add_argument("model", metavar="MODEL", help="model name")
        _key_arguments(action)
        action.set_defaults(handler=handler)


_LIMIT_OPTIONS = ("rpm", "tpm", "rpd", "tpd", "itpm", "otpm", "max_concurrency")


def _limits_command(sub: _Commands, parents: _Parents) -> None:
    limits = sub.add_parser(
        "limits",
        parents=[parents.common],
        help="set or show the limits of a key, a key for a model, an account, ...",
        description="Limit scopes: a key (--key), a key for one model (--key --model), an "
        "account (--account) or an account for one model (--account --model). An acquire is "
        "admitted only if every scope that applies admits it.",
    )
    actions = limits.add_subparsers(dest="limits_action", required=True, metavar="ACTION")
    set_ = actions.add_parser(
        "set", parents=[parents.common], help="set limits of one scope (0 removes a limit)"
    )
    set_.add_argument("provider", metavar="PROVIDER", help="provider name")
    owner = set_.add_mutually_exclusive_group(required=True)
    owner.add_argument("--key", dest="key_id", metavar="KEY_ID", help="a key of the provider")
    owner.add_argument("--account", metavar="ACCOUNT", help="an account of the provider")
    set_.add_argument("--model", metavar="MODEL", help="only for this model")
    for name in _LIMIT_OPTIONS:
        set_.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=int, metavar="N", help=f"{name} limit"
        )
    set_.set_defaults(handler=cmd_limits_set)
    show = actions.add_parser(
        "show", parents=[parents.common], help="every limit scope of a provider"
    )
    show.add_argument("provider", metavar="PROVIDER", help="provider name")
    show.add_argument("--json", action="store_true", help="as JSON")
    show.set_defaults(handler=cmd_limits_show)


def _serve_command(sub: _Commands, parents: _Parents) -> None:
    serve = sub.add_parser(
        "serve",
        parents=[parents.common],
        help="run the HTTP gateway (pip install 'keypool[server]')",
        description="Run the gateway: /{provider}/... is forwarded to the provider with a "
        "leased key. Clients authenticate with a token of KEYPOOL_PROXY_TOKENS.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (8080)")
    serve.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    serve.add_argument(
        "--no-auth",
        action="store_true",
        help="serve without KEYPOOL_PROXY_TOKENS (only when bound to a loopback address)",
    )
    serve.set_defaults(handler=cmd_serve)


# One function per command (or family of commands), in the order ``keypool --help`` lists
# them. A new command is one more function here: it adds its sub-parser (a command with
# actions of its own, e.g. ``limits set|show``, adds a nested ``add_subparsers``), sets
# ``handler`` and, when it names a provider, checks it with ``_require_provider``.
_COMMANDS: tuple[Callable[[_Commands, _Parents], None], ...] = (
    _status_command,
    _add_command,
    _import_command,
    _key_action_commands,
    _model_commands,
    _limits_command,
    _serve_command,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``keypool`` argument parser."""
    parents = _Parents(common=_common_options(), key_options=_key_option_parser())
    parser = _Parser(
        prog="keypool",
        parents=[parents.common],
        description="Inspect and manage a keypool: API keys shared through Redis.",
        epilog=(
            "Settings come from KEYPOOL_* variables (KEYPOOL_REDIS_URL, KEYPOOL_NAMESPACE, "
            "KEYPOOL_SECRET_KEY, ...). Exit codes: 0 ok, 1 error, 2 usage, 3 configuration, "
            "4 store unreachable, 5 unknown key."
        ),
    )
    parser.add_argument("--version", action="version", version=f"keypool {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in _COMMANDS:
        add_command(sub, parents)
    return parser


# --------------------------------------------------------------------------- pool


def _open_pool(args: argparse.Namespace, *, mutating: bool) -> KeyPool:
    overrides: dict[str, object] = {}
    url = getattr(args, "url", None)
    namespace = getattr(args, "namespace", None)
    if url is not None:
        overrides["redis_url"] = url
    if namespace is not None:
        overrides["namespace"] = namespace
    settings = load_settings(**overrides)
    pool = KeyPool(settings=settings)
    if getattr(args, "verbose", False):
        logger = logging.getLogger("keypool")
        logger.setLevel(min(logger.getEffectiveLevel(), logging.INFO))
    if mutating and _is_memory(pool):
        _warn(MEMORY_WARNING)
    return pool


def _is_memory(pool: KeyPool) -> bool:
    return pool.url.strip().lower().startswith("memory:")


def _store_now(pool: KeyPool) -> float:
    """The store's clock (all of keypool's times come from Redis), else this machine's."""
    try:
        return pool.server_time()
    except Exception:  # a cluster answers per node; any trouble: the local clock will do
        return time.time()


def _label(provider: str, key_id: str) -> str:
    return f"{provider}/{key_id}"


def _check_key_args(provider: str, key_id: str) -> tuple[str, str]:
    name = normalize_provider(provider)
    key_id = validate_key_id(key_id)
    if redact(key_id) != key_id:
        raise UsageError(
            "KEY_ID looks like an API key: give a name for the key; the secret is read "
            "from stdin or --from-env, never from the command line"
        )
    return name, key_id


def _suggestion(name: str, known: Sequence[str]) -> str | None:
    """The known provider ``name`` was probably meant for: the provider of an environment
    alias (``hf``, ``google``), else the closest known name."""
    aliased = ALIASES.get(name.upper())
    if aliased is not None and aliased != name:
        return aliased
    close = get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def _require_provider(pool: KeyPool, name: str, *, new_ok: bool | None = None) -> None:
    """Refuse (exit 2) a provider that is neither a :class:`Provider` value nor in the pool:
    most likely a typo, which would otherwise create a provider of its own (or report a
    missing key). ``new_ok``: the command can create a provider (``add``, ``import``), and
    ``True`` when ``--new-provider`` was given; ``None``: it cannot."""
    if name in _PROVIDER_VALUES or new_ok:
        return
    in_pool = pool.providers()
    if name in in_pool:
        return
    message = f"provider {shown(name)} has no keys in this pool and is not a keypool provider"
    hint = _suggestion(name, sorted({*_PROVIDER_VALUES, *in_pool}))
    if hint is not None:
        message += f"; did you mean {hint!r}?"
    if new_ok is not None:
        message += " (give --new-provider to add keys of a new provider)"
    raise UsageError(message)


# --------------------------------------------------------------------------- status


def _cooldown_left(stats: KeyStats, now: float) -> str:
    if stats.cooldown_until is None:
        return "-"
    left = max(0.0, stats.cooldown_until - now)
    return f"{left:.1f}s" if left < 100 else f"{left:.0f}s"


def _why(stats: KeyStats) -> str:
    if stats.status == "disabled":
        return " ".join(redact(stats.disabled_reason or "manual").split()) or "manual"
    return stats.unavailable_reason or "-"


def _errors(stats: KeyStats) -> str:
    if not stats.error_count and not stats.errors_by_kind:
        return "0"
    kinds = " ".join(f"{k}={v}" for k, v in sorted(stats.errors_by_kind.items()))
    return f"{stats.error_count} ({kinds})" if kinds else str(stats.error_count)


def _budget(left: int | None, limit: int | None) -> str:
    if limit is None:
        return "-"
    return f"{'?' if left is None else left}/{limit}"


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _last_error(stats: KeyStats, now: float) -> str:
    if not stats.last_error:
        return "-"
    text = " ".join(redact(stats.last_error).split())
    if len(text) > _LAST_ERROR_WIDTH:
        text = text[: _LAST_ERROR_WIDTH - 3] + "..."
    if stats.last_error_at is not None:
        text += f" ({_age(now - stats.last_error_at)} ago)"
    return text


def _tokens(stats: KeyStats) -> str:
    """Tokens used; with the input/output split when the stats carry it."""
    text = str(stats.tokens_used)
    tokens_in = getattr(stats, "tokens_in", None)
    tokens_out = getattr(stats, "tokens_out", None)
    if tokens_in is None and tokens_out is None:
        return text
    shown_in = "?" if tokens_in is None else str(tokens_in)
    shown_out = "?" if tokens_out is None else str(tokens_out)
    return f"{text} ({shown_in} in, {shown_out} out)"


def _models(stats: KeyStats) -> str:
    if not stats.models:
        return "-"
    return _shorten_names([" ".join(m.split()) for m in stats.models], _MODELS_WIDTH)


def _shorten_names(names: Sequence[str], width: int) -> str:
    """``a,b,c`` in at most ``width`` characters (about: one very long name is cut), the
    names that do not fit counted as ``+N more``."""
    text = ",".join(names)
    if len(text) <= width:
        return text
    kept: list[str] = []
    for name in names:
        more = len(names) - len(kept) - 1
        if len(",".join([*kept, name])) + len(f" +{more} more") > width:
            break
        kept.append(name)
    more = len(names) - len(kept)
    if kept:
        return ",".join(kept) + f" +{more} more"
    more -= 1
    tail = f" +{more} more" if more else ""
    room = max(width - len(tail) - 3, 8)
    return names[0][:room] + "..." + tail


_COLUMNS = (
    ("KEY", False),
    ("STATUS", False),
    ("WHY", False),
    ("COOLDOWN", True),
    ("IN-FLIGHT", True),
    ("REQUESTS", True),
    ("OK", True),
    ("ERRORS", False),
    ("TOKENS", True),
    ("RPM LEFT", True),
    ("TPM LEFT", True),
    ("RPD LEFT", True),
    ("MODELS", False),
    ("LAST ERROR", False),
)


def _row(stats: KeyStats, now: float) -> list[str]:
    in_flight = str(stats.in_flight)
    if stats.max_concurrency is not None:
        in_flight += f"/{stats.max_concurrency}"
    return [
        stats.key_id,
        stats.status,
        _why(stats),
        _cooldown_left(stats, now),
        in_flight,
        str(stats.total_requests),
        str(stats.success_count),
        _errors(stats),
        _tokens(stats),
        _budget(stats.rpm_left, stats.rpm),
        _budget(stats.tpm_left, stats.tpm),
        _budget(stats.rpd_left, stats.rpd),
        _models(stats),
        _last_error(stats, now),
    ]


def _table(rows: list[list[str]]) -> list[str]:
    header = [name for name, _ in _COLUMNS]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, right) in zip(r, widths, _COLUMNS, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def _group(stats: list[KeyStats], only: str | None) -> dict[str, list[KeyStats]]:
    groups: dict[str, list[KeyStats]] = {only: []} if only is not None else {}
    for s in stats:
        groups.setdefault(s.provider, []).append(s)
    return groups


def render_status(pool: KeyPool, provider: str | None, *, as_json: bool, compact: bool) -> str:
    """One status frame: a table per provider, or the JSON document."""
    only = normalize_provider(provider) if provider is not None else None
    groups = _group(pool.snapshot(only), only)
    now = _store_now(pool)
    if as_json:
        doc: dict[str, Any] = {
            "namespace": pool.namespace,
            "store": redact_url(pool.url),
            "now": round(now, 3),
            "providers": {
                name: [_json_stats(s) for s in keys] for name, keys in sorted(groups.items())
            },
        }
        return json.dumps(doc, indent=None if compact else 2, sort_keys=False) + "\n"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(now))
    lines = [f"keypool namespace {pool.namespace!r} at {redact_url(pool.url)}, {stamp} UTC"]
    if not groups:
        lines.append("no keys")
    for name, keys in sorted(groups.items()):
        counts = Counter(s.status for s in keys)
        summary = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
        lines.append("")
        lines.append(
            f"{name}: {len(keys)} key{'s' if len(keys) != 1 else ''}"
            + (f" ({summary})" if summary else "")
        )
        if keys:
            lines.extend("  " + line for line in _table([_row(s, now) for s in keys]))
    return "\n".join(lines) + "\n"


def _json_stats(stats: KeyStats) -> dict[str, Any]:
    out = stats.as_dict()
    if out.get("last_error"):
        out["last_error"] = redact(out["last_error"])
    return out


def _status_provider(args: argparse.Namespace) -> str | None:
    """``status PROVIDER`` and ``status --provider PROVIDER`` are the same; both: must agree."""
    positional: str | None = args.provider_name
    option: str | None = args.provider
    if positional is None and option is None:
        return None
    names = {normalize_provider(name) for name in (positional, option) if name is not None}
    if len(names) > 1:
        raise UsageError(
            f"status: PROVIDER {shown(positional or '')} and --provider {shown(option or '')} "
            "differ: give the provider once"
        )
    return names.pop()


def cmd_status(args: argparse.Namespace) -> int:
    out = sys.stdout
    provider = _status_provider(args)
    with _open_pool(args, mutating=False) as pool:
        if provider is not None:
            _require_provider(pool, provider)
        if args.watch is None:
            frame = render_status(pool, provider, as_json=args.json, compact=False)
            out.write(frame)
            if _is_memory(pool) and not pool.snapshot(provider):
                _warn(MEMORY_WARNING)
            return EXIT_OK
        tty = _isatty(out)
        first = True
        try:
            while True:
                try:
                    frame = render_status(
                        pool, provider, as_json=args.json, compact=args.json and not tty
                    )
                except PoolUnavailable as exc:
                    if first:
                        raise
                    frame = f"keypool: {exc}; retrying every {args.watch:g}s\n"
                if tty:
                    out.write(_CLEAR_SCREEN)
                elif not first and not args.json:
                    out.write("\n")
                out.write(frame)
                out.flush()
                first = False
                _sleep(args.watch)
        except KeyboardInterrupt:
            if tty:
                out.write("\n")
                out.flush()
            return EXIT_OK


# --------------------------------------------------------------------------- add / import


def _key_options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "weight": args.weight,
        "rpm": args.rpm,
        "tpm": args.tpm,
        "rpd": args.rpd,
        "max_concurrency": args.max_concurrency,
        "models": list(args.models),
        "account": args.account,
    }


def _clean_secret(value: str, source: str) -> str:
    secret = value.strip()
    if not secret:
        raise UsageError(f"empty secret from {source}")
    if any(c.isspace() for c in secret) or "\x00" in secret:
        raise UsageError(
            f"the secret from {source} contains whitespace or several lines: give exactly one key"
        )
    return secret


def _read_secret(args: argparse.Namespace, label: str) -> str:
    if args.from_env is not None:
        var = args.from_env
        value = os.environ.get(var)
        if value is None:
            raise UsageError(f"environment variable {var} is not set")
        return _clean_secret(value, f"environment variable {var}")
    stdin = sys.stdin
    if stdin is None:
        raise UsageError("no stdin to read the secret from: pipe it in or use --from-env VAR")
    if _isatty(stdin):
        value = getpass.getpass(f"secret for {label} (not echoed): ")
    else:
        value = stdin.read()
    return _clean_secret(value, "stdin")


def _sealing_note(pool: KeyPool) -> None:
    if pool.settings.secret_key is None and not _is_memory(pool):
        _warn(
            "KEYPOOL_SECRET_KEY is not set, so Redis holds only the key's fingerprint: a "
            "process can use the key only if it registers the same secret itself (set "
            "KEYPOOL_SECRET_KEY, the same everywhere, to share secrets sealed)"
        )


def cmd_add(args: argparse.Namespace) -> int:
    provider, key_id = _check_key_args(args.provider, args.key_id)
    options = _key_options(args)
    label = _label(provider, key_id)
    with _open_pool(args, mutating=True) as pool:
        _require_provider(pool, provider, new_ok=args.new_provider)
        secret = _read_secret(args, label)
        pool.add_key(provider, key_id, secret, **options)
        _sealing_note(pool)
    print(f"added {label} (fingerprint {fingerprint(secret)})")
    return EXIT_OK


def _read_key_file(path: str) -> str:
    if path == "-":
        if sys.stdin is None:
            raise UsageError("--file -: there is no stdin")
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _collect_import(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    if not args.env and args.file is None:
        raise UsageError("nothing to import: give --env and/or --file PATH")
    only = normalize_provider(args.provider) if args.provider is not None else None
    if args.file is not None and only is None:
        raise UsageError("--file needs --provider: the provider of the file's keys")
    entries: dict[tuple[str, str], str] = {}
    repeated = 0

    def put(provider: str, key_id: str, secret: str) -> None:
        nonlocal repeated
        previous = entries.get((provider, key_id))
        if previous is not None and previous != secret:
            repeated += 1
        entries[(provider, key_id)] = secret

    if args.env:
        scan = scan_env()
        for skipped in scan.skipped:
            _warn(f"skipped {skipped}")
        for key in scan.keys:
            if only is None or key.provider == only:
                put(key.provider, validate_key_id(key.key_id), key.secret)
    if args.file is not None:
        assert only is not None
        shown = "stdin" if args.file == "-" else args.file
        try:
            parsed = parse_key_file(_read_key_file(args.file))
        except ValueError as exc:
            raise UsageError(f"{shown}: {exc}") from None
        for key_id, secret in parsed:
            put(only, validate_key_id(key_id or derived_key_id(secret)), secret)
    if repeated:
        _warn(
            f"{repeated} key id(s) were given more than once with different secrets; "
            "the last one is used"
        )
    return [(p, k, s) for (p, k), s in entries.items()]


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total if total else width
    bar = "#" * filled + "." * (width - filled)
    sys.stderr.write(f"\rimporting [{bar}] {done}/{total}")
    sys.stderr.flush()


def cmd_import(args: argparse.Namespace) -> int:
    items = _collect_import(args)
    options = _key_options(args)
    named = {p for p, _, _ in items}
    if args.provider is not None:
        named.add(normalize_provider(args.provider))
    with _open_pool(args, mutating=True) as pool:
        for name in sorted(named):
            _require_provider(pool, name, new_ok=args.new_provider)
        if not items:
            _warn("no keys found to import")
        show = bool(items) and _isatty(sys.stderr)
        done = 0
        try:
            for start in range(0, len(items), IMPORT_CHUNK):
                done += pool.add_keys(items[start : start + IMPORT_CHUNK], **options)
                if show:
                    _progress(done, len(items))
        finally:
            if show:
                sys.stderr.write("\n")
                sys.stderr.flush()
        if items:
            _sealing_note(pool)
    counts = Counter(p for p, _, _ in items)
    detail = ", ".join(f"{p}: {n}" for p, n in sorted(counts.items()))
    print(f"imported {done} key{'s' if done != 1 else ''}" + (f" ({detail})" if detail else ""))
    return EXIT_OK


# --------------------------------------------------------------------------- operator actions


def _key_action(
    args: argparse.Namespace,
    act: Callable[[KeyPool, str, str], object],
    done: Callable[[str], str],
) -> int:
    """One operator action on one key (``keypool disable|enable|reset|remove|assign-model|
    unassign-model``): check the key, act, print ``done(label of the key)``."""
    provider, key_id = _check_key_args(args.provider, args.key_id)
    with _open_pool(args, mutating=True) as pool:
        _require_provider(pool, provider)
        act(pool, provider, key_id)
    print(done(_label(provider, key_id)))
    return EXIT_OK


def cmd_disable(args: argparse.Namespace) -> int:
    why = f" (reason: {redact(args.reason)})" if args.reason else ""
    return _key_action(
        args,
        lambda pool, p, k: pool.disable_key(p, k, reason=args.reason),
        lambda key: f"disabled {key}{why}",
    )


def cmd_enable(args: argparse.Namespace) -> int:
    return _key_action(args, KeyPool.enable_key, lambda key: f"enabled {key}")


def cmd_reset(args: argparse.Namespace) -> int:
    return _key_action(args, KeyPool.reset_key, lambda key: f"reset {key}")


def cmd_remove(args: argparse.Namespace) -> int:
    return _key_action(args, KeyPool.remove_key, lambda key: f"removed {key}")


def cmd_assign_model(args: argparse.Namespace) -> int:
    return _key_action(
        args,
        lambda pool, p, k: pool.assign_model(args.model, p, k),
        lambda key: f"assigned model {args.model!r} to {key}",
    )


def cmd_unassign_model(args: argparse.Namespace) -> int:
    return _key_action(
        args,
        lambda pool, p, k: pool.unassign_model(args.model, p, k),
        lambda key: f"unassigned model {args.model!r} from {key}",
    )


def cmd_limits_set(args: argparse.Namespace) -> int:
    provider = normalize_provider(args.provider)
    values = {name: getattr(args, name) for name in _LIMIT_OPTIONS}
    with _open_pool(args, mutating=True) as pool:
        _require_provider(pool, provider)
        pool.set_limits(
            provider, key_id=args.key_id, account=args.account, model=args.model, **values
        )
    where = f"key {args.key_id}" if args.key_id else f"account {args.account}"
    if args.model:
        where += f" for model {args.model!r}"
    given = ", ".join(f"{n}={v}" for n, v in values.items() if v is not None)
    print(f"limits of {provider} {where}: {given}")
    return EXIT_OK


def cmd_limits_show(args: argparse.Namespace) -> int:
    provider = normalize_provider(args.provider)
    with _open_pool(args, mutating=False) as pool:
        _require_provider(pool, provider)
        scopes = pool.scopes(provider)
        now = pool.server_time()
    if args.json:
        print(json.dumps([s.as_dict() for s in scopes], indent=2))
        return EXIT_OK
    rows = [["SCOPE", "OWNER", "MODEL", "LIMITS", "LEFT", "IN FLIGHT", "STATE"]]
    for s in scopes:
        state = "ok"
        if s.available_at is not None:
            state = f"{s.unavailable_reason or 'waiting'} {max(0.0, s.available_at - now):.0f}s"
        rows.append(
            [
                s.scope,
                s.account or s.key_id or "-",
                s.model or "-",
                " ".join(f"{k}={v}" for k, v in s.limits.items()) or "-",
                " ".join(f"{k}={v}" for k, v in s.left.items()) or "-",
                str(s.in_flight),
                state,
            ]
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not scopes:
        print(f"(no limit scopes for {provider}: see `keypool limits set --help`)")
    return EXIT_OK


# --------------------------------------------------------------------------- main


@contextmanager
def _log_handler(verbose: bool) -> Iterator[None]:
    """Library log events go to stderr with -v, nowhere otherwise (this command prints its
    own messages)."""
    logger = logging.getLogger("keypool")
    handler: logging.Handler
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("keypool: log: %(message)s"))
    else:
        handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _unrecognized(extras: Sequence[str]) -> str:
    # Stray values are not echoed: a misplaced secret would end up in logs.
    options = [a.split("=", 1)[0] for a in extras if a.startswith("-") and a != "-"]
    hidden = len(extras) - len(options)
    message = "unrecognized arguments"
    if options:
        message += ": " + " ".join(options)
    if hidden:
        message += (
            f" ({hidden} value{'s' if hidden != 1 else ''} not shown; a secret is never taken "
            "from the command line: pipe it on stdin or use --from-env VAR)"
        )
    return message


def _exit_code(code: object) -> int:
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return EXIT_ERROR


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the gateway on uvicorn; every worker is one more process of the pool."""
    import ipaddress

    try:
        import uvicorn

        from .server import GatewaySettings, create_app
    except ImportError as exc:
        raise ConfigError(f"keypool serve needs: pip install 'keypool[server]' ({exc})") from None
    if getattr(args, "url", None):
        os.environ["KEYPOOL_REDIS_URL"] = args.url
    if getattr(args, "namespace", None):
        os.environ["KEYPOOL_NAMESPACE"] = args.namespace
    if not 0 < args.port < 65536 or not 1 <= args.workers <= 256:
        raise UsageError("--port must be 1-65535 and --workers 1-256")
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not GatewaySettings().tokens():
        if not args.no_auth:
            raise ConfigError(
                "KEYPOOL_PROXY_TOKENS is empty: set client tokens (--no-auth "
                "serves without them, on a loopback address only)"
            )
        if not loopback:
            raise ConfigError(f"--no-auth is refused on {args.host}: bind to 127.0.0.1 or ::1")
        os.environ["KEYPOOL_PROXY_NO_AUTH"] = "1"
    settings = load_settings()
    if settings.redis_url.startswith("memory://") and args.workers > 1:
        raise UsageError("memory:// is one process: set KEYPOOL_REDIS_URL for --workers > 1")
    create_app(settings)  # fail here, not in every worker, on a bad configuration
    uvicorn.run(
        "keypool.server:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
        server_header=False,
        date_header=False,
        timeout_keep_alive=30,
        access_log=False,
    )
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Run the ``keypool`` command line; returns the exit code."""
    parser = build_parser()
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:
            parser.error(_unrecognized(extras))
    except SystemExit as exc:
        return _exit_code(exc.code)
    handler: Callable[[argparse.Namespace], int] = args.handler
    with _log_handler(bool(getattr(args, "verbose", False))):
        try:
            return handler(args)
        except UsageError as exc:
            _err(str(exc))
            return EXIT_USAGE
        except ConfigError as exc:
            _err(str(exc))
            return EXIT_CONFIG
        except PoolUnavailable as exc:
            _err(str(exc))
            return EXIT_UNAVAILABLE
        except UnknownKey as exc:
            _err(str(exc))
            return EXIT_UNKNOWN_KEY
        except (ValueError, TypeError) as exc:
            _err(str(exc))
            return EXIT_USAGE
        except KeyPoolError as exc:
            _err(str(exc))
            return EXIT_ERROR
        except RedisError as exc:
            _err(f"Redis error ({type(exc).__name__}): {exc}")
            return EXIT_ERROR
        except KeyboardInterrupt:
            _err("interrupted")
            return EXIT_INTERRUPTED
        except BrokenPipeError:
            _quiet_stdout()
            return EXIT_ERROR


def _quiet_stdout() -> None:
    """After a closed pipe (``keypool status | head``), keep the interpreter from failing
    again when it flushes stdout at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
