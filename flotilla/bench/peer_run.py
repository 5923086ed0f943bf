"""The bench's peer, run: the mesh's job on Ray Serve (:mod:`flotilla.bench.peer_app`), measured.

The load is the CPU bench's: a closed loop at the same concurrency (64 for
R = 2, max_batch_size 8) after a warm-up, through Ray Serve's HTTP proxy on
127.0.0.1 (aiohttp; ``front_door="handle"`` drives a ``DeploymentHandle``
from this process instead). The mean batch is images per batch, from the
batch size each answer carries (n / sum(1 / b) over the measured answers).
Every process's CPU is metered as the mesh's is (:mod:`flotilla.bench.meter`),
Ray's by role.

Ray runs locally (``ray.init`` with this machine's cores, no dashboard, no
usage stats, loopback only) and is torn down at the end (``serve.shutdown``,
``ray.shutdown``); the result says whether any process it started was left.

Needs the ``peer`` extra (``pip install -e '.[peer]'``).
``python -m flotilla.bench.peer_run`` runs it alone against a SeaweedFS it
starts and prints JSON (``--with-mesh``: the mesh's CPU-bench point first, in
the same run, and the ratio).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

from flotilla.bench.cpu import cpu_point
from flotilla.bench.inputs import BENCH_CONFIG, LARGE_PHOTOS, MODEL, large_photos
from flotilla.bench.meter import LOAD_GENERATOR, CpuMeter, MeteredPoint, Tier
from flotilla.bench.peer_app import (
    BATCHES_IN_FLIGHT_PER_REPLICA,
    TOP_K,
    PeerConfig,
    application,
    ray_available,
)
from flotilla.clients.loadgen import closed_loop
from flotilla.common.ids import new_image_uuid, object_key
from flotilla.config import BatchingSettings, S3Settings
from flotilla.errors import FlotillaError

MODEL_DIR = Path("build/models") / MODEL
CONCURRENCY = 64
"""The CPU bench's closed loop: 2 x (2 batches in flight per replica) x R=2 x max_batch_size 8."""
MESH_QUEUE_DELAY_S = BatchingSettings().max_queue_delay_us / 1e6
"""The batcher's default ``max_queue_delay_us`` (2 ms; the CPU bench keeps it)."""
WARMUP_S = 2.0
FRONT_DOORS = ("http", "handle")
HOST = "127.0.0.1"
APP_NAME = "flotilla-peer"
ROUTE = "/classify"
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
"""Set for Ray's processes (they inherit the driver's environment at ``ray.init``)."""
THROUGHPUT_OPTIMIZED_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
"""Ray Serve's documented high-throughput mode (Ray >= 2.56): user code on the
replica's own loop, gRPC between proxy and replicas, GC frozen after start-up;
direct ingress (fixed ports 8000/9000, no proxy) stays off: the HTTP proxy
serves on 127.0.0.1 at a free port as in the default mode."""


# -- figures (pure) -----------------------------------------------------------------


def mean_batch(batch_sizes: Sequence[int]) -> float:
    """Images per batch from each answer's batch size: every batch of b images
    answers b times, so n answers came from sum(1 / b) batches."""
    if not batch_sizes:
        return float("nan")
    return len(batch_sizes) / sum(1.0 / b for b in batch_sizes)


def ratio(a: float, b: float) -> float:
    return round(a / b, 2) if b else float("nan")


def peer_lines(
    result: dict[str, Any], flotilla_img_s: float, flotilla_p99_ms: float, flotilla_cpu_us_per_image: float | None = None
) -> list[str]:
    """The results page's Flotilla-vs-Ray-Serve table, from :func:`run_peer`'s result
    and the mesh's images/s and p99 at the same concurrency (and, if given, the
    mesh's CPU-µs per image over every tier, the CPU bench's ``total``: the
    figure other load on the machine disturbs least)."""
    ray_img_s, ray_p99 = float(result["images_per_s"]), float(result["p99_ms"])
    door = {"http": "its HTTP proxy (aiohttp client)", "handle": "a DeploymentHandle in the load generator"}.get(
        str(result.get("front_door")), str(result.get("front_door"))
    )
    mean = result.get("mean_batch")
    ray_cpu_us = (result.get("cpu_us_per_image") or {}).get("total")
    cpu_row = []
    if flotilla_cpu_us_per_image is not None and ray_cpu_us is not None:
        cpu_row = [
            f"| CPU-ms per image, every process (load generator included) | {flotilla_cpu_us_per_image / 1000:.1f} | "
            f"{ray_cpu_us / 1000:.1f} | {ratio(flotilla_cpu_us_per_image, ray_cpu_us)}x |"
        ]
    return [
        f"The same job on Ray Serve {result.get('ray_version', '')} ({result.get('ray_mode', 'defaults')}, access "
        "log off; `flotilla.bench.peer_run`): S3 fetch, "
        f"`decode_for_model`, the same `model.onnx` on ONNX Runtime ({result.get('intra_op_threads', 1)} intra-op "
        f"thread), top-{TOP_K}; {result['replicas']} replicas, `@serve.batch(max_batch_size={result['max_batch_size']}, "
        f"batch_wait_timeout_s={result['batch_wait_timeout_s']})`, closed loop at concurrency "
        f"{result['concurrency']} through {door}, {result['duration_s']:.0f} s after a {result.get('warmup_s', WARMUP_S):.0f} s "
        f"warm-up, on {result.get('photos', 'the same photos')}.",
        "",
        "| | Flotilla | Ray Serve | Flotilla / Ray |",
        "|---|---|---|---|",
        f"| images/s | {flotilla_img_s:.1f} | {ray_img_s:.1f} | **{ratio(flotilla_img_s, ray_img_s)}x** |",
        f"| p99 latency (ms) | {flotilla_p99_ms:.1f} | {ray_p99:.1f} | {ratio(flotilla_p99_ms, ray_p99)}x |",
        *cpu_row,
        f"| mean batch (images) | | {mean if mean is not None else '-'} | |",
        f"| errors | | {result.get('errors', 0)} | |",
        "",
    ]


# -- Ray's processes and the load ----------------------------------------------------


def _descendant_pids() -> set[int]:
    """This process's live descendants (Ray's processes, once it has started them)."""
    return {child.pid for child in psutil.Process().children(recursive=True)}


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    """Those of ``pids`` still running (zombies count as gone) after up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = {p for p in pids if _running(p)}
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has: it only waits to be reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _cmdline(pid: int) -> str:
    """The process's command line, its arguments joined by spaces ("" when it is gone)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


RAY_TIERS = (("ServeReplica", "replicas"), ("ProxyActor", "http proxy"), ("ServeController", "serve controller"))


def ray_tiers(pids: set[int]) -> dict[str, Tier]:
    """This process (the load generator) and Ray's processes, by role from
    their titles (``ray::ServeReplica...``, ``ray::ProxyActor``, ...); the rest
    (gcs_server, raylet, agents, idle workers) is "ray system"."""
    groups: dict[str, list[int]] = {name: [] for _, name in RAY_TIERS}
    groups["ray system"] = []
    for pid in pids:
        cmd = _cmdline(pid)
        name = next((n for key, n in RAY_TIERS if key in cmd), "ray system")
        groups[name].append(pid)
    tiers = {name: Tier(members, descendants=False) for name, members in groups.items()}
    tiers[LOAD_GENERATOR] = Tier([os.getpid()], descendants=False)
    return tiers


def upload(s3: S3Settings, photos: Sequence[bytes], copies: int = 8) -> list[str]:
    """``copies`` objects per photo under fresh uuids, as the bench's ``upload_images``."""
    from flotilla.common.object_store import ObjectStore

    store = ObjectStore(s3)
    uuids = []
    for photo in photos:
        for _ in range(copies):
            image_uuid = new_image_uuid()
            store.put(object_key(image_uuid), photo)
            uuids.append(image_uuid)
    return uuids


async def _drive(call: Callable[[], Awaitable[dict[str, Any]]], tiers: dict[str, Tier], *, concurrency: int,
                 duration_s: float, warmup_s: float) -> dict[str, Any]:
    batches: list[int] = []
    measuring = False

    async def counted() -> object:
        answer = await call()
        if "error" in answer:
            raise FlotillaError(str(answer["error"]))
        if measuring:
            batches.append(int(answer["batch"]))
        return answer

    load = asyncio.create_task(closed_loop(counted, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s))
    await asyncio.sleep(warmup_s)
    measuring = True
    with CpuMeter(tiers) as meter:
        await asyncio.sleep(duration_s)
    measuring = False
    result = await load
    return {
        "images_per_s": round(result.throughput_per_s, 1),
        "p50_ms": round(result.latency_ms(50), 1),
        "p99_ms": round(result.latency_ms(99), 1),
        "requests": result.succeeded,
        "errors": result.failed,
        "error_kinds": dict(result.errors),
        "mean_batch": round(mean_batch(batches), 2) if batches else None,
        "cores_busy_machine": round(meter.machine_busy_s / meter.wall_s, 2),
        "cores_counted_tiers": round(sum(meter.cpu_s.values()) / meter.wall_s, 2),
        "cpu_us_per_image": meter.per_item_us(len(batches)),
        "processes": meter.processes,
    }


def run_peer(
    *,
    replicas: int,
    max_batch_size: int,
    concurrency: int = CONCURRENCY,
    duration_s: float,
    photos: Sequence[bytes] | Sequence[str],
    s3: S3Settings,
    batch_wait_timeout_s: float = MESH_QUEUE_DELAY_S,
    front_door: str = "http",
    warmup_s: float = WARMUP_S,
    model_dir: Path = MODEL_DIR,
    copies: int = 8,
    photos_note: str | None = None,
    throughput_optimized: bool = False,
) -> dict[str, Any]:
    """Ray Serve on this machine, the same job as the mesh, a closed loop at
    ``concurrency`` for ``duration_s`` after ``warmup_s``; Ray is torn down
    before this returns. ``photos``: JPEG bytes (uploaded here, ``copies``
    objects each, as the bench uploads them) or uuids already in ``s3``.
    ``throughput_optimized``: Ray Serve's high-throughput mode
    (:data:`THROUGHPUT_OPTIMIZED_ENV`) instead of its defaults."""
    if front_door not in FRONT_DOORS:
        raise ValueError(f"front_door must be one of {FRONT_DOORS}, not {front_door!r}")
    if not ray_available():
        raise RuntimeError("Ray Serve is not installed: pip install -e '.[peer]'")
    onnx_file = (model_dir / "1" / "model.onnx").resolve()
    if not onnx_file.exists():
        raise FileNotFoundError(f"{onnx_file} is missing; run `make models`")
    if photos and isinstance(photos[0], str):  # uuids of objects already in s3
        uuids = [p for p in photos if isinstance(p, str)]
    else:
        uuids = upload(s3, [p for p in photos if isinstance(p, bytes)], copies)
    cores = os.cpu_count() or 1
    labels = model_dir / "labels.txt"
    config = PeerConfig(
        onnx_file=str(onnx_file), s3=s3, labels_file=str(labels.resolve()) if labels.exists() else None,
        # The local stack's share per Triton replica (flotilla/stack/local.py).
        intra_op_threads=max(1, cores // replicas),
    )
    # Before ray starts its processes: they inherit these (restored at the end).
    env = {**RAY_ENV, **(THROUGHPUT_OPTIMIZED_ENV if throughput_optimized else {})}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import ray
    from ray import serve

    before = _descendant_pids()
    temp_dir = tempfile.mkdtemp(prefix="flotilla-ray-")
    started = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        ray.init(
            num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
            object_store_memory=128 * 2**20, namespace=APP_NAME, _temp_dir=temp_dir, _node_ip_address=HOST,
        )
        from flotilla.stack.processes import free_port

        port = free_port(HOST)
        serve.start(
            http_options={"host": HOST, "port": port},
            logging_config={"log_level": "WARNING", "enable_access_log": False},
        )
        app = application(config, replicas=replicas, max_batch_size=max_batch_size,
                           batch_wait_timeout_s=batch_wait_timeout_s, cpus_per_replica=cores / replicas)
        handle = serve.run(app, name=APP_NAME, route_prefix=ROUTE)
        ready_s = time.perf_counter() - started
        tiers = ray_tiers(_descendant_pids() - before)
        measured = asyncio.run(_load(front_door, handle, port, uuids, tiers, concurrency=concurrency,
                                     duration_s=duration_s, warmup_s=warmup_s))
        result = {
            "peer": "ray-serve",
            "ray_version": ray.__version__,
            "ray_mode": "throughput-optimized" if throughput_optimized else "defaults",
            "front_door": front_door,
            "front_door_detail": (f"Ray Serve HTTP proxy on {HOST}:{port}, aiohttp client" if front_door == "http"
                                  else "DeploymentHandle from the load-generating process"),
            "model": MODEL,
            "replicas": replicas,
            "max_batch_size": max_batch_size,
            "batch_wait_timeout_s": batch_wait_timeout_s,
            "max_concurrent_batches": BATCHES_IN_FLIGHT_PER_REPLICA,
            "max_ongoing_requests": BATCHES_IN_FLIGHT_PER_REPLICA * max_batch_size,
            "intra_op_threads": config.intra_op_threads,
            "fetch_threads": config.fetch_threads,
            "cores": cores,
            "concurrency": concurrency,
            "duration_s": duration_s,
            "warmup_s": warmup_s,
            "images": len(uuids),
            "photos": photos_note or f"{len(uuids)} objects",
            "start_s": round(ready_s, 1),
            **measured,
        }
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
        leftover = _wait_gone(_descendant_pids() - before, timeout_s=15.0)
        shutil.rmtree(temp_dir, ignore_errors=True)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    result["leftover_processes"] = len(leftover)
    return result


async def _load(front_door: str, handle: Any, port: int, uuids: list[str], tiers: dict[str, Tier], *,
                concurrency: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    cycle = itertools.cycle(uuids)
    if front_door == "handle":

        async def by_handle() -> dict[str, Any]:
            answer: dict[str, Any] = await handle.classify.remote(next(cycle))
            return answer

        return await _drive(by_handle, tiers, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s)

    import aiohttp

    url = f"http://{HOST}:{port}{ROUTE}"
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as http:

        async def by_http() -> dict[str, Any]:
            async with http.post(url, json={"image_uuid": next(cycle)}) as response:
                if response.status != 200:
                    raise FlotillaError(f"HTTP {response.status}: {(await response.text())[:200]}")
                answer: dict[str, Any] = await response.json()
                return answer

        return await _drive(by_http, tiers, concurrency=concurrency, duration_s=duration_s, warmup_s=warmup_s)


# -- standalone: `python -m flotilla.bench.peer_run` ----------------------------------

LARGE_NOTE = f"{LARGE_PHOTOS}, 8 copies each"


def run_local(
    *, replicas: int = 2, max_batch_size: int = 8, concurrency: int = CONCURRENCY, duration_s: float = 15.0,
    photos: Sequence[bytes] | None = None, run_dir: Path = Path(".flotilla/bench-peer"), **kw: Any,
) -> dict[str, Any]:
    """:func:`run_peer` against a SeaweedFS started here (and stopped after),
    on the CPU bench's large photos unless ``photos`` is given."""
    from flotilla.common.object_store import ObjectStore
    from flotilla.stack.components import seaweed_s3
    from flotilla.stack.local import S3_START_TIMEOUT_S, s3_ready
    from flotilla.stack.processes import free_port, wait_until

    photos = large_photos() if photos is None else photos
    if not photos:
        raise SystemExit("sample photos missing; run `make models`")
    s3 = S3Settings(endpoint=f"{HOST}:{free_port(HOST)}")
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    weed = seaweed_s3(s3, HOST, int(s3.endpoint.rsplit(":", 1)[1]), run_dir / "s3-data", run_dir / "logs" / "seaweedfs.log")
    weed.start()
    try:
        store = ObjectStore(s3, timeout_s=2.0, retries=0)
        wait_until(lambda: s3_ready(store), S3_START_TIMEOUT_S, "SeaweedFS S3", procs=[weed])
        kw.setdefault("photos_note", LARGE_NOTE)
        return run_peer(replicas=replicas, max_batch_size=max_batch_size, concurrency=concurrency,
                        duration_s=duration_s, photos=photos, s3=s3, **kw)
    finally:
        weed.stop()


def mesh_point(*, replicas: int, max_batch_size: int, concurrency: int, duration_s: float,
               photos: Sequence[bytes]) -> MeteredPoint:
    """The mesh as the CPU bench runs it (its stack settings and ``cpu_point``:
    the median of 3 windows of ``duration_s / 3``, every tier's CPU)."""
    from flotilla.clients.loadtest import StackTarget
    from flotilla.config import load_settings
    from flotilla.stack.local import LocalStack

    base = load_settings(BENCH_CONFIG)
    settings = base.model_copy(deep=True)
    settings.run_dir = base.run_dir.parent / "bench-peer-mesh"
    settings.models = {MODEL: settings.models[MODEL]}
    settings.triton.replicas = replicas
    settings.models[MODEL].batching.max_inflight_batches = BATCHES_IN_FLIGHT_PER_REPLICA * replicas
    settings.models[MODEL].min_copies = settings.models[MODEL].max_copies = replicas
    with LocalStack(settings) as stack:
        assert stack.state is not None
        state = stack.state

        async def drive() -> MeteredPoint:
            target = StackTarget(state)
            try:
                await target.set_max_batch_size(MODEL, max_batch_size)
                uuids = await target.upload_images(photos, copies=8)
                return await cpu_point(stack, target.mesh_call(MODEL, uuids), concurrency=concurrency,
                                       window_s=duration_s / 3)
            finally:
                await target.close()

        return asyncio.run(drive())


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flotilla.bench.peer_run", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--duration", type=float, default=15.0, help="measured seconds (after a 2 s warm-up)")
    parser.add_argument("--front-door", choices=FRONT_DOORS, default="http")
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="Ray Serve's high-throughput mode (RAY_SERVE_THROUGHPUT_OPTIMIZED=1, proxy kept)")
    parser.add_argument("--with-mesh", action="store_true",
                        help="first the mesh at the same point (a stack of its own), then the ratio")
    args = parser.parse_args(argv)
    if not ray_available():
        raise SystemExit("Ray Serve is not installed: .venv/bin/pip install -e '.[peer]'")
    logging.basicConfig(level=logging.WARNING)
    photos = large_photos()
    point = {"replicas": args.replicas, "max_batch_size": args.batch_size, "concurrency": args.concurrency,
             "duration_s": args.duration}
    out: dict[str, Any] = {}
    # What Ray and the stack print while they run goes to stderr: stdout is the JSON.
    with contextlib.redirect_stdout(sys.stderr):
        if args.with_mesh:
            out["flotilla"] = mesh_point(**point, photos=photos)
        out["ray_serve"] = run_local(**point, photos=photos, front_door=args.front_door,
                                     throughput_optimized=args.throughput_optimized)
    print(json.dumps(out, indent=2))
    if args.with_mesh:
        mesh = out["flotilla"]
        lines = peer_lines(out["ray_serve"], mesh["images_per_s"], mesh["p99_ms"], mesh["cpu_us_per_image"]["total"])
        print("\n".join(lines), file=sys.stderr)


if __name__ == "__main__":
    main()
