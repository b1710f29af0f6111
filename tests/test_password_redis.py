"""Redis servers that want credentials: ``requirepass``, ACL users, TLS (``rediss://``).

Each test starts a private ``redis-server`` on a free port of 127.0.0.1 (see
``tests/servers.py``). A wrong credential must give a ``KeyPoolError`` that says what is
wrong, and no password may show in a message, a log line or a ``repr``.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from keypool import (
    AsyncKeyPool,
    ConfigError,
    KeyPool,
    KeyPoolError,
    KeyPoolSettings,
    PoolUnavailable,
    Provider,
)
from tests.servers import free_port, require_redis_server, start_redis

OPENAI = Provider.OPENAI
PASSWORD = uuid.uuid4().hex + "-root"
APP_PASSWORD = uuid.uuid4().hex + "-app"
NS = "kp-auth"  # the private servers hold nothing else


def pool_on(url: str, namespace: str = NS, **settings: object) -> KeyPool:
    options: dict[str, object] = {"socket_timeout": 2.0, "connect_timeout": 2.0}
    options.update(settings)
    return KeyPool(settings=KeyPoolSettings(redis_url=url, namespace=namespace, **options))  # type: ignore[arg-type]


def use(pool: KeyPool) -> None:
    """Register, lease, report and read: the pool works on this server."""
    secret = "sk-" + uuid.uuid4().hex + uuid.uuid4().hex
    pool.add_key(OPENAI, "a", secret, max_concurrency=2, models=["gpt-4o"])
    with pool.acquire(model="gpt-4o") as lease:
        assert lease.secret == secret
    assert pool.stats(OPENAI, "a").success_count >= 1


def assert_hidden(password: str, *texts: str) -> None:
    """Neither the password nor a piece of it (a message may elide its middle)."""
    pieces = {password, password[:8], password[-8:]} if len(password) >= 16 else {password}
    for text in texts:
        for piece in pieces:
            assert piece not in text, f"the password (or a part: {piece!r}) is shown: {text}"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    logger = logging.getLogger("keypool")
    handler = Records()
    level = logger.level
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[int]:
    """A server with a default-user password and two ACL users: ``app`` (everything) and
    ``scoped`` (only the keys of the ``kp-auth`` namespace)."""
    args = [
        "--requirepass",
        PASSWORD,
        "--user",
        "app",
        "on",
        f">{APP_PASSWORD}",
        "~*",
        "&*",
        "+@all",
        "--user",
        "scoped",
        "on",
        f">{APP_PASSWORD}",
        f"~{NS}:*",
        "+@all",
        "-@dangerous",
    ]
    with start_redis(*args, directory=tmp_path) as (port, _proc):
        yield port


# --------------------------------------------------------------------------- passwords, ACL


def test_requirepass_and_acl_users_work(auth_server: int) -> None:
    port = auth_server
    for url in (
        f"redis://:{PASSWORD}@127.0.0.1:{port}/0",
        f"redis://default:{PASSWORD}@127.0.0.1:{port}/0",
        f"redis://app:{APP_PASSWORD}@127.0.0.1:{port}/0",
    ):
        with pool_on(url) as pool:
            use(pool)
            for text in (repr(pool), str(pool)):
                assert_hidden(PASSWORD, text)
                assert_hidden(APP_PASSWORD, text)
            assert "***@127.0.0.1" in repr(pool)


def test_an_acl_user_limited_to_the_namespace_is_enough(auth_server: int) -> None:
    """The pool touches nothing outside its namespace: ``~<ns>:*`` is all it needs."""
    with pool_on(f"redis://scoped:{APP_PASSWORD}@127.0.0.1:{auth_server}/0") as pool:
        use(pool)
        pool.disable_key(OPENAI, "a")
        pool.enable_key(OPENAI, "a")
        assert [s.key_id for s in pool.snapshot()] == ["a"]
        assert pool.providers() == ["openai"]


def test_async_pool_with_a_password(auth_server: int) -> None:
    url = f"redis://app:{APP_PASSWORD}@127.0.0.1:{auth_server}/0"

    async def main() -> str:
        settings = KeyPoolSettings(redis_url=url, namespace=NS)
        async with AsyncKeyPool(settings=settings) as pool:
            await pool.add_key(OPENAI, "async-a", "sk-" + uuid.uuid4().hex * 2)
            async with pool.acquire(OPENAI) as lease:
                assert lease.key_id == "async-a"
            return repr(pool)

    assert_hidden(APP_PASSWORD, asyncio.run(main()))


@pytest.mark.parametrize(
    "credentials",
    ["wrong-password", "no-password", "unknown-user", "right-password-wrong-user"],
)
def test_wrong_credentials_give_a_clear_keypool_error(
    auth_server: int, credentials: str, log_lines: list[str]
) -> None:
    wrong = uuid.uuid4().hex
    userinfo = {
        "wrong-password": f":{wrong}@",
        "no-password": "",
        "unknown-user": f"nobody:{wrong}@",
        "right-password-wrong-user": f"nobody:{APP_PASSWORD}@",
    }[credentials]
    url = f"redis://{userinfo}127.0.0.1:{auth_server}/0"
    with pool_on(url) as pool:
        with pytest.raises(KeyPoolError) as failed:
            pool.add_key(OPENAI, "a", "sk-" + uuid.uuid4().hex * 2)
        error = failed.value
        text = f"{error} {error!r} {pool!r}"
        assert_hidden(wrong, text, *log_lines)
        assert_hidden(APP_PASSWORD, text, *log_lines)
        assert f"127.0.0.1:{auth_server}" in str(error)  # says which server
        assert "auth" in str(error).lower(), f"the error does not say it is about auth: {error}"
        # what a user gets today: PoolUnavailable (redis-py's AuthenticationError is a
        # ConnectionError); a ConfigError would be as acceptable
        assert isinstance(error, PoolUnavailable | ConfigError)


def test_an_acl_user_without_access_to_the_namespace_gives_a_keypool_error(
    auth_server: int,
) -> None:
    """The ``scoped`` user may only touch ``kp-auth:*``; a pool on another namespace is a
    configuration problem the user must see as a KeyPoolError (not a raw redis error)."""
    with pool_on(f"redis://scoped:{APP_PASSWORD}@127.0.0.1:{auth_server}/0", "elsewhere") as pool:
        with pytest.raises(Exception) as failed:
            pool.add_key(OPENAI, "a", "sk-" + uuid.uuid4().hex * 2)
        error = failed.value
        assert_hidden(APP_PASSWORD, str(error), repr(error))
        assert isinstance(error, KeyPoolError), (
            f"a permission error escapes as {type(error).__module__}.{type(error).__name__}: "
            f"{error}"
        )
        assert "permission" in str(error).lower() or "noperm" in str(error).lower()


def test_a_password_is_not_shown_by_the_settings_repr() -> None:
    """The Redis URL carries the password; ``repr(pool.settings)`` ends up in logs too."""
    secret = uuid.uuid4().hex
    settings = KeyPoolSettings(redis_url=f"redis://app:{secret}@127.0.0.1:6379/0")
    assert_hidden(secret, repr(settings), str(settings))


@pytest.mark.parametrize("length", ["long", "short"])
def test_a_password_is_not_shown_by_a_bad_url_error(length: str) -> None:
    # a long one is elided in the middle by pydantic's message: its ends still show
    secret = uuid.uuid4().hex * 2 if length == "long" else "hunter2pw"
    bad = f"redis://app:{secret}@127.0.0.1:99999/0"
    with pytest.raises(ConfigError) as config:
        KeyPool(url=bad)
    assert_hidden(secret, str(config.value), repr(config.value))
    with pytest.raises(ValueError) as invalid:  # pydantic's ValidationError is a ValueError
        KeyPoolSettings(redis_url=bad)
    assert_hidden(secret, str(invalid.value), repr(invalid.value))


# --------------------------------------------------------------------------- TLS


def _tls_support() -> str | None:
    """None when the installed redis-server has TLS built in, else why not."""
    binary = require_redis_server()
    try:
        done = subprocess.run(
            [binary, "--port", "0", "--tls-port", str(free_port()), "--save", ""],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "redis-server did not answer the TLS probe"
    out = done.stdout + done.stderr
    if "tls-cert-file" in out:
        return None  # it knows TLS and only misses a certificate
    return f"redis-server was built without TLS support: {out.strip()[-200:]}"


def require_tls() -> None:
    """Skip (even under CI: TLS is optional in a Redis build) when TLS is not built in."""
    reason = _tls_support()
    if reason is not None:
        pytest.skip(reason)


def make_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for 127.0.0.1 and localhost."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A TLS-only server (plain TCP off) with a password; yields its port and CA file."""
    require_tls()
    cert, key = make_certificate(tmp_path)
    args = [
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
        "--requirepass",
        PASSWORD,
    ]
    with start_redis(*args, directory=tmp_path, tls=True) as (port, _proc):
        yield port, cert


def test_rediss_without_verification(tls_server: tuple[int, Path]) -> None:
    port, _ = tls_server
    with pool_on(f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=none") as pool:
        use(pool)
        assert_hidden(PASSWORD, repr(pool))


def test_rediss_verifying_the_server_certificate(tls_server: tuple[int, Path]) -> None:
    port, ca = tls_server
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
    with pool_on(url) as pool:
        use(pool)

    async def main() -> None:
        settings = KeyPoolSettings(redis_url=url, namespace=NS)
        async with AsyncKeyPool(settings=settings) as apool:
            await apool.add_key(OPENAI, "async-a", "sk-" + uuid.uuid4().hex * 2)
            async with apool.acquire(OPENAI, strategy="least_busy") as lease:
                assert lease.key_id in ("a", "async-a")

    asyncio.run(main())


def test_rediss_with_an_untrusted_certificate_fails_clearly(
    tls_server: tuple[int, Path], tmp_path: Path
) -> None:
    port, _ = tls_server
    other_ca, _ = make_certificate(tmp_path, "other")
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={other_ca}"
    with pool_on(url) as pool, pytest.raises(PoolUnavailable) as failed:
        pool.add_key(OPENAI, "a", "sk-" + uuid.uuid4().hex * 2)
    assert_hidden(PASSWORD, str(failed.value), repr(failed.value))


def test_plain_redis_to_a_tls_port_fails_within_the_timeout(tls_server: tuple[int, Path]) -> None:
    port, _ = tls_server
    with (
        pool_on(f"redis://:{PASSWORD}@127.0.0.1:{port}/0", socket_timeout=1.0) as pool,
        pytest.raises(PoolUnavailable) as failed,
    ):
        pool.add_key(OPENAI, "a", "sk-" + uuid.uuid4().hex * 2)
    assert_hidden(PASSWORD, str(failed.value), repr(failed.value))


def _readme_acl_rights() -> list[str]:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    line = next(x for x in readme.splitlines() if x.startswith("ACL SETUSER keypool-app "))
    words = line.split()[3:]  # after ACL SETUSER <name>
    return [w for w in words if not w.startswith((">", "~"))]


def test_the_readme_acl_line_is_enough_for_the_whole_api(auth_server: int) -> None:
    """A user with exactly the README's rights (its namespace instead of keypool) runs every
    call of the pool, sync and async."""
    admin = redis.Redis(port=auth_server, password=PASSWORD)
    admin.execute_command("ACL", "SETUSER", "minimal", ">min-pw", f"~{NS}:*", *_readme_acl_rights())
    admin.close()
    url = f"redis://minimal:min-pw@127.0.0.1:{auth_server}/0"
    with pool_on(url) as pool:
        use(pool)
        pool.add_key(OPENAI, "b", "sk-" + uuid.uuid4().hex * 2, rpm=100, max_concurrency=2)
        pool.assign_model("gpt-4o", OPENAI, "b")
        lease = pool.acquire(model="gpt-4o", tokens=10)
        assert lease.renew(5.0)
        lease.fail(429, retry_after=1)
        with pool.acquire(OPENAI) as other:
            pass
        pool.acquire(OPENAI).release()
        key_id, _secret = pool.next_key(OPENAI)
        pool.mark_success(OPENAI, key_id, tokens=3)
        pool.mark_failure(OPENAI, key_id, 500)
        pool.disable_key(OPENAI, "b", reason="rotating")
        pool.enable_key(OPENAI, "b")
        pool.reset_key(OPENAI, "b")
        pool.unassign_model("gpt-4o", OPENAI, "b")
        assert {s.key_id for s in pool.snapshot()} == {"a", "b"}
        assert pool.stats(OPENAI, other.key_id).total_requests >= 1
        assert pool.server_time() > 0
        pool.remove_key(OPENAI, "b")
        pool.remove_key(OPENAI, "a")

    async def main() -> None:
        async with AsyncKeyPool(settings=KeyPoolSettings(redis_url=url, namespace=NS)) as apool:
            await apool.add_key(OPENAI, "c", "sk-" + uuid.uuid4().hex * 2)
            async with apool.acquire(OPENAI) as lease:
                assert lease.key_id == "c"
            await apool.snapshot()

    asyncio.run(main())
