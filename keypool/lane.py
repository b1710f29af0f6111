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
worker's acquire-call-report cycle costs one round trip.
"""

from __future__ import annotations

import os
import threading
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


@dataclass(slots=True)
class Unconfirmed:
    """A call sent without waiting; ``then`` gets its reply (or the exception) later."""

    script: scripts.Script
    keys: list[str]
    args: list[Any]
    then: Callable[[Any, BaseException | None], None]


class Lane:
    """One thread's connection to a standalone Redis (or the embedded store)."""

    __slots__ = (
        "__weakref__",
        "_conn",
        "_done",
        "_functions",
        "_heads",
        "_loaded",
        "_lock",
        "_pool",
        "_unconfirmed",
        "pid",
    )

    def __init__(self, connection_pool: Any) -> None:
        self._pool = connection_pool
        self._conn: Any = connection_pool.make_connection()
        self._lock = threading.Lock()
        self._unconfirmed: list[Unconfirmed] = []
        self._done: list[Any] = []
        # scripts this connection has run: only those are sent unconfirmed, so that a
        # NOSCRIPT refusal (and the call sent again after it) cannot overtake a later call
        self._loaded: set[str] = set()
        # FCALL until the server shows it has no functions for us (Redis 6, an ACL)
        self._functions = True
        self._heads: dict[tuple[str, bool, str, str, int], bytes] = {}
        self.pid = os.getpid()

    @property
    def uses_functions(self) -> bool:
        """Whether calls go by FCALL (else EVALSHA)."""
        return self._functions

    @property
    def busy(self) -> bool:
        """Whether replies are still to be read."""
        return bool(self._unconfirmed or self._done)

    def run(
        self, script: scripts.Script, keys: list[str], args: list[Any]
    ) -> tuple[Any, list[Any]]:
        """Call the script and wait for its reply. Returns the reply and the settled
        unconfirmed calls sent before it, as ``(Unconfirmed, reply, error)`` triples for
        the caller to hand on once it is done with this call."""
        with self._lock:
            try:
                try:
                    self._send(script, keys, args)
                    settled, again = self._read_replies()
                    self._done += settled
                    try:
                        reply = self._conn.read_response()
                        self._loaded.add(self._code(script))
                    except redis.ResponseError as exc:
                        if not self._refused(exc):
                            raise
                        # refused like the calls sent before it: those go again first
                        self._done += self._call_again(again)
                        again = []
                        reply = self._load_and_call(script, keys, args, exc)
                    self._done += self._call_again(again)
                except redis.ConnectionError as exc:
                    # dropped while idle (a server restarted, a failover): once more, on a
                    # fresh connection
                    self._drop(exc)
                    reply = self._call(script, keys, args)
                return reply, self._take_done()
            except BaseException as exc:
                if not isinstance(exc, redis.ResponseError):
                    self._drop(exc)
                raise

    def send_unconfirmed(self, call: Unconfirmed) -> list[Any]:
        """Send the call and return without its reply. Returns calls settled on the way
        (when too many replies were waiting), like :meth:`run`."""
        with self._lock:
            settled = self._take_done()
            loaded = self._code(call.script) in self._loaded
            if len(self._unconfirmed) >= MAX_UNCONFIRMED or not loaded:
                settled += self._read_unconfirmed()
            if not loaded:
                try:
                    settled.append((call, self._call(call.script, call.keys, call.args), None))
                except BaseException as exc:
                    if not isinstance(exc, redis.ResponseError):
                        self._drop(exc)
                    raise
                return settled
            try:
                self._send(call.script, call.keys, call.args)
            except redis.ConnectionError:
                # not sent: a confirmed call on a fresh connection instead (its error, if
                # it fails too, is the caller's)
                self._drop(redis.ConnectionError("connection lost"))
                settled += self._take_done()
                settled.append((call, self._call(call.script, call.keys, call.args), None))
                return settled
            self._unconfirmed.append(call)
            return settled

    def settle(self) -> list[Any]:
        """Read every reply still unread; returns the settled calls (see :meth:`run`)."""
        with self._lock:
            return self._take_done() + self._read_unconfirmed()

    def close(self) -> list[Any]:
        """Settle what is unread, then close the connection."""
        with self._lock:
            settled = self._take_done()
            if self.pid == os.getpid():
                try:
                    settled += self._read_unconfirmed()
                except BaseException:
                    settled += self._take_done()
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
        """The connection broke: close it (the next call reconnects); whether the calls
        still unconfirmed ran is unknown."""
        self._conn.disconnect()
        self._loaded.clear()
        self._done.extend((call, None, exc) for call in self._unconfirmed)
        self._unconfirmed.clear()

    def _take_done(self) -> list[Any]:
        if not self._done:
            return []
        done, self._done = self._done, []
        return done

    def _read_unconfirmed(self) -> list[Any]:
        settled, again = self._read_replies()
        return settled + self._call_again(again)

    def _read_replies(self) -> tuple[list[Any], list[tuple[Unconfirmed, BaseException]]]:
        """Read the unconfirmed replies; calls refused with NOSCRIPT come back separately,
        to be sent again once nothing else is in flight on the connection."""
        if not self._unconfirmed:
            return [], []
        pending, self._unconfirmed = self._unconfirmed, []
        settled: list[Any] = []
        again: list[tuple[Unconfirmed, BaseException]] = []
        for i, call in enumerate(pending):
            try:
                settled.append((call, self._conn.read_response(), None))
            except redis.ResponseError as exc:
                if self._refused(exc):
                    again.append((call, exc))  # not run: the code was missing
                else:
                    settled.append((call, None, exc))
            except BaseException as exc:
                # the connection is gone: whether these ran is unknown
                self._unconfirmed = [c for c, _ in again] + pending[i:]
                self._drop(exc)
                if not isinstance(exc, redis.RedisError):
                    raise
                return settled + self._take_done(), []
        return settled, again

    def _call_again(self, again: list[tuple[Unconfirmed, BaseException]]) -> list[Any]:
        settled: list[Any] = []
        for call, refusal in again:
            try:
                reply = self._load_and_call(call.script, call.keys, call.args, refusal)
            except redis.RedisError as exc:
                settled.append((call, None, exc))
            else:
                settled.append((call, reply, None))
        return settled
