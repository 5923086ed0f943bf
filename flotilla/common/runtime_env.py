"""The environment Flotilla's own service processes start with: gRPC's I/O path and glibc malloc's thresholds.

Both are read once, when the process starts (glibc's tunables at exec, ``GRPC_EXPERIMENTS`` when
``grpc`` is imported), so a process cannot choose them for itself: whatever starts a Flotilla
service passes them (the local stack, the bench's processes, the container image's ``ENV`` for
Kubernetes). A variable the operator already set is left as it is (empty: the library's own
defaults). Triton runs on its own defaults.

``GRPC_EXPERIMENTS`` (``SERVICE_GRPC_EXPERIMENTS``): gRPC's EventEngine endpoints off. With them
(grpcio 1.85, the default) every read and write of a connection is handed from the poller to one of
EventEngine's own threads and back, where without them the grpc.aio poller thread does the I/O
itself, the path gRPC Python ran on before them. Measured on this project's 2-core VM (2026-12-07):

- a bidirectional stream on loopback, 2 small messages every 8 ms each way: 10 context switches a
  message in the server against 6, and 206 against 161 server CPU-µs a message (3 runs each);
- the bench's CPU point over ClassifyStream (1-2 MP photos, R=2, bs 8, two runs each): the router
  251 against 236-242 CPU-µs an image, the batcher 225 against 201-204, the controller 44 against
  34-36;
- the router alone at its ceiling (``make bench`` before and after): 339 against 272 CPU-µs a unary
  call, 97 against 61 a request on ClassifyStream.

A later grpcio without these experiments logs "Unknown experiment" once at start and runs with its
defaults.

``GLIBC_TUNABLES`` (``SERVICE_MALLOC_TUNABLES``): memory malloc has handed out once stays with the
process (up to ``MALLOC_TRIM_THRESHOLD_BYTES`` free at the top of a heap) and blocks under
``MALLOC_MMAP_THRESHOLD_BYTES`` come from the heap, not from mmap. By default glibc returns the
freed top of its heap after every burst and maps large blocks afresh, so the next burst's buffers
(a batch's S3 bodies, ~240 KB each; its decoded pixels) page-fault in again, page by page: 56 minor
faults a GET in the worker's S3 reader, whose client CPU a GET went from 318 to 153 µs at ~1 000
GETs/s and from 379-434 to 236-249 at 123 (8 in flight, the bench's large photos, 2026-12-07). A
busy worker's heap seldom shrinks, so in the bench's CPU point the gain is small: 15 against 3 minor
faults an image in the worker, its CPU beyond decode 538-547 against 532-533 µs an image (two runs
each). The cost is memory kept after a burst, up to what the burst used (at most the trim threshold
more).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

EXPERIMENTS_VARIABLE = "GRPC_EXPERIMENTS"
SERVICE_GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener,-event_engine_for_all_other_endpoints"
"""What Flotilla's service processes run with unless their environment already names experiments."""

TUNABLES_VARIABLE = "GLIBC_TUNABLES"
MALLOC_TRIM_THRESHOLD_BYTES = 64 << 20
MALLOC_MMAP_THRESHOLD_BYTES = 32 << 20
SERVICE_MALLOC_TUNABLES = (
    f"glibc.malloc.trim_threshold={MALLOC_TRIM_THRESHOLD_BYTES}:glibc.malloc.mmap_threshold={MALLOC_MMAP_THRESHOLD_BYTES}"
)
"""What Flotilla's service processes run with unless their environment already sets glibc tunables."""

SERVICE_ENV = {EXPERIMENTS_VARIABLE: SERVICE_GRPC_EXPERIMENTS, TUNABLES_VARIABLE: SERVICE_MALLOC_TUNABLES}


def service_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start a Flotilla service process with: ``base`` (default: this process's)
    with each of ``SERVICE_ENV`` it does not set itself."""
    env = dict(os.environ if base is None else base)
    for name, value in SERVICE_ENV.items():
        env.setdefault(name, value)
    return env
