"""The blocking and asyncio drivers of :func:`~keypool.integrations._flow.auth_flow`, and
the auth classes built on them for any httpx-like library (``httpx``, ``httpx2``).

A library module binds them to its own classes with :func:`library_of` and two one-line
subclasses (``class KeyPoolAuth(SyncPoolAuth, httpx2.Auth)``): there is one implementation
behind every library, blocking or asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import anyio.to_thread

from ..aio import AsyncKeyPool
from ..classify import Failure
from ..errors import KeyPoolError
from ..pool import KeyPool
from ._flow import (
    Abandoned,
    Acquire,
    AuthConfig,
    Op,
    ReadBody,
    ReadRequest,
    Report,
    Send,
    Watch,
    auth_flow,
)
from ._keepalive import _TASKS, Hold, renew_in_task, renewer
from ._usage import Usage, UsageMeter

__all__ = ["AsyncBody", "AsyncPoolAuth", "Library", "SyncBody", "SyncPoolAuth", "library_of"]

AsyncReport = Callable[[Report], Awaitable["Failure | None"]]


@dataclass(frozen=True)
class Library:
    """What the drivers need from an httpx-like library."""

    name: str
    response_not_read: type[Exception]
    sync_stream: type[Any]  # the library's SyncByteStream
    async_stream: type[Any]  # the library's AsyncByteStream
    sync_body: type[SyncBody]  # SyncBody subclassing the library's SyncByteStream
    async_body: type[AsyncBody]
    decode: Callable[[bytes, str], bytes]  # a whole body in a content encoding -> bytes

    def content_of(self, response: Any) -> bytes | None:
        try:
            content: bytes = response.content
        except self.response_not_read:
            return None
        return content

    def meter(self, response: Any) -> UsageMeter:
        headers = response.headers
        return UsageMeter(
            headers.get("content-type", ""), headers.get("content-encoding", ""), self.decode
        )


# --------------------------------------------------------------------------- reports


def _usage_args(usage: Usage | None) -> dict[str, int | None]:
    if usage is None:
        return {}
    if usage.input_tokens is None and usage.output_tokens is None:
        return {"tokens": usage.total_tokens}
    return {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}


def _send_sync(op: Report) -> Failure | None:
    """Make a claimed report to a blocking lease. A report never fails the HTTP call: when
    the store is unreachable the pool has logged it and the lease expires by itself."""
    lease = op.hold.lease
    try:
        if op.outcome == "success":
            lease.success(latency=op.hold.latency, **_usage_args(op.usage))
        elif op.outcome == "fail":
            failure: Failure = lease.fail(op.error, headers=op.headers)
            return failure
        else:
            lease.release()
    except KeyPoolError:
        pass
    return None


async def _send_async(op: Report) -> Failure | None:
    """:func:`_send_sync` for an :class:`~keypool.AsyncLease`."""
    lease = op.hold.lease
    try:
        if op.outcome == "success":
            await lease.success(latency=op.hold.latency, **_usage_args(op.usage))
        elif op.outcome == "fail":
            failure: Failure = await lease.fail(op.error, headers=op.headers)
            return failure
        else:
            await lease.release()
    except KeyPoolError:
        pass
    return None


def report_sync(op: Report) -> Failure | None:
    """Report a blocking lease unless it was reported already."""
    return _send_sync(op) if op.hold.claim() else None


async def report_async(op: Report) -> Failure | None:
    """Report an asyncio lease unless it was reported already."""
    return await _send_async(op) if op.hold.claim() else None


async def report_in_thread(op: Report) -> Failure | None:
    """Report a blocking lease from async code, in a worker thread."""
    return await anyio.to_thread.run_sync(report_sync, op)


def _spawn(op: Report) -> None:
    task = asyncio.ensure_future(_send_async(op))
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


def _collected(hold: Hold, meter: UsageMeter) -> None:
    """A response was dropped without being closed: report what its body showed, away
    from the garbage collector (in the renewer thread, or as a task of the lease's loop)."""
    if hold.done or not hold.claim():
        return
    op = Report(hold, "success", usage=meter.usage())
    if hold.loop is None:
        renewer().submit(functools.partial(_send_sync, op))
        return
    with contextlib.suppress(RuntimeError):  # the loop is closed: the lease expires
        hold.loop.call_soon_threadsafe(_spawn, op)


def _on_collect(body: object, hold: Hold, meter: UsageMeter) -> None:
    finalizer = weakref.finalize(body, _collected, hold, meter)
    finalizer.atexit = False


# --------------------------------------------------------------------------- bodies


class SyncBody:
    """A 2xx response's body stream, watched: the usage is counted as chunks pass and the
    lease reported (once) when the response is closed, fails or is garbage-collected."""

    def __init__(self, inner: Any, hold: Hold, meter: UsageMeter) -> None:
        self._inner = inner
        self._hold = hold
        self._meter = meter
        _on_collect(self, hold, meter)

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                self._meter.feed(chunk)
                yield chunk
        except Exception as exc:
            report_sync(Report(self._hold, "fail", error=exc))
            raise

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            report_sync(Report(self._hold, "success", usage=self._meter.usage()))


# asyncio twin of SyncBody: the stream differs only in async iteration and await
class AsyncBody:
    """The asyncio twin of :class:`SyncBody`; ``report`` makes its reports."""

    def __init__(self, inner: Any, hold: Hold, meter: UsageMeter, report: AsyncReport) -> None:
        self._inner = inner
        self._hold = hold
        self._meter = meter
        self._report = report
        _on_collect(self, hold, meter)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._meter.feed(chunk)
                yield chunk
        except Exception as exc:
            await self._report(Report(self._hold, "fail", error=exc))
            raise

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._hold.done:
                await self._report(Report(self._hold, "success", usage=self._meter.usage()))


def library_of(module: Any) -> Library:
    """The :class:`Library` of an httpx-like module (``httpx``, ``httpx2``): its stream
    classes, with the watched bodies subclassing them, and its content decoding."""

    def decode(data: bytes, encoding: str) -> bytes:
        response = module.Response(200, headers={"content-encoding": encoding}, content=data)
        content: bytes = response.content
        return content

    return Library(
        name=module.__name__,
        response_not_read=module.ResponseNotRead,
        sync_stream=module.SyncByteStream,
        async_stream=module.AsyncByteStream,
        sync_body=type("SyncBody", (SyncBody, module.SyncByteStream), {}),
        async_body=type("AsyncBody", (AsyncBody, module.AsyncByteStream), {}),
        decode=decode,
    )


# --------------------------------------------------------------------------- drivers


def _drive_sync(
    flow: Generator[Op, Any, None], execute: Callable[[Op], Any]
) -> Generator[Any, Any, None]:
    answer: Any = None
    error: Exception | None = None
    while True:
        try:
            op = flow.send(answer) if error is None else flow.throw(error)
        except StopIteration:
            return
        answer, error = None, None
        if type(op) is Send:
            abandoned = False
            try:
                answer = yield op.request
            except GeneratorExit:
                abandoned = True
            if abandoned:
                # after the except block: what the caller is handling (see Abandoned)
                answer = Abandoned(sys.exc_info()[1])
            continue
        try:
            answer = execute(op)
        except Exception as exc:
            error = exc


async def _drive_async(
    flow: Generator[Op, Any, None], execute: Callable[[Op], Awaitable[Any]]
) -> AsyncGenerator[Any, Any]:
    answer: Any = None
    error: Exception | None = None
    while True:
        try:
            op = flow.send(answer) if error is None else flow.throw(error)
        except StopIteration:
            return
        answer, error = None, None
        if type(op) is Send:
            abandoned = False
            try:
                answer = yield op.request
            except GeneratorExit:
                abandoned = True
            if abandoned:
                answer = Abandoned(sys.exc_info()[1])
            continue
        try:
            answer = await execute(op)
        except Exception as exc:
            error = exc


# --------------------------------------------------------------------------- auth classes


class _PoolAuthBase:
    _lib: ClassVar[Library]
    pool: KeyPool | AsyncKeyPool
    config: AuthConfig
    requires_request_body: bool

    def __repr__(self) -> str:
        return f"{type(self).__name__}(pool={self.pool!r}, {self.config.describe()})"

    def _configure(self, provider: object, **options: Any) -> None:
        self.config = AuthConfig(provider, **options)
        self.requires_request_body = self.config.requires_request_body

    @property
    def provider(self) -> str:
        return self.config.provider

    @property
    def model(self) -> str | None:
        return self.config.model

    @property
    def header(self) -> str:
        return self.config.header

    def _flow(self, request: Any) -> Generator[Op, Any, None]:
        return auth_flow(self.config, request, self._lib.content_of)


class SyncPoolAuth(_PoolAuthBase):
    """Auth leasing a key from a blocking :class:`~keypool.KeyPool` for each request; with
    a blocking client, or an asyncio one (the pool's calls then run in a worker thread)."""

    pool: KeyPool

    def __init__(
        self,
        pool: KeyPool,
        provider: object,
        *,
        model: str | None = None,
        strategy: str | None = None,
        tokens: int = 0,
        wait: float | None = None,
        retry_on_rate_limit: int = 0,
        retries: int = 0,
        header: str | None = None,
        scheme: str | None = None,
    ) -> None:
        if not isinstance(pool, KeyPool):
            raise TypeError(f"pool must be a KeyPool, not {type(pool).__name__}")
        self.pool = pool
        self._configure(
            provider,
            model=model,
            strategy=strategy,
            tokens=tokens,
            wait=wait,
            retry_on_rate_limit=retry_on_rate_limit,
            retries=retries,
            header=header,
            scheme=scheme,
        )

    def _hold(self) -> Hold:
        lease = self.pool.acquire(self.config.provider, **self.config.acquire_args())
        hold = Hold(lease)
        hold.kept_by(renewer().add(self.pool.settings.lease_ttl / 3, lease.renew))
        return hold

    def _execute(self, op: Op) -> Any:
        if type(op) is Acquire:
            return self._hold()
        if type(op) is Report:
            return report_sync(op)
        if type(op) is ReadRequest:
            return op.request.read()
        if type(op) is ReadBody:
            return op.response.read()
        if type(op) is Watch:
            response = op.response
            stream = response.stream
            if isinstance(stream, self._lib.sync_stream):
                response.stream = self._lib.sync_body(stream, op.hold, self._lib.meter(response))
            else:
                report_sync(Report(op.hold, "success"))
            return None
        raise TypeError(f"unknown operation {op!r}")

    async def _aexecute(self, op: Op) -> Any:
        if type(op) is Acquire:
            return await anyio.to_thread.run_sync(self._hold)
        if type(op) is Report:
            return await report_in_thread(op)
        if type(op) is ReadRequest:
            return await op.request.aread()
        if type(op) is ReadBody:
            return await op.response.aread()
        if type(op) is Watch:
            response = op.response
            stream = response.stream
            if isinstance(stream, self._lib.async_stream):
                meter = self._lib.meter(response)
                body = self._lib.async_body(stream, op.hold, meter, report_in_thread)
                response.stream = body
            else:
                await report_in_thread(Report(op.hold, "success"))
            return None
        raise TypeError(f"unknown operation {op!r}")

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        return _drive_sync(self._flow(request), self._execute)

    def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        return _drive_async(self._flow(request), self._aexecute)


# asyncio twin of SyncPoolAuth: the same arguments and flow; the drivers differ only in
# await and in how the lease is kept alive (a task, not a thread)
class AsyncPoolAuth(_PoolAuthBase):
    """Auth leasing a key from an :class:`~keypool.AsyncKeyPool` for each request of an
    asyncio client."""

    pool: AsyncKeyPool

    def __init__(
        self,
        apool: AsyncKeyPool,
        provider: object,
        *,
        model: str | None = None,
        strategy: str | None = None,
        tokens: int = 0,
        wait: float | None = None,
        retry_on_rate_limit: int = 0,
        retries: int = 0,
        header: str | None = None,
        scheme: str | None = None,
    ) -> None:
        if not isinstance(apool, AsyncKeyPool):
            raise TypeError(f"apool must be an AsyncKeyPool, not {type(apool).__name__}")
        self.pool = apool
        self._configure(
            provider,
            model=model,
            strategy=strategy,
            tokens=tokens,
            wait=wait,
            retry_on_rate_limit=retry_on_rate_limit,
            retries=retries,
            header=header,
            scheme=scheme,
        )

    async def _aexecute(self, op: Op) -> Any:
        if type(op) is Acquire:
            lease = await self.pool.acquire(self.config.provider, **self.config.acquire_args())
            hold = Hold(lease, asyncio.get_running_loop())
            renew_in_task(hold, self.pool.settings.lease_ttl / 3, lease.renew)
            return hold
        if type(op) is Report:
            return await report_async(op)
        if type(op) is ReadRequest:
            return await op.request.aread()
        if type(op) is ReadBody:
            return await op.response.aread()
        if type(op) is Watch:
            response = op.response
            stream = response.stream
            if isinstance(stream, self._lib.async_stream):
                meter = self._lib.meter(response)
                response.stream = self._lib.async_body(stream, op.hold, meter, report_async)
            else:
                await report_async(Report(op.hold, "success"))
            return None
        raise TypeError(f"unknown operation {op!r}")

    def sync_auth_flow(self, request: Any) -> Generator[Any, Any, None]:
        raise TypeError(
            f"{type(self).__name__} works with an AsyncClient; use KeyPoolAuth with a Client"
        )

    def async_auth_flow(self, request: Any) -> AsyncGenerator[Any, Any]:
        return _drive_async(self._flow(request), self._aexecute)
