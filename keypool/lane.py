"""The hot path's own connection: one per thread, script calls written and read directly.

A pool decision is one script call. Sent through redis-py's generic ``execute_command``,
a call also pays for the connection pool's lock, the retry wrapper and the client's
instrumentation — on a fast loopback as much again as the round trip itself. A lane holds
one connection per thread and writes and reads the script call on it directly.

Every script is idempotent under its call id, so the rules are short:

* :meth:`Lane.call` sends a call and waits for its reply. A connection that drops is
  reopened and the call sent once more (if the first one ran, its repeat changes nothing
  and answers the same). A call refused for want of the code is loaded and sent again
  (:func:`keypool.scripts.with_reload`).
* :meth:`Lane.send` may return before the reply comes: only on a connection that answered
  a moment ago and runs that script already. The reply is read by the thread's next call
  (or :meth:`Lane.settle`), and handed back as a *late reply* for the caller to log. A
  connection lost before those replies came is reopened and the calls sent again.
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from . import scripts

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:  # hiredis packs a command in one C call (redis-py's packer checks each argument)
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is optional
    _pack = None

__all__ = ["Lane", "Lanes", "Late"]

# Calls a lane leaves unread before it reads them anyway.
MAX_UNREAD = 64
# A connection unused for longer than this may have been closed by the server (`timeout`)
# or a proxy: a call sent on it waits for its reply.
FRESH_SECONDS = 1.0
# A connection that answered within this long is taken as alive without a look at it.
PROVEN_SECONDS = 0.02


@dataclass(slots=True)
class Late:
    """A call sent without waiting, with its reply (or the error that ended it)."""

    tag: Any
    reply: Any
    error: BaseException | None


_MINE = object()  # the tag of the call waiting for its own reply behind unread ones


@dataclass(slots=True)
class _Sent:
    script: scripts.Script
    keys: list[str]
    args: list[Any]
    tag: Any


class Lane:
    """One thread's connection to a standalone Redis (or one behind Sentinel)."""

    __slots__ = (
        "__weakref__",
        "_carried",
        "_conn",
        "_functions",
        "_heads",
        "_loaded",
        "_lock",
        "_unread",
        "_used",
        "pid",
    )

    def __init__(self, connection_pool: Any) -> None:
        # A connection of its own, made from the pool's settings but not counted against
        # its max_connections (the lane lives as long as its thread).
        self._conn: Any = connection_pool.connection_class(**connection_pool.connection_kwargs)
        self._lock = threading.Lock()
        self._unread: list[_Sent] = []
        self._carried: list[Late] = []  # late replies read by a call that then raised
        self._loaded: set[str] = set()  # code this connection has run (sent unread only then)
        self._functions = True  # FCALL until the server shows it has no functions for us
        self._heads: dict[tuple[str, bool, str, str, int], bytes] = {}
        self._used = 0.0  # monotonic time of the last reply read
        self.pid = os.getpid()

    @property
    def uses_functions(self) -> bool:
        """Whether calls go by FCALL (else EVALSHA)."""
        return self._functions

    @property
    def busy(self) -> bool:
        """Whether replies are still to be read (or handed back)."""
        return bool(self._unread or self._carried)

    def call(
        self, script: scripts.Script, keys: list[str], args: list[Any]
    ) -> tuple[Any, list[Late]]:
        """Run the call and wait for its reply. Returns it with the late replies read first.

        Behind calls still unread (a report sent a moment ago), the call is sent at once and
        every reply read after: one round trip for all."""
        with self._lock:
            if self._unread and len(self._unread) < MAX_UNREAD and self._may_leave_unread(script):
                return self._call_behind_unread(script, keys, args)
            late = self._read_unread()
            try:
                return self._round_trip(script, keys, args), late
            except BaseException:
                self._carried = late + self._carried  # handed back by the next read
                raise

    def send(
        self, script: scripts.Script, keys: list[str], args: list[Any], tag: Any
    ) -> list[Late]:
        """Send the call; return without its reply when that is safe (see the module),
        otherwise wait for it. Returns the late replies read meanwhile (this call's among
        them when it waited)."""
        with self._lock:
            if len(self._unread) >= MAX_UNREAD or not self._may_leave_unread(script):
                late = self._read_unread()
                reply = self._round_trip(script, keys, args)
                late.append(Late(tag, reply, None))
                return late
            sent = _Sent(script, keys, args, tag)
            self._unread.append(sent)  # before it is sent: its reply can go to no other call
            try:
                self._write(script, keys, args)
            except redis.ConnectionError:
                self._conn.disconnect()  # the unread calls go again, on a fresh connection
                return self._read_unread()
            except BaseException:
                self._conn.disconnect()
                raise
            return []

    def settle(self) -> list[Late]:
        """Read every reply still unread."""
        with self._lock:
            return self._read_unread()

    def close(self) -> list[Late]:
        """Settle what is unread, then close the connection."""
        late: list[Late] = []
        if self.pid == os.getpid():
            try:
                late = self.settle()
            except Exception:  # closing: a broken connection is no news
                late = []
        with self._lock:
            self._conn.disconnect()
        return late

    # ------------------------------------------------------------------ internals

    def _call_behind_unread(
        self, script: scripts.Script, keys: list[str], args: list[Any]
    ) -> tuple[Any, list[Late]]:
        mine = _Sent(script, keys, args, _MINE)
        self._unread.append(mine)
        try:
            try:
                self._write(script, keys, args)
            except redis.ConnectionError:
                self._conn.disconnect()  # every unread call goes again, this one among them
            late = self._read_unread()  # (sent again after a refusal or a lost connection)
        except BaseException:
            # Interrupted (a signal, a timeout): this call is abandoned — never sent again,
            # its reply never read as another's. The connection goes; the reports still
            # unread are sent again on a fresh one by the next call.
            if mine in self._unread:
                self._unread.remove(mine)
            self._conn.disconnect()
            self._loaded.clear()
            raise
        for i in range(len(late) - 1, -1, -1):
            if late[i].tag is _MINE:
                answer = late.pop(i)
                if answer.error is not None:
                    self._carried = late + self._carried  # handed back by the next read
                    raise answer.error
                return answer.reply, late
        raise AssertionError("a call's reply went missing")  # pragma: no cover

    def _may_leave_unread(self, script: scripts.Script) -> bool:
        """A connection in use a moment ago, running this script already, and (when no
        reply is due) with nothing to read: no sign the server closed it."""
        if not self._conn.is_connected or self._code(script) not in self._loaded:
            return False
        idle = time.monotonic() - self._used
        if idle > FRESH_SECONDS:
            return False
        if idle < PROVEN_SECONDS or self._unread:
            return True
        try:
            return not self._conn.can_read(timeout=0)  # an end-of-stream reads as readable
        except (redis.ConnectionError, OSError):
            return False

    def _read_unread(self) -> list[Late]:
        """Read the unread replies in order. A call refused for want of the code is sent
        again after a load; when the connection is lost, the rest are sent again. Late
        replies read by a call that then failed come first."""
        late, self._carried = self._carried, []
        try:
            while self._unread:
                sent = self._unread[0]
                try:
                    reply = self._conn.read_response()
                except redis.ResponseError as exc:
                    self._unread.pop(0)
                    if scripts.refused(exc, self._functions):
                        self._flush_unread_then_retry(sent, late)
                    else:
                        late.append(Late(sent.tag, None, exc))
                    continue
                self._unread.pop(0)
                self._used = time.monotonic()
                late.append(Late(sent.tag, reply, None))
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            self._conn.disconnect()
            self._loaded.clear()
            self._send_unread_again(late)
        except BaseException:
            self._carried = late + self._carried  # interrupted: handed back by the next read
            raise
        return late

    def _send_unread_again(self, late: list[Late]) -> None:
        # Each is idempotent: one that did run changes nothing. Each stays queued until it
        # is answered, so an interrupt here leaves the rest to the next read.
        try:
            while self._unread:
                sent = self._unread[0]
                try:
                    reply = self._round_trip(sent.script, sent.keys, sent.args)
                except redis.RedisError as exc:
                    self._unread.pop(0)
                    late.append(Late(sent.tag, None, exc))
                    continue
                self._unread.pop(0)
                late.append(Late(sent.tag, reply, None))
        except BaseException:
            self._carried = late + self._carried
            raise

    def _flush_unread_then_retry(self, sent: _Sent, late: list[Late]) -> None:
        # the calls sent after it were refused too, or ran: read them first
        rest, self._unread = self._unread, []
        pending: list[tuple[_Sent, Any]] = [(sent, None)]
        for other in rest:
            try:
                pending.append((other, self._conn.read_response()))
            except redis.ResponseError as exc:
                pending.append((other, exc if not scripts.refused(exc, self._functions) else None))
        for call, answer in pending:
            if answer is None:
                try:
                    answer = self._round_trip(call.script, call.keys, call.args)
                except redis.ResponseError as exc:
                    answer = exc
            if isinstance(answer, BaseException):
                late.append(Late(call.tag, None, answer))
            else:
                late.append(Late(call.tag, answer, None))

    def _round_trip(self, script: scripts.Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._call_loaded(script, keys, args)
        except (redis.ConnectionError, OSError):
            # dropped (a server restarted, a failover, a blip): once more on a fresh
            # connection; a call that did run answers the same and changes nothing
            self._conn.disconnect()
            self._loaded.clear()
            return self._call_loaded(script, keys, args)
        except BaseException:
            self._conn.disconnect()
            self._loaded.clear()
            raise

    def _call_loaded(self, script: scripts.Script, keys: list[str], args: list[Any]) -> Any:
        def once() -> Any:
            self._write(script, keys, args)
            reply = self._conn.read_response()
            self._used = time.monotonic()
            self._loaded.add(self._code(script))
            return reply

        try:
            return scripts.with_reload(once, lambda: self._load(script), self._functions)
        except redis.ResponseError as exc:
            if self._functions and scripts.refused(exc, True):
                self._functions = False  # no functions to be had here: scripts from now on
                return scripts.with_reload(once, lambda: self._load(script))
            raise

    def _load(self, script: scripts.Script) -> None:
        """Load what the server lacks: the function library (else scripts for good), or the
        script."""
        conn = self._conn
        if self._functions:
            conn.send_command("FUNCTION", "LOAD", scripts.library_source())
            try:
                conn.read_response()
                return
            except redis.ResponseError as exc:
                if "already exists" in str(exc):
                    return
                self._functions = False
        conn.send_command("SCRIPT", "LOAD", script.source)
        conn.read_response()

    def _code(self, script: scripts.Script) -> str:
        return script.function if self._functions else script.sha

    def _write(self, script: scripts.Script, keys: list[str], args: list[Any]) -> None:
        conn = self._conn
        if not conn.is_connected:
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


# Every Lanes object, for the process's exit and for a forked child.
_every: weakref.WeakSet[Lanes] = weakref.WeakSet()


@atexit.register
def _settle_at_exit() -> None:
    for lanes in list(_every):
        lanes.close()


def _forget_in_child() -> None:
    # A forked child must never read or write on its parent's lanes (their sockets and
    # unread replies are the parent's): it makes its own on first use.
    for lanes in list(_every):
        lanes.forget()


os.register_at_fork(after_in_child=_forget_in_child)


class Lanes:
    """The lanes of one pool: one per thread, made on first use, settled and closed when
    their thread ends, at :meth:`close` and at exit, dropped in a forked child. Late
    replies read then go to ``on_late`` (which only logs)."""

    def __init__(self, connection_pool: Any, on_late: Callable[[list[Late]], None]) -> None:
        self._pool = connection_pool
        self._on_late = on_late
        self._local = threading.local()
        self._all: weakref.WeakSet[Lane] = weakref.WeakSet()
        self._finalizers: list[weakref.finalize[Any, Any]] = []
        _every.add(self)

    def current(self) -> Lane:
        """This thread's lane."""
        lane: Lane | None = getattr(self._local, "lane", None)
        if lane is None:
            lane = self._local.lane = Lane(self._pool)
            self._all.add(lane)
            if len(self._finalizers) >= 64:  # those of ended threads have run
                self._finalizers = [f for f in self._finalizers if f.alive]
            self._finalizers.append(
                weakref.finalize(threading.current_thread(), _close_lane, lane, self._on_late)
            )
        return lane

    def existing(self) -> Lane | None:
        """This thread's lane, if it has one."""
        lane: Lane | None = getattr(self._local, "lane", None)
        return lane

    def close(self) -> None:
        for lane in list(self._all):
            _close_lane(lane, self._on_late)
        self._all.clear()
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers.clear()
        self._local = threading.local()

    def forget(self) -> None:
        self._local = threading.local()
        self._all = weakref.WeakSet()
        for finalizer in self._finalizers:
            finalizer.detach()
        self._finalizers = []


def _close_lane(lane: Lane, on_late: Callable[[list[Late]], None]) -> None:
    try:
        late = lane.close()
    except Exception:  # closing: a broken connection is no news
        return
    if late:
        on_late(late)
