"""TLS to Triton (``tls.enabled`` and ``tls.triton``): the worker's ``GrpcReplica`` and the controller's
``TritonReplica`` dial a stand-in Triton gRPC server that requires mutual TLS (as tritonserver's
``--grpc-use-ssl-mutual`` does) with their own certificate; a worker then calls every replica over
gRPC; a renewed certificate opens a new channel; and the local stack's replicas and SeaweedFS are
started with their certificates."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from flotilla.common.certs import CertificateAuthority, IssuedFiles
from flotilla.common.tls import PLAINTEXT, Dialer, server_credentials
from flotilla.config import PoolSettings, S3Settings
from flotilla.errors import Code
from flotilla.services.controller.artifacts import ArtifactCache, ArtifactStore
from flotilla.services.controller.replicas import TritonReplica
from flotilla.services.preprocess.triton.backend import TritonBackend
from flotilla.services.preprocess.triton.grpc_replica import GrpcReplica
from flotilla.services.preprocess.triton.replica import InferCall, ReplicaCallError
from flotilla.stack.components import TritonInstallation, TritonPorts, seaweed_s3

SCORES = np.array([[0.25, 0.75]], dtype=np.float32)


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    """ServerLive, RepositoryIndex and ModelInfer (answering ``SCORES`` as ``probabilities``)."""

    async def ServerLive(self, request: Any, context: Any) -> Any:  # noqa: N802 - the service's naming
        return service_pb2.ServerLiveResponse(live=True)

    async def RepositoryIndex(self, request: Any, context: Any) -> Any:  # noqa: N802
        return service_pb2.RepositoryIndexResponse(
            models=[service_pb2.RepositoryIndexResponse.ModelIndex(name="m", version="1", state="READY")]
        )

    async def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802
        assert request.model_name == "m" and len(request.raw_input_contents) == 1
        output = service_pb2.ModelInferResponse.InferOutputTensor(name="probabilities", datatype="FP32", shape=[1, 2])
        return service_pb2.ModelInferResponse(outputs=[output], raw_output_contents=[SCORES.tobytes()])


@pytest.fixture
def certs(ca: CertificateAuthority, tmp_path: Path) -> dict[str, IssuedFiles]:
    return {name: ca.issue(tmp_path / name, name) for name in ("triton", "preprocess", "controller")}


@pytest.fixture
async def triton(certs: dict[str, IssuedFiles]) -> AsyncIterator[str]:
    """A Triton gRPC endpoint with mutual TLS: its certificate, and callers' signed by the CA."""
    server = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(FakeTriton(), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(certs["triton"].tls_settings(), client_auth=True))
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


def call() -> InferCall:
    return InferCall("m", "", "images", np.zeros((1, 4, 4, 3), np.uint8), "probabilities")


async def test_a_worker_runs_a_batch_on_triton_over_mutual_tls(triton: str, certs: dict[str, IssuedFiles]) -> None:
    replica = GrpcReplica(triton, dialer=Dialer(certs["preprocess"].tls_settings()))
    try:
        got = await replica.infer(call(), False, 5.0)
        assert got is not None and got.tolist() == SCORES.tolist()
    finally:
        await replica.close()


async def test_a_worker_without_the_meshs_certificate_is_refused(
    triton: str, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    stranger = CertificateAuthority.create("another CA").issue(tmp_path / "stranger", "stranger")
    foreign = IssuedFiles(certs["preprocess"].ca_file, stranger.cert_file, stranger.key_file).tls_settings()
    for dialer in (PLAINTEXT, Dialer(foreign)):
        replica = GrpcReplica(triton, dialer=dialer)
        try:
            with pytest.raises(ReplicaCallError) as refused:
                await replica.infer(call(), False, 5.0)
            assert refused.value.code == Code.UNAVAILABLE
        finally:
            await replica.close()


async def test_a_renewed_worker_certificate_opens_a_new_channel(
    triton: str, ca: CertificateAuthority, certs: dict[str, IssuedFiles]
) -> None:
    dialer = Dialer(certs["preprocess"].tls_settings(reload_interval_s=0.001))
    replica = GrpcReplica(triton, dialer=dialer)
    try:
        assert await replica.infer(call(), False, 5.0) is not None
        first = replica.channel
        ca.issue(certs["preprocess"].cert_file.parent, "preprocess")  # renewed in place (files replaced)
        os.utime(certs["preprocess"].cert_file, ns=(1, 1))  # a new signature even within one mtime tick
        assert await replica.infer(call(), False, 5.0) is not None
        assert replica.channel is not first
    finally:
        await replica.close()


async def test_with_tls_to_triton_a_worker_calls_every_replica_over_grpc(certs: dict[str, IssuedFiles]) -> None:
    backend = TritonBackend(PoolSettings(), protocol="http", dialer=Dialer(certs["preprocess"].tls_settings()))
    try:
        assert backend.protocol == "grpc"
        backend.set_http_endpoints({"10.0.0.1:8001": "10.0.0.1:8000"})  # Triton's plaintext HTTP: not used
        client = backend.client_for("10.0.0.1:8001")
        assert isinstance(client, GrpcReplica) and client.dialer.secure
        assert TritonBackend(PoolSettings(), protocol="http").protocol == "http", "plaintext: as configured"
    finally:
        await backend.close()


async def test_the_controller_drives_triton_over_mutual_tls(
    triton: str, certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    def store(bucket: str) -> Any:
        raise AssertionError("no artifact is fetched")

    cache = ArtifactCache(tmp_path / "cache", ArtifactStore(store))
    secure = TritonReplica(triton, 1024, tmp_path / "models", cache, dialer=Dialer(certs["controller"].tls_settings()))
    plaintext = TritonReplica(triton, 1024, tmp_path / "models", cache)
    try:
        assert await secure.is_live()
        assert await secure.loaded() == {"m": [1]}
        assert not await plaintext.is_live(), "a plaintext client does not get in"
    finally:
        await secure.close()
        await plaintext.close()


def test_a_replica_with_a_certificate_serves_grpc_with_mutual_tls_and_no_http(
    certs: dict[str, IssuedFiles], tmp_path: Path
) -> None:
    install = TritonInstallation(Path("/opt/tritonserver"), tmp_path / "libs", tmp_path / "backends")
    ports = TritonPorts(8001, 8000, 8002)
    plain = install.process("triton-0", host="127.0.0.1", ports=ports, model_repository=tmp_path,
                            log_path=tmp_path / "t.log").argv
    assert "--http-port=8000" in plain and not any(a.startswith("--grpc-use-ssl") for a in plain)
    files = certs["triton"]
    argv = install.process("triton-0", host="127.0.0.1", ports=ports, model_repository=tmp_path,
                           log_path=tmp_path / "t.log", tls=files).argv
    for flag in ("--allow-http=false", "--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true",
                 f"--grpc-server-cert={files.cert_file}", f"--grpc-server-key={files.key_file}",
                 f"--grpc-root-cert={files.ca_file}", "--grpc-port=8001", "--metrics-port=8002"):
        assert flag in argv
    assert not any(a.startswith("--http-") for a in argv)


def test_seaweedfs_with_a_certificate_serves_s3_over_https(certs: dict[str, IssuedFiles], tmp_path: Path) -> None:
    files = certs["triton"]  # any certificate of the CA
    argv = seaweed_s3(S3Settings(), "127.0.0.1", 8333, tmp_path / "data", tmp_path / "weed.log", tls=files).argv
    assert f"-s3.cert.file={files.cert_file}" in argv and f"-s3.key.file={files.key_file}" in argv
    assert not any(a.startswith("-s3.port.https") for a in argv), "the one S3 port is HTTPS"
    plain = seaweed_s3(S3Settings(), "127.0.0.1", 8333, tmp_path / "data", tmp_path / "weed.log").argv
    assert not any(a.startswith(("-s3.cert", "-s3.key")) for a in plain)
