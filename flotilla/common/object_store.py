"""Access to the S3-compatible store that holds uploaded images.

``ObjectStore`` is blocking (callers run it in threads) and translates
every failure into a Flotilla error, so nothing above this module knows
which S3 client is used. The hot path, one GET per image, has two forms
over one Signature V4 signer (``GetSigner``; the minio SDK's request
machinery cost about twice the client CPU per GET):

- ``AsyncObjectReader.get``, the preprocess worker's: on the event loop,
  no thread per GET, through this project's minimal HTTP/1.1 client
  (``flotilla.common.http_client``: the body lands in place, ~half aiohttp's
  client CPU per GET; its docstring has the measurements);
- ``ObjectStore.get``, for code that runs in threads: a keep-alive
  ``http.client`` connection per thread (``SignedGetter``).

The rest (put, list, stat, delete, buckets) goes through the minio SDK.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import http.client
import io
import re
import threading
import time
from urllib.parse import quote

import urllib3
from minio import Minio
from minio.error import S3Error

from flotilla.common import metrics
from flotilla.common.http_client import (
    BodyTooLarge,
    HttpConnectionPool,
    HttpProtocolError,
    IncompleteBody,
    split_endpoint,
)
from flotilla.config import S3Settings
from flotilla.errors import FlotillaError, ImageNotFound, ImageTooLarge, StoreUnavailable

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}
_RETRY_STATUSES = (502, 503, 504)
_CLOSED_BY_PEER = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)
_ERROR_BODY_MAX_BYTES = 64 << 10
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SIGNED_HEADERS = "host;x-amz-content-sha256;x-amz-date"


def _count(operation: str, kind: str) -> None:
    metrics.S3_ERRORS.labels(operation, kind).inc()


class _Refused(Exception):
    """The store answered a GET with an error status (``code`` from its XML body)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status = status
        self.code = code


class _ReadFailed(Exception):
    """The connection broke while the body was read."""


class GetSigner:
    """Signature V4 headers of a GET of a whole object (AWS's "Authenticating Requests:
    Using the Authorization Header"), and the object's path.

    The signed headers are host, x-amz-content-sha256 (of the empty payload)
    and x-amz-date. The signing key depends only on the day (and region and
    secret) and is derived once per day: deriving it every time is four of
    the five HMACs, and the minio SDK's signer, which does, cost ~23 µs per
    GET against ~10 here. Tests check every signature against the SDK's.
    """

    def __init__(self, settings: S3Settings) -> None:
        self.host = settings.endpoint
        self.bucket = settings.bucket
        self.region = settings.region
        self.scheme = "https" if settings.secure else "http"
        self._access_key = settings.access_key
        self._secret_key = settings.secret_key.get_secret_value()
        self._day_key: tuple[str, bytes] = ("", b"")

    def path(self, key: str) -> str:
        """``/bucket/key``, URI-encoded as it is signed and sent."""
        return f"/{self.bucket}/{quote(key, safe='/~')}"

    def _signing_key(self, day: str) -> bytes:
        if self._day_key[0] != day:
            key = f"AWS4{self._secret_key}".encode()
            for part in (day, self.region, "s3", "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
            self._day_key = (day, key)
        return self._day_key[1]

    def headers(self, path: str, now: datetime.datetime | None = None) -> dict[str, str]:
        """The signed headers of a GET of ``path`` (from ``path()``)."""
        amz_date = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        scope = f"{day}/{self.region}/s3/aws4_request"
        canonical_request = (
            f"GET\n{path}\n\nhost:{self.host}\nx-amz-content-sha256:{_EMPTY_SHA256}\nx-amz-date:{amz_date}\n\n"
            f"{_SIGNED_HEADERS}\n{_EMPTY_SHA256}"
        )
        string_to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical_request.encode()).hexdigest()}"
        )
        signature = hmac.new(self._signing_key(day), string_to_sign.encode(), "sha256").hexdigest()
        return {
            "Host": self.host,
            "x-amz-content-sha256": _EMPTY_SHA256,
            "x-amz-date": amz_date,
            "Authorization": f"AWS4-HMAC-SHA256 Credential={self._access_key}/{scope}, "
            f"SignedHeaders={_SIGNED_HEADERS}, Signature={signature}",
        }


def _refused(status: int, body: bytes) -> _Refused:
    found = _ERROR_CODE.search(body)
    code = found.group(1).decode(errors="replace") if found else ""
    return _Refused(status, code or ("NoSuchKey" if status == 404 else f"HTTP {status}"))


def _too_large(key: str, max_bytes: int, declared: int | None = None) -> ImageTooLarge:
    """An object past ``max_bytes``: by its declared length, or found while reading it."""
    if declared is not None:
        return ImageTooLarge(f"object {key!r} is {declared} bytes; the limit is {max_bytes} bytes")
    return ImageTooLarge(f"object {key!r} exceeds the limit of {max_bytes} bytes")


def _get_failure(exc: BaseException, key: str, bucket: str, endpoint: str) -> FlotillaError | None:
    """The Flotilla error for a failed GET of ``key`` (counted, its origin the store), or None when
    ``exc`` is not a store failure."""
    error = _get_error(exc, key, bucket, endpoint)
    return None if error is None else error.from_below(f"object store {endpoint}")


def _get_error(exc: BaseException, key: str, bucket: str, endpoint: str) -> FlotillaError | None:
    if isinstance(exc, _Refused):
        if exc.code in _MISSING:
            _count("get", "not_found")
            return ImageNotFound(f"no object {key!r} in bucket {bucket!r}; upload the image before classifying it")
        _count("get", "refused")
        return StoreUnavailable(f"object store error for {key!r}: {exc.code}")
    if isinstance(exc, _ReadFailed):
        _count("get", "unreachable")
        return StoreUnavailable(f"reading {key!r} from the object store failed: {exc}")
    if isinstance(exc, TimeoutError):
        _count("get", "unreachable")
        return StoreUnavailable(f"object store at {endpoint} did not answer the GET of {key!r} in time")
    if isinstance(exc, HttpProtocolError):
        _count("get", "unreachable")
        return StoreUnavailable(f"object store at {endpoint} sent a malformed answer: {exc}")
    if isinstance(exc, OSError | http.client.HTTPException):
        _count("get", "unreachable")
        return StoreUnavailable(f"object store at {endpoint} is unreachable: {str(exc) or type(exc).__name__}")
    return None


class SignedGetter:
    """Signed S3 GETs of whole objects over one keep-alive connection per thread.

    A connection that fails is closed and the next call opens a new one; a
    GET on a reused connection the server closed meanwhile is sent once more
    on a fresh one (GETs are idempotent).
    """

    def __init__(self, settings: S3Settings, *, timeout_s: float, retries: int) -> None:
        self.signer = GetSigner(settings)
        self.host = settings.endpoint
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(timeout_s, 2.0)
        self.retries = retries
        self._connection_class = http.client.HTTPSConnection if settings.secure else http.client.HTTPConnection
        self._address = split_endpoint(self.host, settings.secure)
        self._local = threading.local()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it was used before."""
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is not None and connection.sock is not None:
            return connection, True
        connection = self._connection_class(*self._address, timeout=self.connect_timeout_s)
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
        ``_Refused`` on an error status, OSError / HTTPException when the store is unreachable,
        ``_ReadFailed`` when the connection breaks inside the body."""
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
            except _Refused as refused:
                if refused.status in _RETRY_STATUSES and attempt < self.retries:
                    attempt += 1
                    time.sleep(0.1 * attempt)
                    continue
                raise
            except (OSError, http.client.HTTPException) as exc:
                self._discard()
                raise _ReadFailed(exc) from exc
            except BaseException:
                self._discard()
                raise

    def _body(self, response: http.client.HTTPResponse, key: str, max_bytes: int) -> bytes:
        if response.status != 200:
            body = response.read(_ERROR_BODY_MAX_BYTES)
            if not response.isclosed():
                self._discard()
            raise _refused(response.status, body)
        declared = response.length
        if declared is not None and declared > max_bytes:
            self._discard()  # its body is never read: the connection cannot carry another request
            raise _too_large(key, max_bytes, declared)
        body = response.read() if declared is not None else response.read(max_bytes + 1)
        if len(body) > max_bytes:
            self._discard()
            raise _too_large(key, max_bytes)
        if declared is not None and len(body) < declared:
            raise http.client.IncompleteRead(body, declared - len(body))
        return body


class AsyncObjectReader:
    """Signed GETs of whole objects on the running event loop (``http_client``), for the preprocess worker.

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
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.retries = retries
        self._pool: HttpConnectionPool | None = None

    def _connections(self) -> HttpConnectionPool:
        if self._pool is None:
            host, port = split_endpoint(self.endpoint, self.secure)
            self._pool = HttpConnectionPool(
                host, port, secure=self.secure, max_connections=self.max_connections, timeout_s=self.timeout_s
            )
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
            await asyncio.sleep(0)  # the closed transports let go of their sockets

    async def get(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes; ImageNotFound, ImageTooLarge or StoreUnavailable otherwise."""
        try:
            return await self._get(key, max_bytes)
        except Exception as exc:
            failure = _get_failure(exc, key, self.bucket, self.endpoint)
            if failure is None:
                raise
            raise failure from exc

    async def _get(self, key: str, max_bytes: int) -> bytes:
        path = self.signer.path(key)
        attempt = 0
        while True:
            try:
                answer = await self._connections().get(
                    path, self.signer.headers(path), max_bytes=max_bytes, max_error_bytes=_ERROR_BODY_MAX_BYTES
                )
            except BodyTooLarge as exc:
                raise _too_large(key, max_bytes, exc.declared) from exc
            except IncompleteBody as exc:
                raise _ReadFailed(exc) from exc
            except OSError as exc:  # refused, reset, dropped before the answer (not a timeout)
                if isinstance(exc, TimeoutError) or attempt >= self.retries:
                    raise
                attempt += 1
                continue
            if answer.status == 200:
                return bytes(answer.body)
            refused = _refused(answer.status, bytes(answer.body))
            if answer.status not in _RETRY_STATUSES or attempt >= self.retries:
                raise refused
            attempt += 1
            await asyncio.sleep(0.1 * attempt)


class ObjectStore:
    """Blocking get/put/list/delete of whole objects in one bucket."""

    def __init__(
        self, settings: S3Settings, *, timeout_s: float = 10.0, pool_size: int = 16, retries: int = 1
    ) -> None:
        self.bucket = settings.bucket
        self.endpoint = settings.endpoint
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout_s, 2.0), read=timeout_s),
            maxsize=pool_size,
            retries=urllib3.Retry(total=retries, backoff_factor=0.1, status_forcelist=(502, 503, 504)),
        )
        self._client = Minio(
            settings.endpoint,
            access_key=settings.access_key,
            secret_key=settings.secret_key.get_secret_value(),
            secure=settings.secure,
            region=settings.region,
            http_client=http,
        )
        self._getter = SignedGetter(settings, timeout_s=timeout_s, retries=retries)

    def put(self, key: str, data: bytes, content_type: str = "image/jpeg") -> None:
        try:
            self._client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        except S3Error as exc:
            _count("put", "refused")
            raise StoreUnavailable(f"object store refused to store {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            _count("put", "unreachable")
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def get(self, key: str, max_bytes: int) -> bytes:
        """The object's bytes; ImageNotFound, ImageTooLarge or StoreUnavailable otherwise."""
        try:
            return self._getter.get(key, max_bytes)
        except Exception as exc:
            failure = _get_failure(exc, key, self.bucket, self.endpoint)
            if failure is None:
                raise
            raise failure from exc

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (recursively)."""
        try:
            return [o.object_name for o in self._client.list_objects(self.bucket, prefix=prefix, recursive=True)]
        except S3Error as exc:
            if exc.code in _MISSING:
                return []
            raise StoreUnavailable(f"object store error listing {prefix!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def size(self, key: str) -> int | None:
        """The object's size in bytes, or None when there is no such object."""
        try:
            return int(self._client.stat_object(self.bucket, key).size or 0)
        except S3Error as exc:
            if exc.code in _MISSING:
                return None
            raise StoreUnavailable(f"object store error for {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def delete(self, key: str) -> None:
        try:
            self._client.remove_object(self.bucket, key)
        except S3Error as exc:
            if exc.code not in _MISSING:
                raise StoreUnavailable(f"object store refused to delete {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

    def ensure_bucket(self) -> None:
        try:
            if not self._client.bucket_exists(self.bucket):
                self._client.make_bucket(self.bucket)
        except (S3Error, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StoreUnavailable(f"object store at {self.endpoint} is not ready: {exc}") from exc
