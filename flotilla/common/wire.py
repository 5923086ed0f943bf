"""The wire contract: the header names, services and methods Flotilla's tiers and callers speak.

Plain strings, no protobuf import: the router, which never parses a body,
uses them as much as the tiers that do. ``tests/unit/test_wire.py`` checks
every service and method name here against the compiled protos, so a
renamed RPC fails a test instead of a deployment.
"""

from __future__ import annotations

MODEL_HEADER = "x-model-name"
"""The model a call is for; the router routes by it without reading the body."""
AUTH_HEADER = "authorization"
"""``Bearer <api key>``; checked at the router and never passed on."""
BEARER_PREFIX = "Bearer "
ORIGIN_HEADER = "x-flotilla-origin"
"""Trailing metadata: the part of the mesh an error arose in, when below the tier answering (``FlotillaError.origin``)."""
RETRY_AFTER_HEADER = "retry-after-ms"
"""Trailing metadata of a RESOURCE_EXHAUSTED with a hint (an API key over its rate): milliseconds
until a retry may succeed (``flotilla.errors.ResourceExhausted.retry_after_s``)."""
STREAM_PACKING_HEADER = "x-flotilla-stream-packing"
"""In a ClassifyStream's initial metadata: this router takes packed requests
(``ClassifyStreamRequest.requests``); a client packs only after it has seen it."""

API_PACKAGE = "flotilla.api.v1"
CLASSIFIER_SERVICE = f"{API_PACKAGE}.ImageClassifier"
CLASSIFY_METHOD = f"/{CLASSIFIER_SERVICE}/Classify"
CLASSIFY_STREAM_METHOD = f"/{CLASSIFIER_SERVICE}/ClassifyStream"
KSERVE_SERVICE = "inference.GRPCInferenceService"
"""KServe v2 / Open Inference Protocol over gRPC (Triton's service name), served by the router."""
RELAY_SERVICE = f"{API_PACKAGE}.Relay"
RELAY_CALLS_METHOD = f"/{RELAY_SERVICE}/Calls"
PREPROCESSOR_SERVICE = f"{API_PACKAGE}.Preprocessor"
PROCESS_BATCH_METHOD = f"/{PREPROCESSOR_SERVICE}/ProcessBatch"
BATCHER_ADMIN_SERVICE = f"{API_PACKAGE}.BatcherAdmin"
CONTROLLER_SERVICE = f"{API_PACKAGE}.Controller"
CONTROL_MESSAGE_BYTES = 256 * 1024 * 1024
"""What a reader of the controller accepts in one message: the whole fleet, a shard's whole assignment
or ListModels grow with the fleet (each model's spec, labels included: about 17 MB at 10 000 models),
past gRPC's 4 MiB default. Deltas after the first are the change's size."""
CONTROL_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", CONTROL_MESSAGE_BYTES)]
"""Options of every channel to the controller."""
HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"


def method_name(full_method: str) -> str:
    """``/pkg.Service/Method`` -> ``Method``."""
    return full_method.rsplit("/", 1)[-1]


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint: what precedes a length-delimited field's bytes on the wire, for
    the places that build a message around bytes they already have instead of parsing them again."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
