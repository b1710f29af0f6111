"""The Lua scripts, loaded once from the package and called by SHA (EVALSHA), with a
transparent reload when the server has lost its script cache (NOSCRIPT)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from redis.exceptions import NoScriptError

__all__ = ["ACQUIRE", "ADMIN", "REGISTER", "REPORT", "STATS", "Script", "script_source"]


def _lua_dir() -> Path:
    packaged = resources.files("keypool") / "lua"
    if packaged.is_dir():
        return Path(str(packaged))
    # running from a source checkout (editable install): the repository's lua/ folder
    return Path(__file__).resolve().parent.parent / "lua"


@cache
def script_source(name: str) -> str:
    """The full text sent to Redis for script ``name``: the shared library, then the script."""
    folder = _lua_dir()
    lib = (folder / "lib.lua").read_text(encoding="utf-8")
    body = (folder / f"{name}.lua").read_text(encoding="utf-8")
    return lib + "\n" + body


@dataclass(frozen=True, slots=True)
class Script:
    """One named script; ``sha`` is what EVALSHA is called with."""

    name: str

    @property
    def source(self) -> str:
        return script_source(self.name)

    @property
    def sha(self) -> str:
        return _sha(self.name)

    def __call__(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """Run the script: one round trip, plus one SCRIPT LOAD if the server lost it."""
        for _attempt in range(_RELOADS):
            try:
                return client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                client.script_load(self.source)
        return client.evalsha(self.sha, len(keys), *keys, *args)

    async def call_async(self, client: Any, keys: list[str], args: list[Any]) -> Any:
        """The same, on a ``redis.asyncio`` client."""
        for _attempt in range(_RELOADS):
            try:
                return await client.evalsha(self.sha, len(keys), *keys, *args)
            except NoScriptError:
                await client.script_load(self.source)
        return await client.evalsha(self.sha, len(keys), *keys, *args)


# Times a call loads the script again after NOSCRIPT before giving up: the cache can be
# flushed again between the load and the call (SCRIPT FLUSH on every node of a cluster,
# a second restart), and that must not reach the caller.
_RELOADS = 3


@cache
def _sha(name: str) -> str:
    return hashlib.sha1(script_source(name).encode("utf-8")).hexdigest()


ACQUIRE = Script("acquire")
REPORT = Script("report")
REGISTER = Script("register")
ADMIN = Script("admin")
STATS = Script("stats")
