"""Two ASGI servers measured on the router's HTTP load (``python -m flotilla.bench.http_servers``).

Why the router's KServe v2 HTTP front door runs on uvicorn (docs/benchmarks.md, "The HTTP server").
The router is one asyncio process: its HTTP server must run inside the loop
the gRPC server and the route table already run in, as a task beside them.
Both candidates can: uvicorn (httptools' C parser, asyncio protocols) and
Hypercorn (h11, pure Python, asyncio streams).

Each server runs in its own process on uvloop (as the router does), serving
one minimal raw-ASGI app that reads a small JSON POST (the size of a KServe
v2 infer request naming one image) and answers a small JSON body, from a
socket bound before it starts (as the router binds its own). This process is
the load generator: ``--connections`` aiohttp keep-alive connections, each
sending its next request when the last is answered, for ``--duration-s``
after a warm-up. Reported per run: requests/s and the server process's CPU
per request (psutil: user + system over the measured window), which is what
the router's core would spend on HTTP per call. Rounds alternate the servers,
so a machine whose speed drifts favours neither.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import psutil

SERVERS = ("uvicorn", "hypercorn")
REQUEST = {
    "inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [1], "data": ["0b7a4c4e-3f5e-4b8e-9d6c-2f1e8a9b7c6d"]}],
    "outputs": [{"name": "LABELS", "parameters": {"classification": 5}}],
}
ANSWER = json.dumps(
    {"model_name": "m", "outputs": [{"name": "LABELS", "datatype": "BYTES", "shape": [1, 5],
                                     "data": [f"0.{i}:{i}:label number {i}" for i in range(5)]}]}
).encode()

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def echo_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Reads the whole body, parses it as JSON, answers ``ANSWER``."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    json.loads(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]})
    await send({"type": "http.response.body", "body": ANSWER})


def bound_socket(host: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def serve(name: str, host: str) -> None:
    """Serve ``echo_app`` with server ``name`` in this loop until stdin closes; prints the port."""
    sock = bound_socket(host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closes our stdin to stop us
    print(sock.getsockname()[1], flush=True)
    if name == "uvicorn":
        from flotilla.services.router.http_server import HttpServer

        server = HttpServer(echo_app, grace_s=1.0)
        await server.start_on(sock)
        await stop.wait()
        await server.stop()
    else:
        from hypercorn.asyncio import serve as hypercorn_serve
        from hypercorn.config import Config

        config = Config()
        config.bind = [f"fd://{sock.fileno()}"]
        config.accesslog = None
        config.graceful_timeout = 1.0
        await hypercorn_serve(echo_app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Run:
    server: str
    requests_per_s: float
    server_cpu_us_per_request: float


async def load(port: int, connections: int, duration_s: float, warmup_s: float) -> tuple[int, float]:
    """(requests answered, seconds) over the measured window, after ``warmup_s``."""
    import aiohttp

    url = f"http://127.0.0.1:{port}/v2/models/m/infer"
    body = json.dumps(REQUEST).encode()
    counting = False
    done = 0
    stop_at = time.monotonic() + warmup_s + duration_s
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one_connection() -> None:
            nonlocal done
            while time.monotonic() < stop_at:
                async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                    await response.read()
                    if response.status != 200:
                        raise RuntimeError(f"status {response.status}")
                if counting:
                    done += 1

        tasks = [asyncio.create_task(one_connection()) for _ in range(connections)]
        await asyncio.sleep(warmup_s)
        counting = True
        started = time.monotonic()
        await asyncio.gather(*tasks)
        return done, time.monotonic() - started


def measure(name: str, connections: int, duration_s: float, warmup_s: float) -> Run:
    child = subprocess.Popen(
        [sys.executable, "-m", "flotilla.bench.http_servers", "--serve", name],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        server = psutil.Process(child.pid)

        def cpu_s() -> float:
            times = server.cpu_times()
            return float(times.user + times.system)

        async def run() -> tuple[int, float, float]:
            # CPU is read when counting starts and when the load ends (the warm-up is not counted).
            task = asyncio.create_task(load(port, connections, duration_s, warmup_s))
            await asyncio.sleep(warmup_s)
            before = cpu_s()
            done, seconds = await task
            return done, seconds, cpu_s() - before

        import uvloop

        done, seconds, cpu = uvloop.run(run())
        child.stdin.close()
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return Run(name, done / seconds, cpu / done * 1e6)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, of: " + ", ".join(SERVERS))
    parser.add_argument("--connections", type=int, default=32, help="concurrent keep-alive connections")
    parser.add_argument("--duration-s", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="unmeasured seconds before each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each server, alternating")
    parser.add_argument("--serve", choices=SERVERS, help=argparse.SUPPRESS)  # the server process
    args = parser.parse_args(argv)
    if args.serve:
        import uvloop

        uvloop.run(serve(args.serve, "127.0.0.1"))
        return
    names = [n for n in args.servers.split(",") if n]
    runs: list[Run] = []
    print(f"{args.connections} keep-alive connections, {args.duration_s:g} s per run, {os.cpu_count()} CPUs")
    for round_ in range(args.rounds):
        for name in names:
            run = measure(name, args.connections, args.duration_s, args.warmup_s)
            runs.append(run)
            print(f"round {round_ + 1} {name:10s} {run.requests_per_s:8.0f} requests/s "
                  f"{run.server_cpu_us_per_request:6.0f} server CPU-us/request", flush=True)
    print("median:")
    for name in names:
        mine = [r for r in runs if r.server == name]
        print(f"  {name:10s} {statistics.median(r.requests_per_s for r in mine):8.0f} requests/s "
              f"{statistics.median(r.server_cpu_us_per_request for r in mine):6.0f} server CPU-us/request")


if __name__ == "__main__":
    main()
