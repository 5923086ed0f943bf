"""The preprocess role's core: a batch of image uuids in, per-item results out.

For one batch it fetches every JPEG from the object store and decodes it
concurrently (a thread pool: both steps release the GIL) straight into its
row of one preallocated batch array, runs the batch on an inference backend
and splits the output back per item. The event loop is woken once per
batch, by the last image to finish, not once per image. A bad image fails
only its own item; a failure of the whole batch (backend down, unknown
model) raises.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from prometheus_client import Histogram

from flotilla.common import metrics
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


@dataclass(frozen=True)
class BatchOutcome:
    items: list[ItemOutcome]
    backend: str
    """The backend replica that ran the batch; empty if no item reached one."""


class ImageSource(Protocol):
    def get(self, key: str, max_bytes: int) -> bytes: ...


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
    ) -> None:
        self.models = models
        self.store = store
        self.backend = backend
        self.executor = executor
        self.max_object_bytes = max_object_bytes
        self.max_image_pixels = max_image_pixels
        self._timers: dict[tuple[str, str], Histogram] = {}

    def model(self, name: str) -> ServedModel:
        try:
            return self.models[name]
        except KeyError:
            served = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served: {served})") from None

    def _stage_timer(self, model: str, stage: str) -> Histogram:
        """The stage's histogram child (``labels`` looks it up under a lock on every call)."""
        child = self._timers.get((model, stage))
        if child is None:
            child = self._timers[(model, stage)] = metrics.PREPROCESS_SECONDS.labels(model, stage)
        return child

    def _load_into(self, row: np.ndarray, item: ItemRequest, model: ServedModel) -> None:
        key = object_key(item.image_uuid)
        started_s = time.perf_counter()
        data = self.store.get(key, self.max_object_bytes)
        fetched_s = time.perf_counter()
        self._stage_timer(model.name, "fetch").observe(fetched_s - started_s)
        decode_for_model(
            data, model.settings.input, what=f"image {item.image_uuid}", max_pixels=self.max_image_pixels, out=row
        )
        self._stage_timer(model.name, "decode").observe(time.perf_counter() - fetched_s)

    async def _load_batch(
        self, items: Sequence[ItemRequest], model: ServedModel
    ) -> tuple[np.ndarray, list[BaseException | None]]:
        """Every item's pixels in its row of one (N, H, W, 3) array, and each item's failure (None: loaded).

        Each item is one job on the executor; the last job to finish wakes
        the event loop, once for the whole batch.
        """
        spec = model.settings.input
        pixels = np.empty((len(items), spec.height_px, spec.width_px, 3), dtype=np.uint8)
        failures: list[BaseException | None] = [None] * len(items)
        loop = asyncio.get_running_loop()
        all_done = loop.create_future()
        remaining = [len(items)]
        lock = threading.Lock()

        def wake() -> None:
            if not all_done.done():
                all_done.set_result(None)

        def job(i: int) -> None:
            try:
                self._load_into(pixels[i], items[i], model)
            except BaseException as exc:  # noqa: BLE001 - each item's failure is its own outcome
                failures[i] = exc
            finally:
                with lock:
                    remaining[0] -= 1
                    last = remaining[0] == 0
                if last:
                    try:
                        loop.call_soon_threadsafe(wake)
                    except RuntimeError:  # the loop closed while the batch loaded (shutdown): nobody waits
                        pass

        for i in range(len(items)):
            self.executor.submit(job, i)
        await all_done
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
            best = top_k_rows(scores.reshape(len(good), -1), [items[i].top_k or DEFAULT_TOP_K for i in good])
            for i, pairs in zip(good, best, strict=True):
                outcomes[i] = ItemOutcome(classes=[ClassScore(idx, model.label(idx), score) for idx, score in pairs])
        missing = [items[i].image_uuid for i, o in enumerate(outcomes) if o is None]
        if missing:  # every item gets exactly one outcome; anything else is a bug
            raise FlotillaError(f"internal error: no outcome for {missing}")
        return BatchOutcome(outcomes, backend)  # type: ignore[arg-type]
