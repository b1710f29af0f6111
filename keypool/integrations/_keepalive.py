"""Keeping a request's lease alive while the request is outstanding.

A lease expires after the pool's lease TTL unless renewed; a call longer than that (a slow
model, a long stream) would otherwise lose its key's in-flight slot while still running.
:class:`Hold` is one request's lease: it is renewed every TTL/3 from the moment it is taken
until it is reported, and reported exactly once (:meth:`Hold.claim`).

Blocking leases are renewed by one daemon thread per process (:func:`renewer`); asyncio
leases by a task on their event loop (:func:`renew_in_task`).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import KeyPoolError

__all__ = ["Hold", "renew_in_task", "renewer"]


class Hold:
    """One request's lease, from acquire to its one report.

    ``lease`` is whatever the driver reports to (a :class:`~keypool.Lease`, an
    :class:`~keypool.AsyncLease`); ``latency`` is set when the response headers come.
    """

    __slots__ = ("__weakref__", "_done", "_lock", "_stop", "latency", "lease", "loop")

    def __init__(self, lease: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.lease = lease
        self.loop = loop
        self.latency: float | None = None
        self._done = False
        self._lock = threading.Lock()
        self._stop: Callable[[], None] | None = None

    @property
    def done(self) -> bool:
        return self._done

    def kept_by(self, stop: Callable[[], None]) -> None:
        """Renewals run until :meth:`claim`, which calls ``stop``."""
        self._stop = stop

    def claim(self) -> bool:
        """True exactly once: the caller then makes the lease's one report. Stops renewals."""
        with self._lock:
            if self._done:
                return False
            self._done = True
        if self._stop is not None:
            self._stop()
        return True

    def __repr__(self) -> str:
        return f"Hold({self.lease!r})"


class _Entry:
    __slots__ = ("every", "renew", "stopped")

    def __init__(self, every: float, renew: Callable[[], bool]) -> None:
        self.every = every
        self.renew: Callable[[], bool] | None = renew
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.renew = None  # the lease is not held on to until the entry's turn comes


class _Renewer:
    """One daemon thread renewing blocking leases on time, and running the reports of
    responses dropped without being closed (never in the garbage collector's context)."""

    def __init__(self) -> None:
        self._seq = itertools.count()
        self._reset()

    def _reset(self) -> None:
        """Start afresh (a forked child: the thread, and maybe its lock, are the parent's)."""
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Entry]] = []
        self._jobs: deque[Callable[[], object]] = deque()
        self._thread: threading.Thread | None = None

    def _ensure(self) -> None:  # with the lock held
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="keypool-renewer", daemon=True)
            self._thread.start()

    def add(self, every: float, renew: Callable[[], bool]) -> Callable[[], None]:
        """Call ``renew`` every ``every`` seconds until it returns False or the returned
        function is called."""
        entry = _Entry(every, renew)
        with self._cond:
            self._ensure()
            heapq.heappush(self._heap, (time.monotonic() + every, next(self._seq), entry))
            self._cond.notify()
        return entry.stop

    def submit(self, job: Callable[[], object]) -> None:
        """Run ``job`` soon in the renewer's thread."""
        with self._cond:
            self._ensure()
            self._jobs.append(job)
            self._cond.notify()

    def _next(self) -> tuple[Callable[[], object] | None, _Entry | None]:
        with self._cond:
            while True:
                if self._jobs:
                    return self._jobs.popleft(), None
                while self._heap and self._heap[0][2].stopped:
                    heapq.heappop(self._heap)
                if self._heap:
                    due = self._heap[0][0] - time.monotonic()
                    if due <= 0:
                        return None, heapq.heappop(self._heap)[2]
                    self._cond.wait(due)
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while True:
            job, entry = self._next()
            if job is not None:
                with contextlib.suppress(Exception):
                    job()
                continue
            renew = entry.renew if entry is not None else None
            if renew is None:
                continue
            try:
                alive = renew()
            except KeyPoolError:
                alive = True  # the store is away for now: try again at the next turn
            except Exception:
                alive = False
            if alive and entry is not None and not entry.stopped:
                with self._cond:
                    due = time.monotonic() + entry.every
                    heapq.heappush(self._heap, (due, next(self._seq), entry))


_RENEWER = _Renewer()
os.register_at_fork(after_in_child=_RENEWER._reset)


def renewer() -> _Renewer:
    """This process's renewer thread (started on first use, again after a fork)."""
    return _RENEWER


async def _renew_loop(
    hold: Hold, every: float, renew: Callable[[], Awaitable[bool]], wake: asyncio.Event
) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), every)
        if hold.done:
            return
        try:
            if not await renew():
                return
        except KeyPoolError:
            continue
        except Exception:
            return


_TASKS: set[asyncio.Task[Any]] = set()  # running tasks, kept from the garbage collector


def renew_in_task(hold: Hold, every: float, renew: Callable[[], Awaitable[bool]]) -> None:
    """Renew ``hold``'s lease every ``every`` seconds in a task of the running loop until
    the hold is claimed (which wakes the task to end)."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()

    def stop() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the task is gone
            loop.call_soon_threadsafe(wake.set)

    hold.kept_by(stop)
    task = loop.create_task(_renew_loop(hold, every, renew, wake))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
