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
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

__all__ = [
    "ACQUIRE",
    "ADMIN",
    "REGISTER",
    "RELOADS",
    "REPORT",
    "STATS",
    "Script",
    "library_name",
    "library_source",
    "script_source",
]

_NAMES = ("acquire", "report", "register", "admin", "stats")


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
        for _attempt in range(RELOADS):
            try:
                return client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                client.script_load(self.source)
        return client.evalsha(self.sha, len(keys), *keys, *args)

    async def call_async(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """The same, on a ``redis.asyncio`` client."""
        for _attempt in range(RELOADS):
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(self.source)
        return await client.evalsha(self.sha, len(keys), *keys, *args)


# Times a call loads the script again after NOSCRIPT before giving up: the cache can be
# flushed again between the load and the call (SCRIPT FLUSH on every node of a cluster,
# a second restart), and that must not reach the caller.
RELOADS = 3


@cache
def _sha(name: str) -> str:
    return hashlib.sha1(script_source(name).encode("utf-8")).hexdigest()


ACQUIRE = Script("acquire")
REPORT = Script("report")
REGISTER = Script("register")
ADMIN = Script("admin")
STATS = Script("stats")
