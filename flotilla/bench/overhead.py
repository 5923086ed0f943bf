"""What the mesh itself costs: a near-free model and small JPEGs (`flotilla bench --only overhead`).

The model (``flotilla.modelbuild.nearfree``) has EfficientNet-Lite0's
signature (``images: UINT8 [-1, 224, 224, 3] -> probabilities: FP32
[-1, 1000]``) and costs a few microseconds per image, and the photos are the
samples re-encoded at 64 x 64, so decode and model are nearly free and what
is left is the mesh: router, batcher, worker (S3 fetch, decode, Triton
request), Triton server and its Python-backend stub, S3.

In one run, on one stack (the model deployed through the registry, a copy
on every replica):

1. the mesh at saturation (closed loop, ``max_batch_size`` 8, concurrency
   64): requests/s and every tier's CPU-µs per request;
2. Triton alone, driven directly with tritonclient: requests of 8 images (the
   batch the mesh forms, in system shared memory as the worker sends it) with
   8 in flight (the mesh's 64 images in flight), round-robin over the
   replicas: images/s and its CPU per image, the ceiling the mesh is
   measured against;
3. before the stack starts, decoding the small photos to the model's input on
   an idle core (the part of the worker's cost that is the job itself: a
   floor of the near-free target's budget);
4. the projected cores of mesh CPU per 10 000 images/s: the mesh's CPU-s per
   image (every tier but the load generator) x 10 000; also without the
   model stubs (on a GPU host the model's CPU would not be the mesh's).
"""

from __future__ import annotations

import asyncio
import io
import itertools
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc.aio as triton_aio
from PIL import Image

from flotilla.bench.cpu import beyond_decode_ms, cpu_point, stack_tiers
from flotilla.bench.front_loads import FRONT_DOORS, front_door_load
from flotilla.bench.inputs import LARGE_PHOTOS, SAMPLES, large_photos
from flotilla.bench.limit import decode_cpu_ms_per_image
from flotilla.bench.meter import LOAD_GENERATOR, MODEL_STUBS, TIER_ORDER, MeteredPoint, metered_load
from flotilla.clients.loadtest import StackTarget
from flotilla.config import FlotillaSettings, ModelSettings
from flotilla.services.preprocess.triton.shm import SharedMemoryRegions
from flotilla.stack.local import LocalStack

NEAR_FREE = "near-free"
ARTIFACT = Path("build/models") / NEAR_FREE
SMALL_SIDE_PX = 64
BATCH_SIZE = 8
CONCURRENCY = 64
PROJECTED_IMAGES_PER_S = 10_000


DOOR_CONNECTIONS = 4
"""Client connections (streams, channels) each front door's load spreads over."""


def ensure_model(artifact: Path = ARTIFACT) -> Path:
    """Build the near-free model with the build virtualenv's onnx if it is missing."""
    if not (artifact / "1" / "model.onnx").exists():
        python = Path(".venv-build/bin/python")
        if not python.exists():
            python = Path(sys.executable)  # onnx may be installed here too
        subprocess.run([str(python), "-m", "flotilla.modelbuild.nearfree", "--out", str(artifact)], check=True)
    return artifact


def small_jpegs(side_px: int = SMALL_SIDE_PX) -> list[bytes]:
    """The sample photos re-encoded at ``side_px`` x ``side_px``."""
    out = []
    for path in sorted(SAMPLES.glob("*.jpg")):
        with Image.open(path) as im:
            buffer = io.BytesIO()
            im.convert("RGB").resize((side_px, side_px), Image.Resampling.BILINEAR).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def near_free_spec(base: ModelSettings, replicas: int) -> ModelSettings:
    """EfficientNet-Lite0's spec (input, output, batching) on the near-free artifact."""
    spec = base.model_copy(deep=True)
    spec.artifact = ARTIFACT
    spec.storage_uri = ""
    spec.memory_mb = 50.0
    spec.labels_file = None
    spec.labels = []
    spec.backend_model = None
    spec.batching.max_batch_size = BATCH_SIZE
    spec.batching.max_inflight_batches = 2 * replicas
    spec.min_copies = spec.max_copies = replicas
    return spec


class TritonAlonePoint(MeteredPoint):
    """:func:`triton_alone`'s point: the metered load, in requests of ``batch_size`` images."""

    batch_size: int
    concurrency_requests: int
    requests_per_s: float


async def triton_alone(stack: LocalStack, *, batch_size: int, concurrency: int, window_s: float) -> TritonAlonePoint:
    """Batches of ``batch_size`` straight to Triton, ``concurrency`` in flight, with
    Triton's and the load generator's CPU (medians of 3 windows). The batch is in one
    system-shared-memory region registered with every replica, as the mesh's worker
    sends its batches to replicas on its host (Triton only reads it, so every call
    may name the same region)."""
    assert stack.state is not None
    clients = [triton_aio.InferenceServerClient(a) for a in stack.state.triton]
    tensor = np.random.default_rng(0).integers(0, 256, (batch_size, 224, 224, 3), dtype=np.uint8)
    regions = SharedMemoryRegions("flotilla-bench-", max_bytes=tensor.nbytes + (64 << 20))
    region = regions.acquire(tensor.nbytes)
    assert region is not None
    region.write(tensor.data)
    inputs = triton_aio.InferInput("images", list(tensor.shape), "UINT8")
    inputs.set_shared_memory(region.name, tensor.nbytes)
    outputs = [triton_aio.InferRequestedOutput("probabilities")]
    ring = itertools.cycle(clients)

    async def call() -> object:
        return await next(ring).infer(NEAR_FREE, [inputs], outputs=outputs)

    tiers = {k: v for k, v in stack_tiers(stack).items() if k in ("triton server", LOAD_GENERATOR)}
    try:
        for client in clients:
            await client.register_system_shared_memory(region.name, region.key, region.nbytes)
        point = await metered_load(tiers, call, concurrency=concurrency, window_s=window_s, items_per_call=batch_size)
    finally:
        for client in clients:
            await client.unregister_system_shared_memory(region.name)
            await client.close()
        regions.close()
    return {
        "batch_size": batch_size,
        "concurrency_requests": concurrency,
        "requests_per_s": round(float(point["images_per_s"]) / batch_size, 1),
        **point,
    }


def run(base: FlotillaSettings, *, duration_s: float = 10.0, replicas: int = 2) -> dict[str, object]:
    ensure_model()
    photos = small_jpegs()
    settings = base.model_copy(deep=True)
    # A run directory of its own: the registry there holds only this part's models.
    settings.run_dir = base.run_dir.parent / "bench-overhead"
    settings.triton.replicas = replicas
    template = next(iter(settings.models.values()))
    settings.models = {}  # deployed below through the registry, as an operator would
    spec = near_free_spec(template, replicas)
    decode_us = 1000.0 * decode_cpu_ms_per_image(photos, spec.input, settings.preprocess.max_image_pixels)
    out: dict[str, MeteredPoint] = {}
    print(f"overhead: starting a stack with {replicas} Triton replicas ...", flush=True)
    with LocalStack(settings) as stack:
        stack.deploy(NEAR_FREE, spec)
        assert stack.state is not None
        state = stack.state
        state.models = [NEAR_FREE]

        async def drive() -> None:
            target = StackTarget(state)
            try:
                await target.set_max_batch_size(NEAR_FREE, BATCH_SIZE)
                uuids = await target.upload_images(photos, copies=8)
                out["mesh"] = await cpu_point(
                    stack, target.mesh_call(NEAR_FREE, uuids), concurrency=CONCURRENCY, window_s=duration_s
                )
                # The same load through each other front door of the router (issue 23): requests/s of the
                # near-free mesh and the router's CPU per image, each door in the same run and stack.
                for api, images in FRONT_DOORS:
                    load = front_door_load(
                        api, images, router=state.router, router_http=state.router_http, connections=DOOR_CONNECTIONS,
                        model=NEAR_FREE, api_key=state.api_key, uuids=uuids,
                    )
                    try:
                        out[door_key(api, images)] = await cpu_point(
                            stack, load, concurrency=max(1, CONCURRENCY // images), window_s=duration_s / 2,
                            items_per_call=images,
                        )
                    finally:
                        await load.close()
                # The worker on 1-2 MP photos with no model beside it on the cores: its overhead beyond
                # decode without the model's contention.
                large = await target.upload_images(large_photos(), copies=8)
                out["mesh_large_photos"] = await cpu_point(
                    stack, target.mesh_call(NEAR_FREE, large), concurrency=CONCURRENCY, window_s=duration_s / 2
                )
                # The worker alone at its ceiling, as the ceiling part measures the router and the batcher:
                # batches straight to it, as many in flight as its batcher would keep, no router or batcher.
                out["worker_alone_large_photos"] = await cpu_point(
                    stack, target.direct_call(NEAR_FREE, large, BATCH_SIZE),
                    concurrency=spec.batching.max_inflight_batches, window_s=duration_s / 2,
                    items_per_call=BATCH_SIZE,
                )
                out["triton_alone"] = await triton_alone(
                    stack, batch_size=BATCH_SIZE, concurrency=CONCURRENCY // BATCH_SIZE, window_s=duration_s
                )
            finally:
                await target.close()

        asyncio.run(drive())
    mesh = out["mesh"]
    per_request = mesh["cpu_us_per_image"]
    mesh_us = sum(v for k, v in per_request.items() if k in TIER_ORDER and k != LOAD_GENERATOR)
    without_model_us = mesh_us - per_request.get(MODEL_STUBS, 0.0)
    alone = out["triton_alone"]
    return {
        "model": f"{NEAR_FREE} (EfficientNet-Lite0's signature, ~1 µs/image in ONNX Runtime)",
        "photos": f"build/samples/*.jpg re-encoded at {SMALL_SIDE_PX}x{SMALL_SIDE_PX}",
        "replicas": replicas,
        "max_batch_size": BATCH_SIZE,
        "concurrency": CONCURRENCY,
        "window_s": duration_s,
        "windows": 3,
        "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mesh": {**mesh, "cpu_us_per_request": per_request},
        "mesh_large_photos": {**out["mesh_large_photos"], "photos": LARGE_PHOTOS},
        "worker_alone_large_photos": {
            **out["worker_alone_large_photos"], "photos": LARGE_PHOTOS,
            "batch_size": BATCH_SIZE, "batches_in_flight": spec.batching.max_inflight_batches,
        },
        "triton_alone": alone,
        "front_doors": {
            key: {"api": api, "images_per_request": images, **out[key]}
            for api, images in FRONT_DOORS if (key := door_key(api, images)) in out
        },
        "mesh_vs_triton_alone": round(float(mesh["images_per_s"]) / float(alone["images_per_s"]), 3),
        "decode_cpu_us_per_image_idle_core": round(decode_us, 1),
        "mesh_cpu_us_per_request": round(mesh_us, 1),
        "projected_cores_per_10k_images_per_s": round(mesh_us * PROJECTED_IMAGES_PER_S / 1e6, 1),
        "projected_cores_per_10k_images_per_s_without_model_stubs": round(
            without_model_us * PROJECTED_IMAGES_PER_S / 1e6, 1
        ),
    }


# -- its figures in bench/results.json's summary and the results page (docs/benchmarks.md) --


def door_key(api: str, images: int) -> str:
    return f"mesh_over_{api.replace('-', '_')}" + (f"_n{images}" if images > 1 else "")


def front_door_lines(overhead: dict[str, Any]) -> list[str]:
    """The near-free mesh through each front door: requests/s and the router's CPU per image."""
    doors = overhead.get("front_doors")
    if not doors:
        return []
    rows = [(p["api"], p["images_per_request"], p) for p in doors.values()]
    lines = [
        "",
        "The same near-free mesh through each of the router's front doors (same run, same stack, "
        f"{DOOR_CONNECTIONS} connections; N images a request, {CONCURRENCY} images in flight):",
        "",
        "| front door | N | images/s | router CPU-µs per image | batcher CPU-µs per image |",
        "|---|---|---|---|---|",
    ]
    for name, images, point in rows:
        per_image = point["cpu_us_per_image"]
        lines.append(
            f"| {name} | {images} | {point['images_per_s']} | **{per_image.get('router', '-')}** | "
            f"{per_image.get('batcher', '-')} |"
        )
    return lines


def summary(overhead: dict[str, Any]) -> dict[str, object]:
    """The figures issue 9's targets are stated in, from :func:`run`'s result."""
    mesh = overhead["mesh"]
    return {
        "near_free_mesh_requests_per_s": mesh["images_per_s"],
        "near_free_triton_alone_images_per_s": overhead["triton_alone"]["images_per_s"],
        "near_free_mesh_vs_triton_alone": overhead["mesh_vs_triton_alone"],
        "projected_cores_per_10k_images_per_s": overhead["projected_cores_per_10k_images_per_s"],
        **{
            f"near_free_{tier}_cpu_us_per_request": mesh["cpu_us_per_request"].get(tier)
            for tier in ("router", "batcher")
        },
        **large_photos_summary(overhead),
        **{
            f"near_free_{key}_images_per_s": point["images_per_s"]
            for key, point in overhead.get("front_doors", {}).items()
        },
        **{
            f"near_free_{key}_router_cpu_us_per_image": point["cpu_us_per_image"].get("router")
            for key, point in overhead.get("front_doors", {}).items()
        },
    }


def large_photos_summary(overhead: dict[str, Any]) -> dict[str, object]:
    """The worker on 1-2 MP photos beside the near-free model (in the mesh, and alone at its ceiling):
    its CPU per image less its decode threads'."""
    out: dict[str, object] = {}
    beside = beyond_decode_ms(overhead.get("mesh_large_photos"))
    if beside is not None:
        out["near_free_large_photos_images_per_s"] = overhead["mesh_large_photos"]["images_per_s"]
        out["near_free_large_photos_worker_overhead_beyond_decode_ms"] = round(beside[0], 2)
        out["near_free_large_photos_worker_decode_cpu_ms_per_image"] = round(beside[1], 2)
    alone = beyond_decode_ms(overhead.get("worker_alone_large_photos"))
    if alone is not None:
        out["worker_alone_images_per_s"] = overhead["worker_alone_large_photos"]["images_per_s"]
        out["worker_alone_overhead_beyond_decode_ms"] = round(alone[0], 2)
        out["worker_alone_decode_cpu_ms_per_image"] = round(alone[1], 2)
    return out


def readme_lines(overhead: dict[str, Any]) -> list[str]:
    """The results page's near-free-model table."""
    mesh, alone = overhead["mesh"], overhead["triton_alone"]
    per_request = " / ".join(str(mesh["cpu_us_per_request"].get(t, "-")) for t in TIER_ORDER)
    alone_us = alone["cpu_us_per_image"]
    return [
        f"Mesh overhead ({overhead.get('measured_at', 'this run')}): a near-free model with EfficientNet-Lite0's "
        f"signature, {overhead['photos']}, R={overhead['replicas']}, max_batch_size={overhead['max_batch_size']}, "
        f"concurrency {overhead['concurrency']}, medians of {overhead.get('windows', 1)} windows of "
        f"{overhead['window_s']:.0f} s; Triton alone in the same run and stack: requests of {alone['batch_size']} "
        f"images (one system-shared-memory region, as the worker sends them) straight to the replicas, "
        f"{alone['concurrency_requests']} in flight "
        f"({alone['batch_size'] * alone['concurrency_requests']} images, as the mesh's {overhead['concurrency']}).",
        "",
        "| near-free model | value |",
        "|---|---|",
        f"| mesh requests/s / Triton alone images/s | {mesh['images_per_s']} / {alone['images_per_s']} "
        f"= **{overhead['mesh_vs_triton_alone']}** |",
        f"| mesh CPU-µs per request: {', '.join(TIER_ORDER)} | {per_request} |",
        f"| cores busy, mesh / Triton alone: whole machine / counted in the tiers | "
        f"{mesh.get('cores_busy_machine', '-')} / {mesh.get('cores_counted_tiers', '-')}; "
        f"{alone.get('cores_busy_machine', '-')} / {alone.get('cores_counted_tiers', '-')} |",
        f"| decoding one of these photos to the model's 224x224 input on an idle core, CPU-µs | "
        f"{overhead.get('decode_cpu_us_per_image_idle_core', '-')} |",
        f"| Triton alone CPU-µs per image: triton server / model stubs / load generator | "
        f"{alone_us.get('triton server', '-')} / {alone_us.get(MODEL_STUBS, '-')} / {alone_us.get(LOAD_GENERATOR, '-')} |",
        "| projected cores of mesh CPU per 10 000 images/s (every tier but the load generator; without the model "
        f"stubs) | **{overhead['projected_cores_per_10k_images_per_s']}**; "
        f"{overhead['projected_cores_per_10k_images_per_s_without_model_stubs']} |",
        *large_photos_lines(overhead),
        *front_door_lines(overhead),
        "",
    ]


def large_photos_lines(overhead: dict[str, Any]) -> list[str]:
    figures = large_photos_summary(overhead)
    lines = []
    if "near_free_large_photos_worker_overhead_beyond_decode_ms" in figures:
        point = overhead["mesh_large_photos"]
        per_image = " / ".join(str(point["cpu_us_per_image"].get(t, "-")) for t in TIER_ORDER)
        lines += [
            f"| the same model on {point['photos']}: images/s; CPU-µs per image: {', '.join(TIER_ORDER)} | "
            f"{point['images_per_s']}; {per_image} |",
            "| of that worker: its decode threads' CPU / the rest (its overhead beyond decode, no model on the "
            f"cores), ms per image | {figures['near_free_large_photos_worker_decode_cpu_ms_per_image']} / "
            f"**{figures['near_free_large_photos_worker_overhead_beyond_decode_ms']}** |",
        ]
    if "worker_alone_overhead_beyond_decode_ms" in figures:
        point = overhead["worker_alone_large_photos"]
        lines.append(
            f"| the worker alone at its ceiling (batches of {point['batch_size']} straight to it, "
            f"{point['batches_in_flight']} in flight, no router or batcher): images/s; its decode threads' CPU / "
            f"the rest, ms per image | {point['images_per_s']}; {figures['worker_alone_decode_cpu_ms_per_image']} / "
            f"**{figures['worker_alone_overhead_beyond_decode_ms']}** |"
        )
    return lines
