"""The bench's CPU part (``flotilla bench --only cpu``, part of `make bench`): CPU per image by tier.

The saturated mesh (R = 2, max_batch_size 8, concurrency 64) on the 1-2 MP
photos and on the small samples, every tier's CPU from its processes' own
counters (:mod:`flotilla.bench.meter`), and the mesh against the physical
limit on the same large photos, measured before the stack starts and after it
stops (``mesh_vs_limit``; what the limit is and how it is measured:
:mod:`flotilla.bench.limit`).
"""

from __future__ import annotations

import asyncio
import io
import os
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from flotilla.bench.front_loads import classify_bodies, classify_stream_load
from flotilla.bench.inputs import LARGE_PHOTOS, large_photos, small_photos
from flotilla.bench.limit import bracketed, physical_limit
from flotilla.bench.meter import LOAD_GENERATOR, MODEL_STUBS, TIER_ORDER, MeteredPoint, Tier, metered_load
from flotilla.clients.loadtest import StackTarget
from flotilla.config import FlotillaSettings
from flotilla.stack.local import LocalStack
from flotilla.stack.processes import ManagedProcess

LARGE_OVER_STREAM = "large over stream"
"""The point driven over ClassifyStream (the rest are unary Classify calls)."""
STREAMS = 4
"""ClassifyStream streams the stream point spreads its requests over (each on its own connection, its
share of the closed loop's callers keeping to it: ``front_loads.StreamLoad``)."""


def stack_tiers(stack: LocalStack) -> dict[str, Tier]:
    """The running stack's processes by tier; this process is the load generator."""

    def pids(*procs: ManagedProcess | None) -> list[int]:
        return [p.pid for p in procs if p is not None and p.pid is not None]

    return {
        "router": Tier(pids(*stack.routers)),
        "batcher": Tier(pids(*stack.batcher_processes())),
        "worker": Tier(pids(*stack.preprocess)),
        "triton server": Tier(pids(*stack.tritons), children_to=MODEL_STUBS),
        "s3": Tier(pids(stack.s3)),
        "controller": Tier(pids(stack.controller)),
        LOAD_GENERATOR: Tier([os.getpid()], descendants=False),
    }


WORKER_DECODE = "worker: decode threads"
DECODE_CPU_METRIC = "flotilla_preprocess_decode_cpu_seconds_total"


def counter_total(address: str, sample: str) -> float:
    """The sum of a counter's samples named ``sample`` (every label set) on a service's /metrics page."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5.0) as page:
        text = page.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == sample)


def worker_decode_cpu(stack: LocalStack) -> Callable[[], float]:
    """The CPU seconds the stack's workers' decode threads have spent decoding (their own counter)."""
    addresses = [p.metrics_address for p in stack.preprocess if p.metrics_address]
    return lambda: sum(counter_total(address, DECODE_CPU_METRIC) for address in addresses)


async def cpu_point(
    stack: LocalStack, call: Callable[[], Awaitable[object]], *, concurrency: int, window_s: float,
    items_per_call: int = 1,
) -> MeteredPoint:
    """The mesh under a closed loop, every tier's CPU per image (median of 3 windows), and how
    much of the worker's CPU its decode threads spent decoding."""
    return await metered_load(
        stack_tiers(stack), call, concurrency=concurrency, window_s=window_s,
        counters={WORKER_DECODE: worker_decode_cpu(stack)}, items_per_call=items_per_call,
    )


class PhotoSetPoint(MeteredPoint):
    """A point of :func:`run`: the metered load, and the photos it ran on."""

    photos: str
    photo_megapixels: list[float]


def run(
    base: FlotillaSettings, model: str, *, duration_s: float = 10.0, replicas: int = 2, batch_size: int = 8
) -> dict[str, object]:
    """The saturated mesh (R replicas, max_batch_size, concurrency 2 x slots x
    batch) on the 1-2 MP photos and on the small samples, every tier's CPU per
    image, and the physical limit on the same large photos in the same run."""
    large = large_photos()
    small = small_photos()
    settings = base.model_copy(deep=True)
    # A run directory of its own: the registry there holds only this part's models.
    settings.run_dir = base.run_dir.parent / "bench-cpu"
    settings.models = {model: settings.models[model]}
    settings.triton.replicas = replicas
    settings.models[model].batching.max_inflight_batches = 2 * replicas
    settings.models[model].min_copies = settings.models[model].max_copies = replicas
    concurrency = 2 * 2 * replicas * batch_size
    # Before the stack starts and after it stops: nothing else on the cores.
    before = physical_limit(settings, model, large, batch_size)
    points: dict[str, PhotoSetPoint] = {}
    print(f"cpu: starting a stack with {replicas} Triton replicas ...", flush=True)
    with LocalStack(settings) as stack:
        assert stack.state is not None
        state = stack.state

        async def drive() -> None:
            target = StackTarget(state)
            try:
                await target.set_max_batch_size(model, batch_size)
                for name, photos in (("large", large), ("small", small), (LARGE_OVER_STREAM, large)):
                    uuids = await target.upload_images(photos, copies=8)
                    stream = None
                    if name == LARGE_OVER_STREAM:
                        bodies = classify_bodies(model, uuids, top_k=0)
                        stream = classify_stream_load(state.router, STREAMS, model, state.api_key, bodies)
                    call = stream if stream is not None else target.mesh_call(model, uuids)
                    try:
                        point = await cpu_point(stack, call, concurrency=concurrency, window_s=duration_s)
                    finally:
                        if stream is not None:
                            await stream.close()
                    points[name] = {
                        **point,
                        "photos": "build/samples/*.jpg (small)" if name == "small" else LARGE_PHOTOS,
                        "photo_megapixels": [round(w * h / 1e6, 2) for w, h in (_size(p) for p in photos)],
                    }
            finally:
                await target.close()

        asyncio.run(drive())
    limit = bracketed(before, physical_limit(settings, model, large, batch_size))
    mesh = float(points["large"]["images_per_s"])
    return {
        "model": model,
        "replicas": replicas,
        "max_batch_size": batch_size,
        "window_s": duration_s,
        "windows": 3,
        "limit": {**limit, "photos": LARGE_PHOTOS},
        "points": points,
        "mesh_vs_limit": round(mesh / float(limit["limit_images_per_s"]), 3),
        "mesh_vs_limit_over_stream": round(
            float(points[LARGE_OVER_STREAM]["images_per_s"]) / float(limit["limit_images_per_s"]), 3
        ),
    }


def _size(photo: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(photo)) as im:
        return im.size


# -- its figures in bench/results.json's summary and the results page (docs/benchmarks.md) --


def beyond_decode_ms(point: object) -> tuple[float, float] | None:
    """A point's worker CPU per image less its decode threads' own CPU in the same windows (all the
    worker spends on anything else), and that decode CPU, in ms; None without the decode counter."""
    if not isinstance(point, dict):
        return None
    decode_us = point.get("counted_cpu_us_per_image", {}).get(WORKER_DECODE)
    if decode_us is None:
        return None
    return (point["cpu_us_per_image"]["worker"] - decode_us) / 1000.0, decode_us / 1000.0


def summary(cpu: dict[str, Any]) -> dict[str, object]:
    """The figures issue 9's targets are stated in, from :func:`run`'s result."""
    large = cpu["points"]["large"]
    per_image = large["cpu_us_per_image"]
    beyond = beyond_decode_ms(large)
    return {
        "mesh_vs_limit": cpu["mesh_vs_limit"],
        "mesh_images_per_s_large_photos": large["images_per_s"],
        "limit_images_per_s_large_photos": cpu["limit"]["limit_images_per_s"],
        **{f"{tier}_cpu_us_per_image_large_photos": per_image.get(tier) for tier in ("router", "batcher", "worker")},
        **({"worker_overhead_beyond_decode_ms": round(beyond[0], 2),
            "worker_decode_cpu_ms_per_image_in_mesh": round(beyond[1], 2)} if beyond is not None else {}),
        # The worker's CPU less decode measured alone on an idle core before the stack started (a
        # result from before the limit was measured with every core busy has only that decode figure).
        "worker_minus_idle_core_decode_ms": round(
            per_image["worker"] / 1000.0
            - cpu["limit"].get("decode_cpu_ms_per_image_alone", cpu["limit"]["decode_cpu_ms_per_image"]), 2
        ),
        "mesh_vs_limit_ceiling_here": mesh_vs_limit_ceiling(cpu),
        # How far the limit after the stack lies from the one before it (a fraction; absent: measured once).
        **({"limit_drift": cpu["limit"]["drift"]} if "drift" in cpu["limit"] else {}),
        **({
            # The same load on ClassifyStream (issue 23: >= 0.9 of the ceiling here).
            "mesh_vs_limit_over_stream": cpu["mesh_vs_limit_over_stream"],
            "mesh_vs_limit_ceiling_here_over_stream": mesh_vs_limit_ceiling(cpu, LARGE_OVER_STREAM),
            "mesh_vs_limit_over_stream_of_ceiling_here": round(stream_of_its_ceiling(cpu), 3),
            "router_cpu_us_per_image_large_photos_over_stream":
                cpu["points"][LARGE_OVER_STREAM]["cpu_us_per_image"].get("router"),
            # How far Flotilla's own code can take it: the same point with that code's CPU at zero.
            "flotilla_cpu_us_per_image_large_photos_over_stream":
                flotilla_cpu_us_per_image(cpu["points"][LARGE_OVER_STREAM]),
            "mesh_vs_limit_over_stream_of_ceiling_here_if_flotilla_free":
                of_ceiling_if_flotilla_free(cpu, LARGE_OVER_STREAM),
        } if LARGE_OVER_STREAM in cpu["points"] else {}),
    }


FLOTILLA_PROCESSES = ("router", "batcher", "controller")
"""Tiers whose processes do only Flotilla's work (the worker's also decodes: only its CPU beyond decode
is Flotilla's own)."""


def flotilla_cpu_us_per_image(point: dict[str, Any]) -> float | None:
    """The CPU per image of Flotilla's own work at a point: its router, batcher and controller
    processes and the worker's CPU beyond its decode threads; None without the decode counter."""
    beyond = beyond_decode_ms(point)
    if beyond is None:
        return None
    per_image = point["cpu_us_per_image"]
    return round(float(sum(per_image.get(tier, 0.0) for tier in FLOTILLA_PROCESSES)) + beyond[0] * 1000.0, 1)


def of_ceiling_if_flotilla_free(cpu: dict[str, Any], name: str) -> float | None:
    """What share of the ceiling here point ``name`` would reach were Flotilla's own work free (its
    CPU per image, ``flotilla_cpu_us_per_image``, at zero, the rest as measured): on saturated cores
    images/s go as the inverse of the CPU per image. The part of the gap to the ceiling no change to
    Flotilla's code can close is what stays: the model's stubs and the decode running slower beside
    each other and everything else than in the limit's measurement, and Triton's server."""
    point = cpu["points"].get(name)
    flotilla = flotilla_cpu_us_per_image(point) if point is not None else None
    if point is None or flotilla is None:
        return None
    total = float(point["cpu_us_per_image"]["total"])
    images_per_s = float(point["images_per_s"]) * total / (total - flotilla)
    return round(images_per_s / float(cpu["limit"]["limit_images_per_s"]) / mesh_vs_limit_ceiling(cpu, name), 3)


def mesh_vs_limit_ceiling(cpu: dict[str, Any], name: str = "large") -> float:
    """The best mesh_vs_limit this machine allows at point ``name`` with the same S3 store and load
    generator: every Flotilla tier, Triton's server and the model's stub overhead at zero, so the cores
    carry only the model and decode at the limit's cost (measured with every core running them at
    once, as in the mesh) plus what S3 and that point's load generator measured per image there (they
    share the cores; the limit assumes the cores carry nothing else). Each point is held against its
    own: the stream point's load generator costs less per image than the unary point's (2026-12-07:
    177 against 265 CPU-µs), and the unary point's ceiling would credit the stream point with that
    difference (0.914 against its own 0.920)."""
    limit_us: float = (cpu["limit"]["model_cpu_ms_per_image"] + cpu["limit"]["decode_cpu_ms_per_image"]) * 1000.0
    per_image = cpu["points"][name]["cpu_us_per_image"]
    outside_us: float = per_image.get("s3", 0.0) + per_image.get(LOAD_GENERATOR, 0.0)
    return round(limit_us / (limit_us + outside_us), 3)


def stream_of_its_ceiling(cpu: dict[str, Any]) -> float:
    """The stream point's mesh_vs_limit as a share of its own ceiling (issue 23's figure)."""
    return float(cpu["mesh_vs_limit_over_stream"]) / mesh_vs_limit_ceiling(cpu, LARGE_OVER_STREAM)


def _cores_busy(limit: dict[str, Any]) -> bool:
    """Whether the limit was measured with every core running the model and decode at once (results
    from before that have only the one-process figures)."""
    return "measured_with_cores_busy" in limit


def mesh_vs_limit_row(cpu: dict[str, Any]) -> list[str]:
    """The results page's figure that replaced the old "mesh efficiency"."""
    limit, large = cpu["limit"], cpu["points"]["large"]
    busy = _cores_busy(limit)
    return [
        f"| mesh_vs_limit (1-2 MP photos `build/samples/large/*.jpg`, R={cpu['replicas']}, max_batch_size "
        f"{cpu['max_batch_size']}, c={large['concurrency']}): mesh img/s / ({limit['cores']} cores / (ONNX Runtime "
        "+ decode CPU-s per image"
        + (f", measured with all {limit['measured_with_cores_busy']} cores running both at once; alone: one "
           "process, the other cores idle" if busy else "")
        + (f"; the means of the limit measured before the stack and after it, {limit['before']['limit_images_per_s']} "
           f"and {limit['after']['limit_images_per_s']} images/s" if "after" in limit else "") + ")) | "
        f"{large['images_per_s']} / ({limit['cores']} / ({limit['model_cpu_ms_per_image']} + "
        f"{limit['decode_cpu_ms_per_image']} ms"
        + (f"; alone {limit['model_cpu_ms_per_image_alone']} + {limit['decode_cpu_ms_per_image_alone']} ms"
           if busy else "")
        + f")) = {large['images_per_s']} / {limit['limit_images_per_s']} = **{cpu['mesh_vs_limit']}** |",
        *([
            f"| mesh_vs_limit over ClassifyStream (the same load on {STREAMS} streams instead of unary calls) | "
            f"{cpu['points'][LARGE_OVER_STREAM]['images_per_s']} / {limit['limit_images_per_s']} "
            f"= **{cpu['mesh_vs_limit_over_stream']}** ({stream_of_its_ceiling(cpu):.3f} of its ceiling here, "
            f"{mesh_vs_limit_ceiling(cpu, LARGE_OVER_STREAM):.3f}, from its own S3 and load generator) |",
            *_if_flotilla_free_row(cpu),
        ] if LARGE_OVER_STREAM in cpu["points"] else []),
    ]


def _if_flotilla_free_row(cpu: dict[str, Any]) -> list[str]:
    point, limit = cpu["points"][LARGE_OVER_STREAM], cpu["limit"]
    free, flotilla = of_ceiling_if_flotilla_free(cpu, LARGE_OVER_STREAM), flotilla_cpu_us_per_image(point)
    beyond = beyond_decode_ms(point)
    if free is None or flotilla is None or beyond is None:
        return []
    per_image = point["cpu_us_per_image"]
    return [
        f"| the same over ClassifyStream were Flotilla's own work free (router, batcher, controller and the worker "
        f"beyond decode, {flotilla:.0f} CPU-µs per image, at zero; the rest as measured) | **{free}** of the ceiling "
        f"here; what stays: the model's stubs at {per_image.get(MODEL_STUBS, 0.0) / 1000:.2f} CPU-ms per image "
        f"against the limit's {limit['model_cpu_ms_per_image']}, the decode at {beyond[1]:.2f} against "
        f"{limit['decode_cpu_ms_per_image']}, Triton's server {per_image.get('triton server', 0.0):.0f} µs |",
    ]


def _when_measured(limit: dict[str, Any]) -> str:
    """When the run measured its limit: before the stack started, or before and after (then the means)."""
    if "after" not in limit:
        return "before the stack starts"
    return (f"before the stack started and after it stopped, the means of the two (limits "
            f"{limit['before']['limit_images_per_s']} and {limit['after']['limit_images_per_s']} images/s, "
            f"drift {limit['drift']:+.1%})")


def readme_lines(cpu: dict[str, Any]) -> list[str]:
    """The results page's CPU-per-tier table."""
    limit, large, small = cpu["limit"], cpu["points"]["large"], cpu["points"]["small"]
    streamed = cpu["points"].get(LARGE_OVER_STREAM, {"cpu_us_per_image": {}})
    rows = [
        f"| {tier} | {large['cpu_us_per_image'].get(tier, '-')} | {small['cpu_us_per_image'].get(tier, '-')} | "
        f"{streamed['cpu_us_per_image'].get(tier, '-')} |"
        for tier in (*TIER_ORDER, "total")
    ]
    return [
        f"CPU per image by tier ({cpu.get('measured_at', 'this run')}): the saturated mesh, R={cpu['replicas']}, "
        f"max_batch_size={cpu['max_batch_size']}, concurrency {large['concurrency']}; medians of "
        f"{cpu.get('windows', 1)} windows of {cpu['window_s']:.0f} s per photo set; each process's own user+system "
        "CPU time (psutil, which reads /proc/PID/stat), its children included (Triton's Python-backend stubs counted apart, as model stubs). "
        f"Limit: ONNX Runtime (1 intra-op thread, as each replica runs; batch {limit['batch_size']}) and "
        "decode_for_model, CPU per image, on the large photos, in the same run "
        + _when_measured(limit)
        + (f": measured with every core running them at once ({limit['measured_with_cores_busy']} processes, "
           f"each running one batch then decoding {limit['batch_size']} photos, in turn, as the mesh does; the "
           "means over the processes), the limit's figures; beside them (alone) the same in one process with "
           "the other cores idle." if _cores_busy(limit) else ", in-process."),
        "",
        "| CPU-µs per image | 1-2 MP photos (`build/samples/large/*.jpg`) | small samples (`build/samples/*.jpg`) | "
        "1-2 MP photos over ClassifyStream |",
        "|---|---|---|---|",
        f"| images/s | {large['images_per_s']} | {small['images_per_s']} | {streamed.get('images_per_s', '-')} |",
        f"| cores busy: whole machine / counted in these tiers | {large.get('cores_busy_machine', '-')} / "
        f"{large.get('cores_counted_tiers', '-')} | {small.get('cores_busy_machine', '-')} / "
        f"{small.get('cores_counted_tiers', '-')} | {streamed.get('cores_busy_machine', '-')} / "
        f"{streamed.get('cores_counted_tiers', '-')} |",
        *rows,
        f"| of the worker: its decode threads (its own thread-CPU counter) | "
        f"{large.get('counted_cpu_us_per_image', {}).get(WORKER_DECODE, '-')} | "
        f"{small.get('counted_cpu_us_per_image', {}).get(WORKER_DECODE, '-')} | "
        f"{streamed.get('counted_cpu_us_per_image', {}).get(WORKER_DECODE, '-')} |",
        *([f"| limit: ONNX Runtime / decode, CPU-ms per image, every core busy (alone) | "
           f"{limit['model_cpu_ms_per_image']} / {limit['decode_cpu_ms_per_image']} "
           f"({limit['model_cpu_ms_per_image_alone']} / {limit['decode_cpu_ms_per_image_alone']}) | | |"]
          if _cores_busy(limit) else
          [f"| limit: ONNX Runtime / decode, CPU-ms per image | {limit['model_cpu_ms_per_image']} / "
           f"{limit['decode_cpu_ms_per_image']} | | |"]),
        "",
    ]
