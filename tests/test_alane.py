"""AsyncKeyPool's own connection (keypool/alane.py): many tasks' script calls pipelined on
one connection per event loop, replies matched in order, calls sent again after a dropped
connection, the code reloaded after a flush, EVALSHA without FCALL rights, timeouts on a
hung server, cancellation. Each test runs a private ``redis-server``."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from keypool import AsyncKeyPool, KeyPoolSettings, PoolUnavailable, scripts
from keypool.alane import ALane
from tests import mp_workers
from tests.cluster import Server, start_redis

pytestmark = [pytest.mark.redis]

PROVIDER = "openai"
KEYS = tuple(f"k{i:02d}" for i in range(20))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_redis(tmp_path)
    try:
        yield srv
    finally:
        if srv.proc is not None:
            os.killpg(srv.proc.pid, signal.SIGCONT)
        srv.kill()


async def make_pool(
    url: str, namespace: str, *, keys: tuple[str, ...] = KEYS, **settings: Any
) -> AsyncKeyPool:
    apool = AsyncKeyPool(
        settings=KeyPoolSettings(redis_url=url, namespace=namespace, lease_ttl=60, **settings)
    )
    for key_id in keys:
        await apool.add_key(PROVIDER, key_id, mp_workers.secret_for(key_id))
    return apool


def lane_of(apool: AsyncKeyPool) -> ALane:
    assert apool._lanes is not None, "the pool has no lanes on a plain Redis"
    lane = apool._lanes.existing()
    assert lane is not None
    return lane


async def totals(apool: AsyncKeyPool) -> tuple[int, int, int]:
    """(requests, successes, in flight) over the provider's keys."""
    keys = await apool.snapshot(PROVIDER)
    return (
        sum(s.total_requests for s in keys),
        sum(s.success_count for s in keys),
        sum(s.in_flight for s in keys),
    )


def libraries(client: Any) -> set[str]:
    found = set()
    for lib in client.function_list():
        fields = lib if isinstance(lib, dict) else dict(zip(lib[0::2], lib[1::2], strict=True))
        found.add(fields["library_name"])
    return found


def test_replies_reach_their_callers_under_200_concurrent_tasks(
    server: Server, namespace: str
) -> None:
    async def scenario() -> None:
        apool = await make_pool(server.url, namespace)
        try:

            async def ask(i: int) -> None:
                key_id = KEYS[i % len(KEYS)]
                for _ in range(5):
                    assert (await apool.stats(PROVIDER, key_id)).key_id == key_id
                    lease = await apool.acquire(PROVIDER)
                    assert lease.key_id in KEYS
                    await lease.success()

            await asyncio.gather(*(ask(i) for i in range(200)))
            assert lane_of(apool).uses_functions
            # every report was sent without waiting; a snapshot reads them applied
            assert await totals(apool) == (1000, 1000, 0)
            with server.client() as admin:
                # the pool's script calls all went through one connection
                assert int(admin.info("clients")["connected_clients"]) <= 4
        finally:
            await apool.close()

    asyncio.run(scenario())


def test_a_killed_connection_mid_burst_loses_and_doubles_nothing(
    server: Server, namespace: str
) -> None:
    async def scenario() -> None:
        apool = await make_pool(server.url, namespace)
        acquired = 0
        succeeded = 0
        try:

            async def work() -> None:
                nonlocal acquired, succeeded
                for _ in range(30):
                    lease = await apool.acquire(PROVIDER)
                    acquired += 1
                    await lease.success()
                    succeeded += 1

            def kill() -> int:
                with server.client() as admin:
                    return int(admin.client_kill_filter(_type="normal", skipme=True))

            burst = asyncio.gather(*(work() for _ in range(100)))
            killed = 0
            for at in (300, 1200, 2400):
                while acquired < at:
                    await asyncio.sleep(0.001)
                killed += await asyncio.to_thread(kill)
            await burst  # every caller got its one result, none an error
            assert killed >= 3
            assert (acquired, succeeded) == (3000, 3000)
            assert await totals(apool) == (3000, 3000, 0)
        finally:
            await apool.close()

    asyncio.run(scenario())


def test_a_function_flush_reloads_the_library(server: Server, namespace: str) -> None:
    async def scenario() -> None:
        apool = await make_pool(server.url, namespace)
        try:
            for _ in range(5):
                await (await apool.acquire(PROVIDER)).success()
            with server.client() as admin:
                assert scripts.library_name() in libraries(admin)
                admin.function_flush()
                admin.script_flush()

            async def cycle() -> None:
                await (await apool.acquire(PROVIDER)).success()

            await asyncio.gather(*(cycle() for _ in range(50)))
            # reports sent without waiting, refused after a second flush, are sent again
            leases = [await apool.acquire(PROVIDER) for _ in range(10)]
            with server.client() as admin:
                admin.function_flush()
            for lease in leases:
                await lease.success()
            assert await totals(apool) == (65, 65, 0)
            assert lane_of(apool).uses_functions
            with server.client() as admin:
                assert scripts.library_name() in libraries(admin)
        finally:
            await apool.close()

    asyncio.run(scenario())


def test_without_fcall_rights_the_scripts_are_used(server: Server, namespace: str) -> None:
    with server.client() as admin:
        admin.execute_command(
            "ACL", "SETUSER", "nofcall", "on", ">pw", "~*", "&*", "+@all", "-fcall", "-function"
        )
    url = f"redis://nofcall:pw@127.0.0.1:{server.port}/0"

    async def scenario() -> None:
        apool = await make_pool(url, namespace, keys=("k1", "k2"))
        try:

            async def cycle() -> None:
                async with apool.acquire(PROVIDER):
                    pass

            await asyncio.gather(*(cycle() for _ in range(20)))
            assert not lane_of(apool).uses_functions
            assert await totals(apool) == (20, 20, 0)
        finally:
            await apool.close()

    asyncio.run(scenario())
    with server.client() as admin:
        assert not libraries(admin)  # nothing could be loaded, nothing was


def test_a_hung_server_fails_every_caller_within_the_timeout(
    server: Server, namespace: str
) -> None:
    timeout = 1.0

    async def scenario() -> None:
        apool = await make_pool(server.url, namespace, keys=("k1",), socket_timeout=timeout)
        try:
            await (await apool.acquire(PROVIDER)).success()
            assert server.proc is not None
            os.killpg(server.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
            try:
                start = time.monotonic()
                outcomes = await asyncio.gather(
                    *(apool.acquire(PROVIDER)._get() for _ in range(20)), return_exceptions=True
                )
                elapsed = time.monotonic() - start
                assert all(isinstance(o, PoolUnavailable) for o in outcomes), outcomes
                assert elapsed < timeout + 0.5, elapsed
                # a new connection to the hung server fails within the timeouts too
                start = time.monotonic()
                with pytest.raises(PoolUnavailable):
                    await apool.stats(PROVIDER, "k1")
                assert time.monotonic() - start < 2 * timeout + 0.5
            finally:
                os.killpg(server.proc.pid, signal.SIGCONT)
            lease = await apool.acquire(PROVIDER)  # a fresh connection, once it answers
            assert lease.key_id == "k1"
            await lease.success()
        finally:
            await apool.close()

    asyncio.run(scenario())


def test_cancelled_callers_keep_later_calls_in_step(server: Server, namespace: str) -> None:
    async def scenario() -> None:
        apool = await make_pool(server.url, namespace)
        try:
            await apool.stats(PROVIDER, KEYS[0])  # the connection is open

            async def ask(key_id: str) -> str:
                return (await apool.stats(PROVIDER, key_id)).key_id

            for _round in range(5):
                tasks = [asyncio.create_task(ask(KEYS[i % len(KEYS)])) for i in range(60)]
                await asyncio.sleep(0)  # every call written, no reply read yet
                for task in tasks[::2]:
                    task.cancel()
                results = await asyncio.gather(*tasks, return_exceptions=True)
                for i, result in enumerate(results):
                    if i % 2:
                        assert result == KEYS[i % len(KEYS)]
                    else:
                        assert isinstance(result, asyncio.CancelledError)
                # the replies of the cancelled calls were read and dropped, not handed on
                for key_id in KEYS:
                    assert await ask(key_id) == key_id
            picked = {(await apool.acquire(PROVIDER)).key_id for _ in range(len(KEYS))}
            assert picked == set(KEYS)
        finally:
            await apool.close()

    asyncio.run(scenario())


def test_one_pool_in_several_event_loops(server: Server, namespace: str) -> None:
    apool = asyncio.run(make_pool(server.url, namespace, keys=("k1", "k2")))

    async def use() -> tuple[int, int, int]:
        for _ in range(10):
            await (await apool.acquire(PROVIDER)).success()
        result = await totals(apool)
        await apool.close()
        return result

    assert asyncio.run(use()) == (10, 10, 0)
    assert asyncio.run(use()) == (20, 20, 0)


def test_closing_the_pool_ends_the_calls_in_flight(server: Server, namespace: str) -> None:
    async def scenario() -> None:
        apool = await make_pool(server.url, namespace)
        tasks = [asyncio.create_task(apool.stats(PROVIDER, KEYS[i % 20])) for i in range(50)]
        await asyncio.sleep(0)  # written, not answered
        await apool.close()
        done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        for result in done:  # answered before the close, or ended by it: none hangs
            assert not isinstance(result, BaseException) or isinstance(result, PoolUnavailable)

    asyncio.run(scenario())
