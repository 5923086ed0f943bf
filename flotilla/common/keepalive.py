"""Keeping connections to peers alive: gRPC channel pings and the limits servers accept.

One set of numbers for every connection a Flotilla process holds to another: a tier's
channel to the next (``peer.GrpcPeer``), the worker's channels and HTTP connections to
Triton replicas, and what servers (Flotilla's own, ``server.SERVER_OPTIONS``, and
tritonserver, ``TRITON_PING_ARGS``) accept from them.
"""

from __future__ import annotations

PEER_KEEPALIVE_S = 10.0
"""A peer's channel pings its server this often (HTTP/2 PING), with calls open or not."""
PEER_KEEPALIVE_TIMEOUT_S = 5.0
"""A ping unanswered this long closes the connection: open calls on it (a relay stream's
included) fail UNAVAILABLE and are retried on another replica, instead of waiting for their
deadlines on a peer that vanished without a reset (a partition, a host that lost power)."""
MIN_PING_INTERVAL_MS = 1_000
"""Servers accept pings this often (gRPC's default, 5 minutes, would answer PEER_KEEPALIVE_S with GOAWAY)."""

TRITON_PING_ARGS = [
    "--grpc-keepalive-permit-without-calls=1",
    f"--grpc-http2-min-recv-ping-interval-without-data={MIN_PING_INTERVAL_MS}",
]
"""tritonserver flags that let workers keep their channels to it alive the same way (its default
minimum ping interval, 5 minutes, would answer PEER_KEEPALIVE_S pings with GOAWAY)."""


def keepalive_options(every_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Channel options: ping every ``every_s`` (at least MIN_PING_INTERVAL_MS apart), give up after ``timeout_s``."""
    return [
        ("grpc.keepalive_time_ms", max(MIN_PING_INTERVAL_MS, int(every_s * 1000))),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # This gRPC waits for a keepalive ping's ack by the ping timeout (default one minute):
        # with the keepalive timeout alone, an unanswered ping closed nothing (tested).
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging while a stream is open but quiet
    ]
