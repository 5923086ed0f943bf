"""Batching semantics through the real router and batcher processes.

A policy with a long ``max_queue_delay_us`` and a large ``max_batch_size``
holds requests in the batcher's queue, so what happens to queued requests
can be observed from outside: through client statuses and BatcherAdmin.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from flotilla.api.v1 import batcher_pb2, batcher_pb2_grpc
from flotilla.clients.client import FlotillaClient
from flotilla.errors import Code, FlotillaError
from flotilla.stack.local import LocalStack
from tests.integration.conftest import MODEL, admin_channel, sample
from tests.waiting import until

HOLD_DELAY_US = 30_000_000  # 30 s: nothing leaves the queue unless the test lets it


@pytest.fixture
async def admin(stack: LocalStack) -> AsyncIterator[batcher_pb2_grpc.BatcherAdminStub]:
    """The batcher's admin API; the original policy is restored afterwards."""
    assert stack.state is not None
    async with admin_channel(stack, stack.batchers[MODEL].address) as channel:
        stub = batcher_pb2_grpc.BatcherAdminStub(channel)
        original = await stub.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
        await stub.GetStats(batcher_pb2.GetStatsRequest(reset=True, model_name=MODEL))
        try:
            yield stub
        finally:
            await stub.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=original))
            await stub.GetStats(batcher_pb2.GetStatsRequest(reset=True, model_name=MODEL))


async def hold_queue(admin: batcher_pb2_grpc.BatcherAdminStub, **changes: object) -> None:
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_batch_size = 64
    policy.max_queue_delay_us = HOLD_DELAY_US
    for name, value in changes.items():
        setattr(policy, name, value)
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))


async def queue_depth(admin: batcher_pb2_grpc.BatcherAdminStub) -> int:
    return (await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))).queue_depth


async def wait_for_depth(admin: batcher_pb2_grpc.BatcherAdminStub, depth: int) -> None:
    async def reached() -> bool:
        return await queue_depth(admin) == depth

    await until(reached, 10, f"queue depth {depth}")


async def release(admin: batcher_pb2_grpc.BatcherAdminStub) -> None:
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_queue_delay_us = 0
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))


async def test_queue_timeout_rejects_with_deadline_exceeded(client: FlotillaClient, admin) -> None:  # type: ignore[no-untyped-def]
    await hold_queue(admin, timeout_action="REJECT")
    uuid = await client.upload(sample("chelsea.jpg"))
    with pytest.raises(FlotillaError) as caught:
        await client.classify(uuid, MODEL, queue_timeout_us=200_000, timeout_s=20)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    assert "queue timeout" in caught.value.message
    stats = await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))
    assert stats.expired == 1 and stats.queue_depth == 0 and stats.batches == 0


async def test_client_deadline_ends_a_queued_request(client: FlotillaClient, admin) -> None:  # type: ignore[no-untyped-def]
    await hold_queue(admin)
    uuid = await client.upload(sample("chelsea.jpg"))
    with pytest.raises(FlotillaError) as caught:
        await client.classify(uuid, MODEL, timeout_s=0.5)
    assert caught.value.code == Code.DEADLINE_EXCEEDED
    await wait_for_depth(admin, 0)  # it left the queue; it was never dispatched
    assert (await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))).batches == 0


async def test_cancelled_call_frees_its_place(client: FlotillaClient, admin) -> None:  # type: ignore[no-untyped-def]
    await hold_queue(admin)
    uuid = await client.upload(sample("chelsea.jpg"))
    call = asyncio.create_task(client.classify(uuid, MODEL, timeout_s=20))
    await wait_for_depth(admin, 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await wait_for_depth(admin, 0)


async def test_full_queue_is_resource_exhausted_and_queued_ones_still_succeed(client: FlotillaClient, admin) -> None:  # type: ignore[no-untyped-def]
    await hold_queue(admin, max_queue_size=2)
    uuid = await client.upload(sample("coffee.jpg"))
    queued = [asyncio.create_task(client.classify(uuid, MODEL, timeout_s=20)) for _ in range(2)]
    await wait_for_depth(admin, 2)
    with pytest.raises(FlotillaError) as caught:
        await client.classify(uuid, MODEL, timeout_s=20)
    assert caught.value.code == Code.RESOURCE_EXHAUSTED
    assert "full" in caught.value.message
    await release(admin)
    results = await asyncio.gather(*queued)
    assert all(r.classes for r in results)


async def test_priorities_order_dispatch_and_bad_priority_is_invalid(client: FlotillaClient, admin) -> None:  # type: ignore[no-untyped-def]
    await hold_queue(
        admin, priority_levels=2, default_priority_level=2, max_inflight_batches=1,
        priority_aging_us=60_000_000,  # no aging within this test
    )
    uuid = await client.upload(sample("coffee.jpg"))
    with pytest.raises(FlotillaError) as caught:
        await client.classify(uuid, MODEL, priority=7)
    assert caught.value.code == Code.INVALID_ARGUMENT and "1..2" in caught.value.message

    order: list[str] = []

    async def tracked(name: str, priority: int) -> None:
        await client.classify(uuid, MODEL, priority=priority, timeout_s=30)
        order.append(name)

    # FIFO is by arrival at the batcher; concurrent calls may overtake each other on the way (the
    # router handles them as they come off the connection), so each is queued before the next is sent.
    low = []
    for i in range(3):
        low.append(asyncio.create_task(tracked(f"low{i}", 0)))  # default level 2
        await wait_for_depth(admin, i + 1)
    high = asyncio.create_task(tracked("high", 1))
    await wait_for_depth(admin, 4)
    # Release one request per batch, one batch at a time: completion order is dispatch order.
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_batch_size = 1
    policy.max_queue_delay_us = 0
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))
    await asyncio.gather(*low, high)
    assert order == ["high", "low0", "low1", "low2"]


async def test_invalid_policy_is_rejected_naming_the_field(admin) -> None:  # type: ignore[no-untyped-def]
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.preferred_batch_sizes[:] = [policy.max_batch_size + 1]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "preferred_batch_sizes" in (caught.value.details() or "")
    policy.preferred_batch_sizes[:] = []
    policy.timeout_action = "DROP"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))
    assert "timeout_action" in (caught.value.details() or "")


async def test_stats_count_formed_batches(client: FlotillaClient, admin) -> None:  # type: ignore[no-untyped-def]
    policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=MODEL))
    policy.max_batch_size = 4
    policy.max_queue_delay_us = 200_000
    await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=MODEL, policy=policy))
    await admin.GetStats(batcher_pb2.GetStatsRequest(reset=True, model_name=MODEL))
    uuid = await client.upload(sample("coffee.jpg"))
    await asyncio.gather(*(client.classify(uuid, MODEL) for _ in range(8)))
    stats = await admin.GetStats(batcher_pb2.GetStatsRequest(model_name=MODEL))
    assert stats.requests == 8
    assert stats.batches == 2 and stats.mean_batch_size == 4.0
    assert {(c.batch_size, c.batches) for c in stats.batch_sizes} == {(4, 2)}


def test_loadtest_cli_writes_csv_and_plot(stack: LocalStack, tmp_path: Path) -> None:
    out = tmp_path / "lt"
    result = subprocess.run(
        [sys.executable, "-m", "flotilla", "loadtest", "--state", str(stack.run_dir / "stack.json"),
         "--batch-sizes", "1,4", "--concurrency", "2,8", "--duration-s", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = (out / "results.csv").read_text().splitlines()
    header = lines[0].split(",")
    for column in ("max_batch_size", "concurrency", "throughput_per_s", "p50_ms", "p90_ms", "p95_ms",
                   "p99_ms", "mean_formed_batch", "p99_queue_wait_ms", "backend_executions", "errors"):
        assert column in header
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    assert [(r["max_batch_size"], r["concurrency"]) for r in rows] == [("1", "2"), ("1", "8"), ("4", "2"), ("4", "8")]
    assert all(float(r["throughput_per_s"]) > 0 and r["errors"] == "0" for r in rows)
    assert all(float(r["mean_formed_batch"]) == 1.0 for r in rows if r["max_batch_size"] == "1")
    assert (out / "loadtest.png").stat().st_size > 10_000
    assert "max_bs" in result.stdout  # the table is printed
