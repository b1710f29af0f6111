"""Private ``redis-server`` processes for tests that need a server of their own (a password,
ACL users, TLS): each listens on a free port of 127.0.0.1, persists nothing and is always
stopped afterwards.

    with start_redis("--requirepass", "s3cret", directory=tmp_path) as (port, proc):
        ...

A test without a ``redis-server`` binary skips (under ``CI=true`` it fails instead).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

__all__ = ["REDIS_SERVER", "free_port", "require_redis_server", "start_redis"]


def require_redis_server() -> str:
    """The path of ``redis-server``; skips (fails under CI) when it is not installed."""
    if REDIS_SERVER is None:
        if IN_CI:
            pytest.fail("CI=true but redis-server is not installed", pytrace=False)
        pytest.skip("redis-server is not installed")
    return REDIS_SERVER


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int, tls: bool) -> bool:
    """True once the server answers PING (an authentication error is an answer too)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
            sock: socket.socket = raw
            if tls:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
                sock = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH", b"-NOPERM", b"-ERR"))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def _wait_up(
    proc: subprocess.Popen[bytes],
    port: int,
    tls: bool,
    ready: Callable[[int], bool] | None,
    timeout: float,
) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready(port) if ready is not None else _answers(port, tls):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def start_redis(
    *extra_args: str,
    directory: Path | None = None,
    tls: bool = False,
    ready: Callable[[int], bool] | None = None,
    timeout: float = 10.0,
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """Start ``redis-server`` on a free port with ``extra_args``; yield ``(port, process)``
    once it answers PING; always stop it on exit.

    ``tls=True`` serves TLS on the port (plain TCP off): pass the ``--tls-*`` options in
    ``extra_args``. ``directory`` is the server's working directory (a tmp dir); ``ready``
    replaces the PING check.
    """
    binary = require_redis_server()
    last_output = ""
    for _attempt in range(3):  # another process may take the port between bind and start
        port = free_port()
        listen = ["--port", "0", "--tls-port", str(port)] if tls else ["--port", str(port)]
        args = [
            binary,
            *listen,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            *(["--dir", str(directory)] if directory is not None else []),
            *extra_args,
        ]
        # output to a file, not a pipe: a pipe nobody reads would block a chatty server
        with tempfile.TemporaryFile() as log:
            proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=str(directory) if directory is not None else None,
            )
            try:
                if not _wait_up(proc, port, tls, ready, timeout):
                    _stop(proc)
                    log.seek(0)
                    last_output = log.read().decode(errors="replace")[-4000:]
                    continue
                yield port, proc
                return
            finally:
                _stop(proc)
    raise RuntimeError(f"redis-server did not start ({' '.join(extra_args)}):\n{last_output}")
