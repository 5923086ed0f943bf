"""The router and a model's batcher alone, each at its own ceiling (`flotilla bench --only ceiling`).

On this machine the whole mesh shares two cores, so in the mesh benches no
Flotilla tier ever runs at its own limit: calls arrive a few at a time and
each pays its fixed costs alone. This part gives each tier the machine:

- batcher: a real batcher process (``flotilla serve batcher``) between a load
  generator that sends Classify calls the way the router does (frames on a
  Relay stream) and a preprocess worker that answers every batch at once, so
  the batcher is what runs out of CPU. A model's batcher must stay one queue
  per model (that is how it forms full batches): its ceiling on one core is
  what one model can carry.
- router: a real router process between unary Classify calls from many
  client connections (as callers send them) and a batcher that answers every
  relayed call at once.
- an empty gRPC server: a bare ``grpc.aio`` server process whose one handler
  returns a fixed answer, driven exactly as the router is. It is the floor of
  any Python gRPC tier that accepts one unary call per request (the router
  must: that is the public API), measured on the same machine in the same run.
- a relay proxy: the same bare server whose one handler sends each call's
  body over Flotilla's relay stream (``RelayClient``) to the same instant
  batcher and returns its answer, with nothing else of the router (no routes,
  keys, admission, metrics or spans): the floor of a router that relays, so
  the router's unary call splits into what taking a call costs, what relaying
  it costs and what the router adds.

The fakes (the controller, which answers only ShardHeartbeat / WatchFleet,
the worker, the batcher) and the load generator run in the bench process.
For each point: requests/s over the window, the tier's CPU-µs per request
and cores busy from its own CPU counters, and its ceiling on one core:
requests/s divided by its cores busy.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from pydantic import SecretStr

from flotilla.api.v1 import (
    controller_pb2,
    controller_pb2_grpc,
    inference_pb2,
    preprocess_pb2,
    relay_pb2,
)
from flotilla.bench import front_loads
from flotilla.bench.meter import LOAD_GENERATOR, Tier, metered_load
from flotilla.common.peer import GrpcPeer
from flotilla.common.probe import is_serving
from flotilla.common.relay import RelayClient, RelayServicer
from flotilla.common.runtime_env import service_env
from flotilla.common.server import ServiceServer, run_service
from flotilla.common.wire import MODEL_HEADER
from flotilla.config import FlotillaSettings, ModelSettings, RouterSettings, dump_settings
from flotilla.errors import NotFound
from flotilla.services.preprocess.server import BatchServicer, serve_batches
from flotilla.stack.processes import ManagedProcess, free_port, wait_until

MODEL = "ceiling"
API_KEY = "ceiling-bench-key"
CLASSIFY = "/flotilla.api.v1.ImageClassifier/Classify"
BATCHER_CONCURRENCY = 1024
BATCHER_BATCH_SIZES = (8, 32)
ROUTER_CONNECTIONS = 16
ROUTER_CONCURRENCY = 256
WARMUP_S = 2.0
EMPTY_SERVER = "empty gRPC server"
RELAY_PROXY = "relay proxy"
ROUTER_RELAY_PACING_S = RouterSettings.model_fields["pacing_ms"].default / 1000.0
"""The router's relay pacing by default (``router.pacing_ms``): the batcher's load generator and the relay
proxy send their frames as a router does."""
ANSWER_CLASSES = 10
"""Classes in the fake batcher's answers (every class's score travels when a KServe request asks)."""



def classify_bodies() -> list[bytes]:
    return front_loads.classify_bodies(MODEL, front_loads.random_uuids())


def answer(image_uuid: str) -> inference_pb2.ClassifyResponse:
    return inference_pb2.ClassifyResponse(
        image_uuid=image_uuid, model_name=MODEL, classes=[inference_pb2.ClassScore(index=1, label="one", score=1.0)]
    )


class _Controller(controller_pb2_grpc.ControllerServicer):
    """Gives a batcher the one model in its heartbeats' answers, and a router's WatchFleet one fleet."""

    def __init__(self, spec: ModelSettings, batchers: list[str]) -> None:
        self.spec = spec
        self.batchers = batchers

    async def ShardHeartbeat(  # noqa: N802
        self, request: controller_pb2.ShardHeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> controller_pb2.ShardHeartbeatResponse:
        changed = request.assignment != 1
        models = [controller_pb2.ShardModel(name=MODEL, spec_json=self.spec.model_dump_json())] if changed else []
        return controller_pb2.ShardHeartbeatResponse(assignment=1, changed=changed, models=models, interval_s=1.0)

    async def WatchFleet(  # noqa: N802
        self, request: controller_pb2.WatchFleetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[controller_pb2.Fleet]:
        yield controller_pb2.Fleet(
            generation=1,
            models=[controller_pb2.ModelStatus(name=MODEL, batchers=self.batchers, spec_json=self.spec.model_dump_json())],
        )
        await asyncio.Event().wait()  # the fleet never changes


class _InstantWorker(BatchServicer):
    """Answers every item of every batch at once, both ways a batcher sends one: as a frame on its relay
    stream (``start``, what it uses) or a unary call."""

    def __init__(self) -> None:
        self.batches = 0
        self.items = 0
        self.unary_batches = 0

    def _answer(self, request: preprocess_pb2.ProcessBatchRequest) -> preprocess_pb2.ProcessBatchResponse:
        self.batches += 1
        self.items += len(request.items)
        return preprocess_pb2.ProcessBatchResponse(
            backend="none",
            results=[preprocess_pb2.ItemResult(response=answer(item.image_uuid)) for item in request.items],
        )

    def start(self, frame: relay_pb2.CallFrame) -> asyncio.Future[preprocess_pb2.ProcessBatchResponse]:
        future: asyncio.Future[preprocess_pb2.ProcessBatchResponse] = asyncio.get_running_loop().create_future()
        future.set_result(self._answer(preprocess_pb2.ProcessBatchRequest.FromString(frame.request)))
        return future

    async def ProcessBatch(  # noqa: N802
        self, request: preprocess_pb2.ProcessBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> preprocess_pb2.ProcessBatchResponse:
        self.unary_batches += 1
        return self._answer(request)


_RELAYED = answer("relayed")
_RELAYED.scores.extend([0.0, 1.0] + [0.0] * (ANSWER_CLASSES - 2))  # what a KServe answer's tensor is made of


def _instant_batcher(frame: relay_pb2.CallFrame) -> asyncio.Future[inference_pb2.ClassifyResponse]:
    future: asyncio.Future[inference_pb2.ClassifyResponse] = asyncio.get_running_loop().create_future()
    future.set_result(_RELAYED)
    return future


async def _measure(
    tier: str, pid: int, call: Callable[[], Awaitable[object]], *, concurrency: int, window_s: float,
    items_per_call: int = 1,
) -> dict[str, float]:
    """The CPU bench's closed loop and meter (one window after the warm-up) on one process: rate,
    its CPU per request (and per image, ``items_per_call`` images a request), its and the load
    generator's cores, and its ceiling on one core."""
    point = await metered_load(
        {tier: Tier([pid]), LOAD_GENERATOR: Tier([os.getpid()], descendants=False)}, call,
        concurrency=concurrency, window_s=window_s, windows=1, warmup_s=WARMUP_S, items_per_call=items_per_call,
    )
    images_per_s = float(point["images_per_s"])
    per_image = point["cpu_us_per_image"]
    us = per_image[tier]
    return {
        "concurrency": concurrency,
        "window_s": window_s,
        "requests": point["succeeded"],
        "requests_per_s": round(images_per_s / items_per_call, 1),
        "images_per_s": images_per_s,
        "cpu_us_per_request": round(us * items_per_call, 1),
        "cpu_us_per_image": us,
        "cores_busy": round(us * images_per_s / 1e6, 2),
        "load_generator_cores_busy": round(per_image[LOAD_GENERATOR] * images_per_s / 1e6, 2),
        "ceiling_requests_per_s_one_core": round(1e6 / (us * items_per_call)) if us > 0 else 0,
        "ceiling_images_per_s_one_core": round(1e6 / us) if us > 0 else 0,
        "errors": point["errors"],
    }


async def _start(settings: FlotillaSettings, run_dir: Path, name: str, argv: list[str]) -> ManagedProcess:
    port = free_port(settings.host)
    address = f"{settings.host}:{port}"
    process = ManagedProcess(
        name, [sys.executable, "-m", "flotilla", "serve", *argv, "--port", str(port)],
        log_path=run_dir / f"{name}.log", address=address, env=service_env(),
    )
    process.start()
    await asyncio.to_thread(
        wait_until, lambda: is_serving(address), 30.0, name, procs=[process]
    )
    return process


def _config(
    settings: FlotillaSettings, run_dir: Path, name: str, controller: str, preprocess: str, http_address: str = "",
    pacing_ms: float | None = None,
) -> Path:
    config = settings.model_copy(deep=True)
    config.models = {}
    config.endpoints.controller = controller
    config.endpoints.preprocess = [preprocess]
    config.batcher.max_concurrent_calls = 4 * BATCHER_CONCURRENCY
    config.router = config.router.model_copy(update={
        "api_keys": [SecretStr(API_KEY)],
        "http_port": int(http_address.rsplit(":", 1)[1]) if http_address else 0,
        **({"pacing_ms": pacing_ms} if pacing_ms is not None else {}),
    })
    path = run_dir / f"{name}.yaml"
    dump_settings(config, path)
    return path


async def _hosted(peer: GrpcPeer[None], body: bytes, headers: list[tuple[str, str]], timeout_s: float = 30.0) -> None:
    """Until the batcher hosts the model: it serves at once, and takes the model from its first
    answered heartbeat."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            await peer.relay.call(CLASSIFY, body, headers, 5.0)
            return
        except NotFound:
            if time.monotonic() > deadline_s:
                raise
            await asyncio.sleep(0.05)


async def batcher_point(settings: FlotillaSettings, run_dir: Path, *, max_batch_size: int, window_s: float) -> dict[str, Any]:
    spec = ModelSettings(storage_uri="s3://unused/ceiling", memory_mb=1)
    spec.batching.max_batch_size = max_batch_size
    spec.batching.max_queue_size = 4 * BATCHER_CONCURRENCY
    spec.batching.max_inflight_batches = 4
    worker = _InstantWorker()
    fakes = ServiceServer("bench fakes", [], grace_s=0, tier="bench")
    controller_pb2_grpc.add_ControllerServicer_to_server(_Controller(spec, []), fakes.server)
    serve_batches(fakes, worker)
    fakes_address = f"{settings.host}:{await fakes.start(settings.host, 0)}"
    name = f"batcher-bs{max_batch_size}"
    batcher: ManagedProcess | None = None
    peer: GrpcPeer[None] | None = None
    try:
        config = _config(settings, run_dir, name, fakes_address, fakes_address)
        batcher = await _start(settings, run_dir, name, ["batcher", "--config", str(config), "--model", MODEL])
        peer = GrpcPeer(batcher.address, relay_pacing_s=ROUTER_RELAY_PACING_S)
        ring = itertools.cycle(classify_bodies())
        headers = [(MODEL_HEADER, MODEL)]
        await _hosted(peer, next(ring), headers)
        assert batcher.pid is not None
        point = await _measure(
            "batcher", batcher.pid, lambda: peer.relay.call(CLASSIFY, next(ring), headers, 30.0),
            concurrency=BATCHER_CONCURRENCY, window_s=window_s,
        )
        return {"tier": "batcher", "max_batch_size": max_batch_size, **point,
                "mean_batch": round(worker.items / max(worker.batches, 1), 2),  # over warm-up and window
                "unary_batches": worker.unary_batches}
    finally:
        if peer is not None:
            await peer.close()
        if batcher is not None:
            batcher.stop()
        await fakes.stop()


async def router_point(
    settings: FlotillaSettings, run_dir: Path, *, window_s: float, api: str = "unary", images: int = 1,
    pacing_ms: float | None = None,
) -> dict[str, Any]:
    """The router process alone at its ceiling through one front door; ``pacing_ms``: its
    ``router.pacing_ms`` (None: the default)."""
    spec = ModelSettings(storage_uri="s3://unused/ceiling", memory_mb=1)
    fakes, fakes_address, batcher = await _instant_batcher_fakes(settings, controller_spec=spec)
    router: ManagedProcess | None = None
    load: front_loads.Load | None = None
    try:
        http_address = f"{settings.host}:{free_port(settings.host)}"
        config = _config(settings, run_dir, "router", fakes_address, fakes_address, http_address, pacing_ms)
        router = await _start(settings, run_dir, "router", ["router", "--config", str(config)])
        load = front_loads.front_door_load(
            api, images, router=router.address, router_http=http_address, connections=ROUTER_CONNECTIONS,
            model=MODEL, api_key=API_KEY,
        )
        assert router.pid is not None
        point = await _measure(
            "router", router.pid, load, concurrency=ROUTER_CONCURRENCY, window_s=window_s, items_per_call=images
        )
        return {"tier": "router", "api": api, "images_per_request": images, "connections": ROUTER_CONNECTIONS,
                **({"pacing_ms": pacing_ms} if pacing_ms is not None else {}),
                **point, "calls_per_relay_message": _calls_per_message(batcher)}
    finally:
        if load is not None:
            await load.close()
        if router is not None:
            router.stop()
        await fakes.stop()


class _FixedAnswer(grpc.GenericRpcHandler):
    """Every unary call answered with one serialised ClassifyResponse; the request is not parsed."""

    def __init__(self) -> None:
        self._answer = answer("empty").SerializeToString()
        self._handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(self._call)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handler

    async def _call(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return self._answer


async def serve_empty(host: str, port: int) -> None:
    """The bare server of the floor point: grpc.aio, no interceptors, one handler (plus health, for readiness)."""
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_generic_rpc_handlers((_FixedAnswer(),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


class _Relayed(grpc.GenericRpcHandler):
    """Every unary call's body relayed to a batcher over ``relay``, its answer returned as it came."""

    def __init__(self, relay: RelayClient) -> None:
        self._relay = relay
        self._handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(self._call)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        return self._handler

    async def _call(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return await self._relay.call(CLASSIFY, request, (), None)


async def serve_relay_proxy(host: str, port: int, batcher: str) -> None:
    """The bare server of the relay proxy point: the empty server's, its handler relaying to ``batcher``."""
    channel = grpc.aio.insecure_channel(batcher)
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    # Paced as the router's relay is by default: the floor of a router that relays.
    server.add_generic_rpc_handlers((_Relayed(RelayClient(channel, batcher, pacing_s=ROUTER_RELAY_PACING_S)),))
    server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await server.wait_for_termination()


async def empty_server_point(settings: FlotillaSettings, run_dir: Path, *, window_s: float) -> dict[str, Any]:
    return await _bare_server_point(settings, run_dir, EMPTY_SERVER, window_s=window_s)


async def relay_proxy_point(settings: FlotillaSettings, run_dir: Path, *, window_s: float) -> dict[str, Any]:
    fakes, fakes_address, batcher = await _instant_batcher_fakes(settings)
    try:
        point = await _bare_server_point(settings, run_dir, RELAY_PROXY, window_s=window_s, batcher=fakes_address)
        return {**point, "calls_per_relay_message": _calls_per_message(batcher)}
    finally:
        await fakes.stop()


async def _instant_batcher_fakes(
    settings: FlotillaSettings, controller_spec: ModelSettings | None = None
) -> tuple[ServiceServer, str, RelayServicer[inference_pb2.ClassifyResponse]]:
    """The bench's fakes server, started, with a batcher that answers every relayed call at once and, with
    ``controller_spec``, a controller whose fleet routes that model to it: the server, its address and that
    batcher (which counts the calls and messages it received). Every service is added before the server
    starts (grpc takes no method handlers after)."""
    fakes = ServiceServer("bench fakes", [], grace_s=0, tier="bench")
    batcher = RelayServicer(_instant_batcher, tier="bench")
    fakes.server.add_generic_rpc_handlers([batcher.generic_handler()])
    routed_to: list[str] = []
    if controller_spec is not None:
        controller_pb2_grpc.add_ControllerServicer_to_server(_Controller(controller_spec, routed_to), fakes.server)
    address = f"{settings.host}:{await fakes.start(settings.host, 0)}"
    routed_to.append(address)  # the fleet's batcher: this server
    return fakes, address, batcher


def _calls_per_message(batcher: RelayServicer[Any]) -> float:
    return round(batcher.calls_received / max(batcher.messages, 1), 1)


async def _bare_server_point(
    settings: FlotillaSettings, run_dir: Path, tier: str, *, window_s: float, batcher: str = ""
) -> dict[str, Any]:
    """The point of a bare grpc.aio server process (``python -m flotilla.bench.ceiling``): the empty
    server, or with ``batcher`` the relay proxy to it."""
    port = free_port(settings.host)
    name = tier.lower().replace(" ", "-")
    server = ManagedProcess(
        name,
        [sys.executable, "-m", "flotilla.bench.ceiling", settings.host, str(port), settings.event_loop,
         *([batcher] if batcher else [])],
        log_path=run_dir / f"{name}.log", address=f"{settings.host}:{port}",
        env=service_env(),  # the empty server runs on the router's gRPC runtime, as on its event loop
    )
    load: front_loads.Load | None = None
    try:
        server.start()
        await asyncio.to_thread(
            wait_until, lambda: is_serving(server.address), 30.0, server.name, procs=[server]
        )
        load = front_loads.UnaryLoad(server.address, ROUTER_CONNECTIONS, MODEL, API_KEY, classify_bodies())
        assert server.pid is not None
        point = await _measure(tier, server.pid, load, concurrency=ROUTER_CONCURRENCY, window_s=window_s)
        return {"tier": tier, "connections": ROUTER_CONNECTIONS, **point}
    finally:
        if load is not None:
            await load.close()
        server.stop()


ROUNDS = 5
"""Rounds of the router's doors and the bare servers, in turn: each point is its median round."""
EMPTY_DOOR = ("empty", 1)
"""The empty server's place among the router's doors in a round."""
RELAY_PROXY_DOOR = ("relay proxy", 1)
"""The relay proxy's."""
UNPACED_DOOR = ("unary unpaced", 1)
"""The router's unary door with its relay unpaced (``router.pacing_ms: 0``): what the default pacing buys."""


def run(base: FlotillaSettings, *, duration_s: float = 10.0, rounds: int = ROUNDS) -> dict[str, Any]:
    """Each tier alone at its ceiling. The router's doors and the empty server are measured in
    ``rounds`` rounds of ``duration_s / rounds`` each (the batcher's points in one window of
    ``duration_s``), one door after another in each round: this machine's
    speed drifts by a fifth within minutes (the empty server's call took 141 then 329 us the same
    day), and the router's ratios to the empty server are the figures the issue's targets are stated
    in, so the two are measured beside each other, again and again, and each point is its median round."""
    run_dir = base.run_dir.parent / "bench-ceiling"
    run_dir.mkdir(parents=True, exist_ok=True)
    points = []
    for size in BATCHER_BATCH_SIZES:
        print(f"ceiling: the batcher alone, max_batch_size {size} ...", flush=True)
        points.append(asyncio.run(batcher_point(base, run_dir, max_batch_size=size, window_s=duration_s)))
    window_s = duration_s / rounds
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {
        door: [] for door in (*front_loads.FRONT_DOORS, UNPACED_DOOR, EMPTY_DOOR, RELAY_PROXY_DOOR)
    }
    for round_index in range(rounds):
        for api, images in front_loads.FRONT_DOORS:
            print(f"ceiling: round {round_index + 1}/{rounds}: the router alone, {api} with {images} image(s) a "
                  "request ...", flush=True)
            point = asyncio.run(router_point(base, run_dir, window_s=window_s, api=api, images=images))
            measured[(api, images)].append(point)
        print(f"ceiling: round {round_index + 1}/{rounds}: the router alone, unary with its relay unpaced ...", flush=True)
        measured[UNPACED_DOOR].append(asyncio.run(router_point(base, run_dir, window_s=window_s, pacing_ms=0.0)))
        print(f"ceiling: round {round_index + 1}/{rounds}: an empty gRPC server (the floor of a unary call) ...",
              flush=True)
        measured[EMPTY_DOOR].append(asyncio.run(empty_server_point(base, run_dir, window_s=window_s)))
        print(f"ceiling: round {round_index + 1}/{rounds}: a relay proxy (the floor of a router that relays) ...",
              flush=True)
        measured[RELAY_PROXY_DOOR].append(asyncio.run(relay_proxy_point(base, run_dir, window_s=window_s)))
    points.extend(median_round(each) for each in measured.values())
    return {"measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds, "points": points}


def median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round whose CPU per image is the median (the lower middle one of an even count), whole,
    with every round's CPU per image beside it."""
    ordered = sorted(rounds, key=lambda p: p["cpu_us_per_image"])
    return {**ordered[(len(ordered) - 1) // 2], "rounds_cpu_us_per_image": [p["cpu_us_per_image"] for p in rounds]}


def _point_key(p: dict[str, Any]) -> str:
    tier = p["tier"].lower().replace(" ", "_")  # "empty gRPC server" -> empty_grpc_server
    key = f"{tier}_alone" + (f"_bs{p['max_batch_size']}" if "max_batch_size" in p else "")
    api = p.get("api", "unary")
    if api != "unary":  # the unary point keeps the keys it always had
        key += "_" + api.replace("-", "_") + (f"_n{p['images_per_request']}" if p["images_per_request"] > 1 else "")
    if "pacing_ms" in p:  # a pacing other than the default's
        key += "_paced" if p["pacing_ms"] else "_unpaced"
    return key


def summary(result: dict[str, Any]) -> dict[str, object]:
    out: dict[str, object] = {}
    by_key = {_point_key(p): p for p in result["points"]}
    for key, p in by_key.items():
        out[f"{key}_cpu_us_per_request"] = p["cpu_us_per_request"]
        out[f"{key}_ceiling_requests_per_s_one_core"] = p["ceiling_requests_per_s_one_core"]
    unary, stream = by_key.get("router_alone"), by_key.get("router_alone_stream")
    empty, relay = by_key.get("empty_grpc_server_alone"), by_key.get("relay_proxy_alone")
    # Issue 23's targets: the stream >= 3x unary's requests/s at the router's ceiling, <= 1/3 its CPU per
    # image; unary <= 1.5x an empty server's call. One image a request on these doors, so the requests/s
    # ratio at the ceiling is the inverse of the CPU ratio. Measured in rounds, each ratio is the median
    # of the rounds' own ratios (the two points of a round ran a minute apart at most, the rounds minutes
    # apart: a slow spell of the machine moves both sides of a round's ratio).
    if unary and stream:
        cpu_ratio = paired_ratio(stream, unary)
        out["router_stream_over_unary_cpu_us_per_image"] = round(cpu_ratio, 3)
        out["router_stream_over_unary_requests_per_s"] = round(1 / cpu_ratio, 2)
        out["router_stream_linger_ms"] = RouterSettings.model_fields["stream_linger_ms"].default
    if unary and empty:
        out["router_unary_over_empty_grpc_server_cpu_us"] = round(paired_ratio(unary, empty), 2)
    if unary and "calls_per_relay_message" in unary:
        out["router_unary_pacing_ms"] = RouterSettings.model_fields["pacing_ms"].default
        out["router_unary_calls_per_relay_message"] = unary["calls_per_relay_message"]
    unpaced = by_key.get("router_alone_unpaced")
    if unpaced and empty:  # the same door with router.pacing_ms 0: what the default pacing buys
        out["router_unary_unpaced_over_empty_grpc_server_cpu_us"] = round(paired_ratio(unpaced, empty), 2)
        out["router_unary_unpaced_calls_per_relay_message"] = unpaced["calls_per_relay_message"]
    # Where the unary call's CPU goes: taking the call (the empty server), relaying it (the relay proxy
    # over the empty server) and the router's own work (the router over the relay proxy).
    if relay and empty:
        out["relay_proxy_over_empty_grpc_server_cpu_us"] = round(paired_ratio(relay, empty), 2)
    if unary and relay:
        out["router_unary_over_relay_proxy_cpu_us"] = round(paired_ratio(unary, relay), 2)
    return out


def paired_ratio(top: dict[str, Any], bottom: dict[str, Any]) -> float:
    """``top``'s CPU per image over ``bottom``'s: the median of each round's own ratio when both were
    measured in the same rounds, else the ratio of the two points."""
    tops, bottoms = top.get("rounds_cpu_us_per_image"), bottom.get("rounds_cpu_us_per_image")
    if tops and bottoms and len(tops) == len(bottoms):
        return float(statistics.median(t / b for t, b in zip(tops, bottoms, strict=True)))
    return float(top["cpu_us_per_image"] / bottom["cpu_us_per_image"])


def readme_lines(result: dict[str, Any]) -> list[str]:
    lines = [
        f"Each tier alone at its own ceiling ({result['measured_at']}; `flotilla bench --only ceiling`"
        + (f"; the router's doors, the empty server and the relay proxy in {result['rounds']} rounds in turn, each its median round, "
           "every round's CPU per image in brackets; a ratio between two of them in the summary is the median of "
           "the rounds' own ratios" if result.get("rounds", 1) > 1 else "") + "): a real "
        "batcher process between a Relay load generator and a worker that answers every batch at once; a real router "
        f"process between unary Classify calls on {ROUTER_CONNECTIONS} connections and a batcher that answers every "
        "relayed call at once; an empty gRPC server (bare grpc.aio, one handler with a fixed answer) driven as the "
        "router is: the floor of any Python tier that takes one unary call per request; a relay proxy (the same bare "
        "server, its handler relaying each call over Flotilla's relay stream to the same instant batcher, nothing "
        "else of the router): the floor of a router that relays (fakes and load generator in the bench process). "
        "Ceiling = requests/s / the tier's cores busy.",
        "",
        "| tier | front door (images a request) | max_batch_size | in flight | requests/s | CPU-µs per request | "
        "CPU-µs per image | cores busy (tier / load generator) | ceiling on one core (requests/s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        door = f"{p['api']} ({p['images_per_request']})" if "api" in p else "-"
        if "pacing_ms" in p:
            door += f", router.pacing_ms {p['pacing_ms']:g}"
        lines.append(
            f"| {p['tier']} | {door} | {p.get('max_batch_size', '-')} | {p['concurrency']} | {p['requests_per_s']} | "
            f"**{p['cpu_us_per_request']}** | {p.get('cpu_us_per_image', p['cpu_us_per_request'])}"
            + (f" ({', '.join(str(r) for r in p['rounds_cpu_us_per_image'])})" if "rounds_cpu_us_per_image" in p else "")
            + " | "
            f"{p['cores_busy']} / {p['load_generator_cores_busy']} | **{p['ceiling_requests_per_s_one_core']}** |"
        )
    lines.append("")
    return lines


if __name__ == "__main__":  # the bare servers' process: python -m flotilla.bench.ceiling HOST PORT LOOP [BATCHER]
    # On the services' event loop (settings.event_loop), so it stays the floor of the router as it runs;
    # as run_service reads it, any name but uvloop is asyncio. With BATCHER: the relay proxy to it.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop" if sys.argv[3] == "uvloop" else "asyncio"
    if len(sys.argv) > 4:
        run_service(serve_relay_proxy(sys.argv[1], int(sys.argv[2]), sys.argv[4]), event_loop)
    else:
        run_service(serve_empty(sys.argv[1], int(sys.argv[2])), event_loop)
