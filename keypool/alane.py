"""The asyncio hot path's own connection: one per event loop, every task's script calls
pipelined on it.

Through ``redis.asyncio`` a script call takes a connection from the pool, packs the command
argument by argument, arms a timeout for the write and another for the read, waits for its
reply alone, and gives the connection back: three times the cost of the sync pool's call.
An :class:`ALane` holds one connection per event loop, made from the pool's settings (the
handshake — TLS, AUTH, SELECT — is redis-py's), and then reads and writes it itself:

* every call's command is appended to the connection's outgoing buffer and a waiter to a
  FIFO; the buffer is written once per turn of the event loop, so the calls of many tasks
  go out together (auto-pipelining). Replies come back in order: each one answers the
  oldest waiter. A waiter whose task was cancelled still gets its reply read, and dropped,
  so the others stay in step;
* calls go by ``FCALL`` (the function library), falling back to ``EVALSHA`` where the server
  has no functions for us, like :mod:`keypool.lane`; a call refused for want of the code is
  loaded and sent again under the one reload rule (:func:`keypool.scripts.with_reload_async`);
* every script is idempotent under its call id (a repeat changes nothing and answers the
  same), so a call whose connection dropped before its reply came is sent once more on a
  fresh connection;
* one timer per connection watches the oldest unanswered call: when it has waited
  ``socket_timeout``, the connection is abandoned and every call on it fails with
  ``redis.TimeoutError`` (shown to callers as ``PoolUnavailable``) — never a hang, and
  never sent again to a server that does not answer;
* :meth:`ALane.send` leaves a call's reply unread (the caller goes on at once) under the
  sync lane's rule: only on a connection that answered a moment ago and runs that script
  already. Its reply is handed to ``on_late`` when it comes; if the connection drops first,
  the call is sent again on a fresh one.

Only for a plain ``redis.asyncio.Redis`` on one server (TCP, TLS or a Unix socket) with
``hiredis`` installed; a Cluster, Sentinel and the embedded store keep redis.asyncio's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from redis._parsers.base import BaseParser

from . import scripts
from .lane import FRESH_SECONDS, Late

hiredis: Any
try:
    import hiredis
except ImportError:  # pragma: no cover - hiredis is optional
    hiredis = None

__all__ = ["ALane", "ALanes", "supported"]

_NOT_YET = object()  # hiredis: no whole reply buffered yet (False is a RESP3 reply)


def supported(client: Any) -> bool:
    """Whether ``client`` can have lanes: a ``redis.asyncio.Redis`` whose connections are
    redis-py's own to one server (not Sentinel-managed, not the embedded store's)."""
    if hiredis is None:
        return False
    from redis.asyncio import Redis
    from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection

    if type(client) is not Redis:
        return False
    kind = getattr(client.connection_pool, "connection_class", None)
    return kind in (Connection, SSLConnection, UnixDomainSocketConnection)


class _Dropped(redis.ConnectionError):
    """The connection dropped before the call's reply came (it may or may not have run)."""


class _Entry:
    """One command written and not answered yet. ``future`` is None for a call sent
    without waiting (:meth:`ALane.send`); ``script`` None for a plain command."""

    __slots__ = ("args", "future", "keys", "script", "sent", "tag")

    def __init__(
        self,
        script: scripts.Script | None,
        keys: list[str],
        args: list[Any],
        future: asyncio.Future[Any] | None,
        tag: Any,
        sent: float,
    ) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.future = future
        self.tag = tag
        self.sent = sent


class _Link(asyncio.Protocol):
    """One connection: the protocol its transport delivers bytes to."""

    def __init__(self, lane: ALane, writer: asyncio.StreamWriter, reader: Any) -> None:
        self.lane = lane
        # the stream writer redis-py opened is kept: once collected, it closes the transport
        self.writer = writer
        self.transport: asyncio.WriteTransport = writer.transport
        self.reader = reader
        self.loop = asyncio.get_running_loop()
        self.waiting: deque[_Entry] = deque()
        self.out: list[bytes] = []
        self.timer: asyncio.TimerHandle | None = None
        self.closed = False
        self.loaded: set[str] = set()  # code this connection has run

    def push(self, entry: _Entry, packed: bytes) -> None:
        if self.closed:  # it closed while the caller waited for it to open
            self.lane.lost(self, deque([entry]), _Dropped("connection to Redis lost"), True)
            return
        self.waiting.append(entry)
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(packed)
        if self.timer is None and self.lane.timeout is not None:
            self.timer = self.loop.call_at(entry.sent + self.lane.timeout, self.watch)

    def flush(self) -> None:
        if self.out and not self.closed:
            data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
            self.out.clear()
            self.transport.write(data)

    def watch(self) -> None:
        """The oldest unanswered call has waited the timeout: give up on the connection."""
        self.timer = None
        timeout = self.lane.timeout
        if self.closed or not self.waiting or timeout is None:
            return
        due = self.waiting[0].sent + timeout
        if self.loop.time() < due:
            self.timer = self.loop.call_at(due, self.watch)
            return
        self.fail(redis.TimeoutError(f"no reply from Redis within {timeout} s"), again=False)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        answer = self.lane.answer
        waiting = self.waiting
        try:
            while (reply := reader.gets()) is not _NOT_YET:
                answer(waiting.popleft(), reply)
        except Exception as exc:  # a reply that is not RESP, or one nobody asked for
            self.fail(_Dropped(f"unreadable reply from Redis: {exc!r}"), again=True)
            return
        self.lane.used = self.loop.time()

    def eof_received(self) -> bool:
        return False  # the transport closes; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.fail(_Dropped(f"connection to Redis lost ({exc!r})"), again=True)

    def fail(self, error: redis.RedisError, again: bool) -> None:
        """Close the connection; ``again``: the unanswered calls are sent again on a fresh
        one (it dropped), else they fail with ``error`` (the server did not answer)."""
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.abort()
        entries, self.waiting = self.waiting, deque()
        self.lane.lost(self, entries, error, again)

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport.close()
        entries, self.waiting = self.waiting, deque()
        if entries:  # calls of tasks still running when the pool was closed
            self.lane.lost(self, entries, redis.ConnectionError("the pool was closed"), False)


class ALane:
    """One event loop's connection to a standalone Redis (see the module)."""

    def __init__(
        self,
        connection_pool: Any,
        on_late: Callable[[list[Late]], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._pool = connection_pool
        self._on_late = on_late
        self.loop = loop
        self.timeout: float | None = connection_pool.connection_kwargs.get("socket_timeout")
        kwargs = connection_pool.connection_kwargs
        self._encoding: str | None = (
            kwargs.get("encoding", "utf-8") if kwargs.get("decode_responses") else None
        )
        self._errors: str = kwargs.get("encoding_errors", "strict")
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._functions = True  # FCALL until the server shows it has no functions for us
        self._unconfirmed = 0  # calls sent without waiting, not answered yet
        # calls sent without waiting that are being sent again, oldest first
        self._repairs: dict[asyncio.Task[None], None] = {}
        self.used = 0.0  # loop time of the last reply read
        self.pid = os.getpid()

    @property
    def uses_functions(self) -> bool:
        """Whether calls go by FCALL (else EVALSHA)."""
        return self._functions

    @property
    def busy(self) -> bool:
        """Whether calls sent without waiting are still unanswered."""
        return self._unconfirmed > 0 or bool(self._repairs)

    # ------------------------------------------------------------------ calls

    async def call(self, script: scripts.Script, keys: list[str], args: list[Any]) -> Any:
        """Run the call and wait for its reply."""

        def once() -> Any:
            return self._once(script, keys, args)

        async def load() -> None:
            await self._load(script)
            await self._after_repairs()

        if self._repairs:
            await self._after_repairs()
        try:
            return await scripts.with_reload_async(once, load, self._functions)
        except redis.ResponseError as exc:
            if self._functions and scripts.refused(exc, True):
                self._functions = False  # no functions to be had here: scripts from now on
                return await scripts.with_reload_async(once, load)
            raise

    def send(self, script: scripts.Script, keys: list[str], args: list[Any], tag: Any) -> bool:
        """Send the call without waiting for its reply when that is safe (see the module);
        False when it was not sent (then :meth:`call` it)."""
        link = self._link
        code = script.function if self._functions else script.sha
        if (
            link is None
            or link.closed
            or code not in link.loaded
            or link.loop.time() - self.used > FRESH_SECONDS
        ):
            return False
        self._unconfirmed += 1
        link.push(
            _Entry(script, keys, args, None, tag, link.loop.time()), self._pack(code, keys, args)
        )
        return True

    async def settle(self) -> None:
        """Wait until every call sent without waiting has been answered (applied)."""
        for _attempt in range(scripts.RELOADS + 1):
            if self._repairs:
                await asyncio.wait(list(self._repairs))
            if self._unconfirmed:
                # replies come in order: when this one is read, so were theirs
                try:
                    await self._command("PING")
                except _Dropped:
                    continue  # the unanswered ones are being sent again
            if not self.busy:
                return

    async def close(self) -> None:
        """Settle, then close the connection."""
        with contextlib.suppress(Exception):  # closing: a broken connection is no news
            await self.settle()
        if self._link is not None:
            self._link.close()
            self._link = None

    def abort(self) -> None:
        """Close the connection at once (from the lane's own loop)."""
        if self._link is not None:
            self._link.close()
            self._link = None

    # ------------------------------------------------------------------ internals

    async def _once(self, script: scripts.Script, keys: list[str], args: list[Any]) -> Any:
        for attempt in range(2):
            link = self._link
            if link is None or link.closed:
                link = await self._connect()
            code = script.function if self._functions else script.sha
            future = link.loop.create_future()
            link.push(
                _Entry(script, keys, args, future, None, link.loop.time()),
                self._pack(code, keys, args),
            )
            try:
                reply = await future
            except _Dropped:
                if attempt:
                    raise
                # once more on a fresh connection: a call that did run answers the same
                # and changes nothing (every script is idempotent under its call id)
                await self._after_repairs()
                continue
            link.loaded.add(code)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover

    async def _command(self, *command: Any) -> Any:
        link = self._link
        if link is None or link.closed:
            link = await self._connect()
        future = link.loop.create_future()
        link.push(
            _Entry(None, [], [], future, None, link.loop.time()), hiredis.pack_command(command)
        )
        return await future

    async def _load(self, script: scripts.Script) -> None:
        """Load what the server lacks (once, however many calls were refused): the function
        library (else scripts for good), or the script."""
        what = "functions" if self._functions else script.sha
        task = self._loading.get(what)
        if task is None:
            task = self._loading[what] = self.loop.create_task(self._load_now(script))
            task.add_done_callback(lambda done: self._loaded_one(what, done))
        await asyncio.shield(task)

    def _loaded_one(self, what: str, task: asyncio.Task[None]) -> None:
        self._loading.pop(what, None)
        if not task.cancelled():
            task.exception()  # seen by the callers that waited; none may have

    async def _load_now(self, script: scripts.Script) -> None:
        if self._functions:
            try:
                await self._command("FUNCTION", "LOAD", scripts.library_source())
                return
            except redis.ResponseError as exc:
                if "already exists" in str(exc):
                    return
                self._functions = False
        await self._command("SCRIPT", "LOAD", script.source)

    def _pack(self, code: str, keys: list[str], args: list[Any]) -> bytes:
        verb = "FCALL" if self._functions else "EVALSHA"
        packed: bytes = hiredis.pack_command((verb, code, len(keys), *keys, *args))
        return packed

    async def _connect(self) -> _Link:
        """This loop's connection, opened once however many tasks ask at the same time (the
        opening is not cancelled with any one of them)."""
        task = self._connecting
        if task is None:
            task = self._connecting = self.loop.create_task(self._open())
            task.add_done_callback(self._opened)
        return await asyncio.shield(task)

    def _opened(self, task: asyncio.Task[_Link]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # seen by the callers that waited; none may have

    async def _open(self) -> _Link:
        conn = self._pool.connection_class(**self._pool.connection_kwargs)
        await conn.connect()  # redis-py's handshake: TLS, AUTH/HELLO, SELECT, CLIENT SETINFO
        writer = conn._writer
        # the transport is the lane's from now on; the Connection object is let go
        conn._reader = conn._writer = None
        reader = hiredis.Reader(
            protocolError=redis.exceptions.InvalidResponse,
            replyError=BaseParser.parse_error,
            encoding=self._encoding,
            errors=self._errors,
            notEnoughData=_NOT_YET,
        )
        link = _Link(self, writer, reader)
        link.transport.set_protocol(link)
        self._link = link
        self.used = self.loop.time()
        return link

    def answer(self, entry: _Entry, reply: Any) -> None:
        """Hand a reply to the call it answers."""
        future = entry.future
        if future is not None:
            if not future.done():  # done: its task was cancelled; the reply is dropped
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
            return
        self._unconfirmed -= 1
        if isinstance(reply, redis.ResponseError):
            if scripts.refused(reply, True):
                self._repair(entry)  # the server lost the code: load it, send again
            else:
                self._on_late([Late(entry.tag, None, reply)])
            return
        self._on_late([Late(entry.tag, reply, None)])

    def lost(
        self, link: _Link, entries: deque[_Entry], error: redis.RedisError, again: bool
    ) -> None:
        """A connection ended with ``entries`` unanswered (see :meth:`_Link.fail`)."""
        if self._link is link:
            self._link = None
        for entry in entries:
            future = entry.future
            if future is not None:
                if not future.done():
                    future.set_exception(error)
                continue
            self._unconfirmed -= 1
            if again:
                self._repair(entry)
            else:
                self._on_late([Late(entry.tag, None, error)])

    def _repair(self, entry: _Entry) -> None:
        """Send a call that was sent without waiting again, and wait for it this time."""
        task = self.loop.create_task(self._resend(entry))
        self._repairs[task] = None
        task.add_done_callback(self._repaired)

    def _repaired(self, task: asyncio.Task[None]) -> None:
        del self._repairs[task]

    async def _after_repairs(self) -> None:
        """Wait for the calls sent without waiting ahead of this one that are being sent
        again (refused for want of the code, or cut off): a report is applied before what
        its task asks next, as on the sync lane."""
        me = asyncio.current_task()
        earlier = []
        for task in self._repairs:
            if task is me:
                break
            earlier.append(task)
        if earlier:
            await asyncio.wait(earlier)

    async def _resend(self, entry: _Entry) -> None:
        assert entry.script is not None
        try:
            reply = await self.call(entry.script, entry.keys, entry.args)
        except (redis.RedisError, OSError) as exc:
            self._on_late([Late(entry.tag, None, exc)])
            return
        self._on_late([Late(entry.tag, reply, None)])


class ALanes:
    """The lanes of one pool: one per event loop (a pool may be used from several loops,
    one after another: ``asyncio.run`` per test), made on first use."""

    def __init__(self, connection_pool: Any, on_late: Callable[[list[Late]], None]) -> None:
        self._pool = connection_pool
        self._on_late = on_late
        self._lanes: dict[asyncio.AbstractEventLoop, ALane] = {}

    def current(self) -> ALane:
        """The running loop's lane."""
        loop = asyncio.get_running_loop()
        lane = self._lanes.get(loop)
        if lane is None or lane.pid != os.getpid():
            if len(self._lanes) > 8:  # forget the lanes of loops that are gone
                self._lanes = {lp: ln for lp, ln in self._lanes.items() if not lp.is_closed()}
            lane = self._lanes[loop] = ALane(self._pool, self._on_late, loop)
        return lane

    def existing(self) -> ALane | None:
        """The running loop's lane, if it has one."""
        return self._lanes.get(asyncio.get_running_loop())

    async def close(self) -> None:
        """Settle and close the running loop's lane; close those of other loops."""
        loop = asyncio.get_running_loop()
        lanes, self._lanes = self._lanes, {}
        for lp, lane in lanes.items():
            if lp is loop:
                await lane.close()
            elif not lp.is_closed():
                lp.call_soon_threadsafe(lane.abort)
