"""Key states kept between calls by the function library (lua/lib.lua): a kept state is used
only while the key hash's `v` is the one it was kept at, so whatever else writes the hash —
another process through EVALSHA (its own Lua), an operator who follows the README, a pool
re-created after its state was lost — is seen by the very next call. Each test runs a
private ``redis-server``, so FLUSHALL is safe."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from keypool import KeyPool, KeyPoolSettings, NoKeyAvailable
from keypool.keyspace import ProviderKeys
from tests.cluster import Server, start_redis

pytestmark = [pytest.mark.redis]

PROVIDER = "openai"
SECRET = "test-secret-kept-a-0123456789abcdef"  # made up: no provider's key
SECRET_B = "test-secret-kept-b-0123456789abcdef"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = start_redis(tmp_path)
    try:
        yield srv
    finally:
        srv.kill()


def pool_at(url: str, namespace: str, **settings: object) -> KeyPool:
    return KeyPool(
        settings=KeyPoolSettings(redis_url=url, namespace=namespace, lease_ttl=60, **settings)
    )


def script_url(server: Server) -> str:
    """The URL of a user whose ACL denies FCALL: its pool calls by EVALSHA, in Redis's other
    Lua, where nothing is kept between calls."""
    with server.client() as admin:
        admin.execute_command(
            "ACL", "SETUSER", "nofcall", "on", ">pw", "~*", "&*", "+@all", "-fcall", "-function"
        )
    return f"redis://nofcall:pw@127.0.0.1:{server.port}/0"


def admitted(pool: KeyPool, attempts: int) -> int:
    """How many of ``attempts`` acquires (each reported) the pool admits right now."""
    count = 0
    for _ in range(attempts):
        try:
            pool.acquire(PROVIDER, wait=0).success()
        except NoKeyAvailable:
            continue
        count += 1
    return count


def test_a_budget_spent_through_evalsha_is_seen_by_the_function_library(
    server: Server, namespace: str
) -> None:
    """One process calls by FCALL (its key state kept in the library), another — whose ACL
    denies FCALL — by EVALSHA, in Redis's other Lua: together they admit rpm, not more."""
    with (
        pool_at(server.url, namespace) as by_function,
        pool_at(script_url(server), namespace) as by_script,
    ):
        by_function.add_key(PROVIDER, "only", SECRET, rpm=5)
        by_script.add_key(PROVIDER, "only", SECRET, rpm=5)
        assert admitted(by_function, 2) == 2  # its state of "only" is kept now
        assert admitted(by_script, 2) == 2
        assert admitted(by_function, 3) == 1  # the 5th; the budget then is spent
        assert admitted(by_script, 1) == 0
        assert by_function.stats(PROVIDER, "only").total_requests == 5


def test_an_account_budget_spent_through_evalsha_is_seen_by_the_function_library(
    server: Server, namespace: str
) -> None:
    """Limit scopes are kept like keys: an account's rpm spent by both kinds of caller."""
    with (
        pool_at(server.url, namespace) as by_function,
        pool_at(script_url(server), namespace) as by_script,
    ):
        for pool in (by_function, by_script):
            pool.add_key(PROVIDER, "a", SECRET, account="team")
            pool.add_key(PROVIDER, "b", SECRET_B, account="team")
        by_function.set_limits(PROVIDER, account="team", rpm=6)
        assert admitted(by_function, 3) == 3  # the account's state is kept now
        assert admitted(by_script, 2) == 2
        assert admitted(by_function, 3) == 1
        assert admitted(by_script, 1) == 0
        (scope,) = by_function.scopes(PROVIDER)
        assert scope.limits == {"rpm": 6} and scope.left == {"rpm": 0}


def test_a_hash_edited_by_hand_is_read_again_once_its_v_is_gone(
    server: Server, namespace: str
) -> None:
    """The README's rule for a hand edit: change the field, then `HDEL <hash> v`."""
    with pool_at(server.url, namespace) as pool:
        pool.add_key(PROVIDER, "only", SECRET)
        assert admitted(pool, 5) == 5  # no limit; the state is kept
        key_hash = ProviderKeys(namespace, PROVIDER).key_hash("only")
        with server.client() as admin:
            admin.hset(key_hash, "rpm", 2)
            admin.hdel(key_hash, "v")
        assert admitted(pool, 5) == 2
        with server.client() as admin:
            assert admin.hget(key_hash, "v")  # written again by the calls since


def test_nothing_kept_outlives_the_pool_state(server: Server, namespace: str) -> None:
    """The state is lost (FLUSHALL; the server, and its Lua, live on) and the pool is made
    again with budgets full: what the library had kept of the old keys is not used."""
    with pool_at(server.url, namespace, restart_budgets="full") as pool:
        pool.add_key(PROVIDER, "only", SECRET, rpm=2)
        assert admitted(pool, 3) == 2
        with server.client() as admin:
            admin.flushall()
        assert admitted(pool, 3) == 2  # re-registered: a full budget, not the kept one
        assert pool.stats(PROVIDER, "only").total_requests == 2


def test_a_model_unassigned_through_evalsha_is_not_served_again(
    server: Server, namespace: str
) -> None:
    """An admin action writes the hash directly (the key's models): `v` changes with it, so
    the function library, which kept the key with its models, does not put it back into the
    model's rotation when the key comes back from a cooldown."""
    with (
        pool_at(server.url, namespace) as by_function,
        pool_at(script_url(server), namespace) as by_script,
    ):
        by_function.add_key(PROVIDER, "a", SECRET, models=["m"])
        by_function.add_key(PROVIDER, "b", SECRET_B, models=["m"])
        for _ in range(4):
            by_function.acquire(PROVIDER, model="m").success()  # both kept, with model m
        by_script.unassign_model("m", PROVIDER, "a")
        while True:  # "a" cools for a moment, then the function library places it again
            lease = by_function.acquire(PROVIDER)
            if lease.key_id == "a":
                lease.fail(429, retry_after=0.05)
                break
            lease.success()
        time.sleep(0.2)
        served = set()
        for _ in range(6):
            lease = by_function.acquire(PROVIDER, model="m")
            served.add(lease.key_id)
            lease.success()
        assert served == {"b"}


def test_a_key_sealed_again_through_evalsha_is_unsealed_with_the_new_key(
    server: Server, namespace: str
) -> None:
    """Registering keys again (several at once go as one pipeline of EVALSHA) with a new
    sealing key writes `sealed` and nothing else: `v` changes all the same, so a worker
    holding only the new sealing key unseals what Redis holds, not a kept copy."""
    env = {
        "OPENAI_A_KEY": SECRET,
        "OPENAI_B_KEY": SECRET_B,
    }
    old, new = "old-sealing-key-0123456789abcdef", "new-sealing-key-0123456789abcdef"
    with pool_at(server.url, namespace, secret_key=old) as first:
        first.load_env(env)
        with pool_at(server.url, namespace, secret_key=old) as worker:
            for _ in range(4):
                worker.acquire(PROVIDER).success()  # both kept with the old sealed copy
        with pool_at(server.url, namespace, secret_key=new, old_secret_keys=old) as rotate:
            rotate.load_env(env)
        with pool_at(server.url, namespace, secret_key=new) as after:
            for _ in range(2):
                lease = after.acquire(PROVIDER)
                assert lease.secret in env.values()
                lease.success()
