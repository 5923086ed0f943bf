"""gRPC server reflection on the router: generic tools (grpcurl, grpc_cli, Postman) list its
services and read their messages without a compiled proto.

Reflection describes a service from descriptors held in this process, so this module imports the
generated modules of the services the router serves: the client API and KServe v2. The KServe module
lives in a descriptor pool of its own (it shares the ``inference`` package with tritonclient's, which
may be imported in the same process), so reflection reads one pool built here holding every file it
describes. Nothing here parses a request: the router still forwards every Classify body as bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import grpc
from google.protobuf.descriptor_pb2 import FileDescriptorProto
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from flotilla.api.kserve import grpc_service_pb2 as kserve_pb2
from flotilla.api.v1 import inference_pb2

DESCRIBED = (
    inference_pb2.DESCRIPTOR.services_by_name["ImageClassifier"].full_name,
    kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
)
"""The services reflection describes besides its own and health: the client API and KServe v2."""



class FileDescriptor(Protocol):
    """A proto file's descriptor, from whichever protobuf implementation built it."""

    @property
    def name(self) -> str: ...

    @property
    def dependencies(self) -> Sequence[FileDescriptor]: ...

    def CopyToProto(self, proto: FileDescriptorProto) -> None: ...  # noqa: N802 (protobuf's name)


DESCRIBED_FILES: tuple[FileDescriptor, ...] = (inference_pb2.DESCRIPTOR, kserve_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)


def described_pool(files: Iterable[FileDescriptor] = DESCRIBED_FILES) -> DescriptorPool:
    """One pool holding ``files`` and the files they import, whichever pools they were built in."""
    pool = DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = FileDescriptorProto()
        file.CopyToProto(proto)
        pool.Add(proto)
        added.add(file.name)

    for file in files:
        add(file)
    return pool


def enable_reflection(server: grpc.aio.Server, services: Sequence[str] = DESCRIBED) -> None:
    reflection.enable_server_reflection(
        [*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server, pool=described_pool()
    )
