"""Gateway benchmark: the latency a proxied request adds (p50, p99) against calling the
upstream directly, and non-streaming requests/s through one replica.

    python benchmarks/gateway.py                          # Redis at 127.0.0.1:6379/0
    python benchmarks/gateway.py --url memory:// --seconds 5 --json out.json

Three processes: a minimal HTTP upstream (a fixed OpenAI-like JSON answer), one gateway
replica (``keypool serve``: uvicorn, httptools, uvloop when installed) with 4 keys, and this
one, which drives both with a small keep-alive HTTP/1.1 client over raw sockets (a full HTTP
client library would cost more than the proxy it measures). Latency: one connection,
direct and proxied requests interleaved, so machine drift hits both alike. Throughput:
``--connections`` concurrent connections for ``--seconds``. Nothing in Redis is flushed:
the pool lives under a namespace of its own, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
import uuid
from typing import Any

ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
).encode()
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say ok."}]}
).encode()
TOKEN = "bench-proxy-token-0123456789"


def _loop_policy() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass


# --------------------------------------------------------------------------- the upstream


class _Upstream(asyncio.Protocol):
    """Answers every HTTP/1.1 request on the connection with ANSWER (keep-alive)."""

    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(ANSWER)).encode()
        + b"\r\n\r\n"
        + ANSWER
    )

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            self.transport.write(self.response)


def run_upstream(port: int) -> None:
    _loop_policy()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Upstream, "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --------------------------------------------------------------------------- the client


class Connection:
    """One keep-alive HTTP/1.1 connection that sends a fixed request."""

    def __init__(self, port: int, path: str, token: str | None) -> None:
        self.port = port
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode() + BODY

    async def open(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def call(self) -> int:
        self.writer.write(self.request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        lower = head.lower()
        at = lower.find(b"content-length:")
        if at < 0:
            raise RuntimeError("expected a content-length answer")
        await self.reader.readexactly(int(lower[at + 15 :].split(b"\r\n", 1)[0]))
        return status

    def close(self) -> None:
        self.writer.close()


def pctl(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(up: int, gw: int, rounds: int) -> dict[str, float]:
    direct = await Connection(up, "/v1/chat/completions", None).open()
    proxied = await Connection(gw, "/openai/v1/chat/completions", TOKEN).open()
    d: list[float] = []
    p: list[float] = []
    clock = time.perf_counter
    for _ in range(200):  # warm up both
        await direct.call()
        await proxied.call()
    for _ in range(rounds):
        t0 = clock()
        await direct.call()
        t1 = clock()
        status = await proxied.call()
        t2 = clock()
        if status != 200:
            raise RuntimeError(f"the gateway answered {status}")
        d.append(t1 - t0)
        p.append(t2 - t1)
    direct.close()
    proxied.close()
    us = 1e6
    return {
        "direct_p50_us": pctl(d, 0.5) * us,
        "direct_p99_us": pctl(d, 0.99) * us,
        "proxied_p50_us": pctl(p, 0.5) * us,
        "proxied_p99_us": pctl(p, 0.99) * us,
        "added_p50_us": (pctl(p, 0.5) - pctl(d, 0.5)) * us,
        "added_p99_us": (pctl(p, 0.99) - pctl(d, 0.99)) * us,
    }


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def throughput(
    port: int, path: str, token: str | None, conns: int, seconds: float
) -> tuple[float, int]:
    clients = [await Connection(port, path, token).open() for _ in range(conns)]
    done = 0
    errors = 0
    stop = time.perf_counter() + seconds

    async def drive(c: Connection) -> None:
        nonlocal done, errors
        while time.perf_counter() < stop:
            if await c.call() == 200:
                done += 1
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(drive(c) for c in clients))
    elapsed = time.perf_counter() - start
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{errors} requests were not answered 200")
    return done / elapsed, done


# --------------------------------------------------------------------------- main


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(port: int, path: str = "/readyz", timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _drop_namespace(url: str, namespace: str) -> None:
    if url.startswith("memory://"):
        return
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379/0", help="the pool's store")
    parser.add_argument("--rounds", type=int, default=3000, help="latency samples")
    parser.add_argument("--seconds", type=float, default=5.0, help="throughput run length")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", metavar="PATH", help="write the results here too")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.upstream:
        run_upstream(args.upstream)
        return

    up_port, gw_port = _free_port(), _free_port()
    namespace = "kpbench-gw-" + uuid.uuid4().hex[:8]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KEYPOOL_")},
        "KEYPOOL_REDIS_URL": args.url,
        "KEYPOOL_NAMESPACE": namespace,
        "KEYPOOL_LEASE_TTL": "600",
        "KEYPOOL_PROXY_TOKENS": TOKEN,
        "KEYPOOL_UPSTREAM_OPENAI": f"http://127.0.0.1:{up_port}",
        "OPENAI_API_KEYS": ",".join(f"sk-bench-{i:04d}-abcdef" for i in range(4)),
    }
    procs = [
        subprocess.Popen([sys.executable, __file__, "--upstream", str(up_port)]),
        subprocess.Popen(
            [sys.executable, "-m", "keypool", "serve", "--port", str(gw_port)], env=env
        ),
    ]
    try:
        _wait(gw_port)
        _loop_policy()
        lat = asyncio.run(latency(up_port, gw_port, args.rounds))
        direct_rps, _ = asyncio.run(
            throughput(up_port, "/v1/chat/completions", None, args.connections, args.seconds)
        )
        cpu_before = cpu_seconds(procs[1].pid)
        proxied_rps, proxied_done = asyncio.run(
            throughput(
                gw_port, "/openai/v1/chat/completions", TOKEN, args.connections, args.seconds
            )
        )
        gateway_cpu = cpu_seconds(procs[1].pid) - cpu_before
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        _drop_namespace(args.url, namespace)
    result: dict[str, Any] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "store": args.url.split("://", 1)[0],
        **{k: round(v, 1) for k, v in lat.items()},
        "direct_rps": round(direct_rps),
        "proxied_rps_per_replica": round(proxied_rps),
        "gateway_cpu_us_per_request": round(gateway_cpu / proxied_done * 1e6, 1),
        "proxied_rps_per_gateway_core": round(proxied_done / gateway_cpu),
        "connections": args.connections,
    }
    print(f"store {result['store']}, {result['cpus']} cpus, Python {result['python']}")
    print("                      p50 us    p99 us")
    print(f"direct upstream     {lat['direct_p50_us']:8.1f}  {lat['direct_p99_us']:8.1f}")
    print(f"through the gateway {lat['proxied_p50_us']:8.1f}  {lat['proxied_p99_us']:8.1f}")
    print(f"added by the gateway{lat['added_p50_us']:8.1f}  {lat['added_p99_us']:8.1f}")
    print(
        f"requests/s: direct {direct_rps:.0f}, one gateway replica {proxied_rps:.0f} "
        f"({args.connections} connections)"
    )
    print(
        f"gateway CPU per request {result['gateway_cpu_us_per_request']} us: "
        f"{result['proxied_rps_per_gateway_core']} requests/s per core it gets"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
