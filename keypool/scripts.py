"""The Lua scripts: the shared library (``lua/lib.lua``) and one body per decision.

Each body runs as a function of ``(KEYS, ARGV)`` after the library's ``begin``. The same
files are sent in two forms:

* a Redis **function library** (``FUNCTION LOAD`` once, then ``FCALL``): the library is
  compiled and set up once per server, so a call runs only its own work. Used on the hot
  path where the server has functions (Redis 7+) and the user may call them;
* one **script** per body, the library prepended (``EVALSHA``, reloaded after NOSCRIPT):
  everywhere else (Redis 6.2, a Cluster, the embedded store, the asyncio client).

Names carry a hash of the sources, so processes running different versions never call
each other's code.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from redis.exceptions import NoPermissionError, NoScriptError, ResponseError

__all__ = [
    "ACQUIRE",
    "ADMIN",
    "LIMITS",
    "REGISTER",
    "RELOADS",
    "REPORT",
    "STATS",
    "Script",
    "library_name",
    "library_source",
    "refused",
    "run_many",
    "run_many_async",
    "script_source",
    "with_reload",
]

_NAMES = ("acquire", "report", "register", "admin", "stats", "limits")


def _lua_dir() -> Path:
    packaged = resources.files("keypool") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    # running from a source checkout (editable install): the repository's lua/ folder
    return Path(__file__).resolve().parent.parent / "lua"


@cache
def _read(name: str) -> str:
    return (_lua_dir() / f"{name}.lua").read_text(encoding="utf-8")


_BODY = "local function body_{name}(KEYS, ARGV)\n{text}\nend\n"


def _body(name: str) -> str:
    return _BODY.format(name=name, text=_read(name))


@cache
def script_source(name: str) -> str:
    """The text EVALSHA runs for script ``name``: the library, the body, the call."""
    return f"{_read('lib')}\n{_body(name)}begin(KEYS, ARGV)\nreturn body_{name}(KEYS, ARGV)\n"


_WRAPPER = (
    "redis.register_function('{function}', function(keys, args)\n"
    "  begin(keys, args)\n  return body_{name}(keys, args)\nend)\n"
)


@cache
def _version() -> str:
    # everything the library is made of: the files and the wrapper around each body
    digest = hashlib.sha1((_BODY + _WRAPPER).encode("utf-8"))
    for name in ("lib", *_NAMES):
        digest.update(_read(name).encode("utf-8"))
    return digest.hexdigest()[:12]


def library_name() -> str:
    """The function library's name: ``keypool_<hash of the sources>``."""
    return f"keypool_{_version()}"


@cache
def library_source() -> str:
    """The text FUNCTION LOAD takes: the library, every body, one function per body."""
    parts = [f"#!lua name={library_name()}\n", _read("lib"), "\n"]
    for name in _NAMES:
        parts.append(_body(name))
        parts.append(_WRAPPER.format(function=_function_name(name), name=name))
    return "".join(parts)


@cache
def _function_name(name: str) -> str:
    return f"keypool_{_version()}_{name}"


T = TypeVar("T")

# Times a call loads the script again after NOSCRIPT before giving up: the cache can be
# flushed again between the load and the call (SCRIPT FLUSH on every node of a cluster,
# a second restart), and that must not reach the caller.
RELOADS = 3


def refused(exc: BaseException, functions: bool = False) -> bool:
    """Whether the server refused a call without running it, for want of the code: a
    flushed script cache; with ``functions``, no function library loaded, or none to be
    had (Redis 6, an ACL without FCALL)."""
    if isinstance(exc, NoScriptError):
        return True
    if not functions or not isinstance(exc, ResponseError):
        return False
    text = str(exc).lower()
    return (
        "function not found" in text
        or "unknown command" in text
        or (isinstance(exc, NoPermissionError) and "'fcall'" in text)
    )


def with_reload(call: Callable[[], T], load: Callable[[], object], functions: bool = False) -> T:
    """The one reload rule: run ``call``; when the server refused it for want of the code,
    ``load`` it and call again, up to RELOADS times."""
    for _attempt in range(RELOADS):
        try:
            return call()
        except ResponseError as exc:
            if not refused(exc, functions):
                raise
            load()
    return call()


async def with_reload_async(
    call: Callable[[], Awaitable[T]],
    load: Callable[[], Awaitable[object]],
    functions: bool = False,
) -> T:
    """:func:`with_reload` for coroutines."""
    for _attempt in range(RELOADS):
        try:
            return await call()
        except ResponseError as exc:
            if not refused(exc, functions):
                raise
            await load()
    return await call()


@dataclass(frozen=True, slots=True)
class Script:
    """One named script; ``sha`` is what EVALSHA is called with, ``function`` what FCALL
    is."""

    name: str

    @property
    def source(self) -> str:
        return script_source(self.name)

    @property
    def sha(self) -> str:
        return _sha(self.name)

    @property
    def function(self) -> str:
        return _function_name(self.name)

    def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """Run the script: one round trip, plus one SCRIPT LOAD if the server lost it."""
        return with_reload(
            lambda: client.evalsha(self.sha, len(keys), *keys, *args),
            lambda: client.script_load(self.source),
        )

    async def call_async(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """The same, on a ``redis.asyncio`` client."""
        return await with_reload_async(
            lambda: client.evalsha(self.sha, len(keys), *keys, *args),
            lambda: client.script_load(self.source),
        )

    def fcall(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """Run the script as a function of the library (loaded first if the server lacks
        it); for a client known to have functions (the embedded store)."""
        return with_reload(
            lambda: client.fcall(self.function, len(keys), *keys, *args),
            lambda: _function_load(client),
            functions=True,
        )

    async def fcall_async(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """:meth:`fcall` on an asyncio client."""

        async def load() -> None:
            try:
                await client.function_load(library_source())
            except ResponseError as exc:
                if "already exists" not in str(exc):
                    raise

        return await with_reload_async(
            lambda: client.fcall(self.function, len(keys), *keys, *args), load, functions=True
        )


def _function_load(client: Any) -> None:
    try:
        client.function_load(library_source())
    except ResponseError as exc:  # another thread loaded it meanwhile
        if "already exists" not in str(exc):
            raise


Call = tuple["Script", list[str], list[Any]]


def _queue(pipe: Any, calls: list[Call], todo: list[int]) -> None:
    for i in todo:
        script, keys, args = calls[i]
        # execute_command, not pipe.evalsha: cluster pipelines refuse evalsha, while an
        # EVALSHA command is routed by its keys like any other
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def _unanswered(replies: list[Any], todo: list[int]) -> list[int]:
    return [i for i in todo if isinstance(replies[i], NoScriptError)]


def run_many(client: Any, calls: list[Call]) -> list[Any]:
    """Every call in one pipeline (not a transaction; on a cluster each goes to the node
    of its keys' slot). Calls refused for want of their script are sent again after a
    load, up to RELOADS times; any other error is raised."""
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _attempt in range(RELOADS + 1):
        pipe = client.pipeline(transaction=False)
        _queue(pipe, calls, todo)
        for i, reply in zip(todo, pipe.execute(raise_on_error=False), strict=True):
            replies[i] = reply
        todo = _unanswered(replies, todo)
        if not todo:
            break
        for script in {calls[i][0] for i in todo}:
            client.script_load(script.source)  # on a cluster: on every primary
    return _raise_first(replies)


async def run_many_async(client: Any, calls: list[Call]) -> list[Any]:
    """:func:`run_many` on an asyncio client."""
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _attempt in range(RELOADS + 1):
        pipe = client.pipeline(transaction=False)
        _queue(pipe, calls, todo)
        for i, reply in zip(todo, await pipe.execute(raise_on_error=False), strict=True):
            replies[i] = reply
        todo = _unanswered(replies, todo)
        if not todo:
            break
        for script in {calls[i][0] for i in todo}:
            await client.script_load(script.source)
    return _raise_first(replies)


def _raise_first(replies: list[Any]) -> list[Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


@cache
def _sha(name: str) -> str:
    return hashlib.sha1(script_source(name).encode("utf-8")).hexdigest()


ACQUIRE = Script("acquire")
REPORT = Script("report")
REGISTER = Script("register")
ADMIN = Script("admin")
STATS = Script("stats")
LIMITS = Script("limits")
