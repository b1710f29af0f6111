"""A fault-injection TCP proxy for Redis: it lets the server run a command, then closes the
client's connection before the reply comes back — what a network blip, a load balancer's
reset or a failover does to a caller. Whether the command ran is then unknown to the
caller, which is what makes a retry dangerous unless the operation is exactly-once.

    with FaultProxy(server_port) as proxy:
        pool = KeyPool(proxy.url, ...)
        proxy.arm(script_calls)            # the next script call the server runs...
        pool.acquire("openai")             # ...runs, and its reply never reaches the pool
        assert proxy.dropped_count == 1

The proxy parses RESP enough to know where each request and each reply ends, and the
command's name and arguments. Each client connection gets its own connection to the
server; requests are handled one at a time per connection (pipelined requests wait in the
socket), so a reply always belongs to the request just forwarded.

Modes of :meth:`FaultProxy.arm`:

* ``"after"`` (drop-after-execute): forward the request, read the server's whole reply,
  then close the client's connection without forwarding it. By default only a request the
  server *ran* counts (an error reply such as ``NOSCRIPT`` — refused unrun — is forwarded
  and the proxy stays armed), so "the next script call" means the next one that ran.
* ``"before"``: close the client's connection without forwarding the request (never run),
  for contrast.

A Redis Cluster is proxied with :class:`ClusterProxy`: one proxy per node, sharing one
trigger, each rewriting the nodes' ports to the proxies' ports in the replies that carry
addresses (``CLUSTER SLOTS`` / ``CLUSTER SHARDS`` integers, ``MOVED`` / ``ASK`` errors), so
the cluster client only ever connects through the proxies.
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, Literal

__all__ = [
    "SCRIPT_COMMANDS",
    "ClusterProxy",
    "Dropped",
    "FaultProxy",
    "Predicate",
    "Trigger",
    "command_named",
    "containing",
    "script_calls",
]

HOST = "127.0.0.1"
SCRIPT_COMMANDS = frozenset({b"FCALL", b"FCALL_RO", b"EVALSHA", b"EVALSHA_RO", b"EVAL", b"EVAL_RO"})

Predicate = Callable[[Sequence[bytes]], bool]
Mode = Literal["after", "before"]


def script_calls(args: Sequence[bytes]) -> bool:
    """Any script call: ``FCALL``, ``EVALSHA``, ``EVAL`` (and their ``_RO`` forms)."""
    return bool(args) and args[0].upper() in SCRIPT_COMMANDS


def command_named(*names: str) -> Predicate:
    """Commands whose name is one of ``names`` (case-insensitive)."""
    wanted = {n.upper().encode() for n in names}
    return lambda args: bool(args) and args[0].upper() in wanted


def containing(marker: bytes, base: Predicate = script_calls) -> Predicate:
    """Requests matching ``base`` with an argument containing ``marker``."""
    return lambda args: base(args) and any(marker in a for a in args)


@dataclass(frozen=True)
class Dropped:
    """One request whose connection the proxy closed."""

    mode: Mode
    args: tuple[bytes, ...]
    reply: bytes | None  # the reply the server gave (mode "after"), never forwarded

    @property
    def name(self) -> str:
        return self.args[0].decode(errors="replace").upper() if self.args else ""


@dataclass
class Trigger:
    """When to drop, shared by the proxies of a cluster. Thread-safe."""

    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    predicate: Predicate | None = None
    mode: Mode = "after"
    skip: int = 0
    remaining: int = 0
    ran_only: bool = True
    dropped: list[Dropped] = field(default_factory=list)
    matched: int = 0  # requests that matched while armed (dropped or skipped)
    changed: threading.Condition = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def arm(
        self,
        predicate: Predicate = script_calls,
        *,
        mode: Mode = "after",
        times: int = 1,
        skip: int = 0,
        ran_only: bool = True,
    ) -> None:
        if mode not in ("after", "before"):
            raise ValueError(f"invalid mode {mode!r}")
        with self.lock:
            self.predicate, self.mode, self.remaining = predicate, mode, times
            self.skip, self.ran_only, self.matched = skip, ran_only, 0

    def disarm(self) -> None:
        with self.lock:
            self.predicate, self.remaining = None, 0

    def reset(self) -> None:
        """Disarm and forget what was dropped so far."""
        with self.lock:
            self.predicate, self.remaining, self.matched = None, 0, 0
            self.dropped.clear()

    @property
    def armed(self) -> bool:
        with self.lock:
            return self.predicate is not None and self.remaining > 0

    def wants(self, args: Sequence[bytes], mode: Mode) -> bool:
        """Whether a drop in ``mode`` may apply to this request (not yet counted)."""
        with self.lock:
            return (
                self.predicate is not None
                and self.remaining > 0
                and self.mode == mode
                and self.predicate(args)
            )

    def take(self, args: Sequence[bytes], mode: Mode, reply: bytes | None) -> bool:
        """Count a matching request; True when this one is to be dropped."""
        with self.lock:
            if self.predicate is None or self.remaining <= 0 or self.mode != mode:
                return False
            self.matched += 1
            if self.skip > 0:
                self.skip -= 1
                return False
            self.remaining -= 1
            if self.remaining == 0:
                self.predicate = None
            self.dropped.append(Dropped(mode, tuple(args), reply))
            self.changed.notify_all()
            return True

    def wait_dropped(self, count: int, timeout: float = 5.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.dropped) >= count, timeout)


# ---------------------------------------------------------------------- RESP


class _Closed(Exception):
    """The peer closed its end."""


def _line(stream: BinaryIO) -> bytes:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise _Closed
    return line


def _exactly(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if data is None or len(data) != size:
        raise _Closed
    return data


def read_request(stream: BinaryIO) -> tuple[list[bytes], bytes]:
    """One request: its arguments and its raw bytes (multibulk, or an inline command)."""
    first = _line(stream)
    if not first.startswith(b"*"):
        return first.strip().split(), first
    count = int(first[1:-2])
    raw = [first]
    args: list[bytes] = []
    for _ in range(max(count, 0)):
        head = _line(stream)
        if not head.startswith(b"$"):
            raise ValueError(f"unexpected request part {head!r}")
        size = int(head[1:-2])
        body = _exactly(stream, size + 2)
        raw += [head, body]
        args.append(body[:-2])
    return args, b"".join(raw)


_LINE_TYPES = b"+-:_,#("
_BULK_TYPES = b"$!="
_AGGREGATE_TYPES = b"*~>"
_MAP_TYPES = b"%|"


def read_reply(stream: BinaryIO, out: list[bytes]) -> None:
    """Append one whole reply (RESP2 or RESP3, nested) to ``out``, as raw bytes."""
    head = _line(stream)
    out.append(head)
    kind = head[:1]
    if kind in (b"", b"\r"):
        raise ValueError(f"unexpected reply {head!r}")
    if kind in _LINE_TYPES:
        return
    size = int(head[1:-2])
    if kind in _BULK_TYPES:
        if size >= 0:
            out.append(_exactly(stream, size + 2))
        return
    if kind in _AGGREGATE_TYPES or kind in _MAP_TYPES:
        items = size * 2 if kind in _MAP_TYPES else size
        for _ in range(max(items, 0)):
            read_reply(stream, out)
        return
    raise ValueError(f"unexpected reply type {head!r}")


# ---------------------------------------------------------------------- the proxy


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    """A threaded TCP proxy on a free port of 127.0.0.1 in front of a Redis server."""

    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = HOST,
        trigger: Trigger | None = None,
        port_map: dict[int, int] | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.trigger = trigger if trigger is not None else Trigger()
        self.port_map = port_map  # cluster: node port -> proxy port, rewritten in replies
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._stopped = threading.Event()
        self._accepting: threading.Thread | None = None
        self.requests = 0  # requests forwarded or dropped, all connections

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    # -------------------------------------------------------------- control

    def arm(
        self,
        predicate: Predicate = script_calls,
        *,
        mode: Mode = "after",
        times: int = 1,
        skip: int = 0,
        ran_only: bool = True,
    ) -> None:
        """Drop the connection of the next ``times`` requests matching ``predicate`` (after
        letting ``skip`` matching ones through). ``mode="after"``: the server runs the
        command and the reply is withheld (with ``ran_only``, error replies — refused unrun —
        do not count); ``mode="before"``: the request never reaches the server."""
        self.trigger.arm(predicate, mode=mode, times=times, skip=skip, ran_only=ran_only)

    def disarm(self) -> None:
        self.trigger.disarm()

    def reset(self) -> None:
        """Disarm and forget what was dropped so far."""
        self.trigger.reset()

    @property
    def dropped(self) -> list[Dropped]:
        with self.trigger.lock:
            return list(self.trigger.dropped)

    @property
    def dropped_count(self) -> int:
        with self.trigger.lock:
            return len(self.trigger.dropped)

    def close_all(self) -> int:
        """Close every client connection now (between requests or not); returns how many."""
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for sock in conns:
            _close(sock)
        return len(conns)

    def start(self) -> FaultProxy:
        self._accepting = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self.port}", daemon=True
        )
        self._accepting.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        _close(self._listener)
        self.close_all()
        if self._accepting is not None:
            self._accepting.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- serving

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(
                target=self._serve, args=(client,), name=f"faultproxy-conn-{self.port}", daemon=True
            ).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._conns.update((client, upstream))
        client_in = client.makefile("rb")
        upstream_in = upstream.makefile("rb")
        try:
            while not self._stopped.is_set():
                args, raw = read_request(client_in)
                with self._lock:
                    self.requests += 1
                if self.trigger.wants(args, "before") and self.trigger.take(args, "before", None):
                    return  # never forwarded: the server does not run it
                upstream.sendall(raw)
                parts: list[bytes] = []
                read_reply(upstream_in, parts)
                reply = b"".join(parts)
                if self.trigger.wants(args, "after"):
                    refused = reply[:1] in (b"-", b"!")
                    if not (refused and self.trigger.ran_only) and self.trigger.take(
                        args, "after", reply
                    ):
                        return  # ran, and the caller never hears of it
                if self.port_map:
                    reply = self._rewrite(args, reply)
                client.sendall(reply)
        except (_Closed, OSError, ValueError):
            return
        finally:
            with self._lock:
                self._conns.discard(client)
                self._conns.discard(upstream)
            for stream in (client_in, upstream_in):
                with contextlib.suppress(OSError):
                    stream.close()
            _close(client)
            _close(upstream)

    def _rewrite(self, args: Sequence[bytes], reply: bytes) -> bytes:
        """Node ports to proxy ports in replies that carry addresses (cluster mode)."""
        assert self.port_map is not None
        if reply[:1] == b"-" and reply[1:].startswith((b"MOVED", b"ASK")):
            return re.sub(
                rb"(:)(\d+)(\r\n)$",
                lambda m: m[1] + str(self.port_map.get(int(m[2]), int(m[2]))).encode() + m[3],  # type: ignore[union-attr]
                reply,
            )
        if args and args[0].upper() == b"CLUSTER":
            # ports travel as RESP integers (":30001\r\n"); slot numbers are < 16384 and
            # the nodes' ports are not, so only ports are rewritten
            return re.sub(
                rb"(?m)^:(\d+)\r$",
                lambda m: b":" + str(self.port_map.get(int(m[1]), int(m[1]))).encode() + b"\r",  # type: ignore[union-attr]
                reply,
            )
        return reply


class ClusterProxy:
    """One :class:`FaultProxy` per cluster node, sharing one trigger: arming it drops the
    next matching request whichever node it goes to."""

    def __init__(self, node_ports: Iterable[int]) -> None:
        self.trigger = Trigger()
        self.port_map: dict[int, int] = {}
        self.proxies: list[FaultProxy] = []
        for port in node_ports:
            if port < 16384:
                raise ValueError(f"node port {port} could be mistaken for a slot number")
            proxy = FaultProxy(port, trigger=self.trigger, port_map=self.port_map)
            self.port_map[port] = proxy.port
            self.proxies.append(proxy)

    @property
    def url(self) -> str:
        """A keypool cluster URL naming the proxies of the first two nodes."""
        return "redis+cluster://" + ",".join(f"{HOST}:{p.port}" for p in self.proxies[:2])

    def arm(
        self,
        predicate: Predicate = script_calls,
        *,
        mode: Mode = "after",
        times: int = 1,
        skip: int = 0,
        ran_only: bool = True,
    ) -> None:
        self.trigger.arm(predicate, mode=mode, times=times, skip=skip, ran_only=ran_only)

    def disarm(self) -> None:
        self.trigger.disarm()

    def reset(self) -> None:
        """Disarm and forget what was dropped so far."""
        self.trigger.reset()

    @property
    def dropped(self) -> list[Dropped]:
        with self.trigger.lock:
            return list(self.trigger.dropped)

    @property
    def dropped_count(self) -> int:
        with self.trigger.lock:
            return len(self.trigger.dropped)

    def start(self) -> ClusterProxy:
        for proxy in self.proxies:
            proxy.start()
        return self

    def stop(self) -> None:
        for proxy in self.proxies:
            proxy.stop()

    def __enter__(self) -> ClusterProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
