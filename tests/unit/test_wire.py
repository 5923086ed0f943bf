"""The wire contract's names are the compiled protos' names."""

from __future__ import annotations

from flotilla.api.kserve import grpc_service_pb2
from flotilla.api.v1 import batcher_pb2, controller_pb2, inference_pb2, preprocess_pb2, relay_pb2
from flotilla.common import wire


def test_every_service_and_method_named_in_the_contract_exists_in_the_protos() -> None:
    services = {
        wire.CLASSIFIER_SERVICE: inference_pb2.DESCRIPTOR.services_by_name["ImageClassifier"],
        wire.RELAY_SERVICE: relay_pb2.DESCRIPTOR.services_by_name["Relay"],
        wire.PREPROCESSOR_SERVICE: preprocess_pb2.DESCRIPTOR.services_by_name["Preprocessor"],
        wire.BATCHER_ADMIN_SERVICE: batcher_pb2.DESCRIPTOR.services_by_name["BatcherAdmin"],
        wire.CONTROLLER_SERVICE: controller_pb2.DESCRIPTOR.services_by_name["Controller"],
        wire.KSERVE_SERVICE: grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
    }
    for name, descriptor in services.items():
        assert descriptor.full_name == name
    for method, (service, rpc) in {
        wire.CLASSIFY_METHOD: (wire.CLASSIFIER_SERVICE, "Classify"),
        wire.CLASSIFY_STREAM_METHOD: (wire.CLASSIFIER_SERVICE, "ClassifyStream"),
        wire.RELAY_CALLS_METHOD: (wire.RELAY_SERVICE, "Calls"),
    }.items():
        assert method == f"/{service}/{rpc}" and rpc in services[service].methods_by_name
        assert wire.method_name(method) == rpc
