"""Access to the S3-compatible store that holds uploaded images.

``ObjectStore`` is blocking (callers run it in threads) and translates
every failure into a Flotilla error, so nothing above this module knows
which S3 client is used. ``get``, the hot path (one call per image), is a
SigV4-signed GET on a keep-alive ``http.client`` connection kept per thread
(see ``SignedGetter``): the minio SDK spent about twice the client CPU per
GET (URL building, header dicts, urllib3's pool) for the same request. The
rest (put, list, stat, delete, buckets) goes through the minio SDK.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import io
import re
import threading
import time
from urllib.parse import quote, urlsplit

import urllib3
from minio import Minio
from minio.credentials import Credentials
from minio.error import S3Error
from minio.signer import sign_v4_s3
from minio.time import to_amz_date

from flotilla.common import metrics
from flotilla.config import S3Settings
from flotilla.errors import ImageNotFound, ImageTooLarge, StoreUnavailable

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}
_RETRY_STATUSES = (502, 503, 504)
_CLOSED_BY_PEER = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected)
_ERROR_BODY_MAX_BYTES = 64 << 10
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
SIGNING_REGION = "us-east-1"
"""The region GETs are signed for: what SeaweedFS and MinIO accept (and the minio SDK's default)."""


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


class SignedGetter:
    """Signed S3 GETs of whole objects over one keep-alive connection per thread.

    Signed with the minio SDK's own Signature V4 signer (host,
    x-amz-content-sha256 of the empty payload, x-amz-date); the SDK's request
    machinery around it is what cost the CPU. A connection that fails is closed and the
    next call opens a new one; a GET on a reused connection the server
    closed meanwhile is sent once more on a fresh one (GETs are idempotent).
    """

    def __init__(
        self, settings: S3Settings, *, timeout_s: float, retries: int, region: str = SIGNING_REGION
    ) -> None:
        self.host = settings.endpoint
        self.bucket = settings.bucket
        self.region = region
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(timeout_s, 2.0)
        self.retries = retries
        self._credentials = Credentials(settings.access_key, settings.secret_key.get_secret_value())
        self._scheme = "https" if settings.secure else "http"
        self._connection_class = http.client.HTTPSConnection if settings.secure else http.client.HTTPConnection
        hostname, _, port = self.host.rpartition(":")
        self._address = (hostname, int(port)) if hostname and port.isdigit() else (self.host, None)
        self._local = threading.local()

    def headers(self, path: str, now: datetime.datetime | None = None) -> dict[str, str]:
        """The signed headers of a GET of ``path`` (``/bucket/key``, URI-encoded): minio's SigV4 signer."""
        now = now or datetime.datetime.now(datetime.UTC)
        headers = {"Host": self.host, "x-amz-content-sha256": _EMPTY_SHA256, "x-amz-date": to_amz_date(now)}
        return sign_v4_s3(
            method="GET", url=urlsplit(f"{self._scheme}://{self.host}{path}"), region=self.region, headers=headers,
            credentials=self._credentials, content_sha256=_EMPTY_SHA256, date=now,
        )

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

    def get(self, key: str, max_bytes: int, too_large: type[Exception]) -> bytes:
        """The object's bytes. Raises ``too_large`` (with a message) past ``max_bytes``,
        ``_Refused`` on an error status, OSError / HTTPException when the store is unreachable,
        ``_ReadFailed`` when the connection breaks inside the body."""
        path = f"/{self.bucket}/{quote(key, safe='/~')}"
        attempt = 0
        while True:
            reused = False
            try:
                connection, reused = self._connection()
                connection.request("GET", path, headers=self.headers(path))
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
                return self._body(response, key, max_bytes, too_large)
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

    def _body(self, response: http.client.HTTPResponse, key: str, max_bytes: int, too_large: type[Exception]) -> bytes:
        if response.status != 200:
            body = response.read(_ERROR_BODY_MAX_BYTES)
            if not response.isclosed():
                self._discard()
            found = _ERROR_CODE.search(body)
            code = found.group(1).decode(errors="replace") if found else ""
            raise _Refused(response.status, code or ("NoSuchKey" if response.status == 404 else f"HTTP {response.status}"))
        declared = response.length
        if declared is not None and declared > max_bytes:
            self._discard()  # its body is never read: the connection cannot carry another request
            raise too_large(f"object {key!r} is {declared} bytes; the limit is {max_bytes} bytes")
        body = response.read() if declared is not None else response.read(max_bytes + 1)
        if len(body) > max_bytes:
            self._discard()
            raise too_large(f"object {key!r} exceeds the limit of {max_bytes} bytes")
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
            return self._getter.get(key, max_bytes, ImageTooLarge)
        except _Refused as exc:
            if exc.code in _MISSING:
                _count("get", "not_found")
                raise ImageNotFound(
                    f"no object {key!r} in bucket {self.bucket!r}; upload the image before classifying it"
                ) from exc
            _count("get", "refused")
            raise StoreUnavailable(f"object store error for {key!r}: {exc.code}") from exc
        except _ReadFailed as exc:
            _count("get", "unreachable")
            raise StoreUnavailable(f"reading {key!r} from the object store failed: {exc}") from exc
        except (OSError, http.client.HTTPException) as exc:
            _count("get", "unreachable")
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc

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
