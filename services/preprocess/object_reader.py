"""The preprocess worker's S3 reads: signed GETs of whole objects on its event loop.

No thread per GET: each goes through the worker's own HTTP/1.1 client
(``http_client``: the body lands in place, ~half aiohttp's client CPU per GET;
its docstring has the measurements), signed and its failures translated as the
blocking ``ObjectStore``'s are (``flotilla.common.object_get``), over TLS with
``secure`` (the context of ``object_get.store_ssl_context``, as the blocking
store's).
"""

from __future__ import annotations

import asyncio

from flotilla.common.addresses import split_endpoint
from flotilla.common.object_get import (
    ERROR_BODY_MAX_BYTES,
    RETRY_STATUSES,
    GetSigner,
    MalformedAnswer,
    ReadFailed,
    get_failure,
    refusal,
    store_ssl_context,
    too_large,
)
from flotilla.config import S3Settings
from flotilla.services.preprocess.http_client import BodyTooLarge, HttpConnectionPool, HttpProtocolError, IncompleteBody


class AsyncObjectReader:
    """Signed GETs of whole objects on the running event loop (``http_client``).

    Up to ``max_connections`` GETs at once over kept-alive connections; the
    pool is made on first use, in the loop that uses it. Failures come
    out as ``ObjectStore.get``'s: ImageNotFound, ImageTooLarge (from the
    declared length, before the body is read) or StoreUnavailable. A
    refused connection or one the server dropped, and a busy answer (502,
    503, 504), is tried ``retries`` more times; a timeout is not.
    """

    def __init__(
        self, settings: S3Settings, *, timeout_s: float = 10.0, max_connections: int = 64, retries: int = 1
    ) -> None:
        self.signer = GetSigner(settings)
        self.endpoint = settings.endpoint
        self.bucket = settings.bucket
        self.secure = settings.secure
        self.ssl_context = store_ssl_context(settings)
        """The TLS context of its connections (None: plaintext); made here, so a bad ``ca_file`` fails
        the worker's start, not its first GET."""
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.retries = retries
        self._pool: HttpConnectionPool | None = None

    def _connections(self) -> HttpConnectionPool:
        if self._pool is None:
            host, port = split_endpoint(self.endpoint, self.secure)
            self._pool = HttpConnectionPool(
                host, port, secure=self.secure, max_connections=self.max_connections, timeout_s=self.timeout_s,
                ssl_context=self.ssl_context,
            )
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            await asyncio.sleep(0)  # the closed transports let go of their sockets

    async def get(self, key: str, max_bytes: int) -> bytearray:
        """The object's bytes (the buffer they were received into: a ~240 KB photo is not copied
        again); ImageNotFound, ImageTooLarge or StoreUnavailable otherwise."""
        try:
            return await self._get(key, max_bytes)
        except Exception as exc:
            failure = get_failure(exc, key, self.bucket, self.endpoint)
            if failure is None:
                raise
            raise failure from exc

    async def _get(self, key: str, max_bytes: int) -> bytearray:
        path = self.signer.path(key)
        attempt = 0
        while True:
            try:
                answer = await self._connections().get(
                    path, self.signer.headers(path), max_bytes=max_bytes, max_error_bytes=ERROR_BODY_MAX_BYTES
                )
            except BodyTooLarge as exc:
                raise too_large(key, max_bytes, exc.declared) from exc
            except IncompleteBody as exc:
                raise ReadFailed(exc) from exc
            except HttpProtocolError as exc:
                raise MalformedAnswer(str(exc)) from exc
            except OSError as exc:  # refused, reset, dropped before the answer (not a timeout)
                if isinstance(exc, TimeoutError) or attempt >= self.retries:
                    raise
                attempt += 1
                continue
            if answer.status == 200:
                return answer.body
            refused = refusal(answer.status, bytes(answer.body))
            if answer.status not in RETRY_STATUSES or attempt >= self.retries:
                raise refused
            attempt += 1
            await asyncio.sleep(0.1 * attempt)
