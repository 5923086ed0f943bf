"""The preprocess role's core: a batch of image uuids in, per-item results out.

For one batch it fetches every JPEG from the object store at once, on the
event loop (no thread per GET), then decodes them straight into their rows
of one preallocated batch array in a few jobs on a thread pool (decode and
resize release the GIL: ``decode_jobs`` of them use as many cores), runs the
batch on an inference backend and splits the output back per item. Per
batch that is ``decode_jobs`` thread hand-offs, not one or more per image:
with 8 fetch-and-decode threads, perf put as much of the worker's CPU in
the kernel's thread switches and wake-ups (the GIL passed between them and
the event loop) as in resizing small images. A bad image fails only its
own item; a failure of the whole batch (backend down, unknown model)
raises. With tracing on, each image's fetch and each decode job is a span
under the batch's (off, ``tracing.span`` is a null context).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from opentelemetry.trace import SpanKind
from prometheus_client import Counter, Histogram

from flotilla.common import metrics, tracing
from flotilla.common.ids import object_key
from flotilla.config import ModelSettings
from flotilla.errors import FlotillaError, InvalidArgument, ModelNotFound
from flotilla.services.preprocess.backend import InferenceBackend
from flotilla.services.preprocess.imaging import batch_to_tensor, decode_for_model, scores_to_probabilities, top_k_rows

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class ItemRequest:
    image_uuid: str
    top_k: int = DEFAULT_TOP_K
    request_id: str = ""
    all_scores: bool = False
    """Also return every class's probability (``ItemOutcome.scores``)."""


@dataclass(frozen=True)
class ClassScore:
    index: int
    label: str
    score: float


@dataclass(frozen=True)
class ItemOutcome:
    """Exactly one of ``classes`` and ``error`` is set."""

    classes: list[ClassScore] | None = None
    error: FlotillaError | None = None
    scores: NDArray[np.float32] | None = None
    """Every class's probability by class index, when the item asked for them."""


@dataclass(frozen=True)
class BatchOutcome:
    items: list[ItemOutcome]
    backend: str
    """The backend replica that ran the batch; empty if no item reached one."""


class ImageSource(Protocol):
    async def get(self, key: str, max_bytes: int) -> bytes | bytearray: ...


@dataclass(frozen=True)
class ServedModel:
    """A registered model (its spec from the controller) plus its class labels."""

    name: str
    settings: ModelSettings
    labels: list[str]

    @property
    def backend_model(self) -> str:
        return self.settings.backend_model or self.name

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)

    @classmethod
    def from_spec(cls, name: str, settings: ModelSettings) -> ServedModel:
        """Labels: the spec's list (the controller fills it from the artifact), else ``labels_file``."""
        labels = list(settings.labels)
        if not labels and settings.labels_file is not None and Path(settings.labels_file).exists():
            labels = Path(settings.labels_file).read_text(encoding="utf-8").splitlines()
        return cls(name, settings, labels)


class BatchProcessor:
    """Fetch, decode, preprocess, infer and split one batch."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        store: ImageSource,
        backend: InferenceBackend,
        executor: Executor,
        *,
        max_object_bytes: int,
        max_image_pixels: int,
        decode_jobs: int = 2,
    ) -> None:
        self.models = models
        self.store = store
        self.backend = backend
        self.executor = executor
        self.decode_jobs = decode_jobs
        """At most this many executor jobs decode one batch (its images split evenly between them)."""
        self.max_object_bytes = max_object_bytes
        self.max_image_pixels = max_image_pixels
        # Metric children looked up once each (``labels`` takes a lock on every call).
        self._stage_timers: dict[tuple[str, str], Histogram] = {}
        self._decode_cpu_counters: dict[str, Counter] = {}

    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            served = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served: {served})") from None

    def _stage_timer(self, model: str, stage: str) -> Histogram:
        timer = self._stage_timers.get((model, stage))
        if timer is None:
            timer = self._stage_timers[(model, stage)] = metrics.PREPROCESS_SECONDS.labels(model, stage)
        return timer

    def _decode_cpu_counter(self, model: str) -> Counter:
        counter = self._decode_cpu_counters.get(model)
        if counter is None:
            counter = self._decode_cpu_counters[model] = metrics.PREPROCESS_DECODE_CPU_SECONDS.labels(model)
        return counter

    async def _fetch(self, item: ItemRequest, model: ServedModel) -> bytes | bytearray:
        key = object_key(item.image_uuid)
        started_s = time.perf_counter()
        with tracing.span("fetch", kind=SpanKind.CLIENT, attributes={"flotilla.image_uuid": item.image_uuid}):
            data = await self.store.get(key, self.max_object_bytes)
        self._stage_timer(model.name, "fetch").observe(time.perf_counter() - started_s)
        return data

    async def _load_batch(
        self, items: Sequence[ItemRequest], model: ServedModel
    ) -> tuple[NDArray[np.uint8], list[BaseException | None]]:
        """Every item's pixels in its row of one (N, H, W, 3) array, and each item's failure (None: loaded)."""
        fetched = await asyncio.gather(*(self._fetch(item, model) for item in items), return_exceptions=True)
        failures: list[BaseException | None] = [f if isinstance(f, BaseException) else None for f in fetched]
        jpegs = {i: f for i, f in enumerate(fetched) if not isinstance(f, BaseException)}  # item index -> its JPEG
        spec = model.settings.input
        pixels = np.empty((len(items), spec.height_px, spec.width_px, 3), dtype=np.uint8)
        todo = list(jpegs)
        if not todo:
            return pixels, failures
        timer = self._stage_timer(model.name, "decode")
        cpu = self._decode_cpu_counter(model.name)
        parent = tracing.current_context()  # the decode threads do not share the event loop's context

        def decode(indices: list[int]) -> None:
            with tracing.span("decode", context=parent, attributes={"flotilla.images": len(indices)}):
                cpu_started_s, wall_started_s = time.thread_time(), time.perf_counter()
                for i in indices:
                    started_s = time.perf_counter()
                    try:
                        decode_for_model(
                            jpegs[i],
                            spec, what=f"image {items[i].image_uuid}", max_pixels=self.max_image_pixels,
                            out=pixels[i],
                        )
                    except Exception as exc:  # noqa: BLE001 - each item's failure is its own outcome
                        failures[i] = exc
                    timer.observe(time.perf_counter() - started_s)
                cpu.inc(time.thread_time() - cpu_started_s)
                metrics.PREPROCESS_DECODE_BUSY_SECONDS.inc(time.perf_counter() - wall_started_s)

        jobs = max(1, min(self.decode_jobs, len(todo)))
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(self.executor, decode, todo[j::jobs]) for j in range(jobs)))
        return pixels, failures

    async def process(
        self, model_name: str, items: Sequence[ItemRequest], *, version: int = 0, timeout_s: float | None = None
    ) -> BatchOutcome:
        """``version`` 0 runs the model's default version."""
        model = self.model(model_name)
        if version and version not in model.settings.versions:
            raise InvalidArgument(
                f"model {model_name!r} has no version {version}; live versions: {model.settings.versions}"
            )
        version = version or model.settings.served_version
        if not items:
            return BatchOutcome([], "")
        pixels, failures = await self._load_batch(items, model)

        outcomes: list[ItemOutcome | None] = [None] * len(items)
        good: list[int] = []
        for i, failure in enumerate(failures):
            if failure is None:
                good.append(i)
            elif isinstance(failure, FlotillaError):
                outcomes[i] = ItemOutcome(error=failure)
            else:
                log.error("image %s: unexpected load failure", items[i].image_uuid, exc_info=failure)
                outcomes[i] = ItemOutcome(error=FlotillaError("internal error loading the image"))

        backend = ""
        if good:
            started_s = time.perf_counter()
            rows = pixels if len(good) == len(items) else pixels[good]
            tensor = batch_to_tensor(rows, model.settings.input)
            self._stage_timer(model.name, "tensor").observe(time.perf_counter() - started_s)
            result = await self.backend.infer(
                model.backend_model,
                model.settings.input.name,
                tensor,
                model.settings.output_name,
                version=version,
                timeout_s=timeout_s,
            )
            backend = result.backend
            scores = scores_to_probabilities(result.outputs, model.settings.output_kind)
            rows = scores.reshape(len(good), -1)
            best = top_k_rows(rows, [items[i].top_k or DEFAULT_TOP_K for i in good])
            for row, (i, pairs) in enumerate(zip(good, best, strict=True)):
                outcomes[i] = ItemOutcome(
                    classes=[ClassScore(idx, model.label(idx), score) for idx, score in pairs],
                    scores=rows[row].astype(np.float32, copy=False) if items[i].all_scores else None,
                )
        missing = [items[i].image_uuid for i, o in enumerate(outcomes) if o is None]
        if missing:  # every item gets exactly one outcome; anything else is a bug
            raise FlotillaError(f"internal error: no outcome for {missing}")
        return BatchOutcome([o for o in outcomes if o is not None], backend)
