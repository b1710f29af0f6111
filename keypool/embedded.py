"""The embedded store (``memory://``): fakeredis, with Lua scripts run the way Redis runs them.

keypool makes every decision in a Lua script, and the embedded store must run those same
scripts, not a second implementation of them. fakeredis runs Lua through lupa, but its EVAL
compiles the script's source on every call (keypool's scripts carry the whole shared
library), collects all Lua garbage after every call and scans the Lua globals on every
``redis.call``: about nine tenths of a call's time.

Here each server keeps one Lua runtime in which a script is compiled once, when first loaded
or run, into a function that every later call runs again — as Redis does, so a script's
top-level ``local``s are fresh on each call. Scripts run in one sandbox environment shaped
like Redis 7's: its globals are read-only, reading an unknown global is an error, the
``redis``, ``cjson`` and ``struct`` libraries are there and nothing else of the host (no
``python``, no ``io``, no ``os``), so no script sees state left by another. ``redis.call``
goes straight to fakeredis's command table (no protocol encoding), and replies and errors
follow Redis's conversion rules (numbers truncated to integers, arrays stop at the first
nil, false is nil, true is 1; ``error_reply``/``status_reply``; error texts as Redis 7
words them).

Everything else — data, commands, pipelines, transactions, the asyncio client — is
fakeredis's own: the clients made here are ``fakeredis.FakeRedis`` and
``fakeredis.FakeAsyncRedis`` whose connections are :class:`EmbeddedSocket`, except that
EVAL/EVALSHA/FCALL sent by the client itself (the hot path) skip the fake connection's protocol
encoding and parsing. A command, a script included, runs under the server's lock, so
scripts run one at a time whichever thread or event loop sends them.

Function libraries (FUNCTION LOAD, FCALL) run in the same runtime, as Redis 7 runs them: a
library's code runs once, when loaded, with only ``redis.register_function``, ``redis.log``
and the version at hand, and its functions keep the library's top-level state between calls
— which is what lets keypool's library keep key states between decisions here as on Redis.
FUNCTION LIST, DELETE, FLUSH, DUMP and RESTORE are fakeredis's own.

Limits: scripts speak RESP2 only (``redis.setresp(3)`` is refused); ``struct`` lacks
alignment and zero-terminated strings; there is no ``bit`` or ``cmsgpack``; a function's
flags are not kept (``FCALL_RO`` refuses every function).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import fakeredis
import lupa.lua51 as lua51
import redis
from fakeredis import _msgs as msgs
from fakeredis._clients._async import FakeAsyncRedisConnection, FakeReader, FakeWriter
from fakeredis._clients._sync import FakeRedisConnection
from fakeredis._command_args_parsing import Float, Int
from fakeredis._commands import COMMANDS_WITH_SUB, Key
from fakeredis._core import CommandItem
from fakeredis._helpers import SimpleError, SimpleString
from fakeredis._socket import AsyncFakeSocket, FakeSocket
from fakeredis._socket._resp import convert_to_resp2
from fakeredis.commands_mixins._lua_functions import (
    FunctionLibrary,
    FunctionsEngine,
    LuaFunction,
)

__all__ = [
    "EmbeddedAsyncRedis",
    "EmbeddedRedis",
    "EmbeddedServer",
    "EmbeddedSocket",
    "LuaScripts",
    "async_client",
    "client",
]

_log = logging.getLogger("keypool.embedded")

# Set up once per runtime. Receives the Python callbacks; returns compile(source) and
# run(function, sha, numkeys, ...).
_BOOT = r"""
local py_call, py_encode, py_decode, py_pack, py_unpack, py_size, py_log, py_sha1,
  version, version_num = ...
local error, pcall, xpcall, type, tostring, select = error, pcall, xpcall, type, tostring, select
local rawset, setmetatable, setfenv, loadstring = rawset, setmetatable, setfenv, loadstring
local getinfo = debug.getinfo

local function readonly() error('Attempt to modify a readonly table', 2) end
local function frozen(t)
  return setmetatable({}, {__index = t, __newindex = readonly, __metatable = false})
end

local redis = {}
function redis.call(...)
  local reply, err = py_call(...)
  if err ~= nil then error({err = err}, 0) end
  return reply
end
function redis.pcall(...)
  local reply, err = py_call(...)
  if err ~= nil then return {err = err} end
  return reply
end
function redis.error_reply(msg)
  if type(msg) ~= 'string' then error('wrong number or type of arguments', 2) end
  return {err = msg}
end
function redis.status_reply(msg)
  if type(msg) ~= 'string' then error('wrong number or type of arguments', 2) end
  return {ok = msg}
end
function redis.sha1hex(s) return py_sha1(tostring(s)) end
function redis.log(level, ...) py_log(level, ...) end
function redis.setresp(v)
  if v ~= 2 then error('RESP3 is not supported by the embedded store', 2) end
end
function redis.set_repl(_) end
function redis.replicate_commands() return true end
redis.LOG_DEBUG, redis.LOG_VERBOSE, redis.LOG_NOTICE, redis.LOG_WARNING = 0, 1, 2, 3
redis.REPL_NONE, redis.REPL_AOF, redis.REPL_SLAVE, redis.REPL_REPLICA, redis.REPL_ALL =
  0, 1, 2, 2, 3
redis.REDIS_VERSION, redis.REDIS_VERSION_NUM = version, version_num

local null = newproxy(false)
local cjson = {null = null}
function cjson.encode(v)
  local s, err = py_encode(v)
  if err ~= nil then error(err, 2) end
  return s
end
function cjson.decode(s)
  local v, err = py_decode(s)
  if err ~= nil then error(err, 2) end
  return v
end

local struct = {}
function struct.pack(fmt, ...)
  local s, err = py_pack(fmt, ...)
  if err ~= nil then error(err, 2) end
  return s
end
function struct.unpack(fmt, s, pos)
  local values, err = py_unpack(fmt, s, pos or 1)
  if err ~= nil then error(err, 2) end
  return unpack(values, 1, values.n)
end
function struct.size(fmt)
  local n, err = py_size(fmt)
  if err ~= nil then error(err, 2) end
  return n
end

local globals = {
  redis = frozen(redis), cjson = frozen(cjson), struct = frozen(struct),
  string = frozen(string), table = frozen(table), math = frozen(math),
  assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
  pcall = pcall, xpcall = xpcall, rawequal = rawequal, rawget = rawget, rawset = rawset,
  select = select, getmetatable = getmetatable, setmetatable = setmetatable,
  tonumber = tonumber, tostring = tostring, type = type, unpack = unpack,
  gcinfo = gcinfo, collectgarbage = collectgarbage, _VERSION = _VERSION,
}
-- Redis's own libraries this Lua lacks read as nil (a script can test for them); any other
-- unknown global is an error, as in Redis.
local absent = {bit = true, cmsgpack = true}
setmetatable(globals, {__index = function(_, name)
  if absent[name] then return nil end
  error("Script attempted to access nonexistent global variable '" .. tostring(name) .. "'", 2)
end})
-- KEYS and ARGV are set raw on each call; everything else is read-only
local env = setmetatable({}, {__index = globals, __newindex = readonly, __metatable = false})
rawset(globals, '_G', env)
rawset(globals, 'loadstring', function(s, name)
  local f, err = loadstring(s, name)
  if f then setfenv(f, env) end
  return f, err
end)
python = nil  -- lupa's bridge: out of every script's reach

local function compile(source)
  local f, err = loadstring(source, '@user_script')
  if not f then return nil, err end
  setfenv(f, env)
  return f, nil
end

-- Where in the script an error was raised: the innermost frame of the script (or function
-- library) itself.
local function handler(err)
  if type(err) ~= 'table' then err = {err = 'ERR ' .. tostring(err)} end
  for level = 2, 20 do
    local info = getinfo(level, 'Sl')
    if not info then break end
    if info.source == '@user_script' or info.source == '@user_function' then
      err.source, err.line = info.source, info.currentline
      break
    end
  end
  return err
end

-- An uncaught error as Redis words it: "<message> script: <sha or function>, on <where>."
local function failure(reply, what)
  local msg = reply.err
  if type(msg) ~= 'string' then msg = 'ERR ' .. tostring(msg) end
  if reply.line then
    msg = msg .. ' script: ' .. what .. ', on ' .. reply.source .. ':' .. reply.line .. '.'
  end
  return msg
end

-- Function libraries, as Redis 7 runs them: a library's code runs once, when loaded, with
-- nothing but redis.register_function, redis.log and the version at hand; its functions
-- then run with the scripts' globals, and its top-level locals live on between calls.
local registering = nil   -- name -> function, while a library is being loaded
local load_api = frozen({
  register_function = function(name, callback)
    if registering == nil then
      error('redis.register_function can only be called on FUNCTION LOAD command', 2)
    end
    if type(name) == 'table' then
      name, callback = name.function_name, name.callback
    end
    if type(name) ~= 'string' then
      error('first argument to redis.register_function must be a string', 2)
    end
    if type(callback) ~= 'function' then
      error('second argument to redis.register_function must be a function', 2)
    end
    if registering[name] then error('Function already exists in the library', 2) end
    registering[name] = callback
  end,
  log = redis.log,
  REDIS_VERSION = version, REDIS_VERSION_NUM = version_num,
})
local load_globals = setmetatable({redis = load_api}, {__index = function(_, name)
  error("Script attempted to access nonexistent global variable '" .. tostring(name) .. "'", 2)
end})
local library_meta = {__index = globals, __newindex = readonly, __metatable = false}
local library_env = setmetatable({}, library_meta)

local function load_library(source)
  local f, err = loadstring(source, '@user_function')
  if not f then return nil, 'Error compiling function: ' .. tostring(err) end
  setfenv(f, library_env)
  registering, library_meta.__index = {}, load_globals
  local ok, reply = xpcall(f, handler)
  local functions = registering
  registering, library_meta.__index = nil, globals
  if not ok then
    local msg = reply.err
    if type(msg) ~= 'string' then msg = 'ERR ' .. tostring(msg) end
    return nil, 'Error registering functions: ' .. msg
  end
  return functions, nil
end

-- KEYS and ARGV of a call: the first numkeys arguments, and the rest.
local function split(numkeys, ...)
  local n = select('#', ...)
  local args, keys, argv = {...}, {}, {}
  for i = 1, numkeys do keys[i] = args[i] end
  for i = numkeys + 1, n do argv[i - numkeys] = args[i] end
  return keys, argv
end

local function call_function(f, name, numkeys, ...)
  local keys, argv = split(numkeys, ...)
  local ok, reply = xpcall(function() return f(keys, argv) end, handler)
  if ok then return true, reply end
  return false, failure(reply, name)
end

local function run(f, sha, numkeys, ...)
  local keys, argv = split(numkeys, ...)
  rawset(env, 'KEYS', keys)
  rawset(env, 'ARGV', argv)
  local ok, reply = xpcall(f, handler)
  if ok then return true, reply end
  return false, failure(reply, sha)
end

return compile, run, null, load_library, call_function
"""

_NO_ARGS = b"ERR Please specify at least one argument for this redis lib call"
_BAD_ARG = b"ERR Lua redis lib command arguments must be strings or integers"
_UNKNOWN = b"ERR Unknown Redis command called from script"
_WRONG_ARITY = b"ERR Wrong number of args calling Redis command from script"
_NOT_IN_SCRIPT = b"ERR This Redis command is not allowed from script"
_ARITY_ERRORS = ("ERR wrong number of arguments", "ERR Wrong number of args")
_LLONG_MIN = -(2**63)


def _number_arg(value: Any) -> bytes:
    """A Lua number as Redis passes it to a command (``%.17g``); anything else but a string
    is refused."""
    kind = type(value)
    if kind is int and -(10**17) < value < 10**17:
        return b"%d" % value
    if kind is int or kind is float:
        return b"%.17g" % value
    raise TypeError


_LOG_LEVELS = {0: logging.DEBUG, 1: logging.INFO, 2: logging.INFO, 3: logging.WARNING}


@dataclass(frozen=True, slots=True)
class _Layout:
    struct: struct.Struct
    integers: tuple[bool, ...]  # per value: packed as an integer (Lua passes a number)


# Lua struct's codes (as in Redis: C sizes of a 64-bit machine) in Python struct's terms.
_STRUCT_CODES = {"b": "b", "B": "B", "h": "h", "H": "H", "l": "q", "L": "Q", "T": "Q"}
_STRUCT_INTS = {1: "b", 2: "h", 4: "i", 8: "q"}


@functools.lru_cache(maxsize=256)
def _struct_layout(fmt: bytes) -> _Layout:
    """Redis's ``struct`` formats, but for alignment (``!``) and zero-terminated strings
    (``s``), which raise."""
    text = fmt.decode("ascii")
    order, out, integers, i = "<", [], [], 0
    while i < len(text):
        code = text[i]
        i += 1
        digits = ""
        while i < len(text) and text[i].isdigit():
            digits += text[i]
            i += 1
        if code in "<>=":
            order = ">" if code == ">" else "<"
        elif code == " ":
            continue
        elif code in _STRUCT_CODES:
            out.append(_STRUCT_CODES[code])
            integers.append(True)
        elif code in "iI":
            size = int(digits or 4)
            if size not in _STRUCT_INTS:
                raise ValueError(f"integral size {size} is not supported")
            py = _STRUCT_INTS[size]
            out.append(py if code == "i" else py.upper())
            integers.append(True)
        elif code in "fd":
            out.append(code)
            integers.append(False)
        elif code == "x":
            out.append("x")
        elif code == "c" and digits and int(digits) > 0:
            out.append(f"{digits}s")
            integers.append(False)
        else:
            raise ValueError(f"format option '{code}' is not supported by the embedded store")
    return _Layout(struct.Struct(order + "".join(out)), tuple(integers))


@dataclass(frozen=True, slots=True)
class _Plan:
    """How a command's arguments are read, for one count of arguments."""

    decoders: tuple[tuple[int, Any], ...]  # (position, decode) of the typed non-key args
    keys: tuple[tuple[int, Key], ...]  # (position, Key) of the key args
    create: bool  # a missing key of a known type starts empty
    convert: bool  # the reply goes through convert_to_resp2
    remove_empty: bool  # writeback removes a key left empty
    event: bytes  # the keyspace notification's event name


class LuaScripts:
    """One server's Lua runtime and its compiled scripts. Used only under the server's
    lock (every command runs under it), which is what makes a script atomic."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self._lua = lua51.LuaRuntime(
            encoding=None, unpack_returned_tuples=True, register_eval=False, register_builtins=False
        )
        self._table = self._lua.table_from
        self._compiled: dict[bytes, Any] = {}
        self._socket: Any = None  # the connection whose script is running
        self._commands: dict[bytes, Any] = {}  # a command as a script names it -> its signature
        self._plans: dict[tuple[Any, int], _Plan] = {}
        version = ".".join(str(v) for v in (*server.version, 0, 0)[:3])
        major, minor, patch = (int(v) for v in version.split("."))
        (
            self._compile,
            self._run,
            self._null,
            self._load_library,
            self._call_function,
        ) = self._lua.execute(
            _BOOT,
            self._call,
            self._encode,
            self._decode,
            self._pack,
            self._unpack,
            self._size,
            self._log,
            self._sha1,
            version.encode(),
            major << 16 | minor << 8 | patch,
        )

    # ------------------------------------------------------------------ scripts

    def load(self, sha: bytes, source: bytes) -> None:
        """Compile ``source`` unless already compiled; a syntax error raises it as Redis
        words it."""
        if sha in self._compiled:
            return
        compiled, error = self._compile(source)
        if compiled is None:
            text = error.decode("utf-8", "replace")
            raise SimpleError(f"ERR Error compiling script (new function): {text}")
        self._compiled[sha] = compiled

    def forget(self) -> None:
        self._compiled.clear()

    def run(
        self, socket: Any, sha: bytes, source: bytes, numkeys: int, args: tuple[bytes, ...]
    ) -> Any:
        """Run a script on ``socket``'s behalf: its reply as fakeredis replies, or raise its
        error."""
        compiled = self._compiled.get(sha)
        if compiled is None:
            self.load(sha, source)
            compiled = self._compiled[sha]
        return self._invoke(socket, self._run, compiled, sha, numkeys, *args)

    def library(self, body: bytes) -> dict[bytes, Any]:
        """Run a function library's code (what follows its first line): the functions it
        registers, by name; its errors raise as Redis words them."""
        functions, error = self._load_library(body)
        if functions is None:
            raise SimpleError("ERR " + error.decode("utf-8", "replace"))
        return dict(functions.items())

    def call_function(
        self, socket: Any, name: bytes, callback: Any, numkeys: int, args: tuple[bytes, ...]
    ) -> Any:
        """Run a library's function on ``socket``'s behalf (as :meth:`run` runs a script)."""
        return self._invoke(socket, self._call_function, callback, name, numkeys, *args)

    def _invoke(self, socket: Any, runner: Any, *args: Any) -> Any:
        """Call the Lua ``runner`` (the boot code's run or call_function) with ``socket``'s
        commands in reach: its reply as fakeredis replies, or raise its error."""
        self._socket = socket
        try:
            ok, reply = runner(*args)
        finally:
            self._socket = None
        if not ok:
            raise SimpleError(reply.decode("utf-8", "replace"))
        reply = self._reply(reply)
        if type(reply) is SimpleError:
            raise reply
        return reply

    def _reply(self, value: Any) -> Any:
        """A Lua value as Redis turns it into a reply."""
        kind = type(value)
        if kind is bytes or kind is int or value is None:
            return value
        if kind is float:
            return int(value) if math.isfinite(value) and abs(value) < 2**63 else _LLONG_MIN
        if kind is bool:
            return 1 if value else None
        if lua51.lua_type(value) != "table":
            return None
        err = value[b"err"]
        if type(err) is bytes:
            return SimpleError(err.decode("utf-8", "replace"))
        ok = value[b"ok"]
        if type(ok) is bytes:
            return SimpleString(ok)
        out = []
        index = 1
        item = value[1]
        while item is not None:
            out.append(self._reply(item))
            index += 1
            item = value[index]
        return out

    # ------------------------------------------------------------------ from Lua

    def _call(self, *args: Any) -> Any:
        """``redis.call``: the command's reply as a Lua value, or ``(nil, error)``."""
        try:
            parts = [a if type(a) is bytes else _number_arg(a) for a in args]
        except TypeError:
            return None, _BAD_ARG
        if not parts:
            return None, _NO_ARGS
        op = parts.pop(0)
        socket = self._socket
        sig = self._commands.get(op)
        if sig is not None:
            func = getattr(socket, sig.func_name)
        else:
            name = op.decode("utf-8", "replace").lower()
            container = name in COMMANDS_WITH_SUB
            if container and parts:
                name += " " + parts.pop(0).decode("utf-8", "replace").lower()
            try:
                func, sig = socket._name_to_func(name)
            except SimpleError:
                return None, _UNKNOWN
            if func is None:
                return None, _WRONG_ARITY
            if not container and len(self._commands) < 1024:
                self._commands[op] = sig
        result = self._run_command(socket, func, sig, parts)
        if type(result) is bytes or type(result) is int:
            return result
        return self._to_lua(result, top=True)

    def _run_command(self, socket: Any, func: Any, sig: Any, parts: list[bytes]) -> Any:
        """fakeredis's ``_run_command`` for a script's call on a Redis-type server, with its
        arguments' types worked out once per command and count of arguments."""
        if socket.server_type != "redis":  # pragma: no cover - the embedded store is Redis
            return socket._run_command(func, sig, parts, True)
        plan = self._plans.get((sig, len(parts)))
        if plan is None:
            try:
                plan = self._plan(sig, len(parts), socket.version)
            except SimpleError as exc:
                return exc
        socket._subkey_events = []
        items: list[CommandItem] = []
        try:
            db = socket._db
            args: list[Any] = parts
            for i, decode in plan.decoders:
                args[i] = decode(args[i])
            for i, key in plan.keys:
                if key.missing_return is not Key.UNSPECIFIED and args[i] not in db:
                    return key.missing_return
            for i, key in plan.keys:
                item = db.get(args[i])
                if key.type_ is not None and item is not None and type(item.value) is not key.type_:
                    raise SimpleError(msgs.WRONGTYPE_MSG)
                default = None
                if (
                    plan.create
                    and key.type_ is not None
                    and item is None
                    and key.type_ is not bytes
                ):
                    default = key.type_()
                args[i] = CommandItem(args[i], db, item, default=default)
                items.append(args[i])
            result = func(*args)
            if plan.convert and type(result) is not bytes and type(result) is not int:
                result = convert_to_resp2(result, socket.server_type)
        except SimpleError as exc:
            result = exc
        for item in items:
            item.writeback(remove_empty_val=plan.remove_empty)
        socket._keyspace_notifications(items, plan.event)
        socket._subkey_notifications(items)
        return result

    def _plan(self, sig: Any, count: int, version: Any) -> _Plan:
        sig.check_arity([None] * count, version)  # raises as fakeredis would
        if msgs.FLAG_NO_SCRIPT in sig.flags:
            raise SimpleError(msgs.COMMAND_IN_SCRIPT_MSG)
        types = [*sig.fixed]
        types.extend(sig.repeat[i % len(sig.repeat)] for i in range(count - len(types)))
        plan = _Plan(
            decoders=tuple(
                (i, t.decode)
                for i, t in enumerate(types)
                if not isinstance(t, Key) and t is not bytes
            ),
            keys=tuple((i, t) for i, t in enumerate(types) if isinstance(t, Key)),
            create=msgs.FLAG_DO_NOT_CREATE not in sig.flags,
            convert=msgs.FLAG_SKIP_CONVERT_TO_RESP2 not in sig.flags,
            remove_empty=msgs.FLAG_LEAVE_EMPTY_VAL not in sig.flags,
            event=sig.name.encode(),
        )
        if len(self._plans) < 1024:
            self._plans[(sig, count)] = plan
        return plan

    def _to_lua(self, value: Any, top: bool = False) -> Any:
        if type(value) is bytes or type(value) is int:
            return value
        if value is None:
            return False
        if isinstance(value, list):
            return self._table([v if type(v) is bytes else self._to_lua(v) for v in value])
        if isinstance(value, SimpleString):
            return self._table({b"ok": value.value})
        if isinstance(value, SimpleError):
            if not top:
                return self._table({b"err": value.value.encode()})
            if value.value == msgs.COMMAND_IN_SCRIPT_MSG:
                return None, _NOT_IN_SCRIPT
            if value.value.startswith(_ARITY_ERRORS):
                return None, _WRONG_ARITY
            return None, value.value.encode()
        if isinstance(value, float):
            return Float.encode(value, humanfriendly=False)
        if isinstance(value, str):
            return value.encode()
        if isinstance(value, dict):
            flat = [self._to_lua(v) for pair in value.items() for v in pair]
            return self._table(flat)
        if isinstance(value, (set, tuple)):
            return self._table([self._to_lua(v) for v in value])
        raise TypeError(f"unexpected reply type from a command: {type(value).__name__}")

    def _encode(self, value: Any) -> Any:
        try:
            return json.dumps(self._plain(value, 0), separators=(",", ":")).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            return None, f"Cannot serialise: {exc}".encode()

    def _plain(self, value: Any, depth: int) -> Any:
        """A Lua value as what ``json`` writes (cjson's rules: a table with keys 1..n is an
        array, any other table an object)."""
        if depth > 1000:
            raise ValueError("Cannot serialise, excessive nesting (1001)")
        kind = lua51.lua_type(value)
        if kind == "table":
            items = list(value.items())
            keys = [k for k, _ in items]
            if (
                items
                and all(type(k) is int for k in keys)
                and sorted(keys) == list(range(1, len(keys) + 1))
            ):
                return [self._plain(v, depth + 1) for _, v in sorted(items)]
            return {
                (k.decode("utf-8", "replace") if type(k) is bytes else str(k)): self._plain(
                    v, depth + 1
                )
                for k, v in items
            }
        if kind == "userdata":  # cjson.null: the only userdata a script can reach
            return None
        if type(value) is bytes:
            return value.decode("utf-8", "surrogateescape")
        if type(value) is float and not math.isfinite(value):
            raise ValueError("Cannot serialise number: must not be NaN or Inf")
        return value

    def _decode(self, text: Any) -> Any:
        if type(text) is not bytes:
            return None, b"bad argument #1 to 'decode' (string expected)"
        try:
            value = json.loads(text)
        except ValueError as exc:
            return None, f"Expected value but found invalid token: {exc}".encode()
        return self._from_json(value)

    def _from_json(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.encode()
        if value is None:
            return self._null
        if isinstance(value, list):
            return self._table([self._from_json(v) for v in value])
        if isinstance(value, dict):
            return self._table({k.encode(): self._from_json(v) for k, v in value.items()})
        return value

    def _pack(self, fmt: Any, *values: Any) -> Any:
        try:
            layout = _struct_layout(fmt)
            converted = [
                int(v) if integer else v
                for v, integer in zip(values, layout.integers, strict=False)
            ]
            return layout.struct.pack(*converted)
        except (struct.error, TypeError, ValueError) as exc:
            return None, f"struct.pack: {exc}".encode()

    def _unpack(self, fmt: Any, data: Any, pos: Any) -> Any:
        try:
            layout = _struct_layout(fmt)
            start = int(pos) - 1
            values = layout.struct.unpack_from(data, start)
        except (struct.error, TypeError, ValueError) as exc:
            return None, f"struct.unpack: {exc}".encode()
        out = self._table([*values, start + layout.struct.size + 1])
        out[b"n"] = len(values) + 1
        return out

    def _size(self, fmt: Any) -> Any:
        try:
            return _struct_layout(fmt).struct.size
        except (struct.error, TypeError, ValueError) as exc:
            return None, f"struct.size: {exc}".encode()

    @staticmethod
    def _log(level: Any, *parts: Any) -> None:
        text = " ".join(p.decode("utf-8", "replace") if type(p) is bytes else str(p) for p in parts)
        _log.log(_LOG_LEVELS.get(level, logging.WARNING), text)

    @staticmethod
    def _sha1(data: bytes) -> bytes:
        return hashlib.sha1(data).hexdigest().encode()


class EmbeddedServer(fakeredis.FakeServer):
    """A fakeredis server that owns one :class:`LuaScripts`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lua_scripts = LuaScripts(self)


def _scripts(socket: Any) -> LuaScripts:
    server = socket._server
    scripts: LuaScripts | None = getattr(server, "lua_scripts", None)
    if scripts is None:  # a plain FakeServer: give it one
        scripts = server.lua_scripts = LuaScripts(server)
    return scripts


class _Functions(FunctionsEngine):
    """fakeredis's function libraries (LOAD, LIST, DELETE, FLUSH, DUMP, RESTORE), their code
    run by the server's :class:`LuaScripts`: a library's code runs once and its functions
    keep their library's state between calls, as in Redis."""

    def __init__(self, server: Any, scripts: LuaScripts) -> None:
        # (fakeredis's own Lua runtime for functions is never used: not made)
        self._scripts = scripts
        self._server_type = server.server_type
        self._version = server.version
        self.libraries: dict[bytes, FunctionLibrary] = {}

    def _create_library(self, name: bytes, code: bytes, body: bytes) -> FunctionLibrary:
        functions = {
            fname: LuaFunction(name=fname, callback=callback, description=None, flags=[])
            for fname, callback in self._scripts.library(body).items()
        }
        if not functions:
            raise SimpleError(msgs.FUNCTION_NO_FUNCTIONS_MSG)
        return FunctionLibrary(name=name, code=code, functions=functions)


def _functions(socket: Any) -> _Functions:
    server = socket._server
    engine = getattr(server, "_lua_functions", None)
    if not isinstance(engine, _Functions):
        engine = server._lua_functions = _Functions(server, _scripts(socket))
    return engine


class _Scripting:
    """EVAL, EVALSHA and SCRIPT LOAD/FLUSH through :class:`LuaScripts`. The methods keep
    fakeredis's names, so fakeredis's command table (arity, flags) dispatches to them."""

    _server: Any
    _script_resp: int | None
    _fieldsets: dict[Any, Any]

    def eval(self, script: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        sha = hashlib.sha1(script).hexdigest().encode()
        self._server.script_cache[sha] = script
        return self._eval(sha, script, numkeys, keys_and_args)

    def evalsha(self, sha1: bytes, numkeys: int, *keys_and_args: bytes) -> Any:
        sha = sha1.lower()
        script = self._server.script_cache.get(sha)
        if script is None:
            raise SimpleError(msgs.NO_MATCHING_SCRIPT_MSG)
        return self._eval(sha, script, numkeys, keys_and_args)

    def _eval(self, sha: bytes, script: bytes, numkeys: int, args: tuple[bytes, ...]) -> Any:
        if numkeys > len(args):
            raise SimpleError(msgs.TOO_MANY_KEYS_MSG)
        if numkeys < 0:
            raise SimpleError(msgs.NEGATIVE_KEYS_MSG)
        # A script's redis.call replies are RESP2 whatever the client speaks, and it sees
        # none of the caller's HIMPORT field sets (as in fakeredis's own EVAL).
        self._script_resp = 2
        caller_fieldsets, self._fieldsets = self._fieldsets, {}
        try:
            return _scripts(self).run(self, sha, script, numkeys, args)
        finally:
            self._script_resp = None
            self._fieldsets = caller_fieldsets

    def _functions(self) -> _Functions:
        return _functions(self)

    def fcall(self, function_name: bytes, numkeys: bytes | int, *keys_and_args: bytes) -> Any:
        return self._fcall_embedded(function_name, numkeys, keys_and_args, read_only=False)

    def fcall_ro(self, function_name: bytes, numkeys: bytes | int, *keys_and_args: bytes) -> Any:
        return self._fcall_embedded(function_name, numkeys, keys_and_args, read_only=True)

    def _fcall_embedded(
        self, name: bytes, numkeys_arg: bytes | int, args: tuple[bytes, ...], read_only: bool
    ) -> Any:
        function = _functions(self).find(name)
        if function is None:
            raise SimpleError(msgs.FUNCTION_NOT_FOUND_MSG)
        if isinstance(numkeys_arg, int):  # (sent by the direct path)
            numkeys = numkeys_arg
        else:
            numkeys = Int.decode(numkeys_arg, decode_error=msgs.FUNCTION_BAD_NUMKEYS_MSG)
        if numkeys > len(args):
            raise SimpleError(msgs.TOO_MANY_KEYS_MSG)
        if numkeys < 0:
            raise SimpleError(msgs.NEGATIVE_KEYS_MSG)
        if read_only:  # a library registers no function with the no-writes flag here
            raise SimpleError(msgs.FUNCTION_WRITE_FLAG_RO_MSG)
        self._script_resp = 2
        caller_fieldsets, self._fieldsets = self._fieldsets, {}
        try:
            return _scripts(self).call_function(self, name, function.callback, numkeys, args)
        finally:
            self._script_resp = None
            self._fieldsets = caller_fieldsets

    def script_load(self, *args: bytes) -> bytes:
        if len(args) != 1:
            raise SimpleError(msgs.BAD_SUBCOMMAND_MSG.format("SCRIPT"))
        sha = hashlib.sha1(args[0]).hexdigest().encode()
        _scripts(self).load(sha, args[0])  # a script that does not compile is not stored
        self._server.script_cache[sha] = args[0]
        return sha

    def script_flush(self, *args: bytes) -> Any:
        reply = super().script_flush(*args)  # type: ignore[misc]
        _scripts(self).forget()
        return reply


class EmbeddedSocket(_Scripting, FakeSocket):
    """A fakeredis connection whose scripts run through :class:`LuaScripts`."""


class EmbeddedAsyncSocket(_Scripting, AsyncFakeSocket):
    """The same, for ``fakeredis.FakeAsyncRedis``."""


class _Connection(FakeRedisConnection):
    def _connect(self) -> EmbeddedSocket:
        server = self._server
        if server is None or not server.connected:
            raise self._connection_error_class(msgs.CONNECTION_ERROR_MSG)
        return EmbeddedSocket(
            server,
            client_class=self._client_class,
            db=self.db,
            lua_modules=self._lua_modules,
            client_info=self._client_info,
        )


class _AsyncConnection(FakeAsyncRedisConnection):
    async def _connect(self) -> None:
        server = self._server
        if server is None or not server.connected:
            raise self._connection_error_class(msgs.CONNECTION_ERROR_MSG)
        self._sock = EmbeddedAsyncSocket(
            server,
            self.db,
            client_class=self._client_class,
            lua_modules=self._lua_modules,
            client_info=self._client_info,
        )
        self._reader = FakeReader(self._sock)
        self._writer = FakeWriter(self._sock)


# Commands run straight on the server, without the protocol round trip through a fake
# connection (encoding, parsing, a reply queue): what keypool's hot path sends.
_DIRECT = frozenset({"EVALSHA", "EVAL", "FCALL", "evalsha", "eval", "fcall"})


class _Direct:
    """Runs scripts on the server directly, as fakeredis runs any command received on a
    connection (the server's lock, the clock for expiry, arity) but with no connection."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self._server = server
        self._socket: EmbeddedSocket | None = None

    def __call__(self, encoder: Any, callbacks: Any, args: tuple[Any, ...]) -> Any:
        server = self._server
        if not server.connected:
            raise redis.ConnectionError(msgs.CONNECTION_ERROR_MSG)
        socket = self._socket
        if socket is None:
            socket = self._socket = EmbeddedSocket(server, 0, client_class=redis.Redis)
        encoding, errors = encoder.encoding, encoder.encoding_errors
        fields = [
            a
            if type(a) is bytes
            else a.encode(encoding, errors)
            if type(a) is str
            else encoder.encode(a)
            for a in args[1:]
        ]
        name = str(args[0]).lower()
        run = socket.eval if name == "eval" else socket.fcall if name == "fcall" else socket.evalsha
        with server.lock:
            try:
                if len(fields) < 2:
                    raise SimpleError(msgs.WRONG_ARGS_MSG6.format(name))
                numkeys = Int.decode(fields[1])
                now = time.time()
                for db in server.dbs.values():
                    db.time = now
                # a script's reply needs none of the conversions _run_command makes
                result = run(fields[0], numkeys, *fields[2:])
            except SimpleError as exc:
                result = exc
        kind = type(result)
        if kind is bytes:
            result = encoder.decode(result)
        elif kind is not int and result is not None:
            result = socket._decode_result(result)  # SimpleString, SimpleError, nested
            if isinstance(result, Exception):
                raise result
            result = _decoded(encoder, result)
        callback = callbacks.get(args[0])
        return result if callback is None else callback(result)


def _decoded(encoder: Any, value: Any) -> Any:
    """``value`` as the client reads it (``encoder.decode`` leaves bytes alone unless the
    client decodes responses)."""
    if type(value) is bytes:
        return encoder.decode(value)
    if type(value) is list:
        return [_decoded(encoder, v) for v in value]
    return value


class EmbeddedRedis(fakeredis.FakeRedis):
    """``fakeredis.FakeRedis`` on an embedded server: scripts run through
    :class:`LuaScripts`, and EVAL/EVALSHA/FCALL sent by this client (not by its pipelines) skip
    the fake connection."""

    def __init__(self, *args: Any, server: fakeredis.FakeServer, **kwargs: Any) -> None:
        kwargs.setdefault("connection_class", _Connection)
        super().__init__(*args, server=server, **kwargs)
        self._direct = _Direct(server)
        self._encoder = self.get_encoder()

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if args and args[0] in _DIRECT and self.connection is None:
            return self._direct(self._encoder, self.response_callbacks, args)
        return super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


class EmbeddedAsyncRedis(fakeredis.FakeAsyncRedis):
    """The ``fakeredis.FakeAsyncRedis`` twin of :class:`EmbeddedRedis`. A script runs to
    its end under the server's lock, as every command of fakeredis's asyncio client does."""

    def __init__(self, *args: Any, server: fakeredis.FakeServer, **kwargs: Any) -> None:
        kwargs.setdefault("connection_class", _AsyncConnection)
        super().__init__(*args, server=server, **kwargs)
        self._direct = _Direct(server)
        self._encoder = self.get_encoder()  # type: ignore[no-untyped-call]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        if args and args[0] in _DIRECT and self.connection is None:
            return self._direct(self._encoder, self.response_callbacks, args)
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def client(server: fakeredis.FakeServer, **kwargs: Any) -> EmbeddedRedis:
    """A client of the embedded ``server`` (a redis-py ``Redis``); ``kwargs`` go to
    ``FakeRedis`` (e.g. ``decode_responses``)."""
    return EmbeddedRedis(server=server, **kwargs)


def async_client(server: fakeredis.FakeServer, **kwargs: Any) -> EmbeddedAsyncRedis:
    """An asyncio client of the embedded ``server`` (a ``redis.asyncio.Redis``)."""
    return EmbeddedAsyncRedis(server=server, **kwargs)
