"""The router's HTTP server: an ASGI app served by uvicorn inside the router's own event loop.

The one module that knows the server library; the app (``kserve.http``) is
plain ASGI. uvicorn over Hypercorn: on this load (small JSON POSTs on
keep-alive connections) it served more requests per second at less CPU per
request (docs/benchmarks.md, "The HTTP server"; ``python -m
flotilla.bench.http_servers``), its parser being httptools' C.

uvicorn is not run with ``Server.serve``: that takes over SIGINT and SIGTERM,
which are the router's (``serve_until_signal``). Its public start-up, tick
loop and shutdown are run here instead, in the caller's loop, on a socket
bound here (SO_REUSEPORT when several router processes share the port).
Stopping is graceful: the listener closes, idle keep-alive connections
close, requests in flight get ``grace_s`` to be answered.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from typing import Any

import uvicorn

from flotilla.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

BACKLOG = 2048
KEEP_ALIVE_S = 75
"""An idle keep-alive connection is closed after this long (above common clients' pool timeouts,
so the client, not the server, closes it first)."""


def bind(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (0: a free port); ``reuse_port``: SO_REUSEPORT, so
    several processes serve the port and the kernel spreads connections over them."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpServer:
    """Serves one ASGI app in the running event loop until ``stop``."""

    def __init__(self, app: Any, *, grace_s: float, name: str = "http") -> None:
        self.name = name
        self.config = uvicorn.Config(
            app,
            http="httptools",
            ws="none",
            lifespan="off",
            loop="none",
            log_config=None,  # the process's logging is the service's, not uvicorn's
            access_log=False,
            proxy_headers=False,
            server_header=False,
            timeout_keep_alive=KEEP_ALIVE_S,
            timeout_graceful_shutdown=max(1, math.ceil(grace_s)),
            backlog=BACKLOG,
        )
        self._server = uvicorn.Server(self.config)
        self._sockets: list[socket.socket] = []
        self._ticks: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Bind ``host``:``port`` (0: a free one) and serve; returns the port."""
        return await self.start_on(bind(host, port, reuse_port=reuse_port))

    async def start_on(self, sock: socket.socket) -> int:
        """Serve on ``sock``, a listening socket this server now owns; returns its port."""
        self._sockets = [sock]
        self.config.load()
        self._server.lifespan = self.config.lifespan_class(self.config)  # off: what Server.serve would make
        await self._server.startup(sockets=self._sockets)
        # The tick loop keeps the Date header current; it returns once should_exit is set.
        self._ticks = asyncio.create_task(self._server.main_loop(), name=f"{self.name}-ticks")
        self.port = int(sock.getsockname()[1])
        host = sock.getsockname()[0]
        log.info("%s listening on %s:%d", self.name, host, self.port)
        return self.port

    def drain(self) -> None:
        """Begin stopping (for ``ServiceServer.on_drain``: at once, beside the gRPC server's drain);
        ``stop`` waits for the end."""
        if self._stopping is None and self._ticks is not None:
            self._stopping = asyncio.create_task(self._stop(), name=f"{self.name}-stop")

    async def stop(self) -> None:
        """Stop taking connections and let the requests in flight finish (at most the grace)."""
        self.drain()
        if self._stopping is not None:
            await self._stopping

    async def _stop(self) -> None:
        assert self._ticks is not None
        self._server.should_exit = True
        await cancel_and_wait(self._ticks)
        await self._server.shutdown(sockets=self._sockets)
        log.info("%s stopped", self.name)
