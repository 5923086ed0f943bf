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

**Limits uvicorn lacks** (``GuardedHttpToolsProtocol``): uvicorn bounds an idle keep-alive connection
(``KEEP_ALIVE_S``) but neither how long a request's head may take to arrive nor how large it may be
(httptools sets no limit): a client sending a header byte now and then (slowloris) held a connection,
and its head's memory, for ever. A request's head must arrive within ``HEAD_TIMEOUT_S`` of its first
byte (of the connection's opening, for the first request), else 408 and the connection closes; a head
over ``MAX_HEAD_BYTES`` is answered 431 and the connection closes; a body must arrive within
``BODY_TIMEOUT_S`` of its head, else the connection closes (the app sees the client gone). The body's
size is the app's limit (``kserve.http.MAX_BODY_BYTES``: 413).
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from flotilla.common.tasks import cancel_and_wait
from flotilla.common.tls import CertFiles, http_ssl_context, reload_ssl_context
from flotilla.config import TlsSettings

log = logging.getLogger(__name__)

BACKLOG = 2048
KEEP_ALIVE_S = 75
"""An idle keep-alive connection is closed after this long (above common clients' pool timeouts,
so the client, not the server, closes it first)."""
HEAD_TIMEOUT_S = 10.0
"""A request's line and headers arrive within this long of its first byte (or of the connection's
opening, for its first request); else 408 and the connection closes (slowloris)."""
BODY_TIMEOUT_S = 30.0
"""A request's body arrives within this long of its head; else the connection closes (a body at the
size limit, 4 MiB, must come at 140 KB/s at least)."""
MAX_HEAD_BYTES = 64 * 1024
"""A request's line and headers together, at most (nginx's default, 4 x 8 KiB, doubled); over it, 431
and the connection closes."""
_HEAD_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request's head and body and a limit on its
    head's size (the module's docstring says why)."""

    head_timeout_s = HEAD_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S
    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.head_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self._refused:
            super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm(self.head_timeout_s, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        if not self._refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._arm(self.body_timeout_s, self._body_timed_out)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self.max_head_bytes and not self._refused:
            self._refuse(_HEAD_TOO_LARGE)

    def _head_timed_out(self) -> None:
        self._refuse(_HEAD_TIMEOUT)

    def _body_timed_out(self) -> None:
        self._read_timer = None
        self.transport.close()  # the app's receive() says the client is gone

    def _refuse(self, answer: bytes) -> None:
        """Answer ``answer`` and close: the request's head never reached the app."""
        self._refused = True
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(answer)
            self.transport.close()

    def _arm(self, delay_s: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None


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

    def __init__(self, app: Any, *, grace_s: float, name: str = "http", tls: TlsSettings | None = None) -> None:
        """``tls`` (when enabled): HTTPS with its front door's certificate (``TlsSettings.front_door``),
        reloaded when the files change."""
        self.name = name
        self.tls = tls.front_door() if tls is not None and tls.enabled else None
        self._tls_files: CertFiles | None = None
        self._reloads: asyncio.Task[None] | None = None
        self.config = uvicorn.Config(
            app,
            http=GuardedHttpToolsProtocol,
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
        if self.tls is not None:
            self._tls_files = CertFiles(self.tls)
            self._tls_files.read()  # checks the pair; the context below is made from the same files
            self.config.ssl = http_ssl_context(self.tls)
            self._reloads = asyncio.create_task(self._reload_certificates(), name=f"{self.name}-tls")
        self._server.lifespan = self.config.lifespan_class(self.config)  # off: what Server.serve would make
        await self._server.startup(sockets=self._sockets)
        # The tick loop keeps the Date header current; it returns once should_exit is set.
        self._ticks = asyncio.create_task(self._server.main_loop(), name=f"{self.name}-ticks")
        self.port = int(sock.getsockname()[1])
        host = sock.getsockname()[0]
        log.info("%s listening on %s:%d%s", self.name, host, self.port, " (TLS)" if self.tls else "")
        return self.port

    async def _reload_certificates(self) -> None:
        assert self.tls is not None and self._tls_files is not None and self.config.ssl is not None
        while True:
            await asyncio.sleep(self.tls.reload_interval_s)
            reload_ssl_context(self.config.ssl, self._tls_files)

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
        await cancel_and_wait(self._reloads)
        await cancel_and_wait(self._ticks)
        await self._server.shutdown(sockets=self._sockets)
        log.info("%s stopped", self.name)
