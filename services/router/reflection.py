"""gRPC server reflection on the router: generic tools (grpcurl, grpc_cli, Postman) list its
services and read their messages without a compiled proto.

Reflection describes a service from the descriptors registered in this process, so this module
imports the client API's generated module for them. Nothing here parses a request: the router
still forwards every body as bytes (``server.py`` imports no API message).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from flotilla.api.v1 import inference_pb2

DESCRIBED = (inference_pb2.DESCRIPTOR.services_by_name["ImageClassifier"].full_name,)
"""The services reflection describes besides its own and health: the client API."""


def enable_reflection(server: grpc.aio.Server, services: Sequence[str] = DESCRIBED) -> None:
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
