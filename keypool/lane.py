"""The hot path's own connection: one per thread, commands written and read directly.

A pool decision is one script call. Sent through redis-py's generic ``execute_command``,
a call also pays for the connection pool's lock, the retry wrapper and the client's
instrumentation — on a fast loopback as much again as the round trip itself. A lane
holds one connection per thread and writes and reads the script call on it directly,
with the same rules: one immediate retry after a dropped connection, a reload after
NOSCRIPT.

A lane can also *send* a call without waiting for its reply (``send_unconfirmed``): Redis
runs it at once, in order with everything else on the connection, and the reply is read
with the lane's next call (or by :meth:`Lane.settle`). Lease reports use this, so that a
busy worker's acquire-call-report cycle costs one round trip. A call is only sent that way
on a connection in use a moment ago, with nothing unexpected to read, and running that
script already; otherwise (an idle connection the server or a proxy may have dropped, a
fresh one) it waits for its reply like any other call.

Every call ends as a *settled* triple ``(Unconfirmed, reply, error)`` handed back to the
caller: the reply, or the error (a refusal to run it, or a connection lost before its
reply came, when whether it ran is unknown).
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from redis.exceptions import NoPermissionError, NoScriptError

from . import scripts

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # hiredis packs a command in one C call (redis-py's packer checks each argument)
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is optional
    _pack = None

__all__ = ["Lane", "Unconfirmed"]

# Unread replies a lane keeps before it reads them anyway (so a thread that only reports
# cannot pile up replies on the server).
MAX_UNCONFIRMED = 64
# A connection unused for longer than this may have been closed by the server (`timeout`)
# or a proxy: a report sent on it waits for its reply (and is sent again if it was lost).
FRESH_SECONDS = 1.0
# A connection that answered within this long is taken as alive without a look at it.
PROVEN_SECONDS = 0.02

Settled = tuple["Unconfirmed", Any, BaseException | None]


@dataclass(slots=True)
class Unconfirmed:
    """A call sent without waiting; ``then`` gets its reply (or the exception) later."""

    script: scripts.Script
    keys: list[str]
    args: list[Any]
    then: Callable[[Any, BaseException | None], None]


class Lane:
    """One thread's connection to a standalone Redis (or one behind Sentinel)."""

    __slots__ = (
        "__weakref__",
        "_again",
        "_conn",
        "_done",
        "_functions",
        "_heads",
        "_loaded",
        "_lock",
        "_unconfirmed",
        "_used",
        "pid",
    )

    def __init__(self, connection_pool: Any) -> None:
        # A connection of its own, made from the pool's settings but not counted against
        # its max_connections (the lane lives as long as its thread).
        kwargs = dict(connection_pool.connection_kwargs)
        self._conn: Any = connection_pool.connection_class(**kwargs)
        self._lock = threading.Lock()
        self._unconfirmed: list[Unconfirmed] = []
        self._again: list[tuple[Unconfirmed, BaseException]] = []  # refused: not run
        self._done: list[Settled] = []
        # scripts this connection has run: only those are sent unconfirmed, so that a
        # NOSCRIPT refusal (and the call sent again after it) cannot overtake a later call
        self._loaded: set[str] = set()
        # FCALL until the server shows it has no functions for us (Redis 6, an ACL)
        self._functions = True
        self._heads: dict[tuple[str, bool, str, str, int], bytes] = {}
        self._used = 0.0  # monotonic time of the last reply read
        self.pid = os.getpid()

    @property
    def uses_functions(self) -> bool:
        """Whether calls go by FCALL (else EVALSHA)."""
        return self._functions

    @property
    def busy(self) -> bool:
        """Whether replies are still to be read (or settled calls handed back)."""
        return bool(self._unconfirmed or self._done or self._again)

    def run(
        self, script: scripts.Script, keys: list[str], args: list[Any]
    ) -> tuple[Any, list[Settled]]:
        """Call the script and wait for its reply. Returns the reply and the calls settled
        meanwhile, for the caller to hand on once it is done with this call."""
        with self._lock:
            try:
                try:
                    self._send(script, keys, args)
                    self._read_replies()
                    try:
                        reply = self._conn.read_response()
                        self._loaded.add(self._code(script))
                    except redis.ResponseError as exc:
                        if not self._refused(exc):
                            raise
                        # refused like the calls sent before it: those go again first
                        self._call_again()
                        reply = self._load_and_call(script, keys, args, exc)
                except redis.ConnectionError as exc:
                    # dropped while idle (a server restarted, a failover): once more, on a
                    # fresh connection
                    self._drop(exc)
                    reply = self._call(script, keys, args)
                self._call_again()
                self._used = time.monotonic()
                return reply, self._take_done()
            except BaseException as exc:
                if not isinstance(exc, redis.ResponseError):
                    self._drop(exc)
                elif self._again and self._conn._sock is not None:
                    self._call_again()  # the connection is fine: refused calls go again
                raise

    def send_unconfirmed(self, call: Unconfirmed) -> list[Settled]:
        """Send the call and return without its reply when that is safe (see the module);
        otherwise call it and wait. Returns the calls settled meanwhile, like :meth:`run`."""
        with self._lock:
            try:
                if self._unconfirmed and (
                    len(self._unconfirmed) >= MAX_UNCONFIRMED
                    or time.monotonic() - self._used > FRESH_SECONDS
                ):
                    self._read_replies()
                    self._call_again()
                if self._may_send_unconfirmed(call.script):
                    # in the list before it is sent: whatever interrupts the send, its reply
                    # cannot go to another call
                    self._unconfirmed.append(call)
                    try:
                        self._send(call.script, call.keys, call.args)
                        return self._take_done()
                    except redis.ConnectionError as exc:
                        # not sent: a confirmed call on a fresh connection instead
                        self._unconfirmed.pop()
                        self._drop(exc)
                        reply = self._call(call.script, call.keys, call.args)
                else:
                    self._read_replies()
                    self._call_again()
                    try:
                        reply = self._call(call.script, call.keys, call.args)
                    except redis.ConnectionError as exc:
                        self._drop(exc)
                        reply = self._call(call.script, call.keys, call.args)
                self._used = time.monotonic()
                self._done.append((call, reply, None))
                return self._take_done()
            except BaseException as exc:
                if not isinstance(exc, redis.ResponseError):
                    self._drop(exc)
                raise

    def _may_send_unconfirmed(self, script: scripts.Script) -> bool:
        """A connection in use a moment ago, running this script already, and (when no
        reply is due) with nothing to read: no sign the server closed it."""
        if self._conn._sock is None or self._code(script) not in self._loaded:
            return False
        idle = time.monotonic() - self._used
        if idle > FRESH_SECONDS:
            return False
        # a reply read a few milliseconds ago is proof enough (and saves a system call)
        return idle < PROVEN_SECONDS or bool(self._unconfirmed) or self._quiet()

    def _quiet(self) -> bool:
        """Nothing to read on the socket (no end-of-stream from a server that closed it)."""
        sock = self._conn._sock
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def settle(self) -> list[Settled]:
        """Read every reply still unread; returns the settled calls (see :meth:`run`)."""
        with self._lock:
            try:
                self._read_replies()
                self._call_again()
            except BaseException as exc:
                if not isinstance(exc, redis.ResponseError):
                    self._drop(exc)
                if not isinstance(exc, Exception):
                    raise
            return self._take_done()

    def close(self) -> list[Settled]:
        """Settle what is unread, then close the connection."""
        settled = self.settle() if self.pid == os.getpid() else []
        with self._lock:
            self._conn.disconnect()
        return settled

    # ------------------------------------------------------------------ internals

    def _code(self, script: scripts.Script) -> str:
        return script.function if self._functions else script.sha

    def _send(self, script: scripts.Script, keys: list[str], args: list[Any]) -> None:
        conn = self._conn
        if conn._sock is None:
            # connect() as the pool would: a Sentinel-managed connection asks the Sentinels
            # for the master there (sending on an unconnected one would not)
            conn.connect()
        if _pack is None:
            verb, name = ("FCALL", script.function) if self._functions else ("EVALSHA", script.sha)
            packed = conn.pack_command(verb, name, len(keys), *keys, *args)
        else:
            # the call's fixed part (command, name, keys, prefix) is packed once per provider
            head_key = (script.name, self._functions, keys[0], args[0], len(args))
            head = self._heads.get(head_key)
            if head is None:
                head = self._heads[head_key] = self._head(script, keys, args)
            rest = _pack(tuple(args[1:]))
            packed = [head + rest[rest.index(b"\n") + 1 :]]
        conn.send_packed_command(packed, check_health=False)

    def _head(self, script: scripts.Script, keys: list[str], args: list[Any]) -> bytes:
        assert _pack is not None
        verb, name = ("FCALL", script.function) if self._functions else ("EVALSHA", script.sha)
        fixed = _pack((verb, name, len(keys), *keys, args[0]))
        total = 3 + len(keys) + len(args)
        return b"*%d\r\n" % total + fixed[fixed.index(b"\n") + 1 :]

    def _call(self, script: scripts.Script, keys: list[str], args: list[Any]) -> Any:
        self._send(script, keys, args)
        try:
            reply = self._conn.read_response()
        except redis.ResponseError as exc:
            if not self._refused(exc):
                raise
            return self._load_and_call(script, keys, args, exc)
        self._loaded.add(self._code(script))
        return reply

    def _refused(self, exc: redis.ResponseError) -> bool:
        """Whether the server refused the call without running it, for want of the code:
        a flushed script cache, no functions loaded, or none to be had."""
        if isinstance(exc, NoScriptError):
            return True
        if not self._functions:
            return False
        text = str(exc).lower()
        return (
            "function not found" in text
            or "unknown command" in text
            or (isinstance(exc, NoPermissionError) and "'fcall'" in text)
        )

    def _load_and_call(
        self, script: scripts.Script, keys: list[str], args: list[Any], refusal: BaseException
    ) -> Any:
        """Load what the server lacks and call again: the function library once (else fall
        back to scripts for good), scripts up to RELOADS times."""
        missing = "function not found" in str(refusal).lower()
        if self._functions and missing and self._load_library():
            self._send(script, keys, args)
            try:
                reply = self._conn.read_response()
            except redis.ResponseError as exc:
                if not self._refused(exc):
                    raise
            else:
                self._loaded.add(self._code(script))
                return reply
        self._functions = False
        for _attempt in range(scripts.RELOADS):
            self._conn.connect()
            self._conn.send_command("SCRIPT", "LOAD", script.source)
            self._conn.read_response()
            self._send(script, keys, args)
            try:
                reply = self._conn.read_response()
            except NoScriptError:
                continue
            self._loaded.add(script.sha)
            return reply
        raise NoScriptError(f"the server keeps losing script {script.name!r}")

    def _load_library(self) -> bool:
        self._conn.connect()
        self._conn.send_command("FUNCTION", "LOAD", scripts.library_source())
        try:
            self._conn.read_response()
        except redis.ResponseError as exc:
            # loaded meanwhile by another process: fine; anything else: no functions here
            return "already exists" in str(exc)
        return True

    def _drop(self, exc: BaseException) -> None:
        """The connection broke (or a read or write was cut short): close it, so the next
        call reconnects; whether the calls still unconfirmed ran is unknown. Calls refused
        unrun stay to be sent again."""
        self._conn.disconnect()
        self._loaded.clear()
        self._done.extend((call, None, exc) for call in self._unconfirmed)
        self._unconfirmed.clear()

    def _take_done(self) -> list[Settled]:
        if not self._done:
            return []
        done, self._done = self._done, []
        return done

    def _read_replies(self) -> None:
        """Read the unconfirmed replies, in order. Calls refused unrun (the code was
        missing) are kept in ``_again``, to be sent once nothing else is in flight."""
        while self._unconfirmed:
            call = self._unconfirmed[0]
            try:
                reply = self._conn.read_response()
            except redis.ResponseError as exc:
                self._unconfirmed.pop(0)
                if self._refused(exc):
                    self._again.append((call, exc))
                else:
                    self._done.append((call, None, exc))
                continue
            self._unconfirmed.pop(0)
            self._used = time.monotonic()
            self._done.append((call, reply, None))

    def _call_again(self) -> None:
        """Send the refused calls again (nothing else may be in flight)."""
        while self._again:
            call, refusal = self._again[0]
            try:
                reply = self._load_and_call(call.script, call.keys, call.args, refusal)
            except redis.ResponseError as exc:
                self._again.pop(0)
                self._done.append((call, None, exc))
                continue
            self._again.pop(0)
            self._done.append((call, reply, None))
