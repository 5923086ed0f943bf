"""TLS on the mesh's hops (flotilla.common.tls): real grpc.aio servers and channels on loopback with
certificates from a throwaway CA; who may connect, what a renewed certificate changes, the admin
identity, the plaintext health port and the HTTP front door's context."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flotilla.common.admin import AdminGate
from flotilla.common.certs import CertificateAuthority, IssuedFiles
from flotilla.common.peer import GrpcPeer
from flotilla.common.server import ServiceServer
from flotilla.common.tls import (
    CertFiles,
    Dialer,
    RenewingChannel,
    http_ssl_context,
    peer_common_names,
    reload_ssl_context,
)
from flotilla.config import TlsSettings
from flotilla.errors import PermissionDenied, Unauthenticated
from tests.waiting import until

WHO = "/test.Who/Am"
"""A method that answers the caller's certificate common names, comma-separated."""


@pytest.fixture
def certs(ca: CertificateAuthority, tmp_path: Path) -> dict[str, IssuedFiles]:
    return {name: ca.issue(tmp_path / name, name) for name in ("server", "client", "flotilla-admin")}


class _Who(grpc.GenericRpcHandler):
    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method != WHO:
            return None

        async def who(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
            return ",".join(peer_common_names(context)).encode()

        return grpc.unary_unary_rpc_method_handler(who)


async def _serve(tls: TlsSettings | None, *, public: bool = False) -> tuple[ServiceServer, str]:
    server = ServiceServer("test", ["test.Who"], grace_s=0, tier="test", tls=tls, public=public)
    server.server.add_generic_rpc_handlers([_Who()])
    port = await server.start("127.0.0.1", 0)
    return server, f"127.0.0.1:{port}"


@pytest.fixture
async def mutual(certs: dict[str, IssuedFiles]) -> AsyncIterator[str]:
    """An internal server: TLS with client certificates required."""
    server, address = await _serve(certs["server"].tls_settings())
    yield address
    await server.stop()


async def _who(channel: grpc.aio.Channel) -> str:
    async with channel:
        answer = await channel.unary_unary(WHO)(b"", timeout=5)
    assert isinstance(answer, bytes)
    return answer.decode()


async def _health(channel: grpc.aio.Channel) -> int:
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


async def test_a_mesh_certificate_gets_in_and_the_server_sees_who(mutual: str, certs: dict[str, IssuedFiles]) -> None:
    assert await _who(Dialer(certs["client"].tls_settings()).aio_channel(mutual)) == "client"


async def test_plaintext_no_certificate_or_a_foreign_ca_are_refused(
    mutual: str, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        await _who(grpc.aio.insecure_channel(mutual))
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    no_cert = grpc.ssl_channel_credentials(root_certificates=certs["client"].ca_file.read_bytes())
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await _who(grpc.aio.secure_channel(mutual, no_cert))
    assert anonymous.value.code() == grpc.StatusCode.UNAVAILABLE
    stranger = CertificateAuthority.create("another CA").issue(tmp_path / "stranger", "stranger")
    foreign = IssuedFiles(certs["client"].ca_file, stranger.cert_file, stranger.key_file).tls_settings()
    with pytest.raises(grpc.aio.AioRpcError) as other_ca:
        await _who(Dialer(foreign).aio_channel(mutual))
    assert other_ca.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_client_that_does_not_trust_the_servers_ca_does_not_connect(
    mutual: str, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    other = CertificateAuthority.create("another CA").issue(tmp_path / "other", "x")
    distrusting = IssuedFiles(other.ca_file, certs["client"].cert_file, certs["client"].key_file).tls_settings()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _who(Dialer(distrusting).aio_channel(mutual))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_the_public_front_door_asks_no_client_certificate(certs: dict[str, IssuedFiles]) -> None:
    server, address = await _serve(certs["server"].tls_settings(), public=True)
    try:
        ca_only = grpc.ssl_channel_credentials(root_certificates=certs["server"].ca_file.read_bytes())
        assert await _who(grpc.aio.secure_channel(address, ca_only)) == ""
        with pytest.raises(grpc.aio.AioRpcError):
            await _who(grpc.aio.insecure_channel(address))
    finally:
        await server.stop()


async def test_the_health_port_answers_health_alone_in_plaintext(certs: dict[str, IssuedFiles]) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    server, address = await _serve(certs["server"].tls_settings(health_port=health_port))
    try:
        assert await _health(grpc.aio.insecure_channel(f"127.0.0.1:{health_port}")) == 1  # SERVING
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await _who(grpc.aio.insecure_channel(f"127.0.0.1:{health_port}"))
        assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop()
    assert server.health_server is not None


def _served_common_name(address: str, ca_file: Path, client: IssuedFiles) -> str:
    """The common name of the certificate the server at ``address`` presents to a new connection."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(client.cert_file, client.key_file)
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        subject = dict(pair[0] for pair in tls.getpeercert()["subject"])  # type: ignore[index]
    return str(subject["commonName"])


async def test_a_renewed_server_certificate_is_served_at_the_next_handshake(
    ca: CertificateAuthority, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    server, address = await _serve(certs["server"].tls_settings())
    try:
        assert await asyncio.to_thread(_served_common_name, address, certs["client"].ca_file, certs["client"]) == "server"
        ca.issue(tmp_path / "server", "server-renewed")  # in place, as cert-manager renews a Secret

        async def renewed() -> str:
            return await asyncio.to_thread(_served_common_name, address, certs["client"].ca_file, certs["client"])

        async def served_renewed() -> bool:
            return await renewed() == "server-renewed"

        # A server looks at its files at most once a second, at a handshake.
        await until(served_renewed, 10.0, "the renewed certificate served")
        assert await renewed() == "server-renewed"
        # A certificate whose key did not come with it is not served: the last good pair stays.
        (tmp_path / "server" / "tls.crt").write_bytes((tmp_path / "client" / "tls.crt").read_bytes())
        await asyncio.sleep(1.1)  # duration: past the server's once-a-second look at its files
        assert await renewed() == "server-renewed"
        assert await renewed() == "server-renewed"
    finally:
        await server.stop()


async def test_a_peer_reopens_its_channel_with_a_renewed_client_certificate(
    ca: CertificateAuthority, mutual: str, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    dialer = Dialer(certs["client"].tls_settings(reload_interval_s=0.05))
    peer: GrpcPeer[None] = GrpcPeer(mutual, dialer=dialer)
    try:
        assert await peer.serving()
        assert await peer.channel.unary_unary(WHO)(b"", timeout=5) == b"client"
        before = peer.channel
        ca.issue(tmp_path / "client", "client-renewed")

        async def reopened() -> bool:  # a probe notices the files changed and reopens
            return await peer.serving() and peer.channel is not before

        await until(reopened, 10.0, "the peer's channel reopened")
        assert await peer.channel.unary_unary(WHO)(b"", timeout=5) == b"client-renewed"
    finally:
        await peer.close()


async def test_a_peer_keeps_its_channel_while_renewed_files_do_not_match(
    ca: CertificateAuthority, mutual: str, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    peer: GrpcPeer[None] = GrpcPeer(mutual, dialer=Dialer(certs["client"].tls_settings(reload_interval_s=0.0001)))
    try:
        assert await peer.serving()
        before = peer.channel
        # A certificate written before its key: the probe keeps the channel (and answers) until they match.
        (tmp_path / "client" / "tls.crt").write_bytes((tmp_path / "server" / "tls.crt").read_bytes())
        assert await peer.serving()
        assert peer.channel is before
        ca.issue(tmp_path / "client", "client-renewed")

        async def reopened() -> bool:
            return await peer.serving() and peer.channel is not before

        await until(reopened, 10.0, "the peer's channel reopened once the pair matched")
        assert await peer.channel.unary_unary(WHO)(b"", timeout=5) == b"client-renewed"
    finally:
        await peer.close()


def test_a_changed_file_bumps_the_dialers_generation_once(ca: CertificateAuthority, certs: dict[str, IssuedFiles],
                                                          tmp_path: Path) -> None:
    dialer = Dialer(certs["client"].tls_settings(reload_interval_s=0.0001))
    dialer.credentials()
    first = dialer.generation
    assert dialer.generation == first
    ca.issue(tmp_path / "client", "client")
    assert dialer.generation == first + 1
    dialer.credentials()
    assert dialer.generation == first + 1


def test_plaintext_dialer_has_no_credentials() -> None:
    dialer = Dialer(TlsSettings(enabled=False))
    assert not dialer.secure
    with pytest.raises(RuntimeError):
        dialer.credentials()


def test_the_admin_identity_passes_without_a_key_and_no_other_does() -> None:
    gate = AdminGate(["admin-key"], identities=["flotilla-admin"])
    gate.check((), "Deploy", ["flotilla-admin"])
    gate.check((("authorization", "Bearer admin-key"),), "Deploy", ["router"])
    with pytest.raises(Unauthenticated):
        gate.check((), "Deploy", ["router"])
    with pytest.raises(PermissionDenied):
        gate.check((("authorization", "Bearer api-key"),), "Deploy", ["batcher"])
    # No identities configured (TLS off): a certificate's name is no credential.
    with pytest.raises(Unauthenticated):
        AdminGate(["admin-key"]).check((), "Deploy", ["flotilla-admin"])


@pytest.fixture
def https(certs: dict[str, IssuedFiles]) -> Iterator[tuple[ssl.SSLContext, socket.socket]]:
    context = http_ssl_context(certs["server"].tls_settings())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    yield context, listener
    listener.close()


def test_the_http_context_loads_a_renewed_certificate(
    ca: CertificateAuthority, certs: dict[str, IssuedFiles], tmp_path: Path,
    https: tuple[ssl.SSLContext, socket.socket],
) -> None:
    context, listener = https
    files = CertFiles(certs["server"].tls_settings())
    files.read()
    assert not reload_ssl_context(context, files)  # nothing changed
    ca.issue(tmp_path / "server", "server-renewed")
    assert reload_ssl_context(context, files)

    def handshake() -> str:
        client = ssl.create_default_context(cafile=certs["server"].ca_file)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            accepted, _ = listener.accept()
            with accepted:
                served = context.wrap_socket(accepted, server_side=True, do_handshake_on_connect=False)
                thread = threading.Thread(target=served.do_handshake)
                thread.start()
                with client.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    subject = dict(pair[0] for pair in tls.getpeercert()["subject"])  # type: ignore[index]
                thread.join(5)
        return str(subject["commonName"])

    assert handshake() == "server-renewed"


async def test_a_shared_server_name_is_checked_instead_of_the_ip_dialled(
    ca: CertificateAuthority, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    """Kubernetes dials pods by IP; their certificates name only the mesh's shared name."""
    named = ca.issue(tmp_path / "pod", "batcher", dns_names=["flotilla-mesh"], ip_addresses=[])
    server, address = await _serve(named.tls_settings())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as by_ip:
            await _who(Dialer(certs["client"].tls_settings()).aio_channel(address))
        assert by_ip.value.code() == grpc.StatusCode.UNAVAILABLE
        by_name = Dialer(certs["client"].tls_settings(server_name="flotilla-mesh"))
        assert await _who(by_name.aio_channel(address)) == "client"
    finally:
        await server.stop()


async def test_a_renewing_channel_reopens_with_the_new_certificate_between_calls(
    ca: CertificateAuthority, mutual: str, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    channel = RenewingChannel(Dialer(certs["client"].tls_settings(reload_interval_s=0.0001)), mutual)
    try:
        assert not channel.renew()
        assert await channel.channel.unary_unary(WHO)(b"", timeout=5) == b"client"
        ca.issue(tmp_path / "client", "client-renewed")
        assert channel.renew()
        assert await channel.channel.unary_unary(WHO)(b"", timeout=5) == b"client-renewed"
    finally:
        await channel.close()


async def test_the_front_door_serves_its_public_pair_and_internal_servers_their_own(
    certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    public = CertificateAuthority.create("a public CA").issue(tmp_path / "public", "router.example.com")
    tls = certs["server"].tls_settings(public_cert_file=public.cert_file, public_key_file=public.key_file)
    front, front_address = await _serve(tls, public=True)
    internal, internal_address = await _serve(tls)
    try:
        client = Dialer(certs["client"].tls_settings())
        trusting_public = grpc.ssl_channel_credentials(root_certificates=public.ca_file.read_bytes())
        assert await _who(grpc.aio.secure_channel(front_address, trusting_public)) == ""
        with pytest.raises(grpc.aio.AioRpcError):  # the mesh CA does not vouch for the public pair
            await _who(client.aio_channel(front_address))
        assert await _who(client.aio_channel(internal_address)) == "client"
    finally:
        await front.stop()
        await internal.stop()
    with pytest.raises(ValueError, match="go together"):
        certs["server"].tls_settings(public_cert_file=public.cert_file)
