"""The physical limit the bench holds the mesh against (``mesh_vs_limit`` in :mod:`flotilla.bench.cpu`).

The limit is the most images per second this machine's cores could classify doing nothing but the two
jobs no serving stack can skip: running the model (ONNX Runtime with one intra-op thread, as each of
the bench's Triton replicas runs it) and decoding each photo into the model's input
(``decode_for_model``, as the preprocess workers do). It is cores / (model + decode CPU per image), on
the bench's 1-2 MP photos, measured before the stack starts and again after it stops: the mesh's points
run between the two, and this host's speed drifts by a few percent from minute to minute (six limits
in a row on 2026-12-07 read 146.2 to 153.5 images/s), so the figures the mesh is held against are the
means of the two (:func:`bracketed`), with each measurement and their spread beside them.

Both figures are measured with every core running them at once: one process a core, each running one
batch, then decoding as many photos, in turn, as the mesh's replicas and workers do. The mesh always
runs with every core busy, and a core beside busy ones runs both slower than beside idle ones (shared
caches and memory bandwidth), so figures from one process on an otherwise idle machine would set the
limit too high. On the bench's 2-core machine (2026-12-06) this measurement gave, alone against every
core busy, 6.34 against 6.39 CPU-ms per image for the model and 3.03 against 3.28 for the decode in one
run, and 7.47 against 7.78 and 3.48 against 3.89 in another: the model 1-4% and the decode 8-12% slower
with every core busy, the limit 3-6% lower. The figures from this process alone, the other cores idle,
are reported beside the limit's (``*_alone``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.context import SpawnProcess
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import Any

from numpy.typing import NDArray

from flotilla.common.runtime_env import SERVICE_ENV
from flotilla.config import FlotillaSettings, InputSpec
from flotilla.services.preprocess.imaging import decode_for_model, to_batch_tensor


def _ort_runner(onnx_file: Path, batch: NDArray[Any]) -> Callable[[], object]:
    """One ONNX Runtime run of ``batch``, one intra-op thread (as each of the bench's replicas on 2 cores
    runs), warmed up (arena, kernels)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run() -> object:
        return session.run(None, {name: batch})

    for _ in range(2):
        run()
    return run


def ort_cpu_ms_per_image(onnx_file: Path, batch: NDArray[Any], *, min_cpu_s: float = 3.0) -> float:
    """ONNX Runtime's CPU-ms per image on ``batch``, one intra-op thread, in this process."""
    run_batch = _ort_runner(onnx_file, batch)
    runs, start = 0, time.process_time()
    while time.process_time() - start < min_cpu_s:
        run_batch()
        runs += 1
    return (time.process_time() - start) * 1000.0 / (runs * len(batch))


def decode_cpu_ms_per_image(photos: list[bytes], spec: InputSpec, max_pixels: int, *, min_cpu_s: float = 2.0) -> float:
    """decode_for_model's CPU-ms per image over ``photos``, in this process."""
    decode_for_model(photos[0], spec, what="bench", max_pixels=max_pixels)
    images, start = 0, time.process_time()
    while time.process_time() - start < min_cpu_s:
        for photo in photos:
            decode_for_model(photo, spec, what="bench", max_pixels=max_pixels)
        images += len(photos)
    return (time.process_time() - start) * 1000.0 / images


BUSY_START_TIMEOUT_S = 120.0
"""How long a process of :func:`cores_busy_cpu_ms_per_image` waits for the others to be ready."""
BUSY_TIMEOUT_S = 300.0
"""How long :func:`cores_busy_cpu_ms_per_image` waits for every process's figures."""
BUSY_TAIL_LIMIT_S = 120.0
"""How long a process that has its figures keeps the load on while the others finish theirs."""


@dataclass(frozen=True)
class BusyJob:
    """What each process of :func:`cores_busy_cpu_ms_per_image` runs (pickled to it)."""

    onnx_file: Path
    batch: NDArray[Any]
    """The model's batch tensor: one ONNX Runtime run per turn."""
    photos: list[bytes]
    """Decoded ``len(batch)`` a turn, in order, round and round."""
    spec: InputSpec
    max_pixels: int
    min_cpu_s: float
    """CPU seconds (model and decode together) each process measures for."""


def _busy_process(job: BusyJob, start: Barrier, finished: Synchronized[int], report: Connection) -> None:
    """One process of :func:`cores_busy_cpu_ms_per_image`: sends ``("ok", (model ms, decode ms))`` per image,
    or ``("error", traceback)``; then keeps running the same turns until every process has its figures,
    so that none is measured with a core idle."""
    try:
        run_batch = _ort_runner(job.onnx_file, job.batch)
        decode_for_model(job.photos[0], job.spec, what="bench", max_pixels=job.max_pixels)  # warm-up
        size = len(job.batch)
        start.wait(BUSY_START_TIMEOUT_S)
        model_s = decode_s = 0.0
        turns, measuring, stop_at = 0, True, float("inf")
        while measuring or (finished.value < start.parties and time.monotonic() < stop_at):
            begin = time.process_time()
            run_batch()
            ran = time.process_time()
            for i in range(size):
                decode_for_model(job.photos[(turns * size + i) % len(job.photos)], job.spec, what="bench",
                                 max_pixels=job.max_pixels)
            decoded = time.process_time()
            turns += 1
            if measuring:
                model_s, decode_s = model_s + ran - begin, decode_s + decoded - ran
                if model_s + decode_s >= job.min_cpu_s:
                    measuring, stop_at = False, time.monotonic() + BUSY_TAIL_LIMIT_S
                    report.send(("ok", (model_s * 1000.0 / (turns * size), decode_s * 1000.0 / (turns * size))))
                    with finished.get_lock():
                        finished.value += 1
    except BaseException:
        report.send(("error", traceback.format_exc()))
        raise
    finally:
        report.close()


@contextlib.contextmanager
def _services_environment() -> Iterator[None]:
    """This process's environment as a service's (``runtime_env.SERVICE_ENV``, where it sets none of
    them itself) while it spawns the limit's processes: they decode as the workers do, with the same
    malloc thresholds."""
    added = {name: value for name, value in SERVICE_ENV.items() if name not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def cores_busy_cpu_ms_per_image(job: BusyJob, processes: int) -> list[tuple[float, float]]:
    """The model's and the decode's CPU-ms per image in each of ``processes`` processes running at
    once (spawned, started together once each has its session ready), each running one ONNX Runtime
    batch, then decoding as many photos, in turn, as the mesh's replicas and workers do.

    Every process is ended before this returns, and a process that fails or dies raises here."""
    context = multiprocessing.get_context("spawn")
    start, finished = context.Barrier(processes), context.Value("i", 0)
    children: list[tuple[SpawnProcess, Connection]] = []
    try:
        for index in range(processes):
            receive, send = context.Pipe(duplex=False)
            child = context.Process(target=_busy_process, args=(job, start, finished, send),
                                    name=f"flotilla-bench-limit-{index}", daemon=True)
            children.append((child, receive))
            with _services_environment():
                child.start()
            send.close()  # the child's end: a child that dies leaves EOF on ``receive``
        pending = {receive: index for index, (_, receive) in enumerate(children)}
        figures: dict[int, tuple[float, float]] = {}
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while pending:
            ready = wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"bench limit: {len(pending)} of {processes} processes sent no figures in "
                                   f"{BUSY_TIMEOUT_S:.0f} s")
            for connection in ready:
                assert isinstance(connection, Connection)
                index = pending.pop(connection)
                child = children[index][0]
                try:
                    kind, value = connection.recv()
                except EOFError:
                    child.join(5.0)
                    raise RuntimeError(f"bench limit: process {index} ({child.name}) exited with code "
                                       f"{child.exitcode} before sending its figures") from None
                if kind != "ok":
                    raise RuntimeError(f"bench limit: process {index} ({child.name}) failed:\n{value}")
                figures[index] = value
        for child, _ in children:
            child.join(BUSY_TAIL_LIMIT_S + 10.0)
        return [figures[index] for index in range(processes)]
    finally:
        for child, receive in children:
            receive.close()
            if child.is_alive():
                child.terminate()
                child.join(5.0)
            if child.is_alive():
                child.kill()
                child.join()


def physical_limit(settings: FlotillaSettings, model: str, photos: list[bytes], batch_size: int) -> dict[str, float]:
    """CPU-ms per image of the model (ONNX Runtime) and of the decode on ``photos``, first each alone in
    this process with the other cores idle (``*_alone``), then with every core running both at once
    (the means over one process a core: the limit's figures, as the mesh runs), and the limit
    they make: cores / (model + decode CPU per image)."""
    spec = settings.models[model].input
    max_pixels = settings.preprocess.max_image_pixels
    pixels = [decode_for_model(p, spec, what="bench", max_pixels=max_pixels) for p in photos]
    batch = to_batch_tensor([pixels[i % len(pixels)] for i in range(batch_size)], spec)
    onnx_file = Path("build/models") / model / "1" / "model.onnx"
    model_alone_ms = ort_cpu_ms_per_image(onnx_file, batch)
    decode_alone_ms = decode_cpu_ms_per_image(photos, spec, max_pixels)
    cores = os.cpu_count() or 1
    busy = cores_busy_cpu_ms_per_image(BusyJob(onnx_file, batch, photos, spec, max_pixels, min_cpu_s=4.0), cores)
    model_ms = statistics.fmean(figures[0] for figures in busy)
    decode_ms = statistics.fmean(figures[1] for figures in busy)
    return {
        "batch_size": batch_size,
        "model_cpu_ms_per_image": round(model_ms, 3),
        "decode_cpu_ms_per_image": round(decode_ms, 3),
        "model_cpu_ms_per_image_alone": round(model_alone_ms, 3),
        "decode_cpu_ms_per_image_alone": round(decode_alone_ms, 3),
        "cores": cores,
        "measured_with_cores_busy": cores,
        "limit_images_per_s": round(cores / ((model_ms + decode_ms) / 1000.0), 1),
    }


LIMIT_FIGURES = (
    "model_cpu_ms_per_image", "decode_cpu_ms_per_image", "model_cpu_ms_per_image_alone", "decode_cpu_ms_per_image_alone",
)


def bracketed(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """The limit from two measurements of :func:`physical_limit`, one before the stack started and one
    after it stopped: each figure's mean, the limit those means make, each measurement as it was
    (``before``, ``after``) and how far the second's limit lies from the first's (``drift``, a
    fraction: -0.02 is a host 2% slower at the end)."""
    means = {key: round(statistics.fmean((before[key], after[key])), 3) for key in LIMIT_FIGURES}
    cores = before["cores"]
    return {
        **before,
        **means,
        "limit_images_per_s": round(
            cores / ((means["model_cpu_ms_per_image"] + means["decode_cpu_ms_per_image"]) / 1000.0), 1
        ),
        "before": before,
        "after": after,
        "drift": round(after["limit_images_per_s"] / before["limit_images_per_s"] - 1.0, 3),
    }
