"""The router's KServe v2 HTTP app, driven in-process (httpx's ASGI transport) over the real core with a
fake forwarder and fleet: routes, JSON and binary bodies, the key, and each error's status and body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from tritonclient.http import InferResult
from tritonclient.utils import serialize_byte_tensor

from flotilla.api.v1 import controller_pb2, inference_pb2
from flotilla.common.interceptors import AdmissionLimit, CallObserver
from flotilla.config import ModelSettings
from flotilla.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FlotillaError,
    InvalidArgument,
    ModelNotFound,
    PermissionDenied,
    QueueFull,
    QuotaExceeded,
    Unauthenticated,
    Unavailable,
)
from flotilla.services.router.forward import TimeRemaining
from flotilla.services.router.kserve.core import KServeFront
from flotilla.services.router.kserve.http import TIMEOUT_HEADER, KServeHttp, Message, every_model

MODEL = "classifier"
LABELS = ["cat", "dog", "fox", "owl"]
KEY = "test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
UUIDS = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]


def row_for(uuid: str) -> list[float]:
    """Image i's probabilities: class i is best."""
    row = [0.1] * len(LABELS)
    row[int(uuid[-1]) % len(LABELS)] = 0.7
    return row


class FakeRouter:
    """Routes MODEL; answers each image from its uuid, or raises ``failure``; holds calls while ``hold``."""

    def __init__(self) -> None:
        self.failure: BaseException | None = None
        self.hold = False
        self.released = asyncio.Event()
        self.calls = 0
        self.cancelled = 0

    def check_model(self, model: str | None) -> None:
        if model != MODEL:
            raise ModelNotFound(f"model {model!r} is not served")

    async def call(
        self, model: str | None, raw: bytes, headers: Sequence[tuple[str, str]], time_remaining: TimeRemaining
    ) -> bytes:
        self.check_model(model)
        self.calls += 1
        if self.hold:
            try:
                await self.released.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.failure is not None:
            raise self.failure
        request = inference_pb2.ClassifyRequest.FromString(raw)
        row = row_for(request.image_uuid)
        best = sorted(range(len(row)), key=lambda i: -row[i])[: request.top_k or 5]
        return inference_pb2.ClassifyResponse(
            image_uuid=request.image_uuid, model_name=MODEL,
            classes=[inference_pb2.ClassScore(index=i, label=LABELS[i], score=row[i]) for i in best],
            scores=row if request.all_scores else [],
        ).SerializeToString()


class FakeFleet:
    def __init__(self, *others: str) -> None:
        """MODEL, and ``others`` registered but not routed (FakeRouter routes MODEL only)."""
        spec = ModelSettings.model_validate({"labels": LABELS, "versions": [1], "default_version": 1})
        self.models = {
            name: controller_pb2.ModelStatus(name=name, spec_json=spec.model_dump_json(), batchers=["b:1"])
            for name in (MODEL, *others)
        }


class FakeLoader:
    """The controller's EnsureLoaded: records each model and deadline; holds while ``hold``."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, float | None]] = []
        self.hold = False
        self.cancelled = 0

    async def __call__(self, model: str, timeout_s: float | None) -> None:
        self.loaded.append((model, timeout_s))
        if self.hold:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise


def check_key(authorization: str | None, model: str | None = None) -> None:
    if authorization != f"Bearer {KEY}":
        raise Unauthenticated("API key is not valid" if authorization else "missing authorization header")


def counted(name: str, **totals: Any) -> controller_pb2.ModelRequestStatistics:
    return controller_pb2.ModelRequestStatistics(name=name, **totals)


class FakeStatistics:
    """The controller's GetModelStatistics: ``counted`` for every model, or its one model's."""

    def __init__(self, *counted: controller_pb2.ModelRequestStatistics) -> None:
        self.counted = list(counted)
        self.asked: list[str] = []

    async def __call__(self, model: str, timeout_s: float | None) -> list[controller_pb2.ModelRequestStatistics]:
        self.asked.append(model)
        return [c for c in self.counted if not model or c.name == model]


class Harness:
    def __init__(
        self, *, ready: bool = True, admission: AdmissionLimit | None = None, max_body_bytes: int = 1 << 20,
        fleet: FakeFleet | None = None, scope: Callable[[str | None], Callable[[str], bool]] = every_model,
    ):
        self.router = FakeRouter()
        self.ready = ready
        self.loader = FakeLoader()
        self.statistics = FakeStatistics(
            counted(MODEL, arrivals_total=9, dispatched_total=8, queue_wait_s_total=0.5, batches_total=2,
                    succeeded_total=7, success_s_total=1.5, compute_s_total=0.75, failed_total=1, fail_s_total=0.25,
                    last_used_unix_s=1765000000.5,
                    batch_sizes=[controller_pb2.BatchSizeCounters(size=5, batches_total=1, compute_s_total=0.5),
                                 controller_pb2.BatchSizeCounters(size=2, batches_total=1, compute_s_total=0.25)]),
            counted("hidden", succeeded_total=3),
        )
        front = KServeFront(
            self.router, fleet or FakeFleet(), ready=lambda: self.ready, loader=self.loader, statistics=self.statistics
        )
        self.app = KServeHttp(
            front, check_key, scope=scope, observer=CallObserver("router", admission), max_body_bytes=max_body_bytes
        )


@pytest.fixture
def harness() -> Harness:
    return Harness()


@pytest.fixture
async def http(harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.app), base_url="http://router") as client:
        yield client


def infer_body(uuids: Sequence[str], **extra: object) -> dict[str, object]:
    body: dict[str, object] = {"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [len(uuids)], "data": list(uuids)}]}
    body.update(extra)
    return body


def assert_error(response: httpx.Response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    assert isinstance(message, str)
    for word in words:
        assert word in message, message


async def test_health_needs_no_key_and_says_not_ready_with_400(harness: Harness, http: httpx.AsyncClient) -> None:
    assert (await http.get("/v2/health/live")).status_code == 200
    assert (await http.get("/v2/health/ready")).status_code == 200
    harness.ready = False
    response = await http.get("/v2/health/ready")
    assert response.status_code == 400 and response.content == b""


async def test_every_other_route_needs_the_key(http: httpx.AsyncClient) -> None:
    for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/config"):
        missing = await http.get(path)
        assert_error(missing, 401, "missing")
        assert missing.headers["www-authenticate"] == "Bearer"
        assert_error(await http.get(path, headers={"authorization": "Bearer wrong"}), 401, "not valid")
    assert_error(await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1])), 401)
    assert (await http.get("/v2", headers=AUTH)).status_code == 200


async def test_scope_and_quota_refusals_are_403_and_429_with_retry_after(harness: Harness, http: httpx.AsyncClient) -> None:
    def authorize(authorization: str | None, model: str | None) -> None:
        if model == "other":
            raise PermissionDenied(f"API key 'ci' may not call model {model!r}")
        raise QuotaExceeded("API key 'ci' is over its quota", retry_after_s=1.2)

    harness.app.authorize = authorize
    assert_error(await http.get("/v2/models/other", headers=AUTH), 403, "'ci'", "'other'")
    over = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1]), headers=AUTH)
    assert_error(over, 429, "quota")
    assert over.headers["retry-after"] == "2"


async def test_server_and_model_metadata(http: httpx.AsyncClient) -> None:
    server = (await http.get("/v2", headers=AUTH)).json()
    assert server["name"] == "flotilla" and "classification" in server["extensions"]
    model = (await http.get(f"/v2/models/{MODEL}", headers=AUTH)).json()
    assert model["name"] == MODEL and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {"name": "PROBABILITIES", "datatype": "FP32", "shape": [-1, len(LABELS)]} in model["outputs"]
    versioned = await http.get(f"/v2/models/{MODEL}/versions/1", headers=AUTH)
    assert versioned.json() == model
    config = (await http.get(f"/v2/models/{MODEL}/config", headers=AUTH)).json()
    assert config["name"] == MODEL and config["input"][0]["data_type"] == "TYPE_STRING"


async def test_model_ready_and_unknown_models(http: httpx.AsyncClient) -> None:
    assert (await http.get(f"/v2/models/{MODEL}/ready", headers=AUTH)).status_code == 200
    assert (await http.get(f"/v2/models/{MODEL}/versions/1/ready", headers=AUTH)).status_code == 200
    assert (await http.get(f"/v2/models/{MODEL}/versions/9/ready", headers=AUTH)).status_code == 400
    assert (await http.get("/v2/models/nope/ready", headers=AUTH)).status_code == 400
    assert_error(await http.get("/v2/models/nope", headers=AUTH), 404, "nope")
    assert_error(await http.post("/v2/models/nope/infer", json=infer_body(UUIDS[:1]), headers=AUTH), 404, "nope")
    assert_error(await http.get(f"/v2/models/{MODEL}/versions/9", headers=AUTH), 404, "version")


async def test_infer_json_answers_both_outputs_row_major(http: httpx.AsyncClient) -> None:
    response = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:3], id="r1"), headers=AUTH)
    assert response.status_code == 200, response.text
    assert "inference-header-content-length" not in response.headers
    answer = response.json()
    assert answer["model_name"] == MODEL and answer["id"] == "r1" and answer["model_version"] == "1"
    outputs = {o["name"]: o for o in answer["outputs"]}
    probabilities = outputs["PROBABILITIES"]
    assert probabilities["datatype"] == "FP32" and probabilities["shape"] == [3, len(LABELS)]
    # Every FP32 value comes back exactly (nine significant digits), row-major.
    expected = np.array([row_for(u) for u in UUIDS[:3]], dtype=np.float32).ravel()
    assert np.array_equal(np.array(probabilities["data"], dtype=np.float32), expected)
    labels = outputs["LABELS"]
    assert labels["datatype"] == "BYTES" and labels["shape"][0] == 3
    k = labels["shape"][1]
    assert [labels["data"][i * k] for i in range(3)] == ["cat", "dog", "fox"]  # image i: class i best


async def test_infer_takes_nested_data_parameters_and_classification(http: httpx.AsyncClient) -> None:
    body = {
        "inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [2, 1], "data": [[UUIDS[1]], [UUIDS[2]]]}],
        "outputs": [{"name": "PROBABILITIES", "parameters": {"classification": 2}}, {"name": "LABELS"}],
        "parameters": {"top_k": 1},
    }
    answer = (await http.post(f"/v2/models/{MODEL}/infer", json=body, headers=AUTH)).json()
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["LABELS"]["shape"] == [2, 1] and outputs["LABELS"]["data"] == ["dog", "fox"]
    assert outputs["PROBABILITIES"]["datatype"] == "BYTES" and outputs["PROBABILITIES"]["shape"] == [2, 2]
    assert outputs["PROBABILITIES"]["data"][0].split(":")[1:] == ["1", "dog"]


async def test_infer_binary_tensor_data_both_ways(http: httpx.AsyncClient) -> None:
    """The body tritonclient.http sends by default (binary BYTES input, binary outputs), answered so that
    tritonclient's own parser reads it."""
    raw = serialize_byte_tensor(np.array([u.encode() for u in UUIDS[1:3]], dtype=np.object_)).item()
    header = json.dumps({
        "inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [2, 1],
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"binary_data_output": True},
    }).encode()
    response = await http.post(
        f"/v2/models/{MODEL}/infer", content=header + raw,
        headers={**AUTH, "inference-header-content-length": str(len(header))},
    )
    assert response.status_code == 200, response.text
    length = response.headers["inference-header-content-length"]
    result = InferResult.from_response_body(response.content, header_length=int(length))
    probabilities = result.as_numpy("PROBABILITIES")
    assert probabilities.dtype == np.float32 and probabilities.shape == (2, len(LABELS))
    assert probabilities.argmax(axis=1).tolist() == [1, 2]
    assert [row[0] for row in result.as_numpy("LABELS")] == [b"dog", b"fox"]


async def test_binary_only_for_outputs_that_ask(http: httpx.AsyncClient) -> None:
    body = infer_body(UUIDS[:1], outputs=[{"name": "PROBABILITIES", "parameters": {"binary_data": True}},
                                          {"name": "LABELS", "parameters": {"binary_data": False}}])
    response = await http.post(f"/v2/models/{MODEL}/infer", json=body, headers=AUTH)
    length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:length])
    outputs = {o["name"]: o for o in header["outputs"]}
    assert outputs["PROBABILITIES"]["parameters"]["binary_data_size"] == 4 * len(LABELS)
    assert "data" not in outputs["PROBABILITIES"] and outputs["LABELS"]["data"][0] == "cat"
    assert np.frombuffer(response.content[length:], "<f4").tolist() == pytest.approx(row_for(UUIDS[0]))


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", ["not JSON"]),
        (b"[1, 2]", ["JSON object"]),
        (b'{"inputs": 3}', ["inputs"]),
        (b'{"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [1], "data": [7]}]}', ["strings"]),
        (b'{"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": "1", "data": ["x"]}]}', ["shape"]),
        (b'{"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [1]}]}', ['no "data"']),
        (b'{"inputs": [], "outputs": [{"name": 1}]}', ["outputs[0]"]),
        (b'{"inputs": [], "parameters": {"top_k": [1]}}', ["top_k"]),
    ],
)
async def test_malformed_bodies_are_400(http: httpx.AsyncClient, body: bytes, words: list[str]) -> None:
    response = await http.post(f"/v2/models/{MODEL}/infer", content=body, headers=AUTH)
    assert_error(response, 400, *words)


async def test_binary_sizes_must_match_the_body(http: httpx.AsyncClient) -> None:
    header = json.dumps({"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 100}}]}).encode()
    response = await http.post(f"/v2/models/{MODEL}/infer", content=header + b"\0" * 10,
                               headers={**AUTH, "inference-header-content-length": str(len(header))})
    assert_error(response, 400, "binary_data_size")
    response = await http.post(f"/v2/models/{MODEL}/infer", content=header,
                               headers={**AUTH, "inference-header-content-length": str(len(header) + 1)})
    assert_error(response, 400, "Inference-Header-Content-Length")


async def test_bad_inputs_are_400_naming_what_is_wrong(harness: Harness, http: httpx.AsyncClient) -> None:
    bad_uuid = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(["not-a-uuid"]), headers=AUTH)
    assert_error(bad_uuid, 400, "IMAGE_UUID[0]", "not-a-uuid")
    wrong_name = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [UUIDS[0]]}]}
    assert_error(await http.post(f"/v2/models/{MODEL}/infer", json=wrong_name, headers=AUTH), 400, "images")
    wrong_type = {"inputs": [{"name": "IMAGE_UUID", "datatype": "UINT8", "shape": [3], "data": [1, 2, 3]}]}
    assert_error(await http.post(f"/v2/models/{MODEL}/infer", json=wrong_type, headers=AUTH), 400, "UINT8")
    assert_error(await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1], outputs=[{"name": "X"}]),
                                 headers=AUTH), 400, "X")
    assert harness.router.calls == 0  # refused before any image was forwarded


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (InvalidArgument("bad"), 400),
        (FailedPrecondition("cannot load"), 400),
        (QueueFull("queue full"), 429),
        (Unavailable("no batcher"), 503),
        (DeadlineExceeded("too late"), 504),
        (FlotillaError("backend failed"), 500),
    ],
)
async def test_errors_from_below_get_their_http_status(
    harness: Harness, http: httpx.AsyncClient, failure: FlotillaError, status: int
) -> None:
    harness.router.failure = failure
    response = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1]), headers=AUTH)
    assert_error(response, status, failure.message, UUIDS[0])


async def test_an_unexpected_error_is_500_without_its_details(harness: Harness, http: httpx.AsyncClient) -> None:
    harness.router.failure = RuntimeError("secret internals")
    response = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1]), headers=AUTH)
    assert_error(response, 500, "internal error")
    assert "secret" not in response.text


async def test_routes_methods_and_body_limit() -> None:
    harness = Harness(max_body_bytes=200)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.app), base_url="http://r") as http:
        assert_error(await http.get("/v2/nothing", headers=AUTH), 404, "route")
        assert_error(await http.get(f"/v2/models/{MODEL}/explain", headers=AUTH), 404, "route")
        not_allowed = await http.get(f"/v2/models/{MODEL}/infer", headers=AUTH)
        assert_error(not_allowed, 405)
        assert not_allowed.headers["allow"] == "POST"
        assert_error(await http.post("/v2/health/live"), 405)
        big = infer_body(UUIDS[:1], id="x" * 300)
        assert_error(await http.post(f"/v2/models/{MODEL}/infer", json=big, headers=AUTH), 413, "200 bytes")


async def test_admission_limit_refuses_with_429_but_not_health() -> None:
    harness = Harness(admission=AdmissionLimit("router", 1, "router.max_concurrent_calls"))
    harness.router.hold = True
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.app), base_url="http://r") as http:
        first = asyncio.create_task(http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1]), headers=AUTH))
        while harness.router.calls == 0:
            await asyncio.sleep(0)
        refused = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1]), headers=AUTH)
        assert_error(refused, 429, "router.max_concurrent_calls")
        assert (await http.get("/v2/health/ready")).status_code == 200
        harness.router.released.set()
        assert (await first).status_code == 200


async def test_timeout_header_bounds_the_call(harness: Harness, http: httpx.AsyncClient) -> None:
    harness.router.hold = True  # never answers
    response = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1]),
                               headers={**AUTH, TIMEOUT_HEADER: "20"})
    assert_error(response, 504, TIMEOUT_HEADER)
    bad = await http.post(f"/v2/models/{MODEL}/infer", json=infer_body(UUIDS[:1]), headers={**AUTH, TIMEOUT_HEADER: "soon"})
    assert_error(bad, 400, TIMEOUT_HEADER)


async def test_a_client_gone_withdraws_its_call(harness: Harness) -> None:
    harness.router.hold = True  # never answers
    messages = [{"type": "http.request", "body": json.dumps(infer_body(UUIDS[:1])).encode(), "more_body": False}]
    gone = asyncio.Event()
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": f"/v2/models/{MODEL}/infer",
             "headers": [(b"authorization", f"Bearer {KEY}".encode())]}
    served = asyncio.create_task(harness.app(scope, receive, send))
    while harness.router.calls == 0:
        await asyncio.sleep(0)
    gone.set()
    await asyncio.wait_for(served, 30)  # a bound, so a call that is never withdrawn fails instead of hanging
    assert harness.router.cancelled == 1 and sent == []  # withdrawn below; nobody to answer


# --- the model repository extension, and Triton's routes the mesh does not serve ---------------------------


async def test_the_repository_index_lists_each_version_the_key_may_call_with_its_state() -> None:
    harness = Harness(fleet=FakeFleet("unrouted", "hidden"), scope=lambda auth: lambda model: model != "hidden")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.app), base_url="http://r") as http:
        every = await http.post("/v2/repository/index", headers=AUTH)
        assert every.status_code == 200, every.text
        assert every.json() == [
            {"name": MODEL, "version": "1", "state": "READY"},
            {"name": "unrouted", "version": "1", "state": "UNAVAILABLE", "reason": "model 'unrouted' is not served"},
        ]
        ready = await http.post("/v2/repository/index", json={"ready": True}, headers=AUTH)
        assert ready.json() == [{"name": MODEL, "version": "1", "state": "READY"}]
        assert_error(await http.post("/v2/repository/index", content=b"[1]", headers=AUTH), 400, "JSON object")
        assert_error(await http.post("/v2/repository/index", json={"ready": "yes"}, headers=AUTH), 400, "'ready'")
        assert_error(await http.get("/v2/repository/index", headers=AUTH), 405)
        assert_error(await http.post("/v2/repository/index"), 401)


async def test_a_load_loads_a_registered_model_and_refuses_what_it_cannot_do(harness: Harness, http: httpx.AsyncClient) -> None:
    loaded = await http.post(f"/v2/repository/models/{MODEL}/load", headers=AUTH)
    assert loaded.status_code == 200 and loaded.content == b""
    assert harness.loader.loaded == [(MODEL, None)]
    assert_error(await http.post("/v2/repository/models/missing/load", headers=AUTH), 404, "'missing'")
    with_config = {"parameters": {"config": "{}"}}
    assert_error(await http.post(f"/v2/repository/models/{MODEL}/load", json=with_config, headers=AUTH), 501,
                 "config", "flotilla models deploy")
    assert harness.loader.loaded == [(MODEL, None)]  # neither reached the controller
    harness.loader.hold = True  # a load that takes longer than the caller waits: 504, and the wait is withdrawn
    late = await http.post(f"/v2/repository/models/{MODEL}/load", headers={**AUTH, TIMEOUT_HEADER: "50"})
    assert_error(late, 504, TIMEOUT_HEADER)
    assert harness.loader.cancelled == 1 and 0 < (harness.loader.loaded[-1][1] or 0) <= 0.05


@pytest.mark.parametrize(("method", "path", "words"), [
    ("POST", f"/v2/repository/models/{MODEL}/unload", ("RepositoryModelUnload", "flotilla models undeploy")),
    ("GET", "/v2/systemsharedmemory/status", ("SystemSharedMemoryStatus", "uuids of JPEGs")),
    ("POST", "/v2/systemsharedmemory/region/r0/register", ("SystemSharedMemoryRegister",)),
    ("POST", "/v2/cudasharedmemory/unregister", ("CudaSharedMemoryUnregister",)),
    ("POST", "/v2/trace/setting", ("TraceSetting", "observability.tracing")),
    ("GET", "/v2/logging", ("LogSettings", "flotilla -v serve")),
])
async def test_tritons_other_routes_are_501_saying_what_to_use_instead(
    http: httpx.AsyncClient, method: str, path: str, words: tuple[str, ...]
) -> None:
    assert_error(await http.request(method, path, headers=AUTH), 501, *words)
    assert_error(await http.request(method, path), 401)  # nothing said to a caller without a key


async def test_statistics_are_tritons_json_from_the_fleets_counters() -> None:
    harness = Harness(fleet=FakeFleet("hidden"), scope=lambda auth: lambda model: model != "hidden")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=harness.app), base_url="http://r") as http:
        one = await http.get(f"/v2/models/{MODEL}/versions/1/stats", headers=AUTH)
        assert one.status_code == 200, one.text
        assert one.json() == {"model_stats": [{
            "name": MODEL, "version": "1", "last_inference": 1765000000500, "inference_count": 7, "execution_count": 2,
            "inference_stats": {
                "success": {"count": 7, "ns": 1_500_000_000}, "fail": {"count": 1, "ns": 250_000_000},
                "queue": {"count": 8, "ns": 500_000_000}, "compute_input": {"count": 7, "ns": 0},
                "compute_infer": {"count": 7, "ns": 750_000_000}, "compute_output": {"count": 7, "ns": 0},
            },
            "batch_stats": [  # by size, ascending: each batch counted once, with its time
                {"batch_size": 2, "compute_input": {"count": 1, "ns": 0}, "compute_infer": {"count": 1, "ns": 250_000_000},
                 "compute_output": {"count": 1, "ns": 0}},
                {"batch_size": 5, "compute_input": {"count": 1, "ns": 0}, "compute_infer": {"count": 1, "ns": 500_000_000},
                 "compute_output": {"count": 1, "ns": 0}},
            ],
        }]}
        every = await http.get("/v2/models/stats", headers=AUTH)  # every model the key may call, no version
        assert [(m["name"], m["version"]) for m in every.json()["model_stats"]] == [(MODEL, "")]
        assert harness.statistics.asked == [MODEL, ""]
        assert_error(await http.get("/v2/models/missing/stats", headers=AUTH), 404, "'missing'")
        assert_error(await http.get(f"/v2/models/{MODEL}/versions/7/stats", headers=AUTH), 404, "version 7")
        assert harness.statistics.asked == [MODEL, ""]  # neither reached the controller
        assert_error(await http.post("/v2/models/stats", headers=AUTH), 405)
        assert_error(await http.get("/v2/models/stats"), 401)
