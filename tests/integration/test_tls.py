"""The whole stack with TLS on (``flotilla up --tls``): a throwaway CA, a certificate per service, server
TLS at the router's gRPC and HTTP front doors, mutual TLS between the tiers. Clients nobody here wrote
(tritonclient over TLS, an HTTPS request as curl sends it) get the same top-1 as Flotilla's own API on
a plaintext stack; plaintext and certificate-less callers are refused at every internal tier; the
admin identity's certificate deploys without an admin key and a service's does not; a renewed router
certificate is served without a restart."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flotilla.clients.api_calls import Api, ApiCalls
from flotilla.clients.client import FlotillaClient
from flotilla.clients.loadtest import triton_totals
from flotilla.clients.models import ModelsClient
from flotilla.common.ids import new_image_uuid, object_key
from flotilla.common.object_store import ObjectStore
from flotilla.common.tls import Dialer
from flotilla.config import TlsSettings
from flotilla.errors import PermissionDenied, Unauthenticated
from flotilla.stack.local import LocalStack
from flotilla.stack.state import StackState
from tests.integration.conftest import API_KEY, MODEL, PHOTOS, Photo, sample, stack_settings
from tests.waiting import until

TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    settings = stack_settings(tmp_path_factory.mktemp("tls-stack"), triton={"replicas": 1}, tls={"enabled": True})
    with LocalStack(settings) as running:
        yield running


def _state(stack: LocalStack) -> StackState:
    assert stack.state is not None and stack.state.tls_ca, "stack.json names no CA: TLS is off"
    return stack.state


def _role_tls(stack: LocalStack, role: str) -> TlsSettings:
    return stack.tls_files[role].tls_settings()


async def test_classify_over_tls_gets_the_plaintext_stacks_answers(
    tls_stack: LocalStack, photos: dict[str, Photo]
) -> None:
    state = _state(tls_stack)
    async with FlotillaClient(state.router, API_KEY, state.s3_settings(), dialer=state.dialer()) as client:
        for name in PHOTOS:
            image_uuid = await client.upload(sample(name))
            answer = await client.classify(image_uuid, MODEL, top_k=1, timeout_s=TIMEOUT_S)
            assert answer.classes[0].index == photos[name].index, name


async def test_the_router_takes_tls_without_a_client_certificate_and_refuses_plaintext(tls_stack: LocalStack) -> None:
    state = _state(tls_stack)
    ca_only = grpc.ssl_channel_credentials(root_certificates=Path(state.tls_ca).read_bytes())
    async with grpc.aio.secure_channel(state.router, ca_only) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.aio.AioRpcError) as plaintext:
        async with grpc.aio.insecure_channel(state.router) as channel:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tier", ["controller", "batcher", "preprocess"])
async def test_internal_tiers_refuse_plaintext_and_callers_without_a_certificate(tls_stack: LocalStack, tier: str) -> None:
    state = _state(tls_stack)
    address = {"controller": state.controller, "batcher": state.batcher_shards[0], "preprocess": state.preprocess[0]}[tier]
    ca_only = grpc.ssl_channel_credentials(root_certificates=Path(state.tls_ca).read_bytes())
    for channel in (grpc.aio.insecure_channel(address), grpc.aio.secure_channel(address, ca_only)):
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async with channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # With a certificate from the mesh's CA, it answers.
    async with state.dialer().aio_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_admin_certificate_deploys_without_a_key_and_a_services_does_not(tls_stack: LocalStack) -> None:
    state = _state(tls_stack)
    with ModelsClient(state.controller, admin_key=None, dialer=state.dialer()) as admin:
        created = admin.create_key("tls-admin-identity", [MODEL])
        assert created.token
        admin.revoke_key("tls-admin-identity")
    with ModelsClient(state.controller, admin_key=None, dialer=Dialer(_role_tls(tls_stack, "router"))) as router:
        assert router.list_keys() is not None  # reads stay open to the mesh's own services
        with pytest.raises((Unauthenticated, PermissionDenied)):
            router.create_key("not-an-admin", [MODEL])


def test_tritonclient_over_tls_gets_flotillas_top1(tls_stack: LocalStack, photos: dict[str, Photo]) -> None:
    state = _state(tls_stack)
    client = triton_grpc.InferenceServerClient(state.router, ssl=True, root_certificates=state.tls_ca)
    try:
        photo = photos["chelsea.jpg"]
        image_uuid = _upload(state, sample(photo.name))
        uuids = triton_grpc.InferInput("IMAGE_UUID", [1], "BYTES")
        uuids.set_data_from_numpy(np.array([image_uuid.encode()], dtype=np.object_))
        result = client.infer(MODEL, [uuids], headers={"authorization": f"Bearer {API_KEY}"},
                              client_timeout=TIMEOUT_S)
        probabilities = result.as_numpy("PROBABILITIES")
        assert probabilities is not None and int(np.argmax(probabilities[0])) == photo.index
    finally:
        client.close()


def _upload(state: StackState, jpeg: bytes) -> str:
    """Put ``jpeg`` in the stack's store (over TLS when its store serves TLS); its uuid."""
    image_uuid = new_image_uuid()
    ObjectStore(state.s3_settings()).put(object_key(image_uuid), jpeg)
    return image_uuid


def _https(address: str, ca_file: str, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context(cafile=ca_file)
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=TIMEOUT_S)
    try:
        headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_kserve_http_over_https(tls_stack: LocalStack, photos: dict[str, Photo]) -> None:
    state = _state(tls_stack)
    assert _https(state.router_http, state.tls_ca, "GET", "/v2/health/ready")[0] == 200
    photo = photos["coffee.jpg"]
    image_uuid = _upload(state, sample(photo.name))
    body = {"inputs": [{"name": "IMAGE_UUID", "shape": [1], "datatype": "BYTES", "data": [image_uuid]}]}
    status, answer = _https(state.router_http, state.tls_ca, "POST", f"/v2/models/{MODEL}/infer",
                            json.dumps(body).encode())
    assert status == 200, answer
    outputs = {o["name"]: o for o in json.loads(answer)["outputs"]}
    assert int(np.argmax(outputs["PROBABILITIES"]["data"])) == photo.index
    # Plain HTTP on the TLS port gets no answer it could read as one.
    host, port = state.router_http.rsplit(":", 1)
    plain = http.client.HTTPConnection(host, int(port), timeout=10)
    with pytest.raises((http.client.HTTPException, OSError)):
        plain.request("GET", "/v2/health/ready")
        assert plain.getresponse().status != 200
    plain.close()


def _served_serial(address: str, ca_file: str) -> int:
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols(["h2"])
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    from cryptography import x509

    return int(x509.load_der_x509_certificate(der).serial_number)


async def test_a_renewed_router_certificate_is_served_without_a_restart(tls_stack: LocalStack) -> None:
    state = _state(tls_stack)
    router = tls_stack.router
    assert router is not None
    pid = router.pid
    before = _served_serial(state.router, state.tls_ca)
    # Renew in place, signed by the same CA, as cert-manager renews the router's Secret.
    assert tls_stack.tls_authority is not None
    tls_stack.tls_authority.issue(tls_stack.tls_files["router"].cert_file.parent, "router")
    await until(lambda: _served_serial(state.router, state.tls_ca) != before, 30.0, "the renewed certificate served")
    assert router.pid == pid, "the router was restarted"
    async with FlotillaClient(state.router, API_KEY, state.s3_settings(), dialer=state.dialer()) as client:
        image_uuid = await client.upload(sample("astronaut.jpg"))
        assert (await client.classify(image_uuid, MODEL, top_k=1, timeout_s=TIMEOUT_S)).classes


def test_the_cli_reads_the_stack_file_and_speaks_tls(tls_stack: LocalStack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOTILLA_")}
    listed = subprocess.run(
        [sys.executable, "-m", "flotilla", "models", "--state", str(tls_stack.state_file), "list"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert MODEL in listed.stdout


@pytest.mark.parametrize("api", ["unary", "stream", "kserve-grpc", "kserve-http"])
async def test_the_load_tests_doors_speak_tls(tls_stack: LocalStack, api: Api) -> None:
    state = _state(tls_stack)
    async with FlotillaClient(state.router, API_KEY, state.s3_settings(), dialer=state.dialer()) as client:
        image_uuid = await client.upload(sample("chelsea.jpg"))
        calls = ApiCalls(client, state.router, state.router_http, API_KEY, tls_ca=state.tls_ca)
        try:
            assert await calls.call(api, MODEL, [image_uuid])() is not None
        finally:
            await calls.close()


async def test_the_load_test_reads_tritons_counters_over_mutual_tls(
    tls_stack: LocalStack, photos: dict[str, Photo]
) -> None:
    state = _state(tls_stack)
    before = await triton_totals(state.triton, MODEL, state.dialer())
    async with FlotillaClient(state.router, API_KEY, state.s3_settings(), dialer=state.dialer()) as client:
        await client.classify(await client.upload(sample("rocket.jpg")), MODEL, timeout_s=TIMEOUT_S)
    after = await triton_totals(state.triton, MODEL, state.dialer())
    assert after[0] > before[0] and after[1] > before[1]
