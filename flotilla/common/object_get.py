"""One signed S3 GET of a whole object, whichever client sends it: the blocking
``ObjectStore`` (``object_store``) or the preprocess worker's ``AsyncObjectReader``
(``flotilla.services.preprocess.object_reader``).

Both sign with ``GetSigner`` (the minio SDK's request machinery cost about twice
the client CPU per GET), raise the store's answers as the exceptions below, and
turn them into Flotilla errors in one place, ``get_failure``:

- ``Refused``: an error status (its S3 code read from the XML body) ->
  ImageNotFound for a missing object, StoreUnavailable otherwise;
- ``ReadFailed``: the connection broke inside the body -> StoreUnavailable;
- ``MalformedAnswer``: not HTTP the client understands -> StoreUnavailable;
- a timeout, OSError or ``http.client.HTTPException``: the store is unreachable
  -> StoreUnavailable;
- ``too_large``: an object past the caller's limit is ImageTooLarge at once.

Both reach a store with ``secure`` over TLS with the context of ``store_ssl_context``.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import http.client
import re
import ssl
from urllib.parse import quote

from flotilla.common import metrics
from flotilla.config import S3Settings
from flotilla.errors import FlotillaError, ImageNotFound, ImageTooLarge, StoreUnavailable

MISSING_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NoSuchBucket"})
"""S3 error codes that mean there is no such object (or bucket)."""
RETRY_STATUSES = (502, 503, 504)
"""Error statuses of a busy store: the GET is tried again."""
ERROR_BODY_MAX_BYTES = 64 << 10
"""At most this much of an error answer's body is read (for its S3 code)."""
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,128})</Code>")
_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_SIGNED_HEADERS = "host;x-amz-content-sha256;x-amz-date"


def store_ssl_context(settings: S3Settings) -> ssl.SSLContext | None:
    """The TLS context of every connection to the store (the minio SDK's, ``SignedGetter``'s and the
    worker's ``AsyncObjectReader``'s): None over plaintext (``secure`` off). The store's certificate
    and host name are checked against ``ca_file`` alone when it is set (``FlotillaSettings`` sets it
    to ``tls.ca_file`` with TLS on), else against the system's trusted CAs."""
    if not settings.secure:
        return None
    try:
        context = ssl.create_default_context(cafile=None if settings.ca_file is None else str(settings.ca_file))
    except OSError as exc:  # ssl.SSLError is an OSError
        raise ValueError(f"s3.ca_file {settings.ca_file} cannot be used: {exc}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def count_error(operation: str, kind: str) -> None:
    """One failed S3 ``operation`` (get, put) of ``kind`` (not_found, refused, unreachable)."""
    metrics.S3_ERRORS.labels(operation, kind).inc()


class Refused(Exception):
    """The store answered a GET with an error status (``code`` from its XML body)."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"HTTP {status} {code}")
        self.status = status
        self.code = code


class ReadFailed(Exception):
    """The connection broke while the body was read."""


class MalformedAnswer(Exception):
    """The store's answer is not HTTP the client understands."""


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



def refusal(status: int, body: bytes) -> Refused:
    """The ``Refused`` of an error answer: its S3 code from ``body`` (the first ERROR_BODY_MAX_BYTES)."""
    found = _ERROR_CODE.search(body)
    code = found.group(1).decode(errors="replace") if found else ""
    return Refused(status, code or ("NoSuchKey" if status == 404 else f"HTTP {status}"))


def too_large(key: str, max_bytes: int, declared: int | None = None) -> ImageTooLarge:
    """An object past ``max_bytes``: by its declared length, or found while reading it."""
    if declared is not None:
        return ImageTooLarge(f"object {key!r} is {declared} bytes; the limit is {max_bytes} bytes")
    return ImageTooLarge(f"object {key!r} exceeds the limit of {max_bytes} bytes")


def get_failure(exc: BaseException, key: str, bucket: str, endpoint: str) -> FlotillaError | None:
    """The Flotilla error for a failed GET of ``key`` (counted, its origin the store), or None when
    ``exc`` is not a store failure."""
    error = _get_error(exc, key, bucket, endpoint)
    return None if error is None else error.from_below(f"object store {endpoint}")


def _get_error(exc: BaseException, key: str, bucket: str, endpoint: str) -> FlotillaError | None:
    if isinstance(exc, Refused):
        if exc.code in MISSING_CODES:
            count_error("get", "not_found")
            return ImageNotFound(f"no object {key!r} in bucket {bucket!r}; upload the image before classifying it")
        count_error("get", "refused")
        return StoreUnavailable(f"object store error for {key!r}: {exc.code}")
    if isinstance(exc, ReadFailed):
        count_error("get", "unreachable")
        return StoreUnavailable(f"reading {key!r} from the object store failed: {exc}")
    if isinstance(exc, TimeoutError):
        count_error("get", "unreachable")
        return StoreUnavailable(f"object store at {endpoint} did not answer the GET of {key!r} in time")
    if isinstance(exc, MalformedAnswer):
        count_error("get", "unreachable")
        return StoreUnavailable(f"object store at {endpoint} sent a malformed answer: {exc}")
    if isinstance(exc, OSError | http.client.HTTPException):
        count_error("get", "unreachable")
        return StoreUnavailable(f"object store at {endpoint} is unreachable: {str(exc) or type(exc).__name__}")
    return None
