"""S3 over TLS (``s3.secure``): every client of the store (the minio SDK's pool, ``SignedGetter`` and the
worker's ``AsyncObjectReader``) checks the store's certificate against ``s3.ca_file`` with the one context
of ``store_ssl_context``, against a stand-in HTTPS store on loopback with certificates from throwaway
CAs; ``s3.ca_file`` defaults to the mesh's CA with TLS on; a stack file says how to reach its store."""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from flotilla.common.certs import CertificateAuthority, IssuedFiles
from flotilla.common.object_get import store_ssl_context
from flotilla.common.object_store import ObjectStore
from flotilla.config import FlotillaSettings, S3Settings
from flotilla.errors import StoreUnavailable
from flotilla.services.preprocess.object_reader import AsyncObjectReader
from flotilla.stack.state import StackState

OBJECT = b"\xff\xd8 not really a jpeg \xff\xd9"


class HttpsS3(BaseHTTPRequestHandler):
    """GET /images/photo.jpg: ``OBJECT``; HEAD of it: its size (what ``ObjectStore.size`` asks the SDK)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        assert "Signature=" in self.headers["Authorization"]
        self._answer(OBJECT if self.path == "/images/photo.jpg" else None)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(OBJECT if self.path == "/images/photo.jpg" else None, head=True)

    def _answer(self, body: bytes | None, *, head: bool = False) -> None:
        if body is None:
            body = b"<?xml version='1.0'?><Error><Code>NoSuchKey</Code></Error>"
            self.send_response(404)
        else:
            self.send_response(200)
            self.send_header("ETag", '"d41d8cd98f00b204e9800998ecf8427e"')
            self.send_header("Last-Modified", "Sun, 06 Dec 2026 12:00:00 GMT")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class QuietTlsServer(ThreadingHTTPServer):
    """Handshakes happen in ``accept``: one a client refused is an OSError that ends only that connection."""

    def handle_error(self, request: object, client_address: object) -> None:
        pass


@pytest.fixture(scope="module")
def stranger() -> CertificateAuthority:
    """A CA the clients do not trust."""
    return CertificateAuthority.create("Someone else's CA")


def serve_https(files: IssuedFiles) -> Iterator[str]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(files.cert_file, files.key_file)
    server = QuietTlsServer(("127.0.0.1", 0), HttpsS3)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def store_signed_by_ca(ca: CertificateAuthority, tmp_path: Path) -> Iterator[str]:
    yield from serve_https(ca.issue(tmp_path / "s3", "s3"))


@pytest.fixture
def store_signed_by_stranger(stranger: CertificateAuthority, tmp_path: Path) -> Iterator[str]:
    yield from serve_https(stranger.issue(tmp_path / "s3-stranger", "s3"))


@pytest.fixture
def store_named_otherwise(ca: CertificateAuthority, tmp_path: Path) -> Iterator[str]:
    """Signed by the trusted CA, but for another host (not 127.0.0.1)."""
    yield from serve_https(ca.issue(tmp_path / "s3-other", "s3", dns_names=["other.example"], ip_addresses=[]))


def s3(endpoint: str, ca: CertificateAuthority, tmp_path: Path, **update: Any) -> S3Settings:
    ca_file = tmp_path / "trusted-ca.crt"
    ca_file.write_bytes(ca.pem)
    fields: dict[str, Any] = {"secure": True, "ca_file": ca_file, **update}
    return S3Settings(endpoint=endpoint, secret_key=SecretStr("s3cr3t"), bucket="images", **fields)


async def read(settings: S3Settings, key: str) -> bytes:
    reader = AsyncObjectReader(settings, timeout_s=5.0, retries=0)
    try:
        return await reader.get(key, 1 << 20)
    finally:
        await reader.close()


async def test_every_client_reaches_a_store_the_ca_signed(
    store_signed_by_ca: str, ca: CertificateAuthority, tmp_path: Path
) -> None:
    settings = s3(store_signed_by_ca, ca, tmp_path)
    store = ObjectStore(settings, timeout_s=5.0, retries=0)
    assert store.get("photo.jpg", 1 << 20) == OBJECT  # SignedGetter (http.client)
    assert store.size("photo.jpg") == len(OBJECT)  # the minio SDK (urllib3)
    assert store.size("missing.jpg") is None
    assert await read(settings, "photo.jpg") == OBJECT  # the worker's reader (asyncio)


async def assert_every_client_refuses(settings: S3Settings, match: str) -> None:
    """The signed GETs (http.client), the minio SDK (urllib3) and the worker's reader (asyncio) each
    fail with StoreUnavailable saying ``match``."""
    store = ObjectStore(settings, timeout_s=5.0, retries=0)
    with pytest.raises(StoreUnavailable, match=match):
        store.get("photo.jpg", 1 << 20)
    with pytest.raises(StoreUnavailable, match=match):
        store.size("photo.jpg")
    with pytest.raises(StoreUnavailable, match=match):
        await read(settings, "photo.jpg")


async def test_every_client_refuses_a_store_another_ca_signed(
    store_signed_by_stranger: str, ca: CertificateAuthority, tmp_path: Path
) -> None:
    await assert_every_client_refuses(s3(store_signed_by_stranger, ca, tmp_path), "CERTIFICATE_VERIFY_FAILED")


async def test_every_client_refuses_a_certificate_for_another_host(
    store_named_otherwise: str, ca: CertificateAuthority, tmp_path: Path
) -> None:
    await assert_every_client_refuses(s3(store_named_otherwise, ca, tmp_path), "match|mismatch")


def test_plaintext_clients_cannot_read_a_tls_store(
    store_signed_by_ca: str, ca: CertificateAuthority, tmp_path: Path
) -> None:
    settings = s3(store_signed_by_ca, ca, tmp_path, secure=False, ca_file=None)
    with pytest.raises(StoreUnavailable):
        ObjectStore(settings, timeout_s=5.0, retries=0).get("photo.jpg", 1 << 20)


def test_the_context_trusts_the_ca_file_alone_or_else_the_systems_roots(
    ca: CertificateAuthority, tmp_path: Path
) -> None:
    assert store_ssl_context(S3Settings()) is None, "plaintext: no context"
    pinned = store_ssl_context(s3("127.0.0.1:1", ca, tmp_path))
    assert pinned is not None
    assert pinned.verify_mode == ssl.CERT_REQUIRED and pinned.check_hostname
    assert [c["subject"] for c in pinned.get_ca_certs()] == [
        ((("organizationName", "Flotilla"),), (("commonName", "Flotilla local CA"),))
    ], "only the CA file is trusted"
    system = store_ssl_context(S3Settings(secure=True))
    assert system is not None and system.verify_mode == ssl.CERT_REQUIRED and system.check_hostname


def test_an_unreadable_ca_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="s3.ca_file"):
        ObjectStore(S3Settings(secure=True, ca_file=tmp_path / "missing.crt"))
    with pytest.raises(ValueError, match="s3.ca_file"):
        AsyncObjectReader(S3Settings(secure=True, ca_file=tmp_path / "missing.crt"))


def test_with_tls_on_a_secure_store_is_checked_against_the_mesh_ca_unless_told_otherwise() -> None:
    mesh = {"enabled": True, "ca_file": "/etc/flotilla/tls/ca.crt"}
    assert FlotillaSettings(tls=mesh, s3={"secure": True}).s3.ca_file == Path("/etc/flotilla/tls/ca.crt")
    given = FlotillaSettings(tls=mesh, s3={"secure": True, "ca_file": "/etc/ssl/certs/ca-certificates.crt"})
    assert given.s3.ca_file == Path("/etc/ssl/certs/ca-certificates.crt")
    assert FlotillaSettings(tls=mesh, s3={"secure": False}).s3.ca_file is None, "plaintext store: no CA"
    assert FlotillaSettings(s3={"secure": True}).s3.ca_file is None, "TLS off: the system's roots"


def test_the_mesh_ca_default_also_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOTILLA_TLS__ENABLED", "true")
    monkeypatch.setenv("FLOTILLA_TLS__CA_FILE", "/mnt/tls/ca.crt")
    monkeypatch.setenv("FLOTILLA_S3__SECURE", "true")
    assert FlotillaSettings().s3.ca_file == Path("/mnt/tls/ca.crt")


def test_a_stack_file_says_how_to_reach_its_store(tmp_path: Path) -> None:
    fields: dict[str, Any] = {"router": "r:1", "api_key": "k", "s3_endpoint": "127.0.0.1:8333", "s3_access_key": "a",
                              "s3_secret_key": "s", "s3_bucket": "images", "models": []}
    StackState(**fields, s3_secure=True, s3_ca_file="/run/tls/s3/ca.crt").write(tmp_path / "stack.json")
    settings = StackState.read(tmp_path / "stack.json").s3_settings()
    assert settings.secure and settings.ca_file == Path("/run/tls/s3/ca.crt")
    (tmp_path / "old.json").write_text(json.dumps(fields))  # written before the store could speak TLS
    old = StackState.read(tmp_path / "old.json").s3_settings()
    assert not old.secure and old.ca_file is None
