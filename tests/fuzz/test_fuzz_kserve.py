"""Fuzz: the router's KServe v2 front doors. The REST app (raw ASGI, called in-process with any
method, path, headers and body), its JSON body decoder, and the core's checks of a gRPC
ModelInferRequest (any bytes, or a request with hostile fields), over a fake forwarder and fleet.

The REST app answers only documented statuses (never 500); the decoder and the core raise only
``FlotillaError``s of a caller's making (INVALID_ARGUMENT, NOT_FOUND, ...), never INTERNAL.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from flotilla.api.kserve import grpc_service_pb2 as kserve_pb2
from flotilla.api.v1 import controller_pb2, inference_pb2
from flotilla.common.interceptors import CallObserver
from flotilla.config import ModelSettings
from flotilla.errors import Code, FlotillaError, MalformedRequest, ModelNotFound, Unauthenticated
from flotilla.services.router.forward import TimeRemaining, no_deadline
from flotilla.services.router.kserve.core import KServeFront
from flotilla.services.router.kserve.grpc_api import InferBody, KServeHandler
from flotilla.services.router.kserve.http import KServeHttp
from flotilla.services.router.kserve.http_json import decode_infer
from flotilla.services.router.kserve.wire import encode_bytes_tensor
from tests.fuzz.strategies import mutated, uuid_like

MODEL = "classifier"
KEY = "fuzz-key"
LABELS = ["cat", "dog", "fox", "owl"]
MAX_BODY_BYTES = 64 * 1024
DOCUMENTED_HTTP = {200, 400, 401, 404, 405, 413, 415, 429, 501, 503, 504}
CALLER_CODES = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.UNAUTHENTICATED, Code.RESOURCE_EXHAUSTED,
                Code.FAILED_PRECONDITION, Code.UNIMPLEMENTED}


class Router:
    """Routes MODEL; answers each image with the same classes."""

    def check_model(self, model: str | None) -> None:
        if model != MODEL:
            raise ModelNotFound(f"model {model!r} is not served")

    def check_key(self, authorization: str | None, model: str | None = None) -> None:
        if authorization != f"Bearer {KEY}":
            raise Unauthenticated("API key is not valid")

    def authorize(self, authorization: str | None, model: str | None) -> None:
        self.check_key(authorization)

    async def call(
        self, model: str | None, raw: bytes, headers: Sequence[tuple[str, str]], time_remaining: TimeRemaining
    ) -> bytes:
        self.check_model(model)
        request = inference_pb2.ClassifyRequest.FromString(raw)
        classes = [inference_pb2.ClassScore(index=i, label=label, score=0.25) for i, label in enumerate(LABELS)]
        return inference_pb2.ClassifyResponse(
            image_uuid=request.image_uuid, model_name=MODEL, classes=classes[: request.top_k],
            scores=[0.25] * len(LABELS) if request.all_scores else [],
        ).SerializeToString()


class Fleet:
    def __init__(self) -> None:
        spec = ModelSettings.model_validate({"labels": LABELS, "versions": [1, 2], "default_version": 1})
        self.models = {MODEL: controller_pb2.ModelStatus(name=MODEL, spec_json=spec.model_dump_json(), batchers=["b:1"])}


def front() -> KServeFront:
    return KServeFront(Router(), Fleet(), ready=lambda: True)


# -- JSON values and infer bodies -----------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)


def json_containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)


json_values = st.recursive(json_scalars, json_containers, max_leaves=20)


@st.composite
def infer_documents(draw: st.DrawFn) -> dict[str, Any]:
    """An infer body's JSON: mostly the right shape, with any field replaced by any JSON value."""
    uuids = draw(st.lists(uuid_like, max_size=4))
    tensor: dict[str, Any] = {
        "name": draw(st.sampled_from(["IMAGE_UUID", "other"]) | st.text(max_size=10)),
        "datatype": draw(st.sampled_from(["BYTES", "FP32", ""])),
        "shape": draw(st.sampled_from([[len(uuids)], [len(uuids), 1], [], [-1], [2**40]]) | json_values),
        "data": draw(st.just(uuids) | st.just([uuids]) | json_values),
    }
    document: dict[str, Any] = {"inputs": [tensor]}
    parameters = {
        "top_k": draw(st.sampled_from([1, 3, 0, -1, 2**64, 1.5, True, "3"])),
        "priority": draw(st.sampled_from([0, 1, 2, 99])),
        "timeout": draw(st.sampled_from([0, 1000, -5])),
        "binary_data_output": draw(st.booleans()),
    }
    document["parameters"] = draw(st.just(parameters) | json_values)
    document["outputs"] = draw(st.sampled_from([
        [], [{"name": "LABELS"}], [{"name": "PROBABILITIES", "parameters": {"classification": 2}}],
        [{"name": "PROBABILITIES", "parameters": {"binary_data": True}}],
    ]) | json_values)
    document["id"] = draw(st.text(max_size=8) | json_values)
    for key in draw(st.lists(st.sampled_from(["inputs", "outputs", "parameters", "id"]), max_size=2)):
        document[key] = draw(json_values)
    return document


def nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


infer_bodies = st.one_of(
    infer_documents().map(lambda d: json.dumps(d).encode()),
    infer_documents().map(lambda d: json.dumps(d).encode()).flatmap(mutated),
    st.binary(max_size=200),
    st.integers(1, 200_000).map(nested),
)


@given(infer_bodies, st.sampled_from([None, 0, 10, -1, 10**6]), st.sampled_from(["", "1", "2", "7"]))
@example(nested(100_000), None, "")  # found: json.loads' RecursionError was a 500
@example(b'{"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [1], "data": ["\\ud800"]}]}', None, "")
def test_an_infer_body_decodes_or_is_malformed(body: bytes, header_length: int | None, version: str) -> None:
    try:
        decoded = decode_infer(MODEL, version, body, header_length)
    except MalformedRequest as exc:
        assert exc.code == Code.INVALID_ARGUMENT
        return
    assert decoded.request.model == MODEL


@given(infer_documents(), st.sampled_from(["", "1", "2", "0", "x", "²", "9" * 5000]))
@example({"inputs": [{"name": "IMAGE_UUID", "datatype": "BYTES", "shape": [1],
                      "data": ["123e4567-e89b-12d3-a456-426614174000"]}]}, "²")  # found: int("²") was a 500
async def test_the_core_answers_an_infer_request_or_a_callers_error(document: dict[str, Any], version: str) -> None:
    try:
        decoded = decode_infer(MODEL, version, json.dumps(document).encode(), None)
    except MalformedRequest:
        return
    try:
        result = await asyncio.wait_for(front().infer(decoded.request, (), no_deadline), 10)
    except FlotillaError as exc:
        assert exc.code in CALLER_CODES, (exc.code, exc.message)
        return
    assert result.model == MODEL


# -- the REST app, in-process ---------------------------------------------------------------------

paths = st.one_of(
    st.sampled_from(["/v2", "/v2/", "/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}",
                     f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/config", f"/v2/models/{MODEL}/infer",
                     f"/v2/models/{MODEL}/versions/1/infer", f"/v2/models/{MODEL}/versions/²/infer",
                     "/v2/models//infer", "/v2/models/x/versions//infer"]),
    st.text(max_size=60).map(lambda p: "/" + p),
    st.text(max_size=20).map(lambda name: f"/v2/models/{name}/infer"),
    st.text(max_size=10).map(lambda v: f"/v2/models/{MODEL}/versions/{v}/infer"),
)
latin1 = st.text(st.characters(max_codepoint=255), max_size=40)
header_pairs = st.lists(
    st.tuples(
        st.sampled_from(["authorization", "content-length", "content-encoding", "content-type",
                         "inference-header-content-length", "x-flotilla-timeout-ms", "x-model-name"]) | latin1,
        st.sampled_from([f"Bearer {KEY}", "0", "12", "²", "9" * 5000, "gzip", "identity", "-3", "nan", "1e9"])
        | latin1,
    ),
    max_size=5,
)


async def asgi_call(app: KServeHttp, method: str, path: str, headers: list[tuple[str, str]], body: bytes,
                    chunk: int) -> tuple[int, bytes]:
    """One request through the ASGI app, the body in ``chunk``-byte messages: (status, response body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode("utf-8", "surrogateescape"), "query_string": b"",
             "root_path": "", "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()  # the client stays until it is answered
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await asyncio.wait_for(app(scope, receive, send), 10)
    gone.set()
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert len(starts) == 1, sent
    return starts[0]["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@given(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]) | st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", max_size=8),
    paths,
    header_pairs,
    st.booleans(),
    infer_bodies,
    st.sampled_from([1, 7, 4096, 1 << 20]),
)
@example("POST", f"/v2/models/{MODEL}/versions/²/infer", [("authorization", f"Bearer {KEY}")], True,
         b'{"inputs": []}', 4096)  # found: the version "²" passed isdigit() and int() failed: 500
@example("POST", f"/v2/models/{MODEL}/infer", [("authorization", f"Bearer {KEY}"), ("content-length", "²")], True,
         b"{}", 4096)  # found: the same with content-length
@example("POST", f"/v2/models/{MODEL}/infer", [("authorization", f"Bearer {KEY}"), ("content-length", "9" * 5000)],
         True, b"{}", 4096)  # found: int() refuses over 4300 digits: 500
async def test_the_rest_app_answers_only_documented_statuses(
    method: str, path: str, headers: list[tuple[str, str]], keyed: bool, body: bytes, chunk: int
) -> None:
    app = KServeHttp(front(), Router().check_key, max_body_bytes=MAX_BODY_BYTES)
    if keyed:
        headers = [("authorization", f"Bearer {KEY}"), *headers]
    status, answer = await asgi_call(app, method, path, headers, body, chunk)
    assert status in DOCUMENTED_HTTP, (status, answer)
    if status >= 400 and answer:
        assert set(json.loads(answer)) == {"error"}


# -- the gRPC front door's request ----------------------------------------------------------------


@st.composite
def model_infer_requests(draw: st.DrawFn) -> bytes:
    """A ModelInferRequest's bytes: garbage, or a request with hostile fields, perhaps mutated."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=200))
    uuids = [u.encode("utf-8", "surrogatepass") for u in draw(st.lists(uuid_like, max_size=3))]
    request = kserve_pb2.ModelInferRequest(
        model_name=draw(st.sampled_from([MODEL, "", "other"])), model_version=draw(st.sampled_from(["", "1", "²", "x"])),
        id=draw(st.text(max_size=8)),
    )
    tensor = request.inputs.add(name=draw(st.sampled_from(["IMAGE_UUID", "x"])),
                                datatype=draw(st.sampled_from(["BYTES", "FP32"])),
                                shape=draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
    if draw(st.booleans()):
        request.raw_input_contents.append(draw(st.just(encode_bytes_tensor(uuids)) | st.binary(max_size=40)))
    else:
        tensor.contents.bytes_contents.extend(uuids)
    for name in draw(st.lists(st.sampled_from(["LABELS", "PROBABILITIES", "x"]), max_size=2)):
        output = request.outputs.add(name=name)
        which = draw(st.sampled_from(["none", "int64_param", "bool_param", "string_param", "double_param"]))
        if which == "int64_param":
            output.parameters["classification"].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
        elif which != "none":
            setattr(output.parameters["classification"], which, draw(st.just(True) if which == "bool_param"
                    else st.just("2") if which == "string_param" else st.floats()))
    for name in draw(st.lists(st.sampled_from(["top_k", "priority", "timeout"]), max_size=2)):
        request.parameters[name].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    return draw(mutated(request.SerializeToString()))


class Context:
    """What the handler reads of a gRPC call's context."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {KEY}"),)

    def time_remaining(self) -> float:
        return 10.0


@given(model_infer_requests())
async def test_a_model_infer_request_is_answered_or_refused_with_a_callers_error(raw: bytes) -> None:
    handler = KServeHandler(front(), Router(), CallObserver("router"))
    try:
        answer = await asyncio.wait_for(handler.model_infer(InferBody(raw), Context()), 10)  # type: ignore[arg-type]
    except FlotillaError as exc:
        assert exc.code in CALLER_CODES, (exc.code, exc.message)
        return
    assert kserve_pb2.ModelInferResponse.FromString(answer).model_name == MODEL
