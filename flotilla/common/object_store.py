"""Access to the S3-compatible store that holds uploaded images.

``ObjectStore`` wraps the minio SDK (blocking; callers run it in threads)
and translates its failures into Flotilla errors, so nothing above this
module knows which S3 client is used.
"""

from __future__ import annotations

import io

import urllib3
from minio import Minio
from minio.error import S3Error

from flotilla.common import metrics
from flotilla.config import S3Settings
from flotilla.errors import ImageNotFound, ImageTooLarge, StoreUnavailable

_MISSING = {"NoSuchKey", "NoSuchObject", "NoSuchBucket"}


def _count(operation: str, kind: str) -> None:
    metrics.S3_ERRORS.labels(operation, kind).inc()


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
            response = self._client.get_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING:
                _count("get", "not_found")
                raise ImageNotFound(
                    f"no object {key!r} in bucket {self.bucket!r}; upload the image before classifying it"
                ) from exc
            _count("get", "refused")
            raise StoreUnavailable(f"object store error for {key!r}: {exc.code}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            _count("get", "unreachable")
            raise StoreUnavailable(f"object store at {self.endpoint} is unreachable: {exc}") from exc
        try:
            declared = int(response.headers.get("content-length", "0"))
            if declared > max_bytes:
                raise ImageTooLarge(
                    f"object {key!r} is {declared} bytes; the limit is {max_bytes} bytes"
                )
            body = response.read(max_bytes + 1, decode_content=True)
            if len(body) > max_bytes:
                raise ImageTooLarge(f"object {key!r} exceeds the limit of {max_bytes} bytes")
            return body
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            _count("get", "unreachable")
            raise StoreUnavailable(f"reading {key!r} from the object store failed: {exc}") from exc
        finally:
            response.close()
            response.release_conn()

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
