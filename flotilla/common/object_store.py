"""Access to the S3-compatible store that holds uploaded images, from threads.

``ObjectStore`` is blocking (callers run it in threads) and translates
every failure into a Flotilla error, so nothing above this module knows
which S3 client is used. Its GET, one per image on a hot path, is signed
by ``object_get.GetSigner`` and sent on a keep-alive ``http.client``
connection per thread (``SignedGetter``): the minio SDK's request machinery
cost about twice the client CPU per GET. The rest (put, list, stat, delete,
buckets) goes through the minio SDK. The preprocess worker reads on its event
loop instead, with the same signer and errors
(``flotilla.services.preprocess.object_reader``). With ``secure``, both clients
here speak TLS with one context (``object_get.store_ssl_context``: the store
checked against ``ca_file``, or the system's CAs).
"""

from __future__ import annotations

import http.client
import io
import ssl
import threading
import time

import urllib3
from minio import Minio
from minio.error import S3Error

from flotilla.common.addresses import split_endpoint
from flotilla.common.object_get import (
    ERROR_BODY_MAX_BYTES,
    MISSING_CODES,
    RETRY_STATUSES,
    GetSigner,
    ReadFailed,
    Refused,
    count_error,
    get_failure,
    refusal,
    store_ssl_context,
    too_large,
)
from flotilla.config import S3Settings
from flotilla.errors import StoreUnavailable

_CLOSED_BY_PEER = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected,
                   ssl.SSLEOFError, ssl.SSLZeroReturnError)  # the last two: a TLS connection the peer closed


class SignedGetter:
    """Signed S3 GETs of whole objects over one keep-alive connection per thread.

    A connection that fails is closed and the next call opens a new one; a
    GET on a reused connection the server closed meanwhile is sent once more
    on a fresh one (GETs are idempotent).
    """

    def __init__(
        self, settings: S3Settings, *, timeout_s: float, retries: int, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """``ssl_context``: the TLS context with ``secure`` (default: ``store_ssl_context(settings)``)."""
        self.signer = GetSigner(settings)
        self.host = settings.endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(timeout_s, 2.0)
        self.retries = retries
        self._ssl = (ssl_context or store_ssl_context(settings)) if settings.secure else None
        self._address = split_endpoint(self.host, settings.secure)
        self._local = threading.local()

    def _new_connection(self) -> http.client.HTTPConnection:
        if self._ssl is not None:
            return http.client.HTTPSConnection(*self._address, timeout=self.connect_timeout_s, context=self._ssl)
        return http.client.HTTPConnection(*self._address, timeout=self.connect_timeout_s)

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it was used before."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None:
            return connection, True
        connection = self._new_connection()
        connection.connect()
        assert connection.sock is not None
        connection.sock.settimeout(self.timeout_s)
        self._local.connection = connection
        return connection, False

    def _discard(self) -> None:
        connection = getattr(self._local, "connection", None)
        self._local.connection = None
        if connection is not None:
            connection.close()

    def get(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes. Raises ImageTooLarge past ``max_bytes``,
        ``Refused`` on an error status, OSError / HTTPException when the store is unreachable,
        ``ReadFailed`` when the connection breaks inside the body."""
        path = self.signer.path(key)
        attempt = 0
        while True:
            reused = False
            try:
                connection, reused = self._connection()
                connection.request("GET", path, headers=self.signer.headers(path))
                response = connection.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self._discard()
                if reused and isinstance(exc, _CLOSED_BY_PEER):  # closed while idle: once more on a fresh one
                    continue
                if attempt < self.retries:
                    attempt += 1
                    continue
                raise
            try:
                return self._body(response, key, max_bytes)
            except Refused as refused:
                if refused.status in RETRY_STATUSES and attempt < self.retries:
                    attempt += 1
                    time.sleep(0.1 * attempt)
                    continue
                raise
            except (OSError, http.client.HTTPException) as exc:
                self._discard()
                raise ReadFailed(exc) from exc
            except BaseException:
                self._discard()
                raise

    def _body(self, response: http.client.HTTPResponse, key: str, max_bytes: int) -> bytes:
        if response.status != 200:
            body = response.read(ERROR_BODY_MAX_BYTES)
            if not response.isclosed():
                self._discard()
            raise refusal(response.status, body)
        declared = response.length
        if declared is not None and declared > max_bytes:
            self._discard()  # its body is never read: the connection cannot carry another request
            raise too_large(key, max_bytes, declared)
        body = response.read() if declared is not None else response.read(max_bytes + 1)
        if len(body) > max_bytes:
            self._discard()
            raise too_large(key, max_bytes)
        if declared is not None and len(body) < declared:
            raise http.client.IncompleteRead(body, declared - len(body))
        return body


class ObjectStore:
    """Blocking get/put/list/delete of whole objects in one bucket."""

    def __init__(
        self, settings: S3Settings, *, timeout_s: float = 10.0, pool_size: int = 16, retries: int = 1
    ) -> None:
        self.bucket = settings.bucket
        self.endpoint = settings.endpoint
        context = store_ssl_context(settings)
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 2.0), read=timeout_s),
            maxsize=pool_size,
            retries=urllib3.Retry(total=retries, backoff_factor=0.1, status_forcelist=(502, 503, 504)),
            # HTTPS (secure): the store's certificate required and checked with this context alone (urllib3
            # adds no CAs to a context it is given); plaintext pools ignore both.
            cert_reqs="CERT_REQUIRED",
            ssl_context=context,
        )
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )
        self._getter = SignedGetter(settings, timeout_s=timeout_s, retries=retries, ssl_context=context)

    def put(self, key: str, data: bytes, content_type: str = "image/jpeg") -> None:
        try:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        except S3Error as exc:
            count_error("put", "refused")
            raise StoreUnavailable(f"object store refused to store {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            count_error("put", "unreachable")
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def get(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes; ImageNotFound, ImageTooLarge or StoreUnavailable otherwise."""
        try:
            return self._getter.get(key, max_bytes)
        except Exception as exc:
            failure = get_failure(exc, key, self.bucket, self.endpoint)
            if failure is None:
                raise
            raise failure from exc

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively)."""
        try:
            return [o.object_name for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)]
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                return []
            raise StoreUnavailable(f"object store error listing {prefix!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is no such object."""
        try:
            return int(self._client.stat_object(self.bucket, key).size or 0)
        except S3Error as exc:
            if exc.code in MISSING_CODES:
                return None
            raise StoreUnavailable(f"object store error for {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, key)
        except S3Error as exc:
            if exc.code not in MISSING_CODES:
                raise StoreUnavailable(f"object store refused to delete {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is not ready: {exc}") from exc
