"""Load tests against a running stack: what each batch size buys.

A sweep runs, for each batcher ``max_batch_size``, every load point
(closed-loop concurrency or open-loop request rate). Between batch sizes the
batcher is reconfigured through its BatcherAdmin API; at each point the
batcher's statistics and Triton's own execution counters are read before and
after, so each row says what batches were really formed and executed.

The baseline mode has no batching tier: each request goes on its own to a
preprocess worker and from there to the round-robin Triton replicas, whose
own dynamic batcher is on (model ``<model>-tritonbatch``).

The mesh is driven through one of the router's front doors (``--api``:
unary Classify calls, requests on ClassifyStream, KServe v2 over gRPC or
HTTP; ``api_calls``).
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from flotilla.api.v1 import (
    batcher_pb2,
    batcher_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    preprocess_pb2,
    preprocess_pb2_grpc,
)
from flotilla.clients.api_calls import Api, ApiCalls
from flotilla.clients.client import FlotillaClient
from flotilla.clients.loadgen import LoadResult, closed_loop, open_loop
from flotilla.clients.models import ModelsClient
from flotilla.common.admin import admin_metadata
from flotilla.common.status import error_from_rpc
from flotilla.common.tls import Dialer
from flotilla.common.wire import MODEL_HEADER
from flotilla.config import S3Settings
from flotilla.errors import error_from_code

BASELINE_SUFFIX = "-tritonbatch"
N = TypeVar("N", int, float)  # what parse_list parses


@dataclass
class Row:
    """One load point, with perf_analyzer-style columns."""

    mode: str
    """"mesh" (batching tier) or "baseline" (per-request to Triton's own batcher)."""
    replicas: int
    max_batch_size: int
    concurrency: int
    request_rate_per_s: float
    throughput_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    mean_formed_batch: float
    """Mean batch size Flotilla's batcher formed (mesh) — 0 for the baseline."""
    mean_batch_per_execution: float
    """Images per Triton execution, from Triton's own statistics."""
    p99_queue_wait_ms: float
    backend_executions: int
    succeeded: int
    errors: int
    api: str = "unary"
    """The router's front door the mesh's load came through (``--api``); the baseline's is its own."""


async def triton_totals(addresses: Sequence[str], model: str, dialer: Dialer) -> tuple[int, int]:
    """Summed (inference_count, execution_count) over the replicas that hold the model (over mutual TLS
    with ``dialer``'s certificate when the replicas serve TLS)."""
    inferences = executions = 0
    for address in addresses:
        client = triton_aio.InferenceServerClient(address, creds=dialer.credentials() if dialer.secure else None)
        try:
            stats = await client.get_inference_statistics(model, as_json=True)
        except InferenceServerException:
            continue  # no copy of the model on this replica
        finally:
            await client.close()
        for entry in stats.get("model_stats", []):
            inferences += int(entry.get("inference_count", 0))
            executions += int(entry.get("execution_count", 0))
    return inferences, executions


class RunningStack(Protocol):
    """Where a running stack's parts answer (``flotilla.stack.state.StackState``, read from stack.json)."""

    router: str
    router_http: str
    api_key: str
    admin_key: str
    tls_ca: str
    controller: str
    preprocess: list[str]
    triton: list[str]

    def s3_settings(self) -> S3Settings: ...

    def dialer(self) -> Dialer: ...


class StackTarget:
    """Handles on a running stack for driving and observing load."""

    def __init__(self, state: RunningStack) -> None:
        self.state = state
        self.s3 = state.s3_settings()
        self.dialer = state.dialer()
        self.client = FlotillaClient(state.router, state.api_key, self.s3, default_timeout_s=60.0, dialer=self.dialer)
        self.apis = ApiCalls(self.client, state.router, state.router_http, state.api_key, tls_ca=state.tls_ca)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._batchers: dict[str, str] = {}

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = self.dialer.aio_channel(address)
        return self._channels[address]

    def batcher(self, model: str) -> str:
        """The address of the model's (first) batcher, from the controller."""
        if model not in self._batchers:
            with ModelsClient(self.state.controller, dialer=self.dialer) as client:
                batchers = list(client.status(model).batchers)
            if not batchers:
                raise SystemExit(f"model {model} has no batcher registered yet")
            self._batchers[model] = batchers[0]
        return self._batchers[model]

    def admin(self, model: str) -> batcher_pb2_grpc.BatcherAdminStub:
        return batcher_pb2_grpc.BatcherAdminStub(self.channel(self.batcher(model)))

    async def close(self) -> None:
        await self.apis.close()
        await self.client.close()
        for channel in self._channels.values():
            await channel.close()

    async def upload_images(self, images: Sequence[bytes], copies: int) -> list[str]:
        """Upload ``copies`` objects per image (distinct uuids) and return the uuids."""
        return [await self.client.upload(jpeg) for jpeg in images for _ in range(copies)]

    async def max_batch_size(self, model: str) -> int:
        policy: batcher_pb2.BatchingPolicy = await self.admin(model).GetBatching(
            batcher_pb2.GetBatchingRequest(model_name=model)
        )
        return policy.max_batch_size

    async def set_max_batch_size(self, model: str, max_batch_size: int, max_queue_delay_us: int | None = None) -> None:
        admin = self.admin(model)
        policy = await admin.GetBatching(batcher_pb2.GetBatchingRequest(model_name=model))
        policy.max_batch_size = max_batch_size
        if max_queue_delay_us is not None:
            policy.max_queue_delay_us = max_queue_delay_us
        del policy.preferred_batch_sizes[:]
        # SetBatching changes the batcher: it needs the control plane's admin key (the stack file's).
        await admin.SetBatching(batcher_pb2.SetBatchingRequest(model_name=model, policy=policy),
                                metadata=admin_metadata(self.state.admin_key))

    def mesh_call(self, model: str, uuids: Sequence[str]) -> Callable[[], Awaitable[object]]:
        cycle = itertools.cycle(uuids)
        return lambda: self.client.classify(next(cycle), model)

    def api_call(self, api: Api, model: str, uuids: Sequence[str], *, concurrency: int = 1) -> Callable[[], Awaitable[object]]:
        """One request through the router's front door ``api`` (``api_calls``); ``concurrency``: the
        requests the load keeps in flight (how many streams the stream door opens)."""
        return self.apis.call(api, model, uuids, concurrency=concurrency)

    def batcher_call(self, model: str, uuids: Sequence[str]) -> Callable[[], Awaitable[object]]:
        """Straight to the model's batcher (no router hop)."""
        stub = inference_pb2_grpc.ImageClassifierStub(self.channel(self.batcher(model)))
        cycle = itertools.cycle(uuids)

        async def call() -> object:
            try:
                # A batcher process hosts many models' queues: the header names this one's.
                return await stub.Classify(
                    inference_pb2.ClassifyRequest(image_uuid=next(cycle), model_name=model),
                    timeout=60, metadata=((MODEL_HEADER, model),),
                )
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, "batcher") from exc

        return call

    def direct_call(
        self, model: str, uuids: Sequence[str], batch_size: int = 1
    ) -> Callable[[], Awaitable[object]]:
        """``batch_size`` requests per ProcessBatch call (as a batcher sends them), round-robin over
        preprocess workers; any item's error fails the call."""
        stubs = itertools.cycle(
            [preprocess_pb2_grpc.PreprocessorStub(self.channel(a)) for a in self.state.preprocess]
        )
        cycle = itertools.cycle(uuids)

        async def call() -> object:
            items = [preprocess_pb2.BatchItem(image_uuid=next(cycle), top_k=5) for _ in range(batch_size)]
            request = preprocess_pb2.ProcessBatchRequest(model_name=model, items=items)
            try:
                reply = await next(stubs).ProcessBatch(request, timeout=60)
            except grpc.aio.AioRpcError as exc:
                raise error_from_rpc(exc, "preprocess worker") from exc
            for result in reply.results:
                if result.HasField("error"):
                    raise error_from_code(result.error.code, result.error.message)
            return reply.results[0].response if batch_size == 1 else reply

        return call


async def measure(
    target: StackTarget,
    *,
    mode: str,
    model: str,
    max_batch_size: int,
    call: Callable[[], Awaitable[object]],
    concurrency: int = 0,
    rate_per_s: float = 0.0,
    duration_s: float,
    warmup_s: float = 1.0,
    on_done: Callable[[], None] | None = None,
    api: str = "unary",
) -> Row:
    """Run one load point; read what the batcher and Triton did inside its window.

    Counters are read at the window's edges while the load is running, so
    the ramp-up and the drain after the window do not count.
    """
    backend_model = model if mode == "mesh" else model + BASELINE_SUFFIX
    admin = target.admin(model)
    if concurrency:
        load = asyncio.create_task(
            closed_loop(call, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s, on_done=on_done)
        )
        await asyncio.sleep(warmup_s)
    else:
        load = asyncio.create_task(open_loop(call, rate_per_s=rate_per_s, duration_s=duration_s, on_done=on_done))
    await admin.GetStats(batcher_pb2.GetStatsRequest(reset=True, model_name=model))
    before = await triton_totals(target.state.triton, backend_model, target.dialer)
    await asyncio.sleep(duration_s)
    stats = await admin.GetStats(batcher_pb2.GetStatsRequest(reset=True, model_name=model))
    after = await triton_totals(target.state.triton, backend_model, target.dialer)
    result: LoadResult = await load
    inferences, executions = after[0] - before[0], after[1] - before[1]
    return Row(
        mode=mode,
        replicas=len(target.state.triton),
        max_batch_size=max_batch_size,
        concurrency=concurrency,
        request_rate_per_s=rate_per_s,
        throughput_per_s=round(result.throughput_per_s, 2),
        p50_ms=round(result.latency_ms(50), 2),
        p90_ms=round(result.latency_ms(90), 2),
        p95_ms=round(result.latency_ms(95), 2),
        p99_ms=round(result.latency_ms(99), 2),
        mean_formed_batch=round(stats.mean_batch_size, 2) if mode == "mesh" else 0.0,
        mean_batch_per_execution=round(inferences / executions, 2) if executions else 0.0,
        p99_queue_wait_ms=round(stats.queue_wait_p99_ms, 3) if mode == "mesh" else 0.0,
        backend_executions=executions,
        succeeded=result.succeeded,
        errors=result.failed,
        api=api if mode == "mesh" else "",
    )


def write_csv(rows: Sequence[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def format_table(rows: Sequence[Row]) -> str:
    header = (
        f"{'mode':<17}{'R':>3}{'max_bs':>7}{'load':>10}{'img/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'formed':>8}{'per exec':>9}{'q p99 ms':>10}{'execs':>7}{'errors':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        load = f"c={r.concurrency}" if r.concurrency else f"{r.request_rate_per_s:g}/s"
        mode = r.mode if r.api in ("", "unary") else f"{r.mode}:{r.api}"
        lines.append(
            f"{mode:<17}{r.replicas:>3}{r.max_batch_size:>7}{load:>10}{r.throughput_per_s:>9.1f}"
            f"{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.mean_formed_batch:>8.2f}{r.mean_batch_per_execution:>9.2f}"
            f"{r.p99_queue_wait_ms:>10.2f}{r.backend_executions:>7}{r.errors:>7}"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Throughput against p99 latency, one line per (mode, replicas, batch size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[Row]] = {}
    for r in rows:
        label = (f"{r.mode} ({r.api or 'unary'}) R={r.replicas} max_bs={r.max_batch_size}" if r.mode == "mesh"
                 else f"baseline R={r.replicas}")
        series.setdefault(label, []).append(r)
    for label, points in series.items():
        points = sorted(points, key=lambda r: r.throughput_per_s)
        ax.plot([p.p99_ms for p in points], [p.throughput_per_s for p in points], marker="o", label=label)
    ax.set_xlabel("p99 latency (ms)")
    ax.set_ylabel("throughput (images/s)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_list(text: str, kind: Callable[[str], N] = int) -> list[N]:
    values = [kind(v) for v in text.split(",") if v.strip()]
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"expected a comma-separated list of positive numbers, got {text!r}")
    return values
