"""The bench's CPU accounting: this process and a busy-looping child, services' own
counters read at the same window edges, the worker-overhead figures made from them, and
the physical limit's processes and wording."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from flotilla.bench.ceiling import EMPTY_SERVER
from flotilla.bench.cpu import (
    LARGE_OVER_STREAM,
    WORKER_DECODE,
    counter_total,
    mesh_vs_limit_ceiling,
    mesh_vs_limit_row,
    of_ceiling_if_flotilla_free,
    readme_lines,
    summary,
)
from flotilla.bench.limit import BusyJob, bracketed, cores_busy_cpu_ms_per_image
from flotilla.bench.meter import LOAD_GENERATOR, CpuMeter, Tier, descendants, metered_load, read_process
from flotilla.bench.overhead import large_photos_lines, large_photos_summary
from flotilla.bench.report import NEAR_FREE_BEFORE_REQUESTS_PER_S, near_free_budget
from flotilla.config import InputSpec
from tests.waiting import until_sync

BUSY_S = 0.3


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def until_child_spent(child: subprocess.Popen[bytes], cpu_s: float, timeout_s: float = 30.0) -> None:
    """Until ``child`` has spent ``cpu_s`` of CPU: however loaded the machine is."""
    first = read_process(child.pid)
    assert first is not None

    def spent() -> bool:
        now = read_process(child.pid)
        assert now is not None
        return now.cpu_s - first.cpu_s >= cpu_s

    until_sync(spent, timeout_s, f"the child spends {cpu_s} s of CPU")


@pytest.fixture
def spinning_child() -> Iterator[subprocess.Popen[bytes]]:
    """A child that busy-loops until killed."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_read_process_of_this_process() -> None:
    reading = read_process(os.getpid())
    assert reading is not None
    assert reading.pid == os.getpid() and reading.ppid == os.getppid()
    assert reading.cpu_s > 0


def test_read_process_of_a_missing_process() -> None:
    assert read_process(2**22 + 1) is None  # above the kernel's pid_max limit


def test_two_readings_of_one_process_are_keyed_alike() -> None:
    # The meter matches a window's two readings by process (pid and start time).
    first, second = read_process(os.getpid()), read_process(os.getpid())
    assert first is not None and second is not None
    assert first.process == second.process and {first.process: 1.0}.get(second.process) == 1.0


def test_descendants_follow_the_tree() -> None:
    parents = {1: 0, 2: 1, 3: 2, 4: 1, 5: 9}
    assert descendants(1, parents) == {2, 3, 4}
    assert descendants(2, parents) == {3}
    assert descendants(5, parents) == set()


def test_meter_counts_this_process_busy_time() -> None:
    with CpuMeter({"me": Tier([os.getpid()], descendants=False)}) as meter:
        busy(BUSY_S)
    # Clock ticks are 10 ms; the loop burns what it measures (plus this process's other threads).
    assert meter.cpu_s["me"] >= BUSY_S - 0.02
    assert meter.processes == {"me": 1}
    # The machine's count includes the loop; wall time covers it. (Not against cpu_s itself: that also
    # counts the process's other threads, e.g. gRPC pollers left by earlier tests in this process.)
    assert meter.machine_busy_s >= BUSY_S - 0.02
    assert meter.wall_s >= BUSY_S - 0.02


def test_meter_counts_a_child_in_its_parents_tier(spinning_child: subprocess.Popen[bytes]) -> None:
    with CpuMeter({"parent": Tier([os.getpid()])}) as meter:
        until_child_spent(spinning_child, BUSY_S)
    assert meter.processes["parent"] >= 2
    assert meter.cpu_s["parent"] >= BUSY_S - 0.02  # the child spins while this process sleeps


def test_meter_sends_children_to_another_tier(spinning_child: subprocess.Popen[bytes]) -> None:
    tiers = {"server": Tier([os.getpid()], children_to="stubs")}
    with CpuMeter(tiers) as meter:
        until_child_spent(spinning_child, BUSY_S)
    assert meter.cpu_s["stubs"] >= BUSY_S - 0.02
    assert meter.cpu_s["server"] < meter.cpu_s["stubs"]  # the parent mostly sleeps


def test_a_process_in_two_tiers_counts_once(spinning_child: subprocess.Popen[bytes]) -> None:
    tiers = {"child": Tier([spinning_child.pid]), "parent": Tier([os.getpid()])}
    with CpuMeter(tiers) as meter:
        until_child_spent(spinning_child, BUSY_S)
    # The child is the parent's descendant too, but counts under "child" only: the parent's
    # tier (this test process and whatever else it has started) does not get its CPU again.
    assert meter.processes["child"] == 1
    assert meter.cpu_s["child"] >= BUSY_S - 0.02
    assert meter.cpu_s["parent"] < meter.cpu_s["child"]


def test_per_item_us() -> None:
    meter = CpuMeter({})
    meter.cpu_s = {"a": 0.5, "b": 0.25}
    assert meter.per_item_us(1000) == {"a": 500.0, "b": 250.0, "total": 750.0}
    assert meter.per_item_us(0) == {}


async def test_metered_load_reports_a_counter_per_item_over_the_same_windows() -> None:
    # A service's own CPU counter, read at the window edges like /proc: here each call spends
    # 250 us of "decode" on it, so per item it is 250 whatever the machine's speed.
    spent = [0.0]

    async def call() -> None:
        spent[0] += 250e-6
        await asyncio.sleep(0.001)  # duration: each call takes a millisecond, as a request would

    point = await metered_load(
        {}, call, concurrency=4, window_s=0.2, windows=2, warmup_s=0.05, counters={"decode": lambda: spent[0]}
    )
    assert point["counted_cpu_us_per_image"] == {"decode": pytest.approx(250.0, rel=0.05)}


def test_counter_total_sums_a_counters_labels_from_a_metrics_page() -> None:
    registry = CollectorRegistry()
    counter = Counter("flotilla_test_cpu_seconds", "test", ["model"], registry=registry)
    counter.labels("a").inc(1.5)
    counter.labels("b").inc(0.25)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        address = f"127.0.0.1:{server.server_port}"
        assert counter_total(address, "flotilla_test_cpu_seconds_total") == 1.75
        assert counter_total(address, "flotilla_absent_total") == 0.0
    finally:
        server.shutdown()
        thread.join(5)


def test_the_worker_overhead_is_its_cpu_less_its_decode_threads() -> None:
    point = {"images_per_s": 150.0, "cpu_us_per_image": {"router": 400.0, "batcher": 300.0, "worker": 4000.0},
             "counted_cpu_us_per_image": {WORKER_DECODE: 3400.0}}
    cpu = {"mesh_vs_limit": 0.7,
           "limit": {"limit_images_per_s": 214.0, "model_cpu_ms_per_image": 6.0, "decode_cpu_ms_per_image": 2.9},
           "points": {"large": point}}
    figures = summary(cpu)
    assert figures["worker_overhead_beyond_decode_ms"] == 0.6
    assert figures["worker_decode_cpu_ms_per_image_in_mesh"] == 3.4
    assert figures["worker_minus_idle_core_decode_ms"] == 1.1


def test_the_worker_less_idle_core_decode_takes_the_decode_measured_alone() -> None:
    # The limit's decode is measured with every core busy; the worker's figure is against decode on an idle core.
    point = {"images_per_s": 150.0, "cpu_us_per_image": {"worker": 4000.0}}
    cpu = {"mesh_vs_limit": 0.7, "points": {"large": point},
           "limit": {"limit_images_per_s": 180.0, "model_cpu_ms_per_image": 7.9, "decode_cpu_ms_per_image": 3.2,
                     "model_cpu_ms_per_image_alone": 7.0, "decode_cpu_ms_per_image_alone": 2.9,
                     "measured_with_cores_busy": 2}}
    assert summary(cpu)["worker_minus_idle_core_decode_ms"] == 1.1


def cpu_result(limit: dict[str, Any]) -> dict[str, Any]:
    """A CPU part's result with ``limit``, as :func:`flotilla.bench.cpu.run` returns it."""
    def point(images_per_s: float) -> dict[str, Any]:
        return {"images_per_s": images_per_s, "concurrency": 64, "cpu_us_per_image": {"worker": 4000.0}}

    return {"replicas": 2, "max_batch_size": 8, "window_s": 10.0, "windows": 3, "mesh_vs_limit": 0.8,
            "limit": limit, "points": {"large": point(144.0), "small": point(400.0)}}


BUSY_LIMIT = {"batch_size": 8, "model_cpu_ms_per_image": 8.0, "decode_cpu_ms_per_image": 3.2,
              "model_cpu_ms_per_image_alone": 7.0, "decode_cpu_ms_per_image_alone": 3.0, "cores": 2,
              "measured_with_cores_busy": 2, "limit_images_per_s": 178.6}


def test_the_page_says_the_limit_is_measured_with_every_core_busy_and_shows_the_alone_figures() -> None:
    cpu = cpu_result(BUSY_LIMIT)
    row = mesh_vs_limit_row(cpu)[0]
    assert "measured with all 2 cores running both at once" in row
    assert "144.0 / (2 / (8.0 + 3.2 ms; alone 7.0 + 3.0 ms)) = 144.0 / 178.6 = **0.8**" in row
    lines = readme_lines(cpu)
    assert "measured with every core running them at once (2 processes" in lines[0]
    assert "| limit: ONNX Runtime / decode, CPU-ms per image, every core busy (alone) | 8.0 / 3.2 (7.0 / 3.0) | | |" \
        in lines


def test_a_limit_measured_in_one_process_keeps_its_old_wording() -> None:
    # A results.json from before the limit was measured with every core busy: no alone figures to show.
    limit = {key: value for key, value in BUSY_LIMIT.items()
             if key != "measured_with_cores_busy" and not key.endswith("_alone")}
    cpu = cpu_result(limit)
    assert "144.0 / (2 / (8.0 + 3.2 ms)) = 144.0 / 178.6 = **0.8**" in mesh_vs_limit_row(cpu)[0]
    lines = readme_lines(cpu)
    assert "at once" not in lines[0] and lines[0].endswith("before the stack starts, in-process.")
    assert "| limit: ONNX Runtime / decode, CPU-ms per image | 8.0 / 3.2 | | |" in lines


def test_the_limit_bracketing_the_stack_is_the_means_of_both_measurements_with_each_and_the_drift() -> None:
    # The host ran 5% slower per image at the end: the mesh between them is held against the means.
    after = {**BUSY_LIMIT, "model_cpu_ms_per_image": 8.4, "decode_cpu_ms_per_image": 3.36,
             "model_cpu_ms_per_image_alone": 7.2, "decode_cpu_ms_per_image_alone": 3.1, "limit_images_per_s": 170.1}
    limit = bracketed(BUSY_LIMIT, after)
    assert (limit["model_cpu_ms_per_image"], limit["decode_cpu_ms_per_image"]) == (8.2, 3.28)
    assert (limit["model_cpu_ms_per_image_alone"], limit["decode_cpu_ms_per_image_alone"]) == (7.1, 3.05)
    assert limit["limit_images_per_s"] == round(2 / (11.48 / 1000.0), 1) == 174.2
    assert limit["before"] == BUSY_LIMIT and limit["after"] == after and limit["drift"] == -0.048
    assert (limit["cores"], limit["batch_size"], limit["measured_with_cores_busy"]) == (2, 8, 2)
    cpu = cpu_result(limit)
    assert "the means of the limit measured before the stack and after it, 178.6 and 170.1 images/s" \
        in mesh_vs_limit_row(cpu)[0]
    assert "before the stack started and after it stopped, the means of the two (limits 178.6 and 170.1 " \
        "images/s, drift -4.8%)" in readme_lines(cpu)[0]


def test_a_failing_limit_process_raises_here_and_every_process_is_ended(tmp_path: Path) -> None:
    # No model file: each spawned process fails loading it, before the barrier; the failure comes back
    # with its traceback, and no process of the limit is left behind.
    job = BusyJob(tmp_path / "missing.onnx", np.zeros((1, 224, 224, 3), np.uint8), [b""], InputSpec(),
                  max_pixels=1, min_cpu_s=0.1)
    with pytest.raises(RuntimeError, match=r"bench limit: process \d \(flotilla-bench-limit-\d\) failed:\n"
                                           r"Traceback[\s\S]*missing\.onnx"):
        cores_busy_cpu_ms_per_image(job, 2)
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("flotilla-bench-limit")]


def test_the_mesh_vs_limit_ceiling_counts_only_s3_and_the_load_generator_beside_model_and_decode() -> None:
    # 6 + 3 ms of model and decode per image, 0.8 + 0.2 ms of S3 and load generator: at best 9 / 10.
    point = {"cpu_us_per_image": {"router": 400.0, "worker": 4000.0, "s3": 800.0, LOAD_GENERATOR: 200.0}}
    cpu = {"limit": {"model_cpu_ms_per_image": 6.0, "decode_cpu_ms_per_image": 3.0}, "points": {"large": point}}
    assert mesh_vs_limit_ceiling(cpu) == 0.9


def test_each_point_is_held_against_the_ceiling_of_its_own_s3_and_load_generator() -> None:
    # The stream point's load generator costs 0.2 ms less an image than the unary one's: its ceiling is
    # 9 / 9.8, not the unary point's 9 / 10, and its share of the ceiling is taken against that.
    tiers = {"router": 300.0, "batcher": 250.0, "controller": 50.0, "worker": 3400.0, "model stubs": 5000.0,
             "s3": 800.0, "total": 10000.0}
    unary = {"images_per_s": 160.0, "cpu_us_per_image": {**tiers, LOAD_GENERATOR: 200.0}}
    stream = {"images_per_s": 180.0, "cpu_us_per_image": {**tiers, LOAD_GENERATOR: 0.0}}
    cpu = {"limit": {"model_cpu_ms_per_image": 6.0, "decode_cpu_ms_per_image": 3.0, "limit_images_per_s": 200.0},
           "points": {"large": unary, LARGE_OVER_STREAM: stream}}

    assert mesh_vs_limit_ceiling(cpu) == 0.9
    assert mesh_vs_limit_ceiling(cpu, LARGE_OVER_STREAM) == round(9 / 9.8, 3)
    result = summary({**cpu, "mesh_vs_limit": 0.8, "mesh_vs_limit_over_stream": 0.9})
    assert result["mesh_vs_limit_ceiling_here_over_stream"] == round(9 / 9.8, 3)
    assert result["mesh_vs_limit_over_stream_of_ceiling_here"] == round(0.9 / round(9 / 9.8, 3), 3)


def test_the_stream_point_were_flotillas_own_work_free_sheds_that_cpu_and_keeps_the_rest() -> None:
    # 10 ms per image in all, 1 ms of it Flotilla's own (router, batcher, controller, worker beyond decode):
    # free, the same cores would carry 10/9 as many images.
    per_image = {"router": 300.0, "batcher": 250.0, "controller": 50.0, "worker": 3400.0, "model stubs": 5000.0,
                 "s3": 800.0, LOAD_GENERATOR: 200.0, "total": 10000.0}
    stream = {"images_per_s": 180.0, "cpu_us_per_image": per_image, "counted_cpu_us_per_image": {WORKER_DECODE: 3000.0}}
    cpu = {"limit": {"model_cpu_ms_per_image": 6.0, "decode_cpu_ms_per_image": 3.0, "limit_images_per_s": 200.0},
           "points": {"large": {"images_per_s": 170.0, "cpu_us_per_image": per_image}, LARGE_OVER_STREAM: stream}}

    assert summary_of_stream(cpu)["flotilla_cpu_us_per_image_large_photos_over_stream"] == 1000.0
    assert of_ceiling_if_flotilla_free(cpu, LARGE_OVER_STREAM) == round(180.0 * 10 / 9 / 200.0 / 0.9, 3)
    assert of_ceiling_if_flotilla_free(cpu, "small") is None, "a point the run did not measure"


def summary_of_stream(cpu: dict[str, Any]) -> dict[str, object]:
    return summary({**cpu, "mesh_vs_limit": 0.8, "mesh_vs_limit_over_stream": 0.9})


def test_the_near_free_budget_is_what_3x_leaves_after_the_other_processes() -> None:
    per_request = {"router": 300.0, "batcher": 200.0, "worker": 900.0, "s3": 500.0, LOAD_GENERATOR: 200.0,
                   "triton server": 100.0, "total": 2200.0}
    budget = near_free_budget({"mesh": {"cpu_us_per_request": per_request}})
    allowed = (os.cpu_count() or 1) * 1e6 / (3 * NEAR_FREE_BEFORE_REQUESTS_PER_S)
    assert budget["near_free_3x_cpu_us_per_request_allowed"] == round(allowed, 1)
    assert budget["near_free_3x_cpu_us_left_for_router_batcher_worker"] == round(allowed - 800.0, 1)
    assert budget["near_free_router_batcher_worker_cpu_us_per_request"] == 1400.0


def test_the_near_free_floors_come_off_what_3x_leaves_when_the_ceiling_part_ran() -> None:
    per_request = {"router": 300.0, "batcher": 200.0, "worker": 900.0, "s3": 500.0, LOAD_GENERATOR: 200.0,
                   "triton server": 100.0, "total": 2200.0}
    overhead = {"mesh": {"cpu_us_per_request": per_request}, "decode_cpu_us_per_image_idle_core": 250.0}
    ceiling = {"points": [{"tier": "router", "cpu_us_per_request": 300.0},
                          {"tier": EMPTY_SERVER, "cpu_us_per_request": 170.0}]}
    allowed = (os.cpu_count() or 1) * 1e6 / (3 * NEAR_FREE_BEFORE_REQUESTS_PER_S)
    budget = near_free_budget(overhead, ceiling)
    assert budget["near_free_3x_floors_cpu_us_per_request"] == 420.0
    assert budget["near_free_3x_cpu_us_left_after_floors"] == round(allowed - 800.0 - 420.0, 1)
    assert "near_free_3x_floors_cpu_us_per_request" not in near_free_budget(overhead)  # no ceiling part: no floors


def test_the_worker_beyond_decode_is_its_cpu_less_its_decode_threads_in_the_mesh_and_alone() -> None:
    def point(worker_us: float, decode_us: float) -> dict[str, object]:
        return {"images_per_s": 100.0, "photos": "large", "cpu_us_per_image": {"worker": worker_us},
                "counted_cpu_us_per_image": {WORKER_DECODE: decode_us}}

    overhead = {"mesh_large_photos": point(3500.0, 3000.0),
                "worker_alone_large_photos": {**point(3300.0, 2900.0), "batch_size": 8, "batches_in_flight": 4}}
    figures = large_photos_summary(overhead)
    assert figures["near_free_large_photos_worker_overhead_beyond_decode_ms"] == 0.5
    assert figures["worker_alone_overhead_beyond_decode_ms"] == 0.4
    assert figures["worker_alone_decode_cpu_ms_per_image"] == 2.9
    assert any("alone at its ceiling" in line and "**0.4**" in line for line in large_photos_lines(overhead))
    # A run without the decode counter (an older worker) reports neither.
    assert large_photos_summary({"mesh_large_photos": {"cpu_us_per_image": {"worker": 1.0}}}) == {}


def test_a_share_of_the_ceiling_above_one_is_not_judged() -> None:
    from flotilla.bench.report import beyond_ceiling

    assert beyond_ceiling(0.886) == "" and beyond_ceiling(1.0) == ""
    assert beyond_ceiling(1.004).startswith("not judged")


def test_a_share_of_a_limit_that_moved_more_than_the_judged_drift_across_the_run_is_not_judged() -> None:
    from flotilla.bench.report import JUDGED_DRIFT, judged

    assert judged(0.95, 0.089).startswith("not judged: the limit moved +8.9% between its measurements")
    assert judged(0.85, -0.04).startswith("not judged: the limit moved -4.0%")
    assert judged(0.886, JUDGED_DRIFT) == "" and judged(0.886, -0.01) == ""
    assert judged(0.886, float("nan")) == "", "a limit measured once (an older run) is judged as before"
    assert judged(1.004, 0.0).startswith("not judged: above 1")
