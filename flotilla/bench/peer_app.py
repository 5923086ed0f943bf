"""The bench's peer as a Ray Serve application: the mesh's job, one replica's work (issue 9, item 5).

The job is the mesh's: a JPEG's uuid in, the JPEG fetched from the same S3
store (``ObjectStore``, ``object_key``), decoded with the worker's own
``decode_for_model`` and ``to_batch_tensor`` (EfficientNet-Lite0's
``InputSpec`` from the catalog), the same ``model.onnx`` run with ONNX
Runtime (one session per replica, intra-op threads as the local stack gives
each Triton replica: cores / replicas, spinning off, as the Python-backend
wrapper ``flotilla/modelbuild/triton_onnx_model.py`` runs it), top-5 out.

Ray Serve serves it (:func:`application`) with ``num_replicas`` = the mesh's
Triton replicas and ``@serve.batch(max_batch_size, batch_wait_timeout_s)`` =
the batcher's ``max_batch_size`` and ``max_queue_delay_us``. Like the mesh
(two batches in flight per replica: one preprocessed while the other runs),
each replica forms up to two batches at once (``max_concurrent_batches=2``)
and runs one ONNX Runtime call at a time; it fetches (a keep-alive connection
per thread, the same signed GET as ``ObjectStore.get``) and decodes on
``fetch_threads`` threads per replica. Access logs are off.

:class:`PeerModel` (one replica's work) needs no Ray: it is unit-tested with
fakes. Ray Serve comes with the ``peer`` extra (``pip install -e '.[peer]'``);
``ray_available()`` says whether it is installed. :mod:`flotilla.bench.peer_run`
starts Ray and measures.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from flotilla.bench.inputs import MODEL
from flotilla.common.ids import object_key
from flotilla.config import InputSpec, PreprocessSettings, S3Settings
from flotilla.errors import FlotillaError
from flotilla.modelbuild.catalog import CATALOG
from flotilla.services.preprocess.imaging import decode_for_model, scores_to_probabilities, to_batch_tensor, top_k

TOP_K = 5
BATCHES_IN_FLIGHT_PER_REPLICA = 2
"""The bench's ``max_inflight_batches = 2 x replicas``."""


def ray_available() -> bool:
    """Whether Ray Serve (``ray[serve]``: ray plus its HTTP proxy's packages) is
    installed; found without importing ray."""
    specs = {m: importlib.util.find_spec(m) for m in ("ray", "starlette", "uvicorn", "fastapi", "aiohttp")}
    ray_spec = specs["ray"]
    if ray_spec is None or any(spec is None for spec in specs.values()):
        return False
    locations = ray_spec.submodule_search_locations or []
    return any((Path(location) / "serve" / "__init__.py").exists() for location in locations)


def model_input() -> InputSpec:
    """The model's input, as the stack serves it (the catalog the build checks the artifact against)."""
    return InputSpec.model_validate(CATALOG[MODEL]["input"])


# -- the work of one replica (no Ray here: unit-tested with fakes) -------------------


class ImageSource(Protocol):
    def get(self, key: str, max_bytes: int) -> bytes: ...


class Session(Protocol):
    def run(self, output_names: list[str], feeds: dict[str, NDArray[Any]]) -> list[NDArray[Any]]: ...


def ort_session(onnx_file: Path | str, intra_op_threads: int) -> Session:
    """An ONNX Runtime CPU session set up as the Triton Python-backend wrapper sets it up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session: Session = ort.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    return session


@dataclass
class PeerConfig:
    """What a replica needs; picklable (it travels to Ray's worker processes)."""

    onnx_file: str
    s3: S3Settings
    spec: InputSpec = field(default_factory=model_input)
    output_name: str = str(CATALOG[MODEL]["output_name"])
    output_kind: str = str(CATALOG[MODEL]["output_kind"])
    labels_file: str | None = None
    intra_op_threads: int = 1
    fetch_threads: int = 8
    max_object_bytes: int = PreprocessSettings().max_object_bytes
    max_image_pixels: int = PreprocessSettings().max_image_pixels
    top_k: int = TOP_K


class PeerModel:
    """One replica's work for a batch of uuids: fetch and decode concurrently
    (threads), one tensor, one ONNX Runtime call at a time, top-k per item.
    A bad image fails only its own item (``{"error": ...}``)."""

    def __init__(self, config: PeerConfig, *, store: ImageSource | None = None, session: Session | None = None) -> None:
        from flotilla.common.object_store import ObjectStore

        self.config = config
        self.store: ImageSource = store if store is not None else ObjectStore(
            config.s3, pool_size=max(16, config.fetch_threads)
        )
        self.session: Session = session if session is not None else ort_session(
            config.onnx_file, config.intra_op_threads
        )
        self.labels: list[str] = []
        if config.labels_file and Path(config.labels_file).exists():
            self.labels = Path(config.labels_file).read_text(encoding="utf-8").splitlines()
        self.loaders = ThreadPoolExecutor(config.fetch_threads, thread_name_prefix="fetch")
        self.runner = ThreadPoolExecutor(1, thread_name_prefix="ort")  # one model call at a time, as one Triton stub

    def label(self, index: int) -> str:
        return self.labels[index] if index < len(self.labels) else str(index)

    def load(self, image_uuid: str) -> NDArray[np.uint8]:
        data = self.store.get(object_key(image_uuid), self.config.max_object_bytes)
        return decode_for_model(
            data, self.config.spec, what=f"image {image_uuid}", max_pixels=self.config.max_image_pixels
        )

    def infer(self, tensor: NDArray[Any]) -> NDArray[Any]:
        return self.session.run([self.config.output_name], {self.config.spec.name: tensor})[0]

    async def run_batch(self, uuids: Sequence[str]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        loaded = await asyncio.gather(
            *(loop.run_in_executor(self.loaders, self.load, u) for u in uuids), return_exceptions=True
        )
        answers: list[dict[str, Any]] = [{} for _ in uuids]
        good: list[int] = []
        images: list[NDArray[np.uint8]] = []
        for i, result in enumerate(loaded):
            if isinstance(result, BaseException):
                message = result.message if isinstance(result, FlotillaError) else f"{type(result).__name__}: {result}"
                answers[i] = {"error": message}
            else:
                good.append(i)
                images.append(result)
        if good:
            tensor = to_batch_tensor(images, self.config.spec)
            outputs = await loop.run_in_executor(self.runner, self.infer, tensor)
            scores = scores_to_probabilities(outputs, self.config.output_kind)
            for row, i in enumerate(good):
                answers[i] = {
                    "classes": [[idx, self.label(idx), score] for idx, score in top_k(scores[row], self.config.top_k)],
                }
        for answer in answers:
            answer["batch"] = len(uuids)
        return answers


# -- Ray Serve ------------------------------------------------------------------------


def application(config: PeerConfig, *, replicas: int, max_batch_size: int, batch_wait_timeout_s: float,
                cpus_per_replica: float) -> Any:
    """The Ray Serve application: ``replicas`` replicas of :class:`PeerModel` behind ``@serve.batch``."""
    from ray import serve
    from starlette.requests import Request

    class RayServePeer:
        def __init__(self, config: PeerConfig) -> None:
            self.model = PeerModel(config)

        @serve.batch(
            max_batch_size=max_batch_size,
            batch_wait_timeout_s=batch_wait_timeout_s,
            max_concurrent_batches=BATCHES_IN_FLIGHT_PER_REPLICA,
        )
        async def classify(self, uuids: list[str]) -> list[dict[str, Any]]:
            return await self.model.run_batch(uuids)

        async def __call__(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            answer: dict[str, Any] = await self.classify(body["image_uuid"])
            return answer

    # serve.deployment called rather than written as the class's decorator (the same thing): mypy
    # types a decorated class as the class, not as what the decorator returns (a Deployment, with bind).
    deployment = serve.deployment(
        name="efficientnet-lite0",
        num_replicas=replicas,
        # Room for the batches each replica forms at once, as the mesh's dispatch slots allow.
        max_ongoing_requests=BATCHES_IN_FLIGHT_PER_REPLICA * max_batch_size,
        ray_actor_options={"num_cpus": cpus_per_replica},
        logging_config={"log_level": "WARNING", "enable_access_log": False},
    )(RayServePeer)
    return deployment.bind(config)
