"""The gRPC core runtime Flotilla's own service processes run with.

gRPC core reads ``GRPC_EXPERIMENTS`` from the environment once, when ``grpc`` is imported, so a
process cannot choose it for itself after the fact: whatever starts a Flotilla service passes it
(the local stack, the bench's processes, the container image's ``ENV`` for Kubernetes). An
operator's own ``GRPC_EXPERIMENTS`` is left as it is.

Flotilla's servers turn off gRPC's EventEngine endpoints (``SERVICE_GRPC_EXPERIMENTS``): with them
(grpcio 1.85, the default) every read and write of a connection is handed from the poller to one of
EventEngine's own threads and back, where without them the grpc.aio poller thread does the I/O
itself. Measured on this project's 2-core VM (2026-12-07):

- a bidirectional stream on loopback, 2 small messages every 8 ms each way: 10 context switches a
  message in the server against 6, and 206 against 161 server CPU-µs a message (3 runs each);
- the bench's CPU point over ClassifyStream (1-2 MP photos, R=2, bs 8, two runs each): the router
  251 against 236-242 CPU-µs an image, the batcher 225 against 201-204, the controller 44 against
  34-36; the worker unchanged (its CPU is decoding and S3 reads over its own HTTP client).

Both I/O paths are gRPC's own and supported; the one used without EventEngine endpoints is the
one gRPC Python ran on before them. A later grpcio without these experiments logs "Unknown
experiment" once at start and runs with its defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

EXPERIMENTS_VARIABLE = "GRPC_EXPERIMENTS"
SERVICE_GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"
"""What Flotilla's service processes run with unless their environment already names experiments."""


def service_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start a Flotilla service process with: ``base`` (default: this process's)
    with ``SERVICE_GRPC_EXPERIMENTS`` unless it sets ``GRPC_EXPERIMENTS`` itself."""
    env = dict(os.environ if base is None else base)
    env.setdefault(EXPERIMENTS_VARIABLE, SERVICE_GRPC_EXPERIMENTS)
    return env
