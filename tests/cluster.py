"""Private Redis servers for the Cluster, Sentinel and fault tests.

Every server runs on a free port on 127.0.0.1, in its own process group, with its files in
a directory of the test's choosing. :func:`start_redis` starts one server,
:func:`start_cluster` a three-master Redis Cluster, :func:`start_sentinel` one Sentinel.
Each helper returns an object whose ``stop()`` (or ``kill()``) ends what it started; every
process started here is also killed when the interpreter exits, so a failing test never
leaves a server behind. The shared server on 6379 is never touched.

Unlike ``tests/servers.py`` (a context manager for a server that lives as long as one
block), a :class:`Server` here can be SIGKILLed, stopped (SIGSTOP) and started again on
the same port with the same files, which is what the fault tests do; a Sentinel needs its
config file as the first argument. The binary check (skip, or fail under ``CI=true``) is
the one of ``tests/servers.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.servers import require_redis_server

HOST = "127.0.0.1"
READY_TIMEOUT = 10.0
_RESERVED = {6379, 16379, 26379}
_handed_out: set[int] = set()
_live: dict[int, subprocess.Popen[bytes]] = {}


def free_port() -> int:
    """A TCP port nobody listens on now (never one of the shared server's ports), not
    handed out before by this process."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _RESERVED and port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port found")


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    _live.pop(proc.pid, None)


@atexit.register
def _kill_everything() -> None:
    for proc in list(_live.values()):
        _kill_group(proc)


def wait_until(predicate: object, timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll ``predicate()`` until it is true; ``TimeoutError`` naming ``what`` otherwise."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (redis.RedisError, OSError) as exc:
            last = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} did not happen within {timeout}s (last error: {last!r})")


@dataclass
class Server:
    """One ``redis-server`` process (a data node or a Sentinel)."""

    port: int
    workdir: Path
    args: list[str]
    name: str = "redis"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}-{self.port}.log"

    def client(self, **kwargs: object) -> redis.Redis:
        options: dict[str, object] = {"socket_timeout": 2.0, "decode_responses": True}
        options.update(kwargs)
        return redis.Redis(host=HOST, port=self.port, **options)  # type: ignore[arg-type]

    def start(self, wait: bool = True) -> Server:
        """Start (or start again, on the same port, with the same options)."""
        if self.alive:
            return self
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [require_redis_server(), *self.args],
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: killpg reaches it all
            )
        _live[self.proc.pid] = self.proc
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} on port {self.port} exited:\n{self.log_tail()}")
            with self.client(socket_timeout=0.5, socket_connect_timeout=0.5) as c:
                return bool(c.ping())

        wait_until(ready, timeout, f"{self.name} on port {self.port} answering PING")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save, connections reset."""
        if self.proc is not None:
            _kill_group(self.proc, signal.SIGKILL)
            self.proc = None

    def stop(self) -> None:
        """End it: SIGTERM (a clean shutdown, which writes the AOF), then SIGKILL."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self.kill()

    def restart(self, wait: bool = True) -> Server:
        self.kill()
        return self.start(wait)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "<no log>"


def start_redis(
    workdir: Path, *, port: int | None = None, extra: Sequence[str] = (), name: str = "redis"
) -> Server:
    """One plain Redis server, no persistence unless ``extra`` asks for it."""
    port = port if port is not None else free_port()
    args = [
        "--port",
        str(port),
        "--bind",
        HOST,
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        *extra,
    ]
    return Server(port, workdir, args, name).start()


# ---------------------------------------------------------------------- Redis Cluster


@dataclass
class Cluster:
    """A running Redis Cluster of three masters and no replicas."""

    nodes: list[Server]

    @property
    def url(self) -> str:
        """The keypool URL naming two of the nodes (the client discovers the third)."""
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes[:2])

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host=HOST, port=self.nodes[0].port, decode_responses=True)

    def node_of_slot(self, slot: int) -> int:
        """The port of the master that owns ``slot``."""
        with self.nodes[0].client() as c:
            for start, end, master, *_ in c.execute_command("CLUSTER SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        raise LookupError(f"slot {slot} is not covered")

    def state(self, node: Server) -> str:
        """``cluster_state`` as ``node`` sees it (``ok`` or ``fail``)."""
        return _cluster_info(node).get("cluster_state", "")

    def wait_ok(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            wait_until(
                lambda n=node: _cluster_ok(n, len(self.nodes)),
                timeout,
                f"cluster ok on {node.port}",
            )

    def flush_scripts(self) -> None:
        """SCRIPT FLUSH on every node."""
        for node in self.nodes:
            with node.client() as c:
                c.script_flush()

    def delete(self, pattern: str) -> None:
        """Delete the keys matching ``pattern`` on every node."""
        for node in self.nodes:
            with node.client() as c:
                names = list(c.scan_iter(match=pattern, count=1000))
                for name in names:
                    c.delete(name)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def _cluster_info(node: Server) -> dict[str, str]:
    with node.client(socket_timeout=1.0) as c:
        raw = c.execute_command("CLUSTER INFO")
    if isinstance(raw, bytes | str):
        text = raw.decode() if isinstance(raw, bytes) else raw
        raw = dict(line.split(":", 1) for line in text.split() if ":" in line)
    return {str(k): str(v) for k, v in dict(raw).items()}


def _cluster_ok(node: Server, size: int) -> bool:
    info = _cluster_info(node)
    return info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(size)


def _redis_cli() -> str:
    path = shutil.which("redis-cli")
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true but redis-cli is not installed", pytrace=False)
        pytest.skip("redis-cli is not installed")
    return path


def start_cluster(workdir: Path, masters: int = 3, node_timeout_ms: int = 2000) -> Cluster:
    """Start ``masters`` cluster-enabled servers, join them with ``redis-cli --cluster
    create`` and wait until every node reports ``cluster_state:ok``. A restarted node
    (``Server.start`` again) rejoins with the same id and slots, empty."""
    nodes: list[Server] = []
    try:
        for _ in range(masters):
            port, bus = free_port(), free_port()
            args = [
                "--port",
                str(port),
                "--bind",
                HOST,
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                str(bus),
                "--cluster-config-file",
                f"nodes-{port}.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
                "--dir",
                str(workdir),
                "--save",
                "",
                "--appendonly",
                "no",
            ]
            nodes.append(Server(port, workdir, args, "cluster").start())
        created = subprocess.run(
            [
                _redis_cli(),
                "--cluster",
                "create",
                *(f"{HOST}:{n.port}" for n in nodes),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{created.stdout}")
        cluster = Cluster(nodes)
        cluster.wait_ok()
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return cluster


# ---------------------------------------------------------------------- Sentinel


def start_sentinel(
    workdir: Path,
    master_port: int,
    *,
    service: str = "mymaster",
    quorum: int = 2,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
) -> Server:
    """One Sentinel watching the master on ``master_port`` (its config file is its own:
    Sentinel rewrites it)."""
    port = free_port()
    conf = workdir / f"sentinel-{port}.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {port}",
                f"bind {HOST}",
                "daemonize no",
                f'dir "{workdir}"',
                f"sentinel monitor {service} {HOST} {master_port} {quorum}",
                f"sentinel down-after-milliseconds {service} {down_after_ms}",
                f"sentinel failover-timeout {service} {failover_timeout_ms}",
                f"sentinel parallel-syncs {service} 1",
                "",
            ]
        )
    )
    return Server(port, workdir, [str(conf), "--sentinel"], "sentinel").start()
