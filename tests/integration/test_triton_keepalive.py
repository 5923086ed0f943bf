"""A worker's channel to a real Triton replica pings it (so a replica that vanished fails its
batches fast) and the replica, started with TRITON_PING_ARGS, keeps that channel open."""

from __future__ import annotations

import asyncio

import grpc
from tritonclient.grpc import service_pb2

from flotilla.common.keepalive import keepalive_options
from flotilla.stack.local import LocalStack

SERVER_LIVE = "/inference.GRPCInferenceService/ServerLive"


async def test_a_replica_keeps_a_channel_that_pings_every_second_open(stack: LocalStack) -> None:
    assert stack.state is not None
    # Pings 10x as often as a worker's: Triton's default policy (one ping per 5 minutes, 2 strikes)
    # would close this channel with GOAWAY after the third.
    channel = grpc.aio.insecure_channel(stack.state.triton[0], options=keepalive_options(1.0, 1.0))
    live = channel.unary_unary(
        SERVER_LIVE, request_serializer=service_pb2.ServerLiveRequest.SerializeToString,
        response_deserializer=service_pb2.ServerLiveResponse.FromString,
    )
    try:
        assert (await live(service_pb2.ServerLiveRequest(), timeout=5.0)).live
        assert channel.get_state() == grpc.ChannelConnectivity.READY
        changes = []
        try:
            async with asyncio.timeout(5.0):  # five pings' worth, no call in flight
                while True:
                    await channel.wait_for_state_change(channel.get_state())
                    changes.append(channel.get_state())
        except TimeoutError:
            pass
        assert changes == [], f"the replica closed the connection: {changes}"
        assert (await live(service_pb2.ServerLiveRequest(), timeout=5.0)).live
    finally:
        await channel.close()
