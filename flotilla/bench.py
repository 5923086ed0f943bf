"""`make bench`: what the batching tier buys, measured in one run.

1. Preprocessing per core: DCT-scaled decode + resize (the worker's path)
   against a naive full Pillow decode then resize, on 1-2 MP photos.
2. For R = 2 and R = 4 Triton replicas, a stack on this machine:
   - the mesh at saturation (closed loop) for several ``max_batch_size``;
   - the baseline at the same load: each request alone through a preprocess
     worker to round-robin Triton replicas with Triton's own dynamic batcher;
   - both below saturation (open loop), for queue wait and batch sizes;
   - (R = 2) latency at concurrency 1: through router and batcher, straight
     to the batcher, and straight to a preprocess worker.
3. CPU per image by tier and the physical limit (``flotilla.bench_cpu``,
   alone: ``--only cpu``): the saturated mesh (R = 2, max_batch_size 8,
   concurrency 64) on the 1-2 MP photos and on the small samples, every
   tier's CPU from its processes' own /proc counters, and ONNX Runtime plus
   decode CPU per image on the same large photos: ``mesh_vs_limit``.
4. The mesh's own overhead with a near-free model and 64 x 64 JPEGs against
   Triton alone (``flotilla.bench_overhead``, alone: ``--only overhead``).
5. The router and a model's batcher alone, each at its own ceiling
   (``flotilla.bench_ceiling``, alone: ``--only ceiling``): CPU-µs per
   request and requests/s on one core.
6. A peer: the CPU part's job (same photos, model, replicas, batch size and
   concurrency) on Ray Serve with ``@serve.batch`` (``flotilla.bench_peer``,
   alone: ``--only peer``; needs the ``peer`` extra, which `make bench`
   installs), against the CPU part's mesh point of the same run.

Writes ``bench/results.json``, ``bench/results.csv``, ``bench/loadtest.png``
and refreshes the results table in README.md. A benchmark, not a test: it
asserts nothing and reports what it measured.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from flotilla import bench_ceiling, bench_cpu, bench_fleet, bench_overhead, bench_peer
from flotilla.clients.loadgen import closed_loop
from flotilla.clients.loadtest import Row, StackTarget, format_table, measure, plot, write_csv
from flotilla.config import FlotillaSettings, load_settings
from flotilla.modelbuild.catalog import EFFICIENTNET_LITE0, TRITON_MAX_QUEUE_DELAY_US
from flotilla.services.preprocess.imaging import decode_for_model
from flotilla.stack.local import LocalStack

MODEL = EFFICIENTNET_LITE0
BENCH_CONFIG = Path("bench/flotilla-bench.yaml")
OUT = Path("bench")
README = Path("README.md")
SATURATION_BATCH_SIZES = (8, 16)
BELOW_SATURATION_LOAD = 0.25
ARRIVAL_LIMITED_LOAD = 0.7

"""Open-loop rate as a fraction of the mesh's saturated throughput."""
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
CPU_PARTS = ("cpu", "overhead", "ceiling", "peer")
"""The parts measured from the processes' CPU counters, in the order `make bench` runs them."""
NEAR_FREE_BEFORE_REQUESTS_PER_S = 482.1
"""Near-free mesh requests/s before issue 9's cuts: `make bench` at f0d52b1 (2026-11-23 12:05 UTC), this machine."""


# -- 1. preprocessing per core ---------------------------------------------------


def preprocessing_per_core(photos: list[bytes], settings: FlotillaSettings, rounds: int = 5) -> dict[str, float]:
    spec = settings.models[MODEL].input

    def naive(data: bytes) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB").resize((spec.width_px, spec.height_px), Image.Resampling.BILINEAR))

    def scaled(data: bytes) -> np.ndarray:
        return decode_for_model(data, spec, what="bench", max_pixels=10**9)

    rates = {}
    for name, fn in (("naive", naive), ("flotilla", scaled)):
        fn(photos[0])
        start = time.perf_counter()
        for _ in range(rounds):
            for photo in photos:
                fn(photo)
        rates[name] = rounds * len(photos) / (time.perf_counter() - start)
    # A worker decodes a batch on its decode threads (one per core): the decode releases the GIL, so one worker
    # process uses every core it is given. Same photos, all cores' worth of threads, wall clock.
    threads = os.cpu_count() or 1
    work = [photo for _ in range(rounds) for photo in photos]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(scaled, photos))  # warm the threads
        start = time.perf_counter()
        list(pool.map(scaled, work))
        threaded = len(work) / (time.perf_counter() - start)
    megapixels = [Image.open(io.BytesIO(p)).size for p in photos]
    return {
        "naive_images_per_s_per_core": round(rates["naive"], 1),
        "flotilla_images_per_s_per_core": round(rates["flotilla"], 1),
        "speedup": round(rates["flotilla"] / rates["naive"], 2),
        "threads": threads,
        "flotilla_images_per_s_threads": round(threaded, 1),
        "cores_used_by_threads": round(threaded / rates["flotilla"], 2),
        "photo_megapixels": [round(w * h / 1e6, 2) for w, h in megapixels],
    }


# -- 2. the stacks -------------------------------------------------------------------


async def bench_stack(
    target: StackTarget,
    settings: FlotillaSettings,
    photos: list[bytes],
    *,
    duration_s: float,
    first: bool,
    named: dict[str, Row],
) -> tuple[list[Row], dict[str, float]]:
    """Run one stack's load points; the ones the summary reads are also kept in ``named``."""
    uuids = await target.upload_images(photos, copies=8)
    rows: list[Row] = []
    extra: dict[str, float] = {}
    bar = tqdm(unit="req", desc=f"R={len(target.state.triton)}", leave=False)

    replicas = len(target.state.triton)

    async def point(name: str, **kw) -> Row:  # type: ignore[no-untyped-def]
        row = await measure(target, model=MODEL, duration_s=duration_s, on_done=lambda: bar.update(1), **kw)
        rows.append(row)
        named[f"R{replicas}_{name}"] = row
        return row

    mesh = target.mesh_call(MODEL, uuids)
    baseline = target.direct_call(MODEL + "-tritonbatch", uuids)
    slots = settings.models[MODEL].batching.max_inflight_batches
    for max_bs in SATURATION_BATCH_SIZES:
        await target.set_max_batch_size(MODEL, max_bs)
        # Saturated: twice what the dispatch slots hold, so the queue never drains.
        await point(f"saturated_mesh_bs{max_bs}", mode="mesh", max_batch_size=max_bs, call=mesh,
                    concurrency=2 * slots * max_bs)
    saturation = 2 * slots * max(SATURATION_BATCH_SIZES)
    await point("saturated_baseline", mode="baseline", max_batch_size=1, call=baseline, concurrency=saturation)

    capacity = max(r.throughput_per_s for r in rows if r.mode == "mesh")
    # Below saturation (a quarter of capacity, 2 ms delay): how long requests wait to be batched.
    await target.set_max_batch_size(MODEL, 16, max_queue_delay_us=2_000)
    await point("below_saturation_mesh", mode="mesh", max_batch_size=16, call=mesh,
                rate_per_s=max(5.0, round(BELOW_SATURATION_LOAD * capacity)))
    # Arrival-limited (70% of capacity), both tiers batching with the same 20 ms delay:
    # the one batcher sees every arrival, each replica's batcher 1/R of them.
    arrival_rate = max(5.0, round(ARRIVAL_LIMITED_LOAD * capacity))
    await target.set_max_batch_size(MODEL, 16, max_queue_delay_us=TRITON_MAX_QUEUE_DELAY_US)
    await point("arrival_limited_mesh", mode="mesh", max_batch_size=16, call=mesh, rate_per_s=arrival_rate)
    await point("arrival_limited_baseline", mode="baseline", max_batch_size=1, call=baseline, rate_per_s=arrival_rate)
    await target.set_max_batch_size(MODEL, 8, max_queue_delay_us=2_000)

    if first:  # what the tier adds at max_batch_size=1, concurrency 1
        await target.set_max_batch_size(MODEL, 1)
        extra = await tier_overhead(target, uuids, duration_s=duration_s)
        await target.set_max_batch_size(MODEL, 8)
    bar.close()
    return rows, extra


async def tier_overhead(target: StackTarget, uuids: list[str], *, duration_s: float, rounds: int = 4) -> dict[str, float]:
    """p50 at concurrency 1 and max_batch_size=1: straight to a worker, via the
    batcher, via router and batcher. The three alternate in short rounds and
    their latencies are pooled, so machine noise hits all three alike."""
    calls = {
        "direct_to_worker": target.direct_call(MODEL, uuids),
        "via_batcher": target.batcher_call(MODEL, uuids),
        "via_router_and_batcher": target.mesh_call(MODEL, uuids),
    }
    pooled: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            result = await closed_loop(call, concurrency=1, duration_s=duration_s / rounds, warmup_s=0.2)
            pooled[name] += result.latencies_s
    p50 = {name: float(np.median(v)) * 1000.0 for name, v in pooled.items()}
    return {
        **{f"p50_ms_{name}": round(v, 2) for name, v in p50.items()},
        "batching_tier_adds_p50_ms": round(p50["via_batcher"] - p50["direct_to_worker"], 2),
        "router_and_batcher_add_p50_ms": round(p50["via_router_and_batcher"] - p50["direct_to_worker"], 2),
        "requests_per_path": min(len(v) for v in pooled.values()),
    }


def with_replicas(base: FlotillaSettings, replicas: int) -> FlotillaSettings:
    """R Triton replicas, and room for 2 batches per replica in flight (one
    being preprocessed while the other runs), so that below saturation no
    request waits for a dispatch slot."""
    settings = base.model_copy(deep=True)
    settings.triton.replicas = replicas
    settings.models[MODEL].batching.max_inflight_batches = 2 * replicas
    for model in settings.models.values():  # a copy of each model on every replica
        model.min_copies = model.max_copies = replicas
    return settings


def run_bench(*, duration_s: float = 5.0, replica_counts: tuple[int, ...] = (2, 4)) -> dict[str, object]:
    base = load_settings(BENCH_CONFIG)
    photos = [p.read_bytes() for p in sorted(Path("build/samples/large").glob("*.jpg"))]
    small = [p.read_bytes() for p in sorted(Path("build/samples").glob("*.jpg"))]
    if not photos or not small:
        raise SystemExit("sample photos missing; run `make models`")
    results: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": None},
        "preprocessing": preprocessing_per_core(photos, base),
    }
    rows: list[Row] = []
    named: dict[str, Row] = {}
    for replicas in replica_counts:
        settings = with_replicas(base, replicas)
        print(f"starting a stack with {replicas} Triton replicas ...", flush=True)
        with LocalStack(settings) as stack:
            assert stack.state is not None and stack.settings is not None

            async def drive(replicas: int = replicas) -> tuple[list[Row], dict[str, float]]:
                target = StackTarget(stack.state)  # type: ignore[arg-type]
                try:
                    return await bench_stack(
                        target, stack.settings, small, duration_s=duration_s,  # type: ignore[arg-type]
                        first=replicas == replica_counts[0], named=named,
                    )
                finally:
                    await target.close()

            stack_rows, extra = asyncio.run(drive())
        rows += stack_rows
        if extra:
            results["latency"] = extra
    results["rows"] = [asdict(r) for r in rows]
    results["summary"] = summarise(rows, results, named)
    return results


def summarise(rows: list[Row], results: dict[str, object], named: dict[str, Row]) -> dict[str, object]:
    """The figures the issue's targets are stated in."""
    summary: dict[str, object] = {}
    for name, row in named.items():
        if "saturated_mesh" in name:
            summary[f"{name}_formed_fraction"] = round(row.mean_formed_batch / row.max_batch_size, 3)
        elif name.endswith("saturated_baseline") or "arrival_limited" in name:
            summary[f"{name}_batch_per_execution"] = row.mean_batch_per_execution
        elif "below_saturation" in name:
            summary[f"{name}_p99_queue_wait_ms"] = row.p99_queue_wait_ms
    best_mesh = max((r.throughput_per_s for r in rows if r.mode == "mesh" and r.replicas == 2), default=0.0)
    summary["mesh_images_per_s_R2"] = best_mesh
    summary["preprocessing_speedup"] = results["preprocessing"]["speedup"]  # type: ignore[index]
    summary["batching_tier_adds_p50_ms"] = results.get("latency", {}).get("batching_tier_adds_p50_ms")  # type: ignore[union-attr]
    return summary


def cpu_summary(results: dict[str, object]) -> dict[str, object]:
    """The CPU part's and the overhead part's figures the issue's targets are stated in."""
    cpu, overhead, ceiling = results.get("cpu"), results.get("overhead"), results.get("ceiling")
    return {
        **(bench_cpu.summary(cpu) if isinstance(cpu, dict) else {}),
        **(bench_overhead.summary(overhead) if isinstance(overhead, dict) else {}),
        **(bench_ceiling.summary(ceiling) if isinstance(ceiling, dict) else {}),
        **(near_free_budget(overhead, ceiling if isinstance(ceiling, dict) else None)
           if isinstance(overhead, dict) else {}),
        **peer_summary(results),
    }


def near_free_budget(overhead: dict[str, dict], ceiling: dict[str, Any] | None = None) -> dict[str, object]:
    """What the near-free 3x target leaves the router, batcher and worker: the CPU per request the
    machine's cores allow at 3x the before figure, less what the other processes on them (S3, the
    load generator, Triton's server and stubs, the controller) measured per request in this run.

    With the ceiling part, also the floors inside that budget, each measured in this run: the
    router must take one unary call per request (an empty gRPC server's cost per call), and the
    worker must decode each photo (decoding it on an idle core)."""
    per_request = overhead["mesh"]["cpu_us_per_request"]
    allowed_us = (os.cpu_count() or 1) * 1e6 / (3 * NEAR_FREE_BEFORE_REQUESTS_PER_S)
    others_us = sum(v for k, v in per_request.items() if k not in ("router", "batcher", "worker", "total"))
    out: dict[str, object] = {
        "near_free_3x_cpu_us_per_request_allowed": round(allowed_us, 1),
        "near_free_3x_cpu_us_left_for_router_batcher_worker": round(allowed_us - others_us, 1),
        "near_free_router_batcher_worker_cpu_us_per_request": round(
            sum(per_request.get(k, 0.0) for k in ("router", "batcher", "worker")), 1
        ),
    }
    decode_us = overhead.get("decode_cpu_us_per_image_idle_core")
    empty = [p for p in (ceiling or {}).get("points", []) if p["tier"] == bench_ceiling.EMPTY_SERVER]
    if decode_us is not None and empty:
        floors_us = float(empty[0]["cpu_us_per_request"]) + float(decode_us)
        out["near_free_3x_floors_cpu_us_per_request"] = round(floors_us, 1)
        out["near_free_3x_cpu_us_left_after_floors"] = round(allowed_us - others_us - floors_us, 1)
    return out


def peer_summary(results: dict[str, object]) -> dict[str, object]:
    peer, cpu = results.get("peer"), results.get("cpu")
    if not isinstance(peer, dict) or "skipped" in peer or not isinstance(cpu, dict):
        return {}
    flotilla_img_s = float(cpu["points"]["large"]["images_per_s"])
    return {
        "ray_serve_images_per_s": peer["images_per_s"],
        "ray_serve_p99_ms": peer["p99_ms"],
        "flotilla_over_ray_images_per_s": round(flotilla_img_s / float(peer["images_per_s"]), 2),
    }


def cpu_lines(results: dict[str, object]) -> list[str]:
    """The README's CPU-per-tier and overhead tables (empty for a part not run)."""
    cpu, overhead = results.get("cpu"), results.get("overhead")
    return [
        *(bench_cpu.readme_lines(cpu) if isinstance(cpu, dict) else []),
        *(bench_overhead.readme_lines(overhead) if isinstance(overhead, dict) else []),
        *(bench_ceiling.readme_lines(results["ceiling"]) if isinstance(results.get("ceiling"), dict) else []),
        *peer_lines(results),
    ]


def readme_table(results: dict[str, object]) -> str:
    rows = [Row(**r) for r in results["rows"]]  # type: ignore[union-attr, arg-type]
    pre = results["preprocessing"]
    latency = results.get("latency", {})
    summary = results["summary"]
    lines = [
        MARK_START,
        f"Measured by `make bench` on {results['machine']['cpus']} CPU cores, no GPU "  # type: ignore[index]
        f"({time.strftime('%Y-%m-%d')}). " + same_run_note(results),
        "",
        "| figure | value |",
        "|---|---|",
        f"| preprocessing, images/s per core (1-2 MP photos): Flotilla / naive Pillow | "
        f"{pre['flotilla_images_per_s_per_core']} / {pre['naive_images_per_s_per_core']} = **{pre['speedup']}x** |",  # type: ignore[index]
        *([f"| a worker's decode on {pre['threads']} threads (its decode threads), images/s: cores used | "  # type: ignore[index]
           f"{pre['flotilla_images_per_s_threads']}: **{pre['cores_used_by_threads']}** |"]  # type: ignore[index]
          if "threads" in pre else []),  # type: ignore[operator]
        *(bench_cpu.mesh_vs_limit_row(results["cpu"]) if isinstance(results.get("cpu"), dict) else []),  # type: ignore[arg-type]
        f"| p50 at concurrency 1, max_batch_size=1: direct to worker / via batcher / via router+batcher (ms) | "
        f"{latency.get('p50_ms_direct_to_worker')} / {latency.get('p50_ms_via_batcher')} / {latency.get('p50_ms_via_router_and_batcher')} "  # type: ignore[union-attr]
        f"(batcher adds **{latency.get('batching_tier_adds_p50_ms')} ms**) |",  # type: ignore[union-attr]
        "",
        *cpu_lines(results),
        "Load points, on the five small sample photos (`build/samples/*.jpg`):",
        "",
        "```",
        format_table(rows),
        "```",
        "",
        "`formed` is the mean batch Flotilla's batcher formed; `per exec` is images per Triton execution "
        "from Triton's own statistics. Baseline rows send each request alone to round-robin replicas "
        "whose own dynamic batcher is on. `c=N` rows are closed-loop saturation (N = twice what the "
        "dispatch slots hold); `N/s` rows are open-loop: a quarter of capacity with a 2 ms delay, and "
        f"{int(ARRIVAL_LIMITED_LOAD * 100)}% of capacity with a {TRITON_MAX_QUEUE_DELAY_US // 1000} ms delay in both tiers.",
        "",
        *targets_table(summary),  # type: ignore[arg-type]
        MARK_END,
    ]
    return "\n".join(lines)


def same_run_note(results: dict[str, object]) -> str:
    separate = results.get("parts_run_separately")
    if not separate:
        return "Every figure comes from the same run."
    return (f"The {' and '.join(separate)} tables come from `flotilla bench --only` runs at the time they state "  # type: ignore[arg-type]
            "(each part's figures, limit included, from one run); the load points and the latency figures from "
            "an earlier `make bench` run.")


def targets_table(summary: dict[str, object]) -> list[str]:
    """The issue's targets next to this run's figures."""

    def get(key: str) -> float:
        value = summary.get(key)
        return float(value) if isinstance(value, (int, float)) else float("nan")

    def met(ok: bool) -> str:
        return "yes" if ok else "**no**"

    formed = [get(f"R{r}_saturated_mesh_bs{b}_formed_fraction") for r in (2, 4) for b in SATURATION_BATCH_SIZES]
    waits = [get(f"R{r}_below_saturation_mesh_p99_queue_wait_ms") for r in (2, 4)]
    wait_limit_ms = 2.0 + 2.0  # max_queue_delay_us = 2000 in the below-saturation point
    rows = [
        ("mean formed batch >= 0.9 x max_batch_size at saturation (R=2 bs 8/16, R=4 bs 8/16)",
         " / ".join(f"{f:.2f}" for f in formed), met(all(f >= 0.9 for f in formed))),
        ("baseline images per Triton execution at saturation (R=2 / R=4)",
         f"{get('R2_saturated_baseline_batch_per_execution'):.1f} / {get('R4_saturated_baseline_batch_per_execution'):.1f}", "-"),
        (f"arrival-limited ({int(ARRIVAL_LIMITED_LOAD * 100)}% load): per execution, mesh vs baseline (R=2; R=4)",
         f"{get('R2_arrival_limited_mesh_batch_per_execution'):.2f} vs {get('R2_arrival_limited_baseline_batch_per_execution'):.2f}; "
         f"{get('R4_arrival_limited_mesh_batch_per_execution'):.2f} vs {get('R4_arrival_limited_baseline_batch_per_execution'):.2f}", "-"),
        (f"p99 queue wait below saturation <= delay + 2 ms = {wait_limit_ms:.0f} ms (R=2 / R=4)",
         " / ".join(f"{w:.2f} ms" for w in waits), met(all(w <= wait_limit_ms for w in waits))),
        ("max_batch_size=1: the batcher adds <= 2 ms to p50", f"{get('batching_tier_adds_p50_ms'):.2f} ms",
         met(get("batching_tier_adds_p50_ms") <= 2.0)),
        ("mesh_vs_limit >= 0.9 (1-2 MP photos); the most this machine allows with its S3 store and load generator "
         "on the same cores (every other tier free)",
         f"{get('mesh_vs_limit'):.2f}; {get('mesh_vs_limit_ceiling_here'):.2f}", met(get("mesh_vs_limit") >= 0.9)),
        ("router / batcher CPU per request <= 350 µs at saturation: each alone at its ceiling (batcher: bs 8); "
         "an empty gRPC server driven as the router is (the floor of one unary call)",
         f"{get('router_alone_cpu_us_per_request'):.0f} / {get('batcher_alone_bs8_cpu_us_per_request'):.0f} µs; "
         f"{get('empty_grpc_server_alone_cpu_us_per_request'):.0f} µs",
         met(max(get('router_alone_cpu_us_per_request'), get('batcher_alone_bs8_cpu_us_per_request')) <= 350)),
        ("router / batcher CPU per request inside the mesh on 2 shared cores (near-free model; 1-2 MP photos)",
         f"{get('near_free_router_cpu_us_per_request'):.0f} / {get('near_free_batcher_cpu_us_per_request'):.0f} µs; "
         f"{get('router_cpu_us_per_image_large_photos'):.0f} / {get('batcher_cpu_us_per_image_large_photos'):.0f} µs",
         "-"),
        ("a model's batcher on one core: ceiling requests/s (bs 8 / bs 32)",
         f"{get('batcher_alone_bs8_ceiling_requests_per_s_one_core'):.0f} / "
         f"{get('batcher_alone_bs32_ceiling_requests_per_s_one_core'):.0f}", "-"),
        (f"near-free mesh requests/s >= 3 x {NEAR_FREE_BEFORE_REQUESTS_PER_S} (before issue 9's cuts, same machine); "
         "router + batcher + worker CPU-µs per request: this run / what 3x leaves them after S3, load generator "
         "and Triton / what is left of that after the floors (the router's unary call as an empty gRPC server's, "
         "the worker's decode as on an idle core): the batcher, the router's relay and the worker's fetch and "
         "batch calls would have to fit in it",
         f"{get('near_free_mesh_requests_per_s'):.1f} = "
         f"{get('near_free_mesh_requests_per_s') / NEAR_FREE_BEFORE_REQUESTS_PER_S:.2f}x; "
         f"{get('near_free_router_batcher_worker_cpu_us_per_request'):.0f} / "
         f"{get('near_free_3x_cpu_us_left_for_router_batcher_worker'):.0f} / "
         f"{get('near_free_3x_cpu_us_left_after_floors'):.0f} µs",
         met(get("near_free_mesh_requests_per_s") >= 3 * NEAR_FREE_BEFORE_REQUESTS_PER_S)),
        ("Flotilla / Ray Serve images/s, same job, photos and concurrency (CPU part's point)",
         f"{get('flotilla_over_ray_images_per_s'):.2f}x", "-"),
        ("worker overhead beyond decode <= 0.5 ms per image (1-2 MP photos): the worker's CPU less its decode "
         "threads' own CPU in the same windows (their decode per image); less decode timed alone on an idle core; "
         "beside the near-free model (no model on the cores); the worker alone at its ceiling beside the near-free "
         "model (no router or batcher either)",
         f"{get('worker_overhead_beyond_decode_ms'):.2f} ms ({get('worker_decode_cpu_ms_per_image_in_mesh'):.2f} ms); "
         f"{get('worker_minus_idle_core_decode_ms'):.2f} ms; "
         f"{get('near_free_large_photos_worker_overhead_beyond_decode_ms'):.2f} ms; "
         f"{get('worker_alone_overhead_beyond_decode_ms'):.2f} ms",
         met(get("worker_overhead_beyond_decode_ms") <= 0.5)),
        ("preprocessing >= 2.5x naive images/s per core", f"{get('preprocessing_speedup'):.2f}x",
         met(get("preprocessing_speedup") >= 2.5)),
    ]
    return ["| target | this run | met |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


def refresh_readme(table: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace the README's block between ``start`` and ``end`` (``table`` includes both)."""
    text = README.read_text(encoding="utf-8")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + table + tail
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    README.write_text(text, encoding="utf-8")


FLEET_START, FLEET_END = "<!-- bench-fleet:start -->", "<!-- bench-fleet:end -->"


def fleet_table(fleet: dict[str, dict[str, object]]) -> str:
    cold, scale, place = fleet["cold_start"], fleet["autoscaling"], fleet["placement"]
    lines = [
        FLEET_START,
        f"Control plane, measured by `flotilla bench --only fleet` (part of `make bench`) on "
        f"{os.cpu_count()} CPU cores, no GPU ({time.strftime('%Y-%m-%d')}), EfficientNet-Lite0; cold starts on chelsea.jpg, "
        "the load on the five small sample photos; every figure from the same run.",
        "",
        "| figure | this run | target |",
        "|---|---|---|",
        f"| cold start: first request with no copy loaded -> answer (median of {len(cold['cold_start_ms_all'])}) | "  # type: ignore[arg-type]
        f"{cold['cold_start_ms_median']} ms | <= bare load + 250 ms |",
        f"| bare Triton load of the same model (cached artifact, median) | {cold['bare_triton_load_ms_median']} ms | |",
        f"| cold start minus bare load | **{cold['cold_start_minus_load_ms']} ms** | "
        f"{'met' if cold['met'] else '**not met**'} |",
        f"| the same request warm | {cold['warm_request_ms_median']} ms | |",
        f"| models served under {place['budget_mib_per_replica']:.0f} MiB x {place['replicas']} replicas "  # type: ignore[str-format]
        f"({place['model_memory_mib_measured']} MiB each, measured): heterogeneous / everywhere | "
        f"**{place['heterogeneous_models_served']} / {place['everywhere_models_served']}** | |",
        f"| queue wait at concurrency {scale['concurrency']}, 1 copy -> 2 copies (median of 0.25 s samples) | "
        f"{scale['queue_wait_ms_before']} -> {scale['queue_wait_ms_after']} ms | |",
        f"| images/s through the batcher, 1 copy -> 2 copies | {scale['images_per_s_before']} -> "
        f"{scale['images_per_s_after']} | |",
        f"| second copy placed after | {scale['copy_added_after_s']} s of load | |",
        FLEET_END,
    ]
    return "\n".join(lines)


def main(duration_s: float = 5.0, only: str = "all") -> None:
    if only == "fleet":
        fleet_only()
        return
    if only in CPU_PARTS:
        part_only(only, duration_s=duration_s)
        return
    results = run_bench(duration_s=duration_s)
    run_cpu_parts(results, CPU_PARTS, duration_s=duration_s)
    results["fleet"] = bench_fleet.run()
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows = [Row(**r) for r in results["rows"]]  # type: ignore[union-attr, arg-type]
    write_csv(rows, OUT / "results.csv")
    plot([r for r in rows if r.mode in ("mesh", "baseline")], OUT / "loadtest.png", "Flotilla: throughput vs p99 latency")
    refresh_readme(readme_table(results))
    refresh_readme(fleet_table(results["fleet"]), FLEET_START, FLEET_END)  # type: ignore[arg-type]
    print(format_table(rows))
    print(json.dumps(results["summary"], indent=2))


def run_cpu_parts(results: dict[str, object], parts: tuple[str, ...], *, duration_s: float) -> None:
    """Run the CPU part and/or the overhead part into ``results`` (windows twice
    the load points', for the 10 ms resolution of the /proc counters)."""
    base = load_settings(BENCH_CONFIG)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if "cpu" in parts:
        results["cpu"] = {"measured_at": stamp, **bench_cpu.run(base, MODEL, duration_s=2 * duration_s)}
    if "overhead" in parts:
        results["overhead"] = bench_overhead.run(base, duration_s=2 * duration_s)
    if "ceiling" in parts:
        results["ceiling"] = bench_ceiling.run(base, duration_s=2 * duration_s)
    if "peer" in parts:
        results["peer"] = peer_part(results, duration_s=2 * duration_s)
    summary = results.setdefault("summary", {})
    assert isinstance(summary, dict)
    summary.pop("mesh_efficiency", None)  # replaced by mesh_vs_limit (issue 9)
    summary.update(cpu_summary(results))


def peer_part(results: dict[str, object], *, duration_s: float) -> dict[str, object]:
    """Ray Serve doing the CPU part's job at its point (replicas, batch size, concurrency, photos)."""
    if not bench_peer.ray_available():
        print("peer: skipped: Ray Serve is not installed (pip install -e '.[peer]'; make bench does)", flush=True)
        return {"skipped": "Ray Serve is not installed (the peer extra)"}
    cpu = results.get("cpu")
    if not isinstance(cpu, dict):
        return {"skipped": "no CPU part in this run to compare with"}
    large = cpu["points"]["large"]
    print("peer: the same job on Ray Serve ...", flush=True)
    return bench_peer.run_local(
        replicas=cpu["replicas"], max_batch_size=cpu["max_batch_size"], concurrency=large["concurrency"],
        duration_s=duration_s * large.get("windows", 3),
    )


def peer_lines(results: dict[str, object]) -> list[str]:
    """The README's Flotilla-vs-Ray Serve table (empty without a peer result)."""
    peer, cpu = results.get("peer"), results.get("cpu")
    if not isinstance(peer, dict) or "skipped" in peer or not isinstance(cpu, dict):
        return []
    large = cpu["points"]["large"]
    total_us = (large.get("cpu_us_per_image") or {}).get("total")
    return bench_peer.peer_lines(peer, large["images_per_s"], large["p99_ms"], total_us)


def part_only(part: str, *, duration_s: float) -> None:
    """One CPU part alone (``--only cpu`` / ``--only overhead``), merged into
    bench/results.json and the README block; each part's table says when it ran."""
    path = OUT / "results.json"
    results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    results.pop("in_process_images_per_s", None)  # the old mesh-efficiency reference
    separate = results.setdefault("parts_run_separately", [])
    if part not in separate:
        separate.append(part)
    run_cpu_parts(results, (part,), duration_s=duration_s)
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if "rows" in results and "preprocessing" in results:
        refresh_readme(readme_table(results))
    print(json.dumps(results[part], indent=2))
    print(json.dumps(results["summary"], indent=2))


def fleet_only() -> None:
    """The control-plane part alone; merged into bench/results.json and the README."""
    path = OUT / "results.json"
    results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    results["fleet"] = bench_fleet.run()
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    refresh_readme(fleet_table(results["fleet"]), FLEET_START, FLEET_END)
    print(json.dumps(results["fleet"], indent=2))
