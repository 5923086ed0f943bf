"""The signed GET of an image, both forms (ObjectStore.get in threads, AsyncObjectReader.get on the
event loop): the signature (the minio SDK's signer) and each answer of a stand-in S3 server (found,
chunked, missing, too large, refused, dropped connections, cut bodies, malformed answers, unreachable)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
from minio.credentials import Credentials
from minio.signer import sign_v4_s3
from minio.time import to_amz_date
from pydantic import SecretStr

from flotilla.common.object_get import GetSigner
from flotilla.common.object_store import ObjectStore
from flotilla.config import S3Settings
from flotilla.errors import ImageNotFound, ImageTooLarge, StoreUnavailable
from flotilla.services.preprocess.object_reader import AsyncObjectReader

SETTINGS = S3Settings(endpoint="127.0.0.1:9", access_key="AKIDEXAMPLE", secret_key=SecretStr("s3cr3t"), bucket="images")
EMPTY_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_a_get_is_signed_for_the_endpoint_bucket_key_and_time() -> None:
    now = datetime(2026, 11, 23, 12, 34, 56, tzinfo=UTC)
    path = "/images/123e4567-e89b-42d3-a456-426614174000.jpg"
    headers = GetSigner(SETTINGS).headers(path, now)
    assert headers["x-amz-date"] == "20261123T123456Z"
    assert headers["Host"] == SETTINGS.endpoint
    assert headers["x-amz-content-sha256"] == EMPTY_SHA256
    assert headers["Authorization"].startswith(
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261123/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature="
    )
    later = GetSigner(SETTINGS).headers(path.replace("123e", "223e"), now)
    assert later["Authorization"] != headers["Authorization"], "the key is part of what is signed"


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1"])
@pytest.mark.parametrize("key", ["123e4567-e89b-42d3-a456-426614174000.jpg", "a b+c/ü~.jpg"])
def test_every_signature_is_the_minio_sdks(key: str, region: str) -> None:
    # The SDK's signer is the reference; one signer crosses a day boundary (its cached key must change).
    signer = GetSigner(SETTINGS.model_copy(update={"region": region}))
    credentials = Credentials(SETTINGS.access_key, SETTINGS.secret_key.get_secret_value())
    for now in (datetime(2026, 11, 23, 23, 59, 59, tzinfo=UTC), datetime(2026, 11, 24, 0, 0, 1, tzinfo=UTC)):
        path = signer.path(key)
        reference = {"Host": SETTINGS.endpoint, "x-amz-content-sha256": EMPTY_SHA256, "x-amz-date": to_amz_date(now)}
        reference = sign_v4_s3(
            method="GET", url=urlsplit(f"http://{SETTINGS.endpoint}{path}"), region=region, headers=reference,
            credentials=credentials, content_sha256=EMPTY_SHA256, date=now,
        )
        assert signer.headers(path, now) == reference


class FakeS3(BaseHTTPRequestHandler):
    """GET /images/<key>: the body in ``objects``, or a scripted answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, as S3 servers answer
    objects: dict[str, bytes] = {}
    # Per request, first: "503", "drop" (close without answering), "cut" (half the declared body, then close),
    # "garbage" (not HTTP), "chunked" (answer with a chunked body), or "" (answer).
    script: list[str] = []
    seen: list[str] = []
    connections: set[tuple[str, int]] = set()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.seen.append(self.path)
        self.connections.add(self.client_address)
        step = self.script.pop(0) if self.script else ""
        if step == "drop":
            self.close_connection = True
            return
        if step == "503":
            self._answer(503, b"<Error><Code>SlowDown</Code></Error>")
            return
        if step in ("cut", "garbage"):
            self.close_connection = True
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500 if step == "cut" else b"SPAM\r\n\r\n")
            return
        assert "Signature=" in self.headers["Authorization"]
        body = self.objects.get(unquote(self.path.removeprefix("/images/")))
        if body is None:
            self._answer(404, b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code><Message>gone</Message></Error>")
        elif step == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for at in range(0, len(body), 700):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body[at : at + 700]), body[at : at + 700]))
            self.wfile.write(b"0\r\n\r\n")
        else:
            self._answer(200, body)

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that closed its connection early
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class Reader:
    """AsyncObjectReader.get called from blocking test code: each call on its own event loop
    (a fresh session each time, so reuse is checked within one ``get_all``)."""

    def __init__(self, settings: S3Settings, *, timeout_s: float, retries: int, max_connections: int = 64) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.retries = retries
        self.max_connections = max_connections

    async def _get_all(self, keys: list[str], max_bytes: int, at_once: bool) -> list[bytes]:
        reader = AsyncObjectReader(
            self.settings, timeout_s=self.timeout_s, retries=self.retries, max_connections=self.max_connections
        )
        try:
            if at_once:
                return list(await asyncio.gather(*(reader.get(key, max_bytes) for key in keys)))
            return [await reader.get(key, max_bytes) for key in keys]
        finally:
            await reader.close()

    def get_all(self, keys: list[str], max_bytes: int, *, at_once: bool = False) -> list[bytes]:
        return asyncio.run(self._get_all(keys, max_bytes, at_once))

    def get(self, key: str, max_bytes: int) -> bytes:
        return self.get_all([key], max_bytes)[0]


@pytest.fixture
def fake_s3() -> Iterator[S3Settings]:
    server = QuietServer(("127.0.0.1", 0), FakeS3)
    FakeS3.objects = {"a.jpg": b"\xff\xd8\xff" + b"x" * 1000, "big.jpg": b"y" * 5000, "a b+c.jpg": b"spaced"}
    FakeS3.script, FakeS3.seen, FakeS3.connections = [], [], set()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield SETTINGS.model_copy(update={"endpoint": f"127.0.0.1:{server.server_address[1]}"})
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(params=["threads", "event loop"])
def s3(request: pytest.FixtureRequest, fake_s3: S3Settings) -> ObjectStore | Reader:
    if request.param == "threads":
        return ObjectStore(fake_s3, timeout_s=2.0, retries=1)
    return Reader(fake_s3, timeout_s=2.0, retries=1)


def test_an_object_comes_back_whole_over_one_connection(s3: ObjectStore | Reader) -> None:
    if isinstance(s3, Reader):
        assert s3.get_all(["a.jpg"] * 3, 4096) == [FakeS3.objects["a.jpg"]] * 3
    else:
        for _ in range(3):
            assert s3.get("a.jpg", 4096) == FakeS3.objects["a.jpg"]
    assert FakeS3.seen == ["/images/a.jpg"] * 3
    assert len(FakeS3.connections) == 1


def test_a_key_is_sent_as_it_was_signed(s3: ObjectStore | Reader) -> None:
    assert s3.get("a b+c.jpg", 4096) == b"spaced"
    assert FakeS3.seen == ["/images/a%20b%2Bc.jpg"]


def test_a_missing_object_says_to_upload_it(s3: ObjectStore | Reader) -> None:
    with pytest.raises(ImageNotFound, match="no object 'nope.jpg' in bucket 'images'; upload the image"):
        s3.get("nope.jpg", 4096)
    assert s3.get("a.jpg", 4096)  # the connection is still usable


def test_an_object_over_the_limit_is_refused_from_its_length(s3: ObjectStore | Reader) -> None:
    with pytest.raises(ImageTooLarge, match="object 'big.jpg' is 5000 bytes; the limit is 4096 bytes"):
        s3.get("big.jpg", 4096)
    assert s3.get("a.jpg", 4096) == FakeS3.objects["a.jpg"]  # a fresh connection after the unread body


def test_a_busy_store_is_retried_then_reported(s3: ObjectStore | Reader) -> None:
    FakeS3.script = ["503"]
    assert s3.get("a.jpg", 4096) == FakeS3.objects["a.jpg"]
    FakeS3.script = ["503", "503"]
    with pytest.raises(StoreUnavailable, match="object store error for 'a.jpg': SlowDown"):
        s3.get("a.jpg", 4096)


def test_a_connection_the_server_dropped_is_replaced(s3: ObjectStore | Reader) -> None:
    assert s3.get("a.jpg", 4096)
    FakeS3.script = ["drop"]
    assert s3.get("a.jpg", 4096) == FakeS3.objects["a.jpg"]


def test_a_chunked_object_comes_back_whole_and_one_over_the_limit_is_refused(s3: ObjectStore | Reader) -> None:
    FakeS3.script = ["chunked"]
    assert s3.get("big.jpg", 5000) == FakeS3.objects["big.jpg"]
    FakeS3.script = ["chunked"]
    with pytest.raises(ImageTooLarge, match="object 'big.jpg' exceeds the limit of 4096 bytes"):
        s3.get("big.jpg", 4096)
    assert s3.get("a.jpg", 4096) == FakeS3.objects["a.jpg"]


def test_a_connection_broken_inside_the_body_fails_the_get(s3: ObjectStore | Reader) -> None:
    FakeS3.script = ["cut"]
    with pytest.raises(StoreUnavailable, match="reading 'a.jpg' from the object store failed"):
        s3.get("a.jpg", 4096)
    assert s3.get("a.jpg", 4096) == FakeS3.objects["a.jpg"]


def test_a_malformed_answer_is_unavailable_naming_the_store(s3: ObjectStore | Reader, fake_s3: S3Settings) -> None:
    FakeS3.script = ["garbage", "garbage"]  # the threaded form tries twice
    with pytest.raises(StoreUnavailable, match=rf"object store at {fake_s3.endpoint} "):
        s3.get("a.jpg", 4096)


def test_a_store_that_keeps_dropping_the_connection_is_unreachable(s3: ObjectStore | Reader) -> None:
    FakeS3.script = ["drop", "drop"]  # the first try and the one retry
    with pytest.raises(StoreUnavailable, match=r"object store at 127\.0\.0\.1:\d+ is unreachable"):
        s3.get("a.jpg", 4096)


@pytest.mark.parametrize("form", [ObjectStore, Reader])
def test_a_kept_connection_the_server_closed_is_replaced_without_a_retry(form: type, fake_s3: S3Settings) -> None:
    store = form(fake_s3, timeout_s=2.0, retries=0)
    FakeS3.script = ["", "drop"]  # the second GET finds its kept connection closed
    if isinstance(store, Reader):
        assert store.get_all(["a.jpg", "a.jpg"], 4096) == [FakeS3.objects["a.jpg"]] * 2
    else:
        assert [store.get("a.jpg", 4096) for _ in range(2)] == [FakeS3.objects["a.jpg"]] * 2
    assert len(FakeS3.connections) == 2


def test_gets_at_once_share_at_most_max_connections(fake_s3: S3Settings) -> None:
    # 30 GETs at once over at most 3 connections. (A first round that failed on a missing object
    # made this flaky: that round's abandoned GETs were still being answered on the server when
    # the second round's connections were counted.)
    reader = Reader(fake_s3, timeout_s=2.0, retries=0, max_connections=3)
    keys = ["a.jpg", "big.jpg", "a b+c.jpg"] * 10
    assert reader.get_all(keys, 8192, at_once=True) == [FakeS3.objects[key] for key in keys]
    assert len(FakeS3.seen) == len(keys)
    assert len(FakeS3.connections) <= 3


@pytest.mark.parametrize("form", [ObjectStore, Reader])
def test_an_unreachable_store_is_unavailable_with_its_address(form: type) -> None:
    store = form(SETTINGS.model_copy(update={"endpoint": "127.0.0.1:9"}), timeout_s=1.0, retries=0)
    with pytest.raises(StoreUnavailable, match=r"object store at 127\.0\.0\.1:9 is unreachable"):
        store.get("a.jpg", 4096)


@pytest.mark.parametrize("form", [ObjectStore, Reader])
def test_a_store_that_never_answers_is_reported_in_time(form: type) -> None:
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel does), never answers
    try:
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        store = form(SETTINGS.model_copy(update={"endpoint": address}), timeout_s=0.3, retries=0)
        with pytest.raises(StoreUnavailable, match=rf"object store at {address} did not answer the GET of 'a.jpg' in time"):
            store.get("a.jpg", 4096)
    finally:
        silent.close()
