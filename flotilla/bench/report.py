"""The bench's figures: bench/results.json's summary and the tables of docs/benchmarks.md.

The summary holds the figures the issues' targets are stated in; the blocks of
the results page (``RESULTS_PAGE``, docs/benchmarks.md) between ``MARK_START``
and ``MARK_END`` (the batching tier, every CPU part, the peer) and between
``FLEET_START`` and ``FLEET_END`` (the control plane) are rewritten from the
results of a run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, TypedDict

from flotilla.bench import ceiling as ceiling_part
from flotilla.bench import cpu as cpu_part
from flotilla.bench import overhead as overhead_part
from flotilla.bench import peer_run, sim_run
from flotilla.bench.inputs import ARRIVAL_LIMITED_LOAD, SATURATION_BATCH_SIZES
from flotilla.clients.loadtest import Row, format_table
from flotilla.modelbuild.catalog import TRITON_MAX_QUEUE_DELAY_US

RESULTS_PAGE = Path("docs/benchmarks.md")
"""The page that holds the bench's tables (the README held them before it was split into docs/)."""
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
NEAR_FREE_BEFORE_REQUESTS_PER_S = 482.1
"""Near-free mesh requests/s before issue 9's cuts: `make bench` at f0d52b1 (2026-11-23 12:05 UTC), this machine."""


class Results(TypedDict, total=False):
    """bench/results.json: each part's result under its name, and the summary of them all.

    A part run alone (``--only``) is merged into the file an earlier run left, so any key may be
    missing. The CPU parts' and the control plane's results are read as JSON documents (their
    readers index them as their ``run`` functions build them)."""

    machine: dict[str, object]
    preprocessing: dict[str, object]
    latency: dict[str, float]
    rows: list[dict[str, Any]]
    """The load points, each a :class:`Row` as a dict."""
    summary: dict[str, object]
    cpu: dict[str, Any]
    overhead: dict[str, Any]
    ceiling: dict[str, Any]
    peer: dict[str, Any]
    fleet: dict[str, dict[str, Any]]
    fleet_sim: dict[str, Any]
    """The control plane at scale on simulated time (:func:`flotilla.bench.sim_run.run`)."""
    idle_fleet: dict[str, Any]
    """What an idle model costs the mesh (:func:`flotilla.bench.idle.run`)."""
    parts_run_separately: list[str]
    """The parts last run alone (``--only``), not in the run the load points come from."""
    in_process_images_per_s: object
    """The old mesh-efficiency reference (before issue 9): dropped when a part is run alone."""


def summarise(rows: list[Row], results: Results, named: dict[str, Row]) -> dict[str, object]:
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
    summary["preprocessing_speedup"] = results["preprocessing"]["speedup"]
    summary["batching_tier_adds_p50_ms"] = results.get("latency", {}).get("batching_tier_adds_p50_ms")
    return summary


def cpu_summary(results: Results) -> dict[str, object]:
    """The CPU part's and the overhead part's figures the issue's targets are stated in."""
    cpu, overhead, ceiling = results.get("cpu"), results.get("overhead"), results.get("ceiling")
    return {
        **(cpu_part.summary(cpu) if isinstance(cpu, dict) else {}),
        **(overhead_part.summary(overhead) if isinstance(overhead, dict) else {}),
        **(ceiling_part.summary(ceiling) if isinstance(ceiling, dict) else {}),
        **(near_free_budget(overhead, ceiling if isinstance(ceiling, dict) else None)
           if isinstance(overhead, dict) else {}),
        **peer_summary(results),
    }


def near_free_budget(overhead: dict[str, Any], ceiling: dict[str, Any] | None = None) -> dict[str, object]:
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
    empty = [p for p in (ceiling or {}).get("points", []) if p["tier"] == ceiling_part.EMPTY_SERVER]
    if decode_us is not None and empty:
        floors_us = float(empty[0]["cpu_us_per_request"]) + float(decode_us)
        out["near_free_3x_floors_cpu_us_per_request"] = round(floors_us, 1)
        out["near_free_3x_cpu_us_left_after_floors"] = round(allowed_us - others_us - floors_us, 1)
    return out


def peer_summary(results: Results) -> dict[str, object]:
    peer, cpu = results.get("peer"), results.get("cpu")
    if not isinstance(peer, dict) or "skipped" in peer or not isinstance(cpu, dict):
        return {}
    flotilla_img_s = float(cpu["points"]["large"]["images_per_s"])
    return {
        "ray_serve_images_per_s": peer["images_per_s"],
        "ray_serve_p99_ms": peer["p99_ms"],
        "flotilla_over_ray_images_per_s": round(flotilla_img_s / float(peer["images_per_s"]), 2),
    }


def cpu_lines(results: Results) -> list[str]:
    """The results page's CPU-per-tier, overhead, ceiling and peer tables (empty for a part not run)."""
    cpu, overhead = results.get("cpu"), results.get("overhead")
    return [
        *(cpu_part.readme_lines(cpu) if isinstance(cpu, dict) else []),
        *(overhead_part.readme_lines(overhead) if isinstance(overhead, dict) else []),
        *(ceiling_part.readme_lines(results["ceiling"]) if isinstance(results.get("ceiling"), dict) else []),
        *peer_lines(results),
    ]


def readme_table(results: Results) -> str:
    """The results page's block between ``MARK_START`` and ``MARK_END``."""
    rows = [Row(**r) for r in results["rows"]]
    pre = results["preprocessing"]
    latency = results.get("latency", {})
    summary = results["summary"]
    lines = [
        MARK_START,
        f"Measured by `make bench` on {results['machine']['cpus']} CPU cores, no GPU "
        f"({time.strftime('%Y-%m-%d')}). " + same_run_note(results),
        "",
        "| figure | value |",
        "|---|---|",
        f"| preprocessing, images/s per core (1-2 MP photos): Flotilla / naive Pillow | "
        f"{pre['flotilla_images_per_s_per_core']} / {pre['naive_images_per_s_per_core']} = **{pre['speedup']}x** |",
        *([f"| a worker's decode on {pre['threads']} threads (its decode threads), images/s: cores used | "
           f"{pre['flotilla_images_per_s_threads']}: **{pre['cores_used_by_threads']}** |"]
          if "threads" in pre else []),
        *(cpu_part.mesh_vs_limit_row(results["cpu"]) if isinstance(results.get("cpu"), dict) else []),
        f"| p50 at concurrency 1, max_batch_size=1: direct to worker / via batcher / via router+batcher (ms) | "
        f"{latency.get('p50_ms_direct_to_worker')} / {latency.get('p50_ms_via_batcher')} / {latency.get('p50_ms_via_router_and_batcher')} "
        f"(batcher adds **{latency.get('batching_tier_adds_p50_ms')} ms**) |",
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
        *targets_table(summary),
        MARK_END,
    ]
    return "\n".join(lines)


def same_run_note(results: Results) -> str:
    separate = results.get("parts_run_separately")
    if not separate:
        return "Every figure comes from the same run."
    return (f"The {' and '.join(separate)} tables come from `flotilla bench --only` runs at the time they state "
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
         f"{get('mesh_vs_limit'):.2f}; {get('mesh_vs_limit_ceiling_here'):.2f}",
         judged(0.0, get("limit_drift")) or met(get("mesh_vs_limit") >= 0.9)),
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
        ("ClassifyStream >= 3x unary's requests/s at the router's ceiling, and <= 1/3 its CPU per image (the "
         "router's answers lingering up to router.stream_linger_ms for others of their stream in flight)",
         f"{get('router_stream_over_unary_requests_per_s'):.2f}x; {get('router_stream_over_unary_cpu_us_per_image'):.3f} "
         f"(linger {get('router_stream_linger_ms'):g} ms)",
         met(get("router_stream_over_unary_requests_per_s") >= 3
             and get("router_stream_over_unary_cpu_us_per_image") <= 1 / 3)),
        ("the router's unary call <= 1.5x an empty grpc.aio server's; a relay proxy's (that server relaying each call "
         "over Flotilla's relay, nothing else of the router) over the empty server's; the router's over the relay "
         "proxy's",
         f"{get('router_unary_over_empty_grpc_server_cpu_us'):.2f}x; "
         f"{get('relay_proxy_over_empty_grpc_server_cpu_us'):.2f}x; {get('router_unary_over_relay_proxy_cpu_us'):.2f}x",
         met(get("router_unary_over_empty_grpc_server_cpu_us") <= 1.5)),
        ("the same with the router's relay unpaced (router.pacing_ms 0; by default a shard's stream carrying more "
         "than 1.5 calls a ms is paced), over the empty server's; calls a relay message, paced (the default) and not",
         f"{get('router_unary_unpaced_over_empty_grpc_server_cpu_us'):.2f}x unpaced; "
         f"{get('router_unary_calls_per_relay_message'):.1f} at {get('router_unary_pacing_ms'):g} ms against "
         f"{get('router_unary_unpaced_calls_per_relay_message'):.1f}",
         "-"),
        ("the CPU point over ClassifyStream >= 0.9 of the ceiling here (from that point's own S3 and load "
         "generator); the same were Flotilla's own work free (router, batcher, controller, the worker beyond "
         "decode: CPU-µs per image)",
         f"{get('mesh_vs_limit_over_stream_of_ceiling_here'):.3f}; "
         f"{get('mesh_vs_limit_over_stream_of_ceiling_here_if_flotilla_free'):.3f} "
         f"({get('flotilla_cpu_us_per_image_large_photos_over_stream'):.0f} µs)",
         judged(get("mesh_vs_limit_over_stream_of_ceiling_here"), get("limit_drift"))
         or met(get("mesh_vs_limit_over_stream_of_ceiling_here") >= 0.9)),
    ]
    return ["| target | this run | met |", "|---|---|---|", *(f"| {a} | {b} | {c} |" for a, b, c in rows)]


JUDGED_DRIFT = 0.03
"""The most the limit may move between its measurements before and after the stack for a share of it to
be judged: a target a few percent away cannot be told from a host whose speed moved more than that."""


def judged(share: float, drift: float) -> str:
    """"" when a share of the limit (or of the ceiling) can be judged; else why not: above 1 (see
    :func:`beyond_ceiling`), or the limit drifted more than JUDGED_DRIFT across the run (nan: measured once)."""
    if abs(drift) > JUDGED_DRIFT:
        return (f"not judged: the limit moved {drift:+.1%} between its measurements before and after the stack "
                "(the host's speed changed under the run)")
    return beyond_ceiling(share)


def beyond_ceiling(share: float) -> str:
    """A share of the ceiling above 1 is no result: the limit, measured before the stack starts and after
    it stops, met a slower host than the mesh did (its model and decode cost more per image then); ""
    for one at most 1."""
    if share <= 1.0:
        return ""
    return "not judged: above 1, the limit was measured while the host was slower than when the mesh ran"


def refresh_readme(table: str, start: str = MARK_START, end: str = MARK_END) -> None:
    """Replace the results page's block between ``start`` and ``end`` (``table`` includes both)."""
    refresh_block(RESULTS_PAGE, table, start, end)


def refresh_block(page: Path, table: str, start: str, end: str) -> None:
    """Replace ``page``'s block between ``start`` and ``end`` (``table`` includes both); appended when absent."""
    text = page.read_text(encoding="utf-8")
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + table + tail
    else:
        text = text.rstrip() + "\n\n" + table + "\n"
    page.write_text(text, encoding="utf-8")


FLEET_START, FLEET_END = "<!-- bench-fleet:start -->", "<!-- bench-fleet:end -->"


def fleet_table(fleet: dict[str, dict[str, Any]]) -> str:
    """The results page's block between ``FLEET_START`` and ``FLEET_END``, from :func:`flotilla.bench.fleet.run`."""
    cold, scale, place = fleet["cold_start"], fleet["autoscaling"], fleet["placement"]
    lines = [
        FLEET_START,
        f"Control plane, measured by `flotilla bench --only fleet` (part of `make bench`) on "
        f"{os.cpu_count()} CPU cores, no GPU ({time.strftime('%Y-%m-%d')}), EfficientNet-Lite0; cold starts on chelsea.jpg, "
        "the load on the five small sample photos; every figure from the same run.",
        "",
        "| figure | this run | target |",
        "|---|---|---|",
        f"| cold start: first request with no copy loaded -> answer (median of {len(cold['cold_start_ms_all'])}) | "
        f"{cold['cold_start_ms_median']} ms | <= bare load + 250 ms |",
        f"| bare Triton load of the same model (cached artifact, median) | {cold['bare_triton_load_ms_median']} ms | |",
        f"| cold start minus bare load | **{cold['cold_start_minus_load_ms']} ms** | "
        f"{'met' if cold['met'] else '**not met**'} |",
        f"| the same request warm | {cold['warm_request_ms_median']} ms | |",
        f"| models served under {place['budget_mib_per_replica']:.0f} MiB x {place['replicas']} replicas "
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


def peer_lines(results: Results) -> list[str]:
    """The results page's Flotilla-vs-Ray Serve table (empty without a peer result)."""
    peer, cpu = results.get("peer"), results.get("cpu")
    if not isinstance(peer, dict) or "skipped" in peer or not isinstance(cpu, dict):
        return []
    large = cpu["points"]["large"]
    total_us = (large.get("cpu_us_per_image") or {}).get("total")
    return peer_run.peer_lines(peer, large["images_per_s"], large["p99_ms"], total_us)


FLEET_SIM_START, FLEET_SIM_END = "<!-- bench-fleet-sim:start -->", "<!-- bench-fleet-sim:end -->"


def fleet_sim_table(fleet_sim: dict[str, Any], page: Path = RESULTS_PAGE) -> str:
    """The block between ``FLEET_SIM_START`` and ``FLEET_SIM_END`` on ``page`` (the results page), from
    :func:`flotilla.bench.sim_run.run`; the plot, when one was written, under the table (linked
    relative to ``page``)."""
    lines = [FLEET_SIM_START, *sim_run.table_lines(fleet_sim)]
    if fleet_sim.get("plot"):
        image = os.path.relpath(fleet_sim["plot"], page.parent)
        lines += ["", f"![Copies against demand over the simulated day]({image})"]
    return "\n".join([*lines, FLEET_SIM_END])


def fleet_sim_summary(fleet_sim: dict[str, Any]) -> dict[str, Any]:
    """Each size's headline figures (the series left out)."""
    return {
        key: {policy: {k: v for k, v in run.items() if k != "series"} if isinstance(run, dict) else run
              for policy, run in entry.items()}
        for key, entry in fleet_sim["sizes"].items()
    }


IDLE_START, IDLE_END = "<!-- bench-idle-fleet:start -->", "<!-- bench-idle-fleet:end -->"


def idle_fleet_table(idle: dict[str, Any]) -> str:
    """The block between ``IDLE_START`` and ``IDLE_END`` on the results page (:mod:`flotilla.bench.idle`)."""
    head = (f"Measured {idle['measured_at']}: {idle['idle_models']} idle models (min_copies 0, never called) on the "
            f"local stack with {idle['shards']} shard(s), quiet windows of {idle['quiet_window_s']:.0f} s "
            f"(`flotilla bench --only idle-fleet`). Deploying them took {idle['deploy_s']} s "
            f"({idle['deploys_per_s']} per second); then one deploy at a time reached the router in "
            f"{idle['deploy_visible_on_router_s']['median'] * 1000:.0f} ms (median; max "
            f"{idle['deploy_visible_on_router_s']['max'] * 1000:.0f} ms).")
    return "\n".join([IDLE_START, head, "", *idle_lines(idle), IDLE_END])


def idle_lines(idle: dict[str, Any]) -> list[str]:
    from flotilla.bench import idle as idle_part

    return idle_part.table(idle)
