"""KServe v2 over HTTP/REST on the router, driven by clients no one here wrote: tritonclient.http,
unchanged but for the ``authorization`` header, and the plain HTTP requests curl would send, against
the real stack: the same top-1 as the Flotilla API on the sample photos, the descriptions, and each
error with the protocol's status and ``{"error": ...}`` body."""

from __future__ import annotations

import http.client
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton_http
import tritonclient.http.aio as triton_http_aio
from tritonclient.utils import InferenceServerException

from flotilla.stack.local import LocalStack
from tests.integration.conftest import API_KEY, MODEL, Photo

HEADERS = {"authorization": f"Bearer {API_KEY}"}
"""For curl. tritonclient.http writes into the headers it is given (Inference-Header-Content-Length),
so each of its calls gets a fresh copy: ``auth()``."""


def auth() -> dict[str, str]:
    return dict(HEADERS)


CURL_HEADERS = {"user-agent": "curl/8.5.0", "accept": "*/*"}
"""What curl sends on its own; a test adds what the command line would (-H)."""
TIMEOUT_S = 120.0  # the first call of a model may wait for its cold start


@pytest.fixture
def address(stack: LocalStack) -> str:
    assert stack.state is not None and stack.state.router_http, "stack.json names no router HTTP address"
    return stack.state.router_http


@pytest.fixture
def triton(address: str) -> Iterator[triton_http.InferenceServerClient]:
    client = triton_http.InferenceServerClient(address, network_timeout=TIMEOUT_S, connection_timeout=TIMEOUT_S)
    yield client
    client.close()


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type") == "application/json", self.headers
        return json.loads(self.body)


def curl(address: str, method: str, path: str, body: object = None, headers: dict[str, str] | None = None) -> Answer:
    """What ``curl -X METHOD http://ADDRESS/PATH [-H ...] [-d JSON]`` does: one request on its own connection."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    sent = {**CURL_HEADERS, **(headers or {})}
    data = None
    if body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent.setdefault("content-type", "application/json")
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        connection.close()


def uuid_input(uuids: list[str], *, binary: bool = True, shape: list[int] | None = None) -> triton_http.InferInput:
    tensor = triton_http.InferInput("IMAGE_UUID", shape or [len(uuids)], "BYTES")
    values = np.array([u.encode() for u in uuids], dtype=np.object_).reshape(shape or [len(uuids)])
    tensor.set_data_from_numpy(values, binary_data=binary)
    return tensor


def infer_body(uuids: list[str], name: str = "IMAGE_UUID", datatype: str = "BYTES") -> dict[str, Any]:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": [len(uuids)], "data": uuids}]}


def assert_top1(result: triton_http.InferResult, photos: list[Photo]) -> None:
    probabilities = result.as_numpy("PROBABILITIES")
    labels = result.as_numpy("LABELS")
    assert probabilities.dtype == np.float32 and probabilities.shape[0] == len(photos), probabilities.shape
    assert probabilities.shape[1] >= 1000  # every class of the ImageNet model
    assert labels.shape[0] == len(photos)
    for row, photo in enumerate(photos):
        assert int(np.argmax(probabilities[row])) == photo.index, photo.name
        label = labels[row][0]
        assert (label.decode() if isinstance(label, bytes) else label) == photo.label, photo.name


def assert_error(answer: Answer, status: int, *words: str) -> None:
    assert answer.status == status, (answer.status, answer.body)
    message = answer.json()["error"]
    for word in words:
        assert word in message, message


async def test_tritonclient_health_and_descriptions(triton: triton_http.InferenceServerClient) -> None:
    assert triton.is_server_live()  # health needs no key, as in KServe
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL, headers=auth())
    assert triton.is_model_ready(MODEL, "1", headers=auth())
    assert not triton.is_model_ready("no-such-model", headers=auth())
    server = triton.get_server_metadata(headers=auth())
    assert server["name"] == "flotilla"
    metadata = triton.get_model_metadata(MODEL, headers=auth())
    assert metadata["name"] == MODEL
    assert metadata["inputs"] == [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [-1, 1]}]
    assert {o["name"] for o in metadata["outputs"]} == {"PROBABILITIES", "LABELS"}
    config = triton.get_model_config(MODEL, headers=auth())
    assert config["name"] == MODEL and config["input"][0]["name"] == "IMAGE_UUID"


async def test_tritonclient_repository_index_load_and_the_routes_not_served(
    triton: triton_http.InferenceServerClient,
) -> None:
    assert triton.get_model_repository_index(headers=auth()) == [{"name": MODEL, "version": "1", "state": "READY"}]
    triton.load_model(MODEL, headers=auth())  # the controller's EnsureLoaded: a copy is ready, so at once
    with pytest.raises(InferenceServerException) as info:
        triton.load_model("no-such-model", headers=auth())
    assert info.value.status() == "404"
    with pytest.raises(InferenceServerException) as info:
        triton.load_model(MODEL, config="{}", headers=auth())
    assert info.value.status() == "501" and "flotilla models deploy" in str(info.value.message())
    refused = {
        "unload_model": (lambda: triton.unload_model(MODEL, headers=auth()), "flotilla models undeploy"),
        "get_cuda_shared_memory_status": (lambda: triton.get_cuda_shared_memory_status(headers=auth()), "uuids"),
        "get_log_settings": (lambda: triton.get_log_settings(headers=auth()), "flotilla -v serve"),
    }
    for name, (call, words) in refused.items():
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.status() == "501", name
        assert words in str(info.value.message()), name
    [stats] = triton.get_inference_statistics(MODEL, "1", headers=auth())["model_stats"]
    assert (stats["name"], stats["version"]) == (MODEL, "1")
    assert stats["inference_count"] == stats["inference_stats"]["success"]["count"]
    assert set(stats["inference_stats"]) >= {"success", "fail", "queue", "compute_infer"}


async def test_tritonclient_infer_gets_the_flotilla_top1(
    triton: triton_http.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    one = [photos["chelsea.jpg"]]
    # tritonclient's defaults: the input as binary tensor data, every output as binary data.
    assert_top1(triton.infer(MODEL, [uuid_input([p.uuid for p in one])], headers=auth()), one)
    three = [photos[name] for name in ("astronaut.jpg", "coffee.jpg", "rocket.jpg")]
    result = triton.infer(MODEL, [uuid_input([p.uuid for p in three], shape=[3, 1])], headers=auth(), request_id="r3")
    assert result.get_response()["id"] == "r3"
    assert_top1(result, three)
    # All JSON: the input's data and both outputs' (binary_data=False).
    outputs = [triton_http.InferRequestedOutput("PROBABILITIES", binary_data=False),
               triton_http.InferRequestedOutput("LABELS", binary_data=False)]
    json_result = triton.infer(MODEL, [uuid_input([p.uuid for p in three], binary=False)], outputs=outputs,
                               headers=auth())
    assert all("data" in o for o in json_result.get_response()["outputs"])
    assert_top1(json_result, three)


async def test_tritonclient_asyncio_client_gets_the_flotilla_top1(address: str, photos: dict[str, Photo]) -> None:
    """tritonclient.http.aio: aiohttp underneath, and its own reading of the binary answer."""
    chosen = [photos["chelsea.jpg"], photos["rocket.jpg"]]
    async with triton_http_aio.InferenceServerClient(address, conn_timeout=TIMEOUT_S) as client:
        assert await client.is_server_ready()
        assert_top1(await client.infer(MODEL, [uuid_input([p.uuid for p in chosen])], headers=auth()), chosen)


async def test_tritonclient_classification_output(
    triton: triton_http.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    photo = photos["motorcycle_left.jpg"]
    outputs = [triton_http.InferRequestedOutput("PROBABILITIES", class_count=3)]
    result = triton.infer(MODEL, [uuid_input([photo.uuid])], outputs=outputs, headers=auth())
    classes = result.as_numpy("PROBABILITIES")
    assert classes.shape == (1, 3)
    _, index, label = classes[0][0].decode().split(":", 2)
    assert (int(index), label) == (photo.index, photo.label)


async def test_curl_infer_gets_the_flotilla_top1(address: str, photos: dict[str, Photo]) -> None:
    chosen = [photos["coffee.jpg"], photos["chelsea.jpg"]]
    answer = curl(address, "POST", f"/v2/models/{MODEL}/infer", infer_body([p.uuid for p in chosen]), HEADERS)
    assert answer.status == 200, answer.body
    document = answer.json()
    assert document["model_name"] == MODEL
    outputs = {o["name"]: o for o in document["outputs"]}
    probabilities = outputs["PROBABILITIES"]
    classes = probabilities["shape"][1]
    rows = np.array(probabilities["data"], dtype=np.float32).reshape(probabilities["shape"])
    assert probabilities["datatype"] == "FP32" and rows.shape == (2, classes) and classes >= 1000
    labels = outputs["LABELS"]
    k = labels["shape"][1]
    for row, photo in enumerate(chosen):
        assert int(np.argmax(rows[row])) == photo.index, photo.name
        assert labels["data"][row * k] == photo.label, photo.name


async def test_curl_ready_and_model_metadata(address: str) -> None:
    assert curl(address, "GET", "/v2/health/live").status == 200
    assert curl(address, "GET", "/v2/health/ready").status == 200
    assert curl(address, "GET", f"/v2/models/{MODEL}/ready", headers=HEADERS).status == 200
    metadata = curl(address, "GET", f"/v2/models/{MODEL}", headers=HEADERS)
    assert metadata.status == 200 and metadata.json()["name"] == MODEL
    assert curl(address, "GET", "/v2", headers=HEADERS).json()["name"] == "flotilla"


async def test_curl_errors_get_the_protocols_status(address: str, photos: dict[str, Photo]) -> None:
    good = photos["rocket.jpg"].uuid
    path = f"/v2/models/{MODEL}/infer"
    assert_error(curl(address, "POST", path, infer_body(["not-a-uuid"]), HEADERS), 400, "IMAGE_UUID[0]", "not-a-uuid")
    missing = str(uuid.uuid4())  # well formed, never uploaded
    assert_error(curl(address, "POST", path, infer_body([good, missing]), HEADERS), 400, "IMAGE_UUID[1]", missing)
    assert_error(curl(address, "POST", "/v2/models/no-such-model/infer", infer_body([good]), HEADERS),
                 404, "no-such-model")
    assert_error(curl(address, "GET", "/v2/models/no-such-model", headers=HEADERS), 404, "no-such-model")
    no_key = curl(address, "POST", path, infer_body([good]))
    assert_error(no_key, 401)
    assert no_key.headers["www-authenticate"] == "Bearer"
    assert_error(curl(address, "POST", path, infer_body([good]), {"authorization": "Bearer wrong"}), 401)
    assert_error(curl(address, "POST", path, infer_body([good], name="images"), HEADERS), 400, "images")
    assert_error(curl(address, "POST", path, infer_body([good], datatype="FP32"), HEADERS), 400, "FP32")
    assert_error(curl(address, "POST", path, b'{"inputs": [', HEADERS), 400, "JSON")


async def test_tritonclient_errors_carry_the_http_status(
    triton: triton_http.InferenceServerClient, photos: dict[str, Photo]
) -> None:
    inputs = [uuid_input([photos["astronaut.jpg"].uuid])]
    cases: list[tuple[str, dict[str, str], str]] = [
        ("no-such-model", auth(), "404"),
        (MODEL, {"authorization": "Bearer wrong"}, "401"),
    ]
    for model, headers, status in cases:
        with pytest.raises(InferenceServerException) as raised:
            triton.infer(model, inputs, headers=headers)
        assert raised.value.status() == status, raised.value
    with pytest.raises(InferenceServerException) as bad:
        triton.infer(MODEL, [uuid_input(["not-a-uuid"])], headers=auth())
    assert bad.value.status() == "400" and "not-a-uuid" in str(bad.value.message())
