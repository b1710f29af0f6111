"""The embedded store's Lua: compiled once, atomic, sandboxed, and replying as Redis does.

The same scripts run against the real Redis where one answers (``redis`` marker): every
reply and error text below is what Redis 7 gives. Only scripts that a Redis handles safely
are sent to it (Redis 7.0 crashes on ``error({})`` without an ``err`` field).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from keypool import KeyPool, embedded, scripts
from tests.conftest import REDIS_URL, require_redis

# (script, numkeys and arguments, reply) — the same on the embedded store and on Redis
REPLIES: list[tuple[str, tuple[Any, ...], Any]] = [
    ("return 3.9", (0,), 3),
    ("return -3.7", (0,), -3),
    ("return {1, 2.5, -2.5, 'a'}", (0,), [1, 2, -2, "a"]),
    ("return {1, 2, nil, 3}", (0,), [1, 2]),
    ("local t = {} t[1] = 1 t[3] = 3 return t", (0,), [1]),
    ("return false", (0,), None),
    ("return true", (0,), 1),
    ("return {1, {2, 'a'}, false, true}", (0,), [1, [2, "a"], None, 1]),
    ("return {{}}", (0,), [[]]),
    ("return {err = 5}", (0,), []),
    ("return {ok = 5, 1}", (0,), [1]),
    ("return redis.status_reply('FINE')", (0,), "FINE"),
    ("return redis.call('GET', KEYS[1])", (1, "kp:emb:nokey"), None),
    ("return redis.call('PING')", (0,), "PONG"),
    ("return redis.call('HGETALL', KEYS[1])", (1, "kp:emb:nokey"), []),
    ("return {redis.call('ZSCORE', KEYS[1], 'm')}", (1, "kp:emb:nokey"), [None]),
    ("return redis.call('ZADD', KEYS[1], 1.5, 'm')", (1, "kp:emb:nokey"), 1),
    ("return KEYS", (2, "a", "b", "c"), ["a", "b"]),
    ("return ARGV", (2, "a", "b", "c"), ["c"]),
    ("return #redis.call('TIME')", (0,), 2),
    ("return type(redis.call('TIME')[1])", (0,), "string"),
    ("return redis.pcall('NOSUCH')['err']", (0,), "ERR Unknown Redis command called from script"),
    ("return cjson.encode({1, 2, {a = cjson.null}})", (0,), '[1,2,{"a":null}]'),
    ("return cjson.encode({})", (0,), "{}"),
    ('return cjson.encode(cjson.decode(\'[1,null,"x",{"k":[]}]\'))', (0,), '[1,null,"x",{"k":{}}]'),
    ("return tostring(cjson.decode('[1,null]')[2] == cjson.null)", (0,), "true"),
    ("return redis.sha1hex('')", (0,), "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
    ("return {struct.unpack('<di2', struct.pack('<di2', 2.5, -3))}", (0,), [2, -3, 11]),
    ("return string.foo", (0,), None),
    ("return tostring(_G ~= nil)", (0,), "true"),
]

# (script, the error's text as redis-py gives it, with <sha> for the script's sha)
ERRORS: list[tuple[str, str]] = [
    ("error('boom')", "user_script:1: boom script: <sha>, on @user_script:1."),
    (
        "return 'x' .. nil",
        "user_script:1: attempt to concatenate a nil value script: <sha>, on @user_script:1.",
    ),
    (
        "x = 1 return 1",
        "user_script:1: Attempt to modify a readonly table script: <sha>, on @user_script:1.",
    ),
    (
        "string.foo = 1 return 1",
        "user_script:1: Attempt to modify a readonly table script: <sha>, on @user_script:1.",
    ),
    (
        "return y",
        "user_script:1: Script attempted to access nonexistent global variable 'y' script: <sha>, "
        "on @user_script:1.",
    ),
    (
        "return type(os)",
        "user_script:1: Script attempted to access nonexistent global variable 'os' script: <sha>, "
        "on @user_script:1.",
    ),
    ("return redis.error_reply('MYERR bad thing')", "MYERR bad thing"),
    ("return redis.error_reply('bad thing')", "bad thing"),
    ("return {err = 'E x'}", "E x"),
    ("error({err = 'MY boom'})", "MY boom script: <sha>, on @user_script:1."),
    (
        "local v = redis.call('INCR') return v",
        "Wrong number of args calling Redis command from script script: <sha>, on @user_script:1.",
    ),
    (
        "local v = redis.call('nosuch') return v",
        "Unknown Redis command called from script script: <sha>, on @user_script:1.",
    ),
    (
        "local v = redis.call('SCRIPT', 'LOAD', 'return 1') return v",
        "This Redis command is not allowed from script script: <sha>, on @user_script:1.",
    ),
    (
        "local v = redis.call('HSET', 'k', 'a', {}) return v",
        "Lua redis lib command arguments must be strings or integers script: <sha>, "
        "on @user_script:1.",
    ),
    (
        "redis.pcall('SET', KEYS[1], 'x') local v = redis.call('INCR', KEYS[1]) return v",
        "value is not an integer or out of range script: <sha>, on @user_script:1.",
    ),
    (
        "redis.pcall('SET', KEYS[1], 'x') local v = redis.call('HGET', KEYS[1], 'f') return v",
        "WRONGTYPE Operation against a key holding the wrong kind of value script: <sha>, "
        "on @user_script:1.",
    ),
    (
        "return 1 +",
        "Error compiling script (new function): user_script:1: unexpected symbol near '<eof>'",
    ),
]


@pytest.fixture
def server() -> embedded.EmbeddedServer:
    return embedded.EmbeddedServer()


@pytest.fixture
def client(server: embedded.EmbeddedServer) -> Any:
    return embedded.client(server, decode_responses=True)


@pytest.fixture(params=["memory", "redis"])
def any_client(request: pytest.FixtureRequest, server: embedded.EmbeddedServer) -> Iterator[Any]:
    if request.param == "memory":
        yield embedded.client(server, decode_responses=True)
        return
    require_redis()
    real = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield real
    real.delete("kp:emb:nokey", "kp:emb:counter")
    real.close()


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


@pytest.mark.parametrize(("script", "args", "reply"), REPLIES, ids=[r[0] for r in REPLIES])
def test_replies_convert_as_in_redis(
    any_client: Any, script: str, args: tuple[Any, ...], reply: Any
) -> None:
    assert any_client.eval(script, *args) == reply


@pytest.mark.parametrize(("script", "text"), ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_read_as_in_redis(any_client: Any, script: str, text: str) -> None:
    keys = (1, "kp:emb:counter") if "KEYS[1]" in script else (0,)
    with pytest.raises(redis.ResponseError) as caught:
        any_client.eval(script, *keys)
    assert str(caught.value) == text.replace("<sha>", _sha(script))


def test_error_table_without_err_is_an_error(client: Any) -> None:
    with pytest.raises(redis.ResponseError):
        client.eval("error({foo = 1})", 0)


def test_nested_error_reply_is_an_element(client: Any) -> None:
    reply = client.eval("return {redis.status_reply('A'), redis.error_reply('B x')}", 0)
    assert reply[0] == "A"
    assert isinstance(reply[1], redis.ResponseError) and str(reply[1]) == "B x"


def test_numbers_reach_commands_as_redis_formats_them(client: Any) -> None:
    client.eval("redis.call('SET', KEYS[1], 0.1) redis.call('SET', KEYS[2], 3)", 2, "f", "i")
    assert client.get("f") == "0.10000000000000001"  # %.17g, as Redis 7.0
    assert client.get("i") == "3"


def test_nonfinite_and_huge_numbers_reply_llong_min(client: Any) -> None:
    assert client.eval("return 1e300", 0) == -(2**63)
    assert client.eval("return 0/0", 0) == -(2**63)


def test_unknown_sha_is_noscript_and_load_makes_it_known(client: Any) -> None:
    script = "return ARGV[1]"
    sha = _sha(script)
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha(sha, 0, "x")
    assert client.script_load(script) == sha
    assert client.evalsha(sha, 0, "x") == "x"
    assert client.evalsha(sha.upper(), 0, "y") == "y"
    assert client.script_exists(sha) == [True]
    client.script_flush()
    with pytest.raises(redis.exceptions.NoScriptError):
        client.evalsha(sha, 0, "x")


def test_script_that_does_not_compile_is_not_stored(client: Any) -> None:
    with pytest.raises(redis.ResponseError, match="Error compiling script"):
        client.script_load("return 1 +")
    assert client.script_exists(_sha("return 1 +")) == [False]


def test_each_script_is_compiled_once(server: embedded.EmbeddedServer, client: Any) -> None:
    scripts = server.lua_scripts
    compiled = 0
    compile_source = scripts._compile

    def counting(source: bytes) -> Any:
        nonlocal compiled
        compiled += 1
        return compile_source(source)

    scripts._compile = counting
    sha = client.script_load("local n = 0 n = n + 1 return n")
    for _ in range(20):
        assert client.evalsha(sha, 0) == 1  # top-level locals are fresh on every call
        assert client.eval("return 2", 0) == 2
    assert compiled == 2


def test_a_script_sees_nothing_of_another(client: Any) -> None:
    with pytest.raises(redis.ResponseError, match="readonly table"):
        client.eval("leaked = 1 return 1", 0)
    with pytest.raises(redis.ResponseError, match="nonexistent global variable 'leaked'"):
        client.eval("return leaked", 0)
    with pytest.raises(redis.ResponseError, match="readonly table"):
        client.eval("redis.call = nil return 1", 0)
    assert client.eval("return redis.call('PING')", 0) == "PONG"
    with pytest.raises(redis.ResponseError, match="readonly table"):
        client.eval("_G.x = 1", 0)
    # lupa's bridge to Python is out of reach, whatever way a script looks for it
    for probe in ("return python", "return _G.python", "return loadstring('return python')()"):
        with pytest.raises(redis.ResponseError, match="nonexistent global variable 'python'"):
            client.eval(probe, 0)


def test_struct_and_missing_libraries(client: Any) -> None:
    assert client.eval("return struct.size('<i4hBl')", 0) == 15
    assert client.eval("return {struct.unpack('>I2', struct.pack('>I2', 513))}", 0) == [513, 3]
    with pytest.raises(redis.ResponseError, match="not supported by the embedded store"):
        client.eval("return struct.pack('s', 'x')", 0)
    assert client.eval("return type(bit)", 0) == "nil"  # Redis has it; a script can test for it


def test_scripts_are_atomic_under_threads(server: embedded.EmbeddedServer) -> None:
    # read, yield to other threads through a command, write back: lost updates if two
    # scripts ever interleave
    script = (
        "local v = tonumber(redis.call('GET', KEYS[1]) or '0') "
        "for _ = 1, 20 do redis.call('TIME') end "
        "redis.call('SET', KEYS[1], v + 1) return v + 1"
    )
    clients = [embedded.client(server) for _ in range(4)]
    sha = clients[0].script_load(script)
    errors: list[BaseException] = []

    def work(c: Any) -> None:
        try:
            for _ in range(100):
                c.evalsha(sha, 1, "counter")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert int(clients[0].get("counter")) == 400


def test_async_client_shares_the_server(server: embedded.EmbeddedServer) -> None:
    sync = embedded.client(server, decode_responses=True)
    sha = sync.script_load("return redis.call('INCR', KEYS[1])")

    async def main() -> list[Any]:
        aclient = embedded.async_client(server, decode_responses=True)
        replies = await asyncio.gather(*(aclient.evalsha(sha, 1, "n") for _ in range(50)))
        with pytest.raises(redis.exceptions.NoScriptError):
            await aclient.evalsha("0" * 40, 0)
        pipe = aclient.pipeline(transaction=False)
        pipe.evalsha(sha, 1, "n")
        pipe.get("n")
        replies.extend(await pipe.execute())
        await aclient.aclose()
        return replies

    replies = asyncio.run(main())
    assert sorted(replies[:50]) == list(range(1, 51))
    assert replies[50:] == [51, "51"]
    assert sync.evalsha(sha, 1, "n") == 52


def test_pipelines_and_transactions_run_scripts(client: Any) -> None:
    sha = client.script_load("return redis.call('INCR', KEYS[1])")
    pipe = client.pipeline(transaction=False)
    pipe.evalsha(sha, 1, "p")
    pipe.execute_command("EVALSHA", "0" * 40, 0)
    replies = pipe.execute(raise_on_error=False)
    assert replies[0] == 1 and isinstance(replies[1], redis.exceptions.NoScriptError)
    with client.pipeline(transaction=True) as tx:
        tx.evalsha(sha, 1, "p")
        tx.evalsha(sha, 1, "p")
        assert tx.execute() == [2, 3]


def test_disconnected_server_refuses_scripts(server: embedded.EmbeddedServer, client: Any) -> None:
    server.connected = False
    with pytest.raises(redis.ConnectionError):
        client.eval("return 1", 0)
    server.connected = True
    assert client.eval("return 1", 0) == 1


def test_keypool_memory_store_is_embedded() -> None:
    pool = KeyPool("memory://test-embedded")
    assert isinstance(pool._client, embedded.EmbeddedRedis)
    pool.add_key("openai", "a", "sk-test-aaaaaaaaaaaaaaaa")
    for _ in range(5):
        pool.acquire("openai").success()
    pool.close()


# ---------------------------------------------------------------------- function libraries

LIBRARY = """#!lua name=kptest_fn
local n = 0
redis.register_function('kptest_count', function(keys, args) n = n + 1 return n end)
redis.register_function('kptest_fail', function(keys, args)
  error('boom')
end)
redis.register_function('kptest_echo', function(keys, args)
  return {keys[1], args[1], #keys, #args, redis.call('PING')}
end)
"""

# (library code, the error's text) — the same on the embedded store and on Redis 7
LIBRARY_ERRORS: list[tuple[str, str]] = [
    (  # at load, a library sees redis.register_function, redis.log and the version only
        "#!lua name=kptest_bad\nlocal f = string.format\n"
        "redis.register_function('kptest_x', function() return 1 end)\n",
        "Error registering functions: ERR user_function:2: Script attempted to access "
        "nonexistent global variable 'string'",
    ),
    (
        "#!lua name=kptest_bad\nredis.register_function('kptest_x', function() return 1 end\n",
        "Error compiling function: user_function:3: ')' expected (to close '(' at line 2) "
        "near '<eof>'",
    ),
]


@pytest.fixture
def library_client(any_client: Any) -> Iterator[Any]:
    any_client.function_load(LIBRARY, replace=True)
    yield any_client
    with contextlib.suppress(redis.ResponseError):
        any_client.function_delete("kptest_fn")


def test_a_function_library_keeps_its_state_between_calls(library_client: Any) -> None:
    """A library's code runs once, when loaded: its top-level locals live on (what keeps
    keypool's key states between calls), unlike a script's."""
    assert [library_client.fcall("kptest_count", 0) for _ in range(3)] == [1, 2, 3]
    assert library_client.fcall("kptest_echo", 1, "k", "a", "b") == ["k", "a", 1, 2, "PONG"]
    library_client.function_load(LIBRARY, replace=True)  # loaded again: state anew
    assert library_client.fcall("kptest_count", 0) == 1


def test_function_errors_read_as_in_redis(library_client: Any) -> None:
    with pytest.raises(redis.ResponseError) as caught:
        library_client.fcall("kptest_fail", 0)
    assert str(caught.value) == "user_function:5: boom script: kptest_fail, on @user_function:5."
    with pytest.raises(redis.ResponseError, match=r"^Library 'kptest_fn' already exists$"):
        library_client.function_load(LIBRARY)
    with pytest.raises(redis.ResponseError, match=r"^Function not found$"):
        library_client.fcall("kptest_nosuch", 0)


@pytest.mark.parametrize(("code", "text"), LIBRARY_ERRORS)
def test_library_load_errors_read_as_in_redis(any_client: Any, code: str, text: str) -> None:
    with pytest.raises(redis.ResponseError) as caught:
        any_client.function_load(code, replace=True)
    assert str(caught.value) == text
    with pytest.raises(redis.ResponseError, match=r"^Function not found$"):
        any_client.fcall("kptest_x", 0)  # nothing of a library that failed is kept


def test_memory_pool_runs_the_function_library_and_reloads_it() -> None:
    pool = KeyPool("memory://test-embedded-functions")
    try:
        pool.add_key("openai", "a", "sk-test-aaaaaaaaaaaaaaaa")
        pool.add_key("openai", "b", "sk-test-bbbbbbbbbbbbbbbb")
        for _ in range(4):
            pool.acquire("openai").success()
        listed = pool._client.function_list()  # RESP2: each library as name/value pairs
        names = {dict(zip(lib[0::2], lib[1::2], strict=True))["library_name"] for lib in listed}
        assert scripts.library_name() in names
        pool._client.function_flush()  # the code is gone: the next call loads it again
        for _ in range(4):
            pool.acquire("openai").success()
        stats = pool.snapshot("openai")
        assert sum(s.total_requests for s in stats) == 8
        assert sum(s.success_count for s in stats) == 8
        assert sum(s.in_flight for s in stats) == 0
    finally:
        pool.close()
