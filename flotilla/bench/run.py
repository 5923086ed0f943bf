"""`make bench`: what the batching tier buys, measured in one run (``flotilla bench`` calls :func:`main`).

1. Preprocessing per core: DCT-scaled decode + resize (the worker's path)
   against a naive full Pillow decode then resize, on 1-2 MP photos.
2. For R = 2 and R = 4 Triton replicas, a stack on this machine:
   - the mesh at saturation (closed loop) for several ``max_batch_size``;
   - the baseline at the same load: each request alone through a preprocess
     worker to round-robin Triton replicas with Triton's own dynamic batcher;
   - both below saturation (open loop), for queue wait and batch sizes;
   - (R = 2) latency at concurrency 1: through router and batcher, straight
     to the batcher, and straight to a preprocess worker.
3. CPU per image by tier and the physical limit (``flotilla.bench.cpu``,
   alone: ``--only cpu``): the saturated mesh (R = 2, max_batch_size 8,
   concurrency 64) on the 1-2 MP photos and on the small samples, every
   tier's CPU from its processes' own counters, and ONNX Runtime plus
   decode CPU per image on the same large photos: ``mesh_vs_limit``.
4. The mesh's own overhead with a near-free model and 64 x 64 JPEGs against
   Triton alone (``flotilla.bench.overhead``, alone: ``--only overhead``).
5. The router and a model's batcher alone, each at its own ceiling
   (``flotilla.bench.ceiling``, alone: ``--only ceiling``): CPU-µs per
   request and requests/s on one core.
6. A peer: the CPU part's job (same photos, model, replicas, batch size and
   concurrency) on Ray Serve with ``@serve.batch`` (``flotilla.bench.peer_run``,
   alone: ``--only peer``; needs the ``peer`` extra, which `make bench`
   installs), against the CPU part's mesh point of the same run.

Writes ``bench/results.json``, ``bench/results.csv``, ``bench/loadtest.png``
and refreshes the results tables in docs/benchmarks.md (:mod:`flotilla.bench.report`).
A benchmark, not a test: it asserts nothing and reports what it measured.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from tqdm import tqdm

from flotilla.bench import ceiling as ceiling_part
from flotilla.bench import cpu as cpu_part
from flotilla.bench import fleet as fleet_part
from flotilla.bench import idle as idle_part
from flotilla.bench import overhead as overhead_part
from flotilla.bench import peer_app, peer_run, sim_run
from flotilla.bench.inputs import (
    ARRIVAL_LIMITED_LOAD,
    BELOW_SATURATION_LOAD,
    BENCH_CONFIG,
    MODEL,
    SATURATION_BATCH_SIZES,
    large_photos,
    small_photos,
)
from flotilla.bench.report import (
    FLEET_END,
    FLEET_SIM_END,
    FLEET_SIM_START,
    FLEET_START,
    IDLE_END,
    IDLE_START,
    Results,
    cpu_summary,
    fleet_sim_summary,
    fleet_sim_table,
    fleet_table,
    idle_fleet_table,
    readme_table,
    refresh_readme,
    summarise,
)
from flotilla.clients.loadgen import closed_loop
from flotilla.clients.loadtest import Row, StackTarget, format_table, measure, plot, write_csv
from flotilla.config import FlotillaSettings, load_settings
from flotilla.modelbuild.catalog import TRITON_MAX_QUEUE_DELAY_US
from flotilla.services.preprocess.imaging import decode_for_model
from flotilla.stack.local import LocalStack
from flotilla.stack.state import StackState

OUT = Path("bench")
CPU_PARTS = ("cpu", "overhead", "ceiling", "peer")
"""The parts measured from the processes' CPU counters, in the order `make bench` runs them."""


# -- 1. preprocessing per core ---------------------------------------------------


def preprocessing_per_core(photos: list[bytes], settings: FlotillaSettings, rounds: int = 5) -> dict[str, object]:
    spec = settings.models[MODEL].input

    def naive(data: bytes) -> NDArray[Any]:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB").resize((spec.width_px, spec.height_px), Image.Resampling.BILINEAR))

    def scaled(data: bytes) -> NDArray[np.uint8]:
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

    def tick() -> None:
        bar.update(1)

    async def point(name: str, **kw: Any) -> Row:
        row = await measure(target, model=MODEL, duration_s=duration_s, on_done=tick, **kw)
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


def run_bench(*, duration_s: float = 5.0, replica_counts: tuple[int, ...] = (2, 4)) -> Results:
    base = load_settings(BENCH_CONFIG)
    photos = large_photos()
    small = small_photos()
    if not photos or not small:
        raise SystemExit("sample photos missing; run `make models`")
    results: Results = {
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

            async def drive(
                state: StackState, resolved: FlotillaSettings, replicas: int = replicas
            ) -> tuple[list[Row], dict[str, float]]:
                target = StackTarget(state)
                try:
                    return await bench_stack(
                        target, resolved, small, duration_s=duration_s,
                        first=replicas == replica_counts[0], named=named,
                    )
                finally:
                    await target.close()

            stack_rows, extra = asyncio.run(drive(stack.state, stack.settings))
        rows += stack_rows
        if extra:
            results["latency"] = extra
    results["rows"] = [asdict(r) for r in rows]
    results["summary"] = summarise(rows, results, named)
    return results


def main(duration_s: float = 5.0, only: str = "all") -> None:
    if only == "fleet":
        fleet_only()
        return
    if only == "fleet-sim":
        fleet_sim_only()
        return
    if only == "idle-fleet":
        idle_fleet_only()
        return
    if only in CPU_PARTS:
        part_only(only, duration_s=duration_s)
        return
    results = run_bench(duration_s=duration_s)
    run_cpu_parts(results, CPU_PARTS, duration_s=duration_s)
    results["fleet"] = fleet_part.run()
    OUT.mkdir(exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    rows = [Row(**r) for r in results["rows"]]
    write_csv(rows, OUT / "results.csv")
    plot([r for r in rows if r.mode in ("mesh", "baseline")], OUT / "loadtest.png", "Flotilla: throughput vs p99 latency")
    refresh_readme(readme_table(results))
    refresh_readme(fleet_table(results["fleet"]), FLEET_START, FLEET_END)
    print(format_table(rows))
    print(json.dumps(results["summary"], indent=2))


def run_cpu_parts(results: Results, parts: tuple[str, ...], *, duration_s: float) -> None:
    """Run the CPU part and/or the overhead part into ``results`` (windows twice
    the load points', for the 10 ms resolution of the /proc counters)."""
    base = load_settings(BENCH_CONFIG)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    if "cpu" in parts:
        results["cpu"] = {"measured_at": stamp, **cpu_part.run(base, MODEL, duration_s=2 * duration_s)}
    if "overhead" in parts:
        results["overhead"] = overhead_part.run(base, duration_s=2 * duration_s)
    if "ceiling" in parts:
        results["ceiling"] = ceiling_part.run(base, duration_s=2 * duration_s)
    if "peer" in parts:
        results["peer"] = peer_part(results, duration_s=2 * duration_s)
    summary = results.setdefault("summary", {})
    assert isinstance(summary, dict)
    summary.pop("mesh_efficiency", None)  # replaced by mesh_vs_limit (issue 9)
    summary.update(cpu_summary(results))


def peer_part(results: Results, *, duration_s: float) -> dict[str, object]:
    """Ray Serve doing the CPU part's job at its point (replicas, batch size, concurrency, photos)."""
    if not peer_app.ray_available():
        print("peer: skipped: Ray Serve is not installed (pip install -e '.[peer]'; make bench does)", flush=True)
        return {"skipped": "Ray Serve is not installed (the peer extra)"}
    cpu = results.get("cpu")
    if not isinstance(cpu, dict):
        return {"skipped": "no CPU part in this run to compare with"}
    large = cpu["points"]["large"]
    print("peer: the same job on Ray Serve ...", flush=True)
    return peer_run.run_local(
        replicas=cpu["replicas"], max_batch_size=cpu["max_batch_size"], concurrency=large["concurrency"],
        duration_s=duration_s * large.get("windows", 3),
    )


def part_only(part: str, *, duration_s: float) -> None:
    """One CPU part alone (``--only cpu`` / ``--only overhead``), merged into
    bench/results.json and the results page's block; each part's table says when it ran."""
    path = OUT / "results.json"
    results: Results = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    results.pop("in_process_images_per_s", None)  # the old mesh-efficiency reference
    separate = results.setdefault("parts_run_separately", [])
    if part not in separate:
        separate.append(part)
    run_cpu_parts(results, (part,), duration_s=duration_s)
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if "rows" in results and "preprocessing" in results:
        refresh_readme(readme_table(results))
    print(json.dumps(results.get(part), indent=2))
    print(json.dumps(results["summary"], indent=2))


def _section_alone(key: str, measure: Callable[[], Any], block: Callable[[Any], str], start: str, end: str,
                   shown: Callable[[Any], Any] = lambda section: section) -> None:
    """One part run alone: its section ``key`` of bench/results.json replaced by ``measure()``, its block
    (between ``start`` and ``end``) on the results page rewritten, and what it measured printed."""
    path = OUT / "results.json"
    results: dict[str, Any] = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    results[key] = measure()
    OUT.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    refresh_readme(block(results[key]), start, end)
    print(json.dumps(shown(results[key]), indent=2))


def fleet_only() -> None:
    """The control-plane part alone; merged into bench/results.json and the results page."""
    _section_alone("fleet", fleet_part.run, fleet_table, FLEET_START, FLEET_END)


def fleet_sim_only() -> None:
    """The control plane at scale on simulated time (:mod:`flotilla.bench.sim_run`); merged into
    bench/results.json (``fleet_sim``) and the results page's block, with the plot of copies against demand."""
    _section_alone("fleet_sim", sim_run.run, fleet_sim_table, FLEET_SIM_START, FLEET_SIM_END, fleet_sim_summary)


def idle_fleet_only() -> None:
    """What an idle model costs the mesh (:mod:`flotilla.bench.idle`): merged into bench/results.json
    (``idle_fleet``) and the results page's block."""
    _section_alone("idle_fleet", idle_part.run, idle_fleet_table, IDLE_START, IDLE_END)
