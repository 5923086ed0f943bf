"""API keys on the real stack: made with the CLI or the operator client, scoped to models, rate-limited,
revoked over the fleet watch; and the control plane's admin key."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc, controller_pb2, inference_pb2
from flotilla.cli import main
from flotilla.clients.client import FlotillaClient
from flotilla.clients.models import ModelsClient
from flotilla.common.wire import CLASSIFY_METHOD, MODEL_HEADER, RETRY_AFTER_HEADER
from flotilla.errors import Code, FlotillaError, ResourceExhausted
from flotilla.stack.local import LocalStack
from tests.integration.conftest import MODEL, sample
from tests.waiting import until

OTHER_MODEL = "open-nsfw"
"""A model no key below may call (whether it is served does not matter: scope is checked first)."""


@pytest.fixture
async def image(stack: LocalStack) -> str:
    assert stack.state is not None and stack.settings is not None
    async with FlotillaClient(stack.state.router, stack.state.api_key, stack.settings.s3) as client:
        return await client.upload(sample("chelsea.jpg"))


@pytest.fixture
async def router(stack: LocalStack) -> AsyncIterator[grpc.aio.Channel]:
    assert stack.state is not None
    async with grpc.aio.insecure_channel(stack.state.router) as channel:
        yield channel


async def classify(channel: grpc.aio.Channel, token: str, image_uuid: str, model: str = MODEL) -> bytes:
    request = inference_pb2.ClassifyRequest(image_uuid=image_uuid).SerializeToString()
    call = channel.unary_unary(CLASSIFY_METHOD)
    answer: bytes = await call(request, metadata=(("authorization", f"Bearer {token}"), (MODEL_HEADER, model)),
                               timeout=30)
    return answer


async def refused(channel: grpc.aio.Channel, token: str, image_uuid: str, model: str = MODEL) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await classify(channel, token, image_uuid, model)
    return caught.value


def keys_cli(stack: LocalStack, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    main(["keys", "--state", str(stack.state_file), *args])
    return capsys.readouterr().out


async def test_a_scoped_key_made_with_the_cli_calls_its_models_only(
    stack: LocalStack, router: grpc.aio.Channel, image: str, capsys: pytest.CaptureFixture[str]
) -> None:
    token = keys_cli(stack, capsys, "create", "cli-scoped", "--models", "efficientnet-*,nothing-else").strip()
    assert token.startswith("flt_")
    # The router learns the key over its fleet watch: poll until it takes it.
    await until(lambda: _accepts(router, token, image), 5, "the router accepts the new key")
    denied = await refused(router, token, image, OTHER_MODEL)
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "cli-scoped" in (denied.details() or "") and OTHER_MODEL in (denied.details() or "")
    assert token.split("_", 2)[2] not in (denied.details() or "")
    # The HTTP front door says the same.
    assert stack.state is not None
    async with httpx.AsyncClient(base_url=f"http://{stack.state.router_http}") as http:
        response = await http.get(f"/v2/models/{OTHER_MODEL}", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 403 and "cli-scoped" in response.json()["error"]

    listed = keys_cli(stack, capsys, "list")
    assert "cli-scoped" in listed and "efficientnet-*" in listed
    assert token not in listed and token.split("_", 2)[2] not in listed


async def _accepts(router: grpc.aio.Channel, token: str, image: str) -> bool:
    try:
        await classify(router, token, image)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNAUTHENTICATED:
            raise
        return False
    return True


async def test_over_its_rate_a_key_is_refused_with_a_retry_hint(
    stack: LocalStack, router: grpc.aio.Channel, image: str
) -> None:
    with stack.models_client() as models:
        token = models.create_key("slow", [MODEL], rate_per_s=0.5, burst=1).token
    await until(lambda: _accepts(router, token, image), 5, "the router accepts the new key")  # the one token
    over = await refused(router, token, image)
    assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "slow" in (over.details() or "")
    retry_after_ms = int(dict(over.trailing_metadata() or ())[RETRY_AFTER_HEADER])
    assert 0 < retry_after_ms <= 2000


async def test_flotillas_client_gets_the_retry_hint_on_unary_calls_and_on_the_stream(
    stack: LocalStack, router: grpc.aio.Channel, image: str
) -> None:
    assert stack.state is not None and stack.settings is not None
    with stack.models_client() as models:
        token = models.create_key("slow-client", [MODEL], rate_per_s=0.2, burst=1).token
    await until(lambda: _accepts(router, token, image), 5, "the router accepts the new key")  # the one token
    async with FlotillaClient(stack.state.router, token, stack.settings.s3, transparent_retries=False) as client:
        with pytest.raises(ResourceExhausted) as unary:
            await client.classify(image, MODEL)
        assert unary.value.retry_after_s is not None and 0 < unary.value.retry_after_s <= 5.0
        async with client.stream(MODEL) as stream:
            with pytest.raises(ResourceExhausted) as streamed:
                await stream.classify(image)
        assert "slow-client" in str(streamed.value)
        assert streamed.value.retry_after_s is not None and 0 < streamed.value.retry_after_s <= 5.0


async def test_a_revoked_key_stops_within_a_second(
    stack: LocalStack, router: grpc.aio.Channel, image: str
) -> None:
    with stack.models_client() as models:
        token = models.create_key("short-lived", ["*"]).token
        await until(lambda: _accepts(router, token, image), 5, "the router accepts the new key")
        models.revoke_key("short-lived")
        revoked_at = time.monotonic()

        async def refused_now() -> bool:
            return not await _accepts(router, token, image)

        await until(refused_now, 1.0, "the revoked key is refused")
        assert time.monotonic() - revoked_at < 1.0
        assert "short-lived" not in [k.name for k in models.list_keys()]


def test_mutations_need_the_admin_key(stack: LocalStack) -> None:
    assert stack.settings is not None
    controller = stack.settings.endpoints.controller
    spec = {"storage_uri": "s3://flotilla-models/nothing"}
    for admin_key, code in ((None, Code.UNAUTHENTICATED), ("not-the-admin-key", Code.PERMISSION_DENIED)):
        with ModelsClient(controller, admin_key=admin_key) as models, pytest.raises(FlotillaError) as caught:
            models.deploy("never-deployed", spec)
        assert caught.value.code == code, caught.value.message
        with ModelsClient(controller, admin_key=admin_key) as models, pytest.raises(FlotillaError) as caught:
            models.create_key("never-made", ["*"])
        assert caught.value.code == code
        with ModelsClient(controller, admin_key=admin_key) as models:
            assert MODEL in [m.name for m in models.list()]  # reads stay open
    with stack.models_client() as models:
        # Past the gate: the controller's own answer (no artifact there), not an authentication one.
        with pytest.raises(FlotillaError) as caught:
            models.deploy("never-deployed", spec)
        assert caught.value.code not in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED)
        created = models.create_key("made-by-admin", ["*"])
        assert created.token and not created.key.hash
        models.revoke_key("made-by-admin")


async def test_set_batching_needs_the_admin_key(stack: LocalStack) -> None:
    async with grpc.aio.insecure_channel(stack.batchers[MODEL].address) as channel:
        admin = batcher_pb2_grpc.BatcherAdminStub(channel)
        policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))  # a read: open
        request = batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.SetBatching(request)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.SetBatching(request, metadata=(("authorization", "Bearer wrong"),))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await admin.SetBatching(request, metadata=(("authorization", f"Bearer {stack.admin_key}"),))


def test_the_fleet_carries_hashes_never_keys(stack: LocalStack) -> None:
    with stack.models_client() as models:
        token = models.create_key("in-the-fleet", ["*"]).token
        try:
            fleet: controller_pb2.Fleet = models.fleet()
            key = next(k for k in fleet.keys if k.name == "in-the-fleet")
            assert len(key.hash) == 32 and len(key.salt) == 16
            assert token.split("_", 2)[2].encode() not in fleet.SerializeToString()
        finally:
            models.revoke_key("in-the-fleet")
