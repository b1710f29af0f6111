"""No secret is ever shown: not in Redis, not in a log line (even at DEBUG, console or JSON),
not in an exception, not in any ``repr``.

Each secret carries a unique random part; the tests register secrets every documented way
(``add_key``, ``add_keys``, ``load_env``, ``from_env``), use them every way (leases,
successes, failures whose exception message repeats the secret, disable, stats, snapshot,
the error paths), then read every key of the namespace in full and every captured log
record and look for any piece of a secret.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from keypool import (
    AsyncKeyPool,
    ConfigError,
    ErrorKind,
    KeyPool,
    KeyPoolSettings,
    NoKeyAvailable,
    Provider,
    SecretUnavailable,
    UnknownKey,
)
from keypool.log import redact

OPENAI = Provider.OPENAI
HF = Provider.HUGGINGFACE


# --------------------------------------------------------------------------- helpers


class Secret(str):
    """A secret with a unique random part: ``pieces`` are what must never be seen."""

    unique: str

    def __new__(cls, template: str) -> Secret:
        unique = uuid.uuid4().hex
        self = super().__new__(cls, template.format(unique))
        self.unique = unique
        return self

    @property
    def pieces(self) -> tuple[str, ...]:
        u = self.unique
        b64 = base64.b64encode(str(self).encode()).decode()
        return (str(self), u[:12], u[10:22], u[-12:], b64[4:24])


def new_secrets() -> dict[str, Secret]:
    """One secret of each shape: key-shaped ones and a plain one no pattern would catch."""
    return {
        "openai": Secret("sk-proj-MARKER{}"),
        "anthropic": Secret("sk-ant-api03-MARKER{}"),
        "hf": Secret("hf_MARKER{}"),
        "gemini": Secret("AIzaMARKER{}"),
        "plain": Secret("MARKER-{}"),
    }


def leaks(text: str | bytes, secrets: Iterator[Secret] | list[Secret]) -> list[str]:
    """The pieces of any secret found in ``text``."""
    found = []
    for secret in secrets:
        for piece in secret.pieces:
            needle: str | bytes = piece.encode() if isinstance(text, bytes) else piece
            if needle in text:  # type: ignore[operator]
                found.append(piece)
    return found


def hash_texts(client: Any, name: str) -> list[str]:
    """A hash's fields as ``field=value`` text, whatever the client decodes: a key's packed
    numbers (``st``) are bytes, shown escaped."""
    raw = client.execute_command("HGETALL", name, NEVER_DECODE=True)
    pairs = raw.items() if isinstance(raw, dict) else zip(raw[0::2], raw[1::2], strict=True)
    return [f"{_text(k)}={_text(v)}" for k, v in pairs]


def _text(value: Any) -> str:
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def read_store(client: Any, pattern: str) -> tuple[list[str], str, bytes]:
    """Every key matching ``pattern``: the names, the full content (type by type) as text,
    and the concatenated DUMPs."""
    names: list[str] = []
    texts: list[str] = []
    dumps: list[bytes] = []
    for name in client.scan_iter(match=pattern, count=1000):
        name = name.decode() if isinstance(name, bytes) else name
        names.append(name)
        kind = client.type(name)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            texts.append(str(client.get(name)))
        elif kind == "hash":
            texts.extend(hash_texts(client, name))
        elif kind == "zset":
            texts.extend(f"{m}@{s}" for m, s in client.zrange(name, 0, -1, withscores=True))
        elif kind == "set":
            texts.extend(str(m) for m in client.smembers(name))
        elif kind == "list":
            texts.extend(str(m) for m in client.lrange(name, 0, -1))
        elif kind == "stream":
            texts.extend(str(e) for e in client.xrange(name))
        else:
            texts.append(f"<unread type {kind}>")
        dumped = client.dump(name)
        if dumped is not None:
            dumps.append(bytes(dumped))
    return names, "\n".join(names + texts), b"".join(dumps)


def assert_store_clean(client: Any, namespace: str, secrets: list[Secret]) -> list[str]:
    names, text, dumped = read_store(client, f"{namespace}:*")
    assert names, "the pool wrote nothing to the store?"
    assert not leaks(text, secrets), f"secret pieces stored in Redis: {leaks(text, secrets)}"
    assert not leaks(dumped, secrets), f"secret pieces in a DUMP: {leaks(dumped, secrets)}"
    return names


def assert_not_shown(secrets: list[Secret], *objects: object) -> None:
    for obj in objects:
        shown = [repr(obj), str(obj)]
        if isinstance(obj, BaseException):
            shown += [repr(a) for a in obj.args]
            # what a traceback shows: the cause, or the context unless suppressed
            cause = obj.__cause__ or (None if obj.__suppress_context__ else obj.__context__)
            if cause is not None:
                shown += [repr(cause), str(cause)]
        for text in shown:
            assert not leaks(text, secrets), f"a secret is shown by {type(obj).__name__}: {text}"


class LeakyError(Exception):
    """An SDK error that, like many real ones, repeats the key in its message."""

    def __init__(
        self, secret: str, status: int | None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"bad key {secret} (Authorization: Bearer {secret})")
        if status is not None:
            self.status_code = status
        self.response = type("Response", (), {"status_code": status, "headers": headers or {}})()
        self.body = {"error": {"message": f"Incorrect API key provided: {secret}"}}


class Records(logging.Handler):
    """Keeps every record of the ``keypool`` logger, at any level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def texts(self) -> list[str]:
        out = []
        for record in self.records:
            out.append(record.getMessage())
            out.append(repr(vars(record)))
            if record.exc_info:
                out.append(logging.Formatter().formatException(record.exc_info))
        return out

    def events(self) -> list[str]:
        found = []
        for record in self.records:
            message = record.getMessage()
            if message.startswith("{"):
                found.append(json.loads(message)["event"])
            else:
                found.append(message.split(" ", 1)[0].removeprefix("event=").strip("'\""))
        return found


@pytest.fixture
def records() -> Iterator[Records]:
    logger = logging.getLogger("keypool")
    handler = Records()
    level = logger.level
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def assert_logs_clean(records: Records, secrets: list[Secret]) -> None:
    assert records.records, "keypool logged nothing at DEBUG?"
    for text in records.texts():
        assert not leaks(text, secrets), f"a secret is in a log record: {text}"


# --------------------------------------------------------------------------- the full tour


@pytest.mark.parametrize("log_format", ["console", "json"])
def test_no_secret_in_store_logs_errors_or_reprs(
    make_pool: Callable[..., KeyPool],
    store_url: str,
    namespace: str,
    records: Records,
    log_format: str,
) -> None:
    pool = make_pool(log_level="debug", log_format=log_format, error_threshold=2)
    assert logging.getLogger("keypool").isEnabledFor(logging.DEBUG)
    s = new_secrets()
    batch = [Secret("sk-proj-MARKER{}"), Secret("MARKER-{}")]
    listed = [Secret("sk-MARKER{}"), Secret("MARKER-{}")]
    research = Secret("hf_MARKER{}")
    env = {
        "OPENAI_API_KEYS": f"{listed[0]}\n{listed[1]}",
        "ANTHROPIC_API_KEY": s["anthropic"],
        "GEMINI_API_KEY": s["gemini"],
        "HF_RESEARCH_KEY": research,
        "OLLAMA_API_URL": "http://127.0.0.1:11434",
    }
    all_secrets: list[Secret] = [*s.values(), *batch, *listed, research]
    assert len(set(all_secrets)) == len(all_secrets) == 10

    # register: add_key (with every option), add_keys, load_env, from_env
    pool.add_key(OPENAI, "direct", s["openai"], rpm=600, max_concurrency=2, models=["gpt-4o"])
    pool.add_key(HF, "hf-main", s["hf"], models="llama-3")
    pool.add_key("custom-llm", "plain", s["plain"], weight=2.5)
    pool.add_keys([(OPENAI, "bulk-1", batch[0]), ("custom-llm", "bulk-2", batch[1])])
    found = pool.load_env(env)
    assert len(found) == 5
    settings = KeyPoolSettings(
        redis_url=store_url, namespace=namespace, log_level="debug", log_format=log_format
    )
    other = KeyPool.from_env(settings=settings, environ=env)
    try:
        assert sorted(other.load_env(env)) == sorted(found)
    finally:
        other.close()

    # use them: leases, successes, context-manager failures, explicit failures
    shown: list[object] = [pool, pool.settings, settings]
    for provider in (OPENAI, HF, "custom-llm", Provider.ANTHROPIC, Provider.GEMINI):
        for _ in range(len(pool.snapshot(provider))):
            lease = pool.acquire(provider, tokens=3)
            shown.append(lease)
            lease.success(tokens=4, latency=0.01)
            shown.append(lease)
    lease = pool.acquire(OPENAI, model="gpt-4o")
    assert lease.secret == s["openai"]
    with pytest.raises(LeakyError), lease:
        raise LeakyError(lease.secret, 500)
    lease = pool.acquire(OPENAI, model="gpt-4o", wait=1.0)
    with pytest.raises(LeakyError), lease:
        raise LeakyError(lease.secret, None)  # no status: classified by name, still counted
    # 429 whose headers carry the key too
    lease = pool.acquire(HF)
    failure = lease.fail(
        LeakyError(lease.secret, 429, {"retry-after": "30", "authorization": f"Bearer {s['hf']}"})
    )
    assert failure.kind is ErrorKind.RATE_LIMIT
    shown.append(failure)
    # 401: disabled, with the reason kept in Redis
    lease = pool.acquire("custom-llm")
    secret = lease.secret
    failure = lease.fail(LeakyError(secret, 401))
    assert failure.kind is ErrorKind.AUTH
    shown.append(failure)
    shown.append(pool.mark_failure(Provider.GEMINI, "default", LeakyError(s["gemini"], 503)))
    shown.append(
        pool.mark_failure(
            Provider.ANTHROPIC,
            "default",
            TimeoutError(f"timed out talking with key {s['anthropic']}"),
        )
    )
    pool.mark_success(Provider.ANTHROPIC, "default", tokens=1, latency=0.2)

    # call(): every attempt fails with a leaky error, the user's own exception comes back
    def leaky_call(lease: Any) -> None:
        raise LeakyError(lease.secret, 503)

    with pytest.raises(LeakyError):
        pool.call(leaky_call, OPENAI, max_attempts=2)

    # operator actions
    pool.disable_key(OPENAI, "bulk-1", reason="rotating")
    pool.enable_key(OPENAI, "bulk-1")
    pool.disable_key(OPENAI, "bulk-1")
    pool.reset_key(OPENAI, "bulk-1")
    pool.assign_model("gpt-4o-mini", OPENAI, "bulk-1")
    pool.unassign_model("gpt-4o-mini", OPENAI, "bulk-1")

    # reading state
    stats = pool.snapshot()
    assert len(stats) == 10
    for one in stats:
        shown += [one, one.as_dict(), json.dumps(one.as_dict())]
    by_id = {(x.provider, x.key_id): x for x in stats}
    auth = [x for x in stats if x.status == "disabled" and x.disabled_reason != "manual"]
    assert auth and all(x.disabled_reason and x.disabled_reason.startswith("auth") for x in auth)
    assert by_id[("huggingface", "hf-main")].last_error is not None
    shown.append(pool.stats(OPENAI, "direct"))
    for one in stats:
        for text in (one.last_error or "", one.disabled_reason or ""):
            assert not leaks(text, all_secrets), text

    # the error paths
    errors: list[BaseException] = []
    with pytest.raises(UnknownKey) as unknown:
        pool.stats(OPENAI, "no-such-key")
    errors.append(unknown.value)
    with pytest.raises(UnknownKey) as unknown:
        pool.mark_failure(OPENAI, "no-such-key", LeakyError(s["openai"], 500))
    errors.append(unknown.value)
    pool.disable_key(HF, "hf-main")
    pool.disable_key(HF, "research")
    with pytest.raises(NoKeyAvailable) as none:
        pool.acquire(HF)
    errors.append(none.value)
    with pytest.raises(NoKeyAvailable) as none:
        pool.acquire(model="llama-3")
    errors.append(none.value)
    for bad in (
        lambda: pool.add_key(OPENAI, "bad id!", s["openai"]),
        lambda: pool.add_key(OPENAI, "x" * 65, s["openai"]),
        lambda: pool.add_key(OPENAI, "ok", f" {s['openai']}"),
        lambda: pool.add_key(OPENAI, "ok", f"{s['openai']}\n"),
        lambda: pool.add_key(OPENAI, "ok", s["openai"], weight=-1),
        lambda: pool.add_key(OPENAI, "ok", s["openai"], rpm=0),
        lambda: pool.add_key("Not A Provider", "ok", s["openai"]),
        lambda: pool.add_keys([(OPENAI, "a", s["openai"]), (OPENAI, "b", "")]),
        lambda: pool.add_keys([(OPENAI, "a", s["openai"]), (OPENAI, "b c", s["plain"])]),
        lambda: pool.add_key(OPENAI, "ok", s["openai"].encode()),  # type: ignore[arg-type]
        lambda: pool.acquire(OPENAI, strategy="fastest"),
        lambda: pool.acquire(OPENAI, tokens=-1),
    ):
        with pytest.raises((ValueError, TypeError)) as bad_arg:
            bad()
        errors.append(bad_arg.value)
    assert pool.stats(OPENAI, "direct").total_requests >= 1
    with pytest.raises(UnknownKey):
        pool.stats(OPENAI, "ok")  # nothing was written by the rejected calls

    # Redis loses the state: the pool puts its keys back (and logs it)
    client = redis.Redis.from_url(store_url) if store_url.startswith("redis:") else pool._client
    for name in list(client.scan_iter(match=f"{namespace}:*")):
        client.delete(name)
    # (put back with its budgets spent: the first request waits a moment)
    lease = pool.acquire(OPENAI, model="gpt-4o", wait=1.0)
    lease.release()
    shown.append(lease)

    assert_not_shown(all_secrets, *shown, *errors)
    assert_store_clean(pool._client, namespace, all_secrets)
    assert_logs_clean(records, all_secrets)
    events = records.events()
    for event in ("key_registered", "key_disabled", "cooldown_set", "pool_state_lost"):
        assert event in events, f"{event} not logged: {sorted(set(events))}"
    if log_format == "json":
        for record in records.records:
            assert isinstance(json.loads(record.getMessage()), dict)


def test_async_pool_shows_no_secret(
    store_url: str, namespace: str, records: Records, make_pool: Callable[..., KeyPool]
) -> None:
    secrets = [Secret("sk-proj-MARKER{}"), Secret("MARKER-{}")]
    sync_pool = make_pool()  # the fixture's pool closes the store afterwards

    async def main() -> list[object]:
        settings = KeyPoolSettings(redis_url=store_url, namespace=namespace, log_level="debug")
        apool = AsyncKeyPool(settings=settings)
        shown: list[object] = [apool]
        try:
            await apool.add_key(OPENAI, "a", secrets[0])
            await apool.add_keys([(OPENAI, "b", secrets[1])])
            for _ in range(2):
                lease = await apool.acquire(OPENAI)
                shown.append(lease)
                await lease.fail(LeakyError(lease.secret, 401))
            with pytest.raises(NoKeyAvailable) as none:
                await apool.acquire(OPENAI)
            shown.append(none.value)
            shown.extend(await apool.snapshot(OPENAI))
        finally:
            await apool.close()
        return shown

    shown = asyncio.run(main())
    assert_not_shown(secrets, *shown)
    assert_store_clean(sync_pool._client, namespace, secrets)
    assert_logs_clean(records, secrets)


# --------------------------------------------------------------------------- single paths


def test_disable_reason_taken_from_a_leaky_error_is_not_stored(
    pool: KeyPool, raw: Any, namespace: str, records: Records
) -> None:
    """``disable_key(..., reason=str(exc))`` is what an operator writes after an auth error;
    SDK messages repeat the key, and the reason is kept in Redis and shown by stats."""
    secret = Secret("sk-proj-MARKER{}")
    pool.add_key(OPENAI, "team-a", secret)
    error = LeakyError(secret, 401)
    pool.disable_key(OPENAI, "team-a", reason=str(error)[:200])
    stats = pool.stats(OPENAI, "team-a")
    assert stats.status == "disabled"
    assert stats.disabled_reason  # a reason is kept...
    assert not leaks(stats.disabled_reason, [secret]), stats.disabled_reason  # ...not the key
    assert_store_clean(raw, namespace, [secret])
    assert_logs_clean(records, [secret])


def test_failing_with_a_message_string_does_not_echo_the_secret(pool: KeyPool) -> None:
    """``lease.fail(str(exc))`` is a plausible mistake; the ValueError must not quote a key."""
    secret = Secret("MARKER-{}")
    pool.add_key(OPENAI, "team-a", secret)
    lease = pool.acquire(OPENAI)
    with pytest.raises(ValueError) as bad:
        lease.fail(f"{secret} was rejected")
    assert_not_shown([secret], bad.value)
    lease.release()
    assert pool.stats(OPENAI, "team-a").in_flight == 0


def test_secret_unavailable_names_the_key_not_the_secret(
    make_pool: Callable[..., KeyPool], records: Records
) -> None:
    """A process that never registered a key (default mode) cannot use it: the error says
    which key, and how to fix it, without the secret; the lease is given back."""
    owner, stranger = make_pool(), make_pool(log_level="debug")
    secret = Secret("sk-proj-MARKER{}")
    owner.add_key(OPENAI, "team-a", secret)
    with pytest.raises(SecretUnavailable) as missing:
        stranger.acquire(OPENAI)
    assert "team-a" in str(missing.value)
    assert_not_shown([secret], missing.value, stranger, owner)
    assert stranger.stats(OPENAI, "team-a").in_flight == 0


def test_settings_and_pool_reprs_hide_the_sealing_key(
    make_pool: Callable[..., KeyPool], store_url: str
) -> None:
    sealing = "sealing-" + uuid.uuid4().hex + uuid.uuid4().hex
    old = "old-sealing-" + uuid.uuid4().hex + uuid.uuid4().hex
    settings = KeyPoolSettings(redis_url=store_url, secret_key=sealing, old_secret_keys=old)
    pool = make_pool(secret_key=sealing, old_secret_keys=old)
    texts = [
        repr(settings),
        str(settings),
        settings.model_dump_json(),
        repr(settings.model_dump()),
        repr(pool),
        str(pool),
        repr(pool.settings),
        repr(vars(pool).get("_sealer")),
    ]
    for text in texts:
        assert sealing not in text and sealing[8:30] not in text, text
        assert old not in text and old[12:34] not in text, text
    short = "short-" + uuid.uuid4().hex[:6]
    with pytest.raises(ConfigError) as too_short:
        make_pool(secret_key=short)
    assert short not in str(too_short.value) and short not in repr(too_short.value)
    assert "KEYPOOL_SECRET_KEY" in str(too_short.value)


def test_redis_url_password_is_not_shown(namespace: str) -> None:
    password = "pw-" + uuid.uuid4().hex
    # a port nothing listens on: the error must name the server without the password
    url = f"redis://:{password}@127.0.0.1:1/0"
    settings = KeyPoolSettings(
        redis_url=url, namespace=namespace, socket_timeout=0.5, connect_timeout=0.5
    )
    pool = KeyPool(settings=settings)
    try:
        assert password not in repr(pool) and password not in str(pool)
        with pytest.raises(Exception) as down:
            pool.add_key(OPENAI, "a", "sk-" + uuid.uuid4().hex)
        assert password not in str(down.value) and password not in repr(down.value)
    finally:
        pool.close()


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "shape",
    [
        "sk-{}",
        "sk-proj-{}",
        "sk-ant-api03-{}",
        "sk-or-v1-{}",
        "hf_{}",
        "AIzaSy{}",
        "gsk_{}",
    ],
)
def test_redact_replaces_key_shapes_never_registered(shape: str) -> None:
    secret = shape.format(uuid.uuid4().hex + "AbCdEf")
    for text in (
        secret,
        f"calling with {secret} now",
        f"api_key={secret}",
        f'{{"key": "{secret}"}}',
        f"x-api-key: {secret}\n",
    ):
        out = redact(text)
        assert secret not in out and secret[-20:] not in out, out
        assert "[REDACTED]" in out


def test_redact_replaces_bearer_tokens_and_registered_plain_secrets(pool: KeyPool) -> None:
    token = "tok." + uuid.uuid4().hex + "-" + uuid.uuid4().hex[:8]
    out = redact(f"Authorization: Bearer {token}")
    assert token not in out and "[REDACTED]" in out
    plain = Secret("MARKER-{}")
    assert plain in redact(f"x {plain} y")  # no pattern knows it...
    pool.add_key(OPENAI, "plain", plain)
    assert plain not in redact(f"x {plain} y")  # ...until it is registered


def test_redact_leaves_ordinary_text_alone() -> None:
    text = (
        "event=key_disabled provider=openai key_id=team-a fingerprint=3f2a9c1b0d4e "
        "reason=auth: AuthenticationError: HTTP 401 until=1700000000.0"
    )
    assert redact(text) == text


# --------------------------------------------------------------------------- real Redis only


@contextlib.contextmanager
def monitor(url: str, tmp_path: Path) -> Iterator[Callable[[], str]]:
    """Record every command the server receives (``redis-cli MONITOR``); yields a function
    that stops recording and returns what was seen."""
    parsed = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
    host, port, db = parsed.get("host", "127.0.0.1"), parsed.get("port", 6379), parsed.get("db", 0)
    out = tmp_path / "monitor.txt"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            ["redis-cli", "-h", str(host), "-p", str(port), "-n", str(db), "MONITOR"],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    marker = "monitor-end-" + uuid.uuid4().hex
    client = redis.Redis.from_url(url)

    def wait_for(text: str) -> str:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            seen = out.read_text(errors="replace")
            if text in seen:
                return seen
            time.sleep(0.02)
        raise AssertionError(f"redis-cli MONITOR never showed {text!r}")

    def stop() -> str:
        client.echo(marker)
        return wait_for(marker)

    try:
        wait_for("OK")
        yield stop
    finally:
        proc.terminate()
        proc.wait(timeout=5)
        client.close()


@pytest.mark.parametrize("sealed", [False, True], ids=["default", "sealed"])
def test_no_secret_ever_crosses_the_wire_to_redis(
    redis_url: str, namespace: str, tmp_path: Path, sealed: bool
) -> None:
    """Not only is nothing stored: no command sent to Redis carries a secret (MONITOR sees
    every argument of every FCALL or EVALSHA)."""
    extra: dict[str, Any] = {"secret_key": "x" * 16 + uuid.uuid4().hex} if sealed else {}
    settings = KeyPoolSettings(redis_url=redis_url, namespace=namespace, **extra)
    secrets = [Secret("sk-proj-MARKER{}"), Secret("MARKER-{}"), Secret("hf_MARKER{}")]
    with monitor(redis_url, tmp_path) as stop:
        pool = KeyPool(settings=settings)
        try:
            pool.add_key(OPENAI, "a", secrets[0], max_concurrency=1, models=["gpt-4o"])
            pool.add_keys([(OPENAI, "b", secrets[1])])
            pool.load_env({"HF_API_KEY": secrets[2]})
            for _ in range(2):
                with pool.acquire(OPENAI, model="gpt-4o" if _ == 0 else None) as lease:
                    pass
            lease = pool.acquire(Provider.HUGGINGFACE)
            lease.fail(LeakyError(lease.secret, 401))
            pool.disable_key(OPENAI, "b")
            pool.snapshot()
        finally:
            pool.close()
        seen = stop()
    assert "FCALL" in seen.upper() or "EVAL" in seen.upper()
    assert namespace in seen
    assert not leaks(seen, secrets), f"a secret was sent to Redis: {leaks(seen, secrets)}"
    client = redis.Redis.from_url(redis_url)
    try:
        assert_store_clean(client, namespace, secrets)
    finally:
        client.close()
