"""Typed configuration: one YAML file, overridden by ``FLOTILLA_*`` variables.

Precedence, highest first: environment (``FLOTILLA_`` prefix, ``__`` between
nested names, e.g. ``FLOTILLA_TRITON__REPLICAS=3``), then the YAML file, then
the defaults below. Nothing is read at import time: call ``load_settings``.
Every duration and size carries its unit in its name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class S3Settings(_Section):
    """Where images are uploaded and fetched from."""

    endpoint: str = "127.0.0.1:8333"
    """host:port of the S3 API."""
    access_key: str = "flotilla"
    """S3 access key id."""
    secret_key: SecretStr = SecretStr("flotilla-dev-secret")
    """S3 secret access key."""
    bucket: str = "images"
    """Bucket holding ``<uuid>.jpg`` objects."""
    secure: bool = False
    """Use HTTPS to reach the S3 API."""
    region: str = "us-east-1"
    """Region requests are signed for: the bucket's region on AWS S3; SeaweedFS and MinIO accept us-east-1."""
    ca_file: Path | None = None
    """PEM bundle of the CAs trusted for the store's certificate (``secure`` only). Unset: ``tls.ca_file``
    when TLS is on, else the system's roots."""


class BatchingSettings(_Section):
    """How a model's batcher forms batches (names follow Triton's dynamic_batching).

    Priority level 1 is the highest. A request may lower its queue timeout
    below ``default_timeout_us`` but never raise it; its gRPC deadline
    always applies as well.
    """

    max_batch_size: int = Field(8, ge=1, le=1024)
    """Largest batch sent to a preprocess worker."""
    preferred_batch_sizes: list[int] = []
    """With these set, a batch leaves at once when the largest preferred size is queued;
    at the delay, the batch is the largest preferred size that fits (or all queued)."""
    max_queue_delay_us: int = Field(2000, ge=0)
    """Longest the oldest queued request waits for its batch to fill, in microseconds."""
    max_queue_size: int = Field(1024, ge=1)
    """Requests queued beyond this are rejected at once with RESOURCE_EXHAUSTED."""
    max_inflight_batches: int = Field(2, ge=1)
    """Batches dispatched and not yet answered, at most."""
    priority_levels: int = Field(0, ge=0, le=100)
    """Number of priority levels; 0 turns priorities off (request priorities are ignored)."""
    default_priority_level: int = Field(0, ge=0)
    """Level of requests that name none; 0 means the lowest level."""
    priority_aging_us: int = Field(100_000, ge=0)
    """Starvation bound: a request queued this long is served before any younger request,
    whatever its level (requests DELAYed past their queue timeout excepted). 0 turns aging
    off (strict priority)."""
    default_timeout_us: int = Field(0, ge=0)
    """Queue timeout for requests that set none, in microseconds; 0 means no queue timeout."""
    timeout_action: Literal["REJECT", "DELAY"] = "REJECT"
    """REJECT: a request past its queue timeout leaves with DEADLINE_EXCEEDED.
    DELAY: it stays queued behind every request still within its timeout."""
    batch_timeout_s: float = Field(30.0, gt=0)
    """Bound on one batch's preprocess and inference call when no request in it has a deadline."""

    @model_validator(mode="after")
    def _check_consistency(self) -> BatchingSettings:
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise ValueError(
                    f"preferred_batch_sizes: {size} is outside 1..max_batch_size ({self.max_batch_size})"
                )
        if len(set(self.preferred_batch_sizes)) != len(self.preferred_batch_sizes):
            raise ValueError(f"preferred_batch_sizes: {self.preferred_batch_sizes} has duplicates")
        self.preferred_batch_sizes = sorted(self.preferred_batch_sizes)
        levels = max(self.priority_levels, 1)
        if self.default_priority_level > levels:
            raise ValueError(
                f"default_priority_level: {self.default_priority_level} is above priority_levels ({levels})"
            )
        return self

    @property
    def levels(self) -> int:
        """Priority levels in effect (at least one)."""
        return max(self.priority_levels, 1)

    @property
    def default_level(self) -> int:
        return self.default_priority_level or self.levels


class InputSpec(_Section):
    """What the model's input tensor looks like, and how to make it from a JPEG.

    The pipeline, in order: read the EXIF orientation (``apply_exif_orientation``),
    decode DCT-scaled, turn the pixels upright, resize (``resize``, ``resize_px``,
    ``crop_fraction``), put the channels in ``channel_order``, and for FP32
    compute ``(pixel * scale - mean) / std`` per channel; then ``layout``.

    A deploy reads ``name``, ``dtype``, ``layout`` and a fixed ``height_px`` and
    ``width_px`` from the model's ONNX graph when the spec leaves them unset (the
    defaults below stand where the graph does not say, e.g. dynamic sizes), and
    checks those given against it. Channel order, resize, scale and mean/std
    are not in a graph: only the spec says them.
    """

    name: str = "images"
    """Input tensor name in the backend model."""
    height_px: int = Field(224, ge=1)
    """Height of the tensor's images in pixels."""
    width_px: int = Field(224, ge=1)
    """Width of the tensor's images in pixels."""
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    """Tensor layout of the batch."""
    dtype: Literal["UINT8", "FP32"] = "UINT8"
    """UINT8 ships raw pixels (normalisation folded into the model); FP32 applies scale, mean and std."""
    channel_order: Literal["RGB", "BGR"] = "RGB"
    """Order of the colour channels in the tensor (BGR for Caffe- and OpenCV-trained models)."""
    scale: float = Field(1.0, gt=0.0)
    """FP32 only: 0..255 pixels are multiplied by this before the mean is subtracted (1/255 for 0..1)."""
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """FP32 only: per-channel value subtracted from ``pixel * scale``, in ``channel_order``."""
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """FP32 only: per-channel divisor applied after the mean, in ``channel_order``."""
    resize: Literal["stretch", "center_crop"] = "stretch"
    """stretch: resize ignoring the aspect ratio; center_crop: scale the short side, crop the centre."""
    resize_px: int | None = Field(None, ge=1)
    """stretch: stretch to resize_px x resize_px, then crop the centre height x width.
    center_crop: scale the short side to resize_px, then crop the centre height x width.
    Unset: stretch goes straight to height x width; center_crop uses ``crop_fraction``."""
    crop_fraction: float = Field(0.875, gt=0.0, le=1.0)
    """center_crop without resize_px: the crop covers this fraction of the scaled short side."""
    apply_exif_orientation: bool = True
    """Turn the image upright as its EXIF orientation tag (1..8) says, as phones and viewers do."""

    @model_validator(mode="after")
    def _check_resize(self) -> InputSpec:
        if self.resize_px is not None and self.resize_px < max(self.height_px, self.width_px):
            raise ValueError(
                f"resize_px ({self.resize_px}) is below the crop "
                f"{self.height_px} x {self.width_px}; the crop must fit in the resized image"
            )
        return self


StrategyName = Literal["round_robin", "least_outstanding", "power_of_two"]


class PoolSettings(_Section):
    """How a tier spreads calls over the replicas of the next tier."""

    strategy: StrategyName = "round_robin"
    """round_robin, least_outstanding or power_of_two (two at random, the less busy)."""
    max_attempts: int = Field(3, ge=1)
    """Attempts per call; only UNAVAILABLE is retried, each time on another replica."""
    eject_after_failures: int = Field(2, ge=1)
    """Consecutive UNAVAILABLE failures that eject a replica (passive check)."""
    eject_cooldown_s: float = Field(1.0, gt=0)
    """How long a passively ejected replica is left out before it is tried again."""
    health_check_interval_s: float = Field(0.25, gt=0)
    """Time between active probes of every replica."""
    health_check_timeout_s: float = Field(0.5, gt=0)
    """A probe slower than this counts as failed."""
    health_check_unhealthy_after: int = Field(2, ge=1)
    """Failed probes in a row that eject a replica."""
    dns_refresh_interval_s: float = Field(0.0, ge=0)
    """Re-resolve each configured or registered peer name this often and hold one endpoint per
    address behind it (Kubernetes headless Services: no pinning to one pod); 0 uses each name as
    one endpoint (the local stack, where every name is one process)."""


class BackendSettings(_Section):
    """How a model runs on the inference backends (Truss-style instance groups)."""

    strategy: StrategyName | None = None
    """Replica choice for this model; defaults to pools.strategy."""
    instance_groups: int = Field(1, ge=1)
    """Model instances per Triton replica (Triton's instance_group count)."""
    predict_concurrency: int = Field(1, ge=1)
    """Executions in flight per instance that the pool allows. Capacity =
    replicas x instance_groups x predict_concurrency; beyond it work waits in
    Flotilla, not in Triton."""
    max_batch_size: int = Field(64, ge=1)
    """Triton's max_batch_size for the model (the largest batch a copy accepts)."""
    triton_dynamic_batching_us: int | None = Field(None, ge=0)
    """Turn on Triton's own dynamic batcher with this queue delay (load-test baselines only)."""


class ModelSettings(_Section):
    """One served model: its registry record's spec (KFServing TrainedModel-like).

    The same schema is the ``--spec`` file of ``flotilla models deploy`` and an
    entry under ``models:`` in the stack's YAML (deployed through the registry
    when the stack starts).
    """

    backend_model: str | None = None
    """The model's name in the inference backend; defaults to the Flotilla name."""
    framework: str = "onnx"
    """Artifact format. Supported: onnx (run by the generic Python-backend ONNX wrapper)."""
    storage_uri: str = ""
    """s3://bucket/prefix holding ``<version>/model.onnx`` (and optionally ``labels.txt``)."""
    artifact: Path | None = None
    """Local directory the stack uploads to ``storage_uri`` before deploying (local stack only)."""
    versions: list[int] = [1]
    """Versions kept live on every copy (Triton version_policy specific)."""
    default_version: int = Field(0, ge=0)
    """Version a request gets when it names none; 0 means the highest of ``versions``."""
    memory_mb: float = Field(300.0, gt=0)
    """Declared memory of one copy in MiB; replaced by the measured value after the first load."""
    min_copies: int = Field(1, ge=0)
    """Copies kept loaded whatever the traffic; 0 allows scale-to-zero."""
    max_copies: int = Field(1, ge=1)
    """Most copies the autoscaler may place."""
    input: InputSpec = InputSpec()
    output_name: str = "probabilities"
    """Output tensor holding per-class scores; unset, a deploy takes the graph's output when it has one."""
    output_kind: Literal["probabilities", "logits"] = "probabilities"
    """probabilities: scores are used as they are; logits: softmax is applied first."""
    labels: list[str] = []
    """Class names, index = position. Else ``labels_file``, else the artifact's labels.txt, else indices."""
    labels_file: Path | None = None
    """One class name per line; index = line number."""
    batching: BatchingSettings = BatchingSettings()
    backend: BackendSettings = BackendSettings()
    dedicated_batcher: bool = False
    """Queue this model only on batchers started for it alone (``flotilla serve batcher --model``;
    the local stack starts one, ``k8s render`` writes its Deployment), never on a shared shard: its
    traffic shares no process with other models'. While none is up it waits on a shared shard."""

    @model_validator(mode="after")
    def _check_copies(self) -> ModelSettings:
        if self.min_copies > self.max_copies:
            raise ValueError(f"min_copies ({self.min_copies}) is above max_copies ({self.max_copies})")
        if not self.versions or any(v < 1 for v in self.versions):
            raise ValueError(f"versions: {self.versions} must list positive version numbers")
        if len(set(self.versions)) != len(self.versions):
            raise ValueError(f"versions: {self.versions} has duplicates")
        self.versions = sorted(self.versions)
        if self.default_version and self.default_version not in self.versions:
            raise ValueError(f"default_version {self.default_version} is not one of versions {self.versions}")
        if self.batching.max_batch_size > self.backend.max_batch_size:
            raise ValueError(
                f"batching.max_batch_size ({self.batching.max_batch_size}) is above "
                f"backend.max_batch_size ({self.backend.max_batch_size})"
            )
        return self

    @property
    def served_version(self) -> int:
        """The version requests get by default."""
        return self.default_version or max(self.versions)


GRAPH_FILLED_SETTINGS: tuple[tuple[str, ...], ...] = (
    ("input", "name"), ("input", "dtype"), ("input", "layout"), ("input", "height_px"), ("input", "width_px"),
    ("output_name",), ("batching", "max_batch_size"),
)
"""Spec settings a deploy reads from the model's ONNX graph when the spec leaves them unset."""


def spec_sets(spec: ModelSettings, path: tuple[str, ...]) -> bool:
    """Whether ``spec`` sets the setting at ``path`` (given, or assigned: pydantic's fields_set)."""
    section: BaseModel = spec
    for key in path[:-1]:
        section = getattr(section, key)
    return path[-1] in section.model_fields_set


def deploy_json(spec: ModelSettings) -> str:
    """The spec as a deploy sends it: every setting, except those of ``GRAPH_FILLED_SETTINGS`` it leaves
    unset, which the controller then reads from the model's graph.

    Not ``exclude_unset``: a nested setting changed by assignment (``spec.backend.instance_groups = 2``)
    is set in its own section but the section is not set in its parent, so it would be dropped."""
    data = spec.model_dump(mode="json")
    for path in GRAPH_FILLED_SETTINGS:
        if not spec_sets(spec, path):
            section = data
            for key in path[:-1]:
                section = section[key]
            section.pop(path[-1], None)
    return json.dumps(data)


FILLED_AT_DEPLOY = frozenset({("labels",), *GRAPH_FILLED_SETTINGS})
"""Spec settings a deploy fills in when the spec leaves them out: labels from the artifact's
labels.txt, the rest from the model's ONNX graph."""

_LEFT_OUT = object()


def spec_differences(configured: ModelSettings, registered: dict[str, Any]) -> list[str]:
    """The top-level settings in which a registered spec (as JSON data) is not what deploying
    ``configured`` would register.

    A setting the configuration gives must be equal. One it leaves out must be the default, unless a
    deploy fills it in (``FILLED_AT_DEPLOY``; empty labels count as left out): whatever the deploy
    found there stands."""
    wanted = json.loads(configured.model_dump_json())
    given = json.loads(deploy_json(configured))
    return sorted(
        key for key in wanted.keys() | registered.keys()
        if _differs(wanted.get(key), given.get(key, _LEFT_OUT), registered.get(key), (key,))
    )


def _differs(want: Any, given: Any, have: Any, path: tuple[str, ...]) -> bool:
    if isinstance(want, dict) and isinstance(have, dict):
        inner = given if isinstance(given, dict) else {}
        return any(
            _differs(want.get(key), inner.get(key, _LEFT_OUT), have.get(key), (*path, key))
            for key in want.keys() | have.keys()
        )
    if path in FILLED_AT_DEPLOY and (given is _LEFT_OUT or want in (None, [], "")):
        return False
    return bool(want != have)


class RouterSettings(_Section):
    """The router: the client API's one way in."""

    api_keys: list[SecretStr] = []
    """Static API keys (``authorization: Bearer <key>``): unscoped and unlimited. Keys made with
    ``flotilla keys create`` (scoped to models, with a rate quota and expiry) come from the
    controller's registry over the fleet watch and need no entry here. With neither, every request
    is refused."""
    max_concurrent_calls: int = Field(8192, ge=1)
    """Calls the router handles at once; beyond it, RESOURCE_EXHAUSTED at once."""
    stream_window: int = Field(256, ge=1)
    """Requests of one ClassifyStream the router holds in flight at most (each also counts against
    ``max_concurrent_calls``); at the cap it stops reading that stream and HTTP/2 flow control makes
    the sender wait, so a fast sender holds no more than this much of the router's memory."""
    stream_linger_ms: float = Field(2.0, ge=0, le=100)
    """How long a ClassifyStream answer may wait for others of its stream still in flight, so that
    they go back in one message (once the sender packs its requests): at most this long, not at all
    when no other request of the stream is in flight, and only on a stream whose requests have been
    finishing less than two lingers apart on average (elsewhere company would seldom come in time).
    A message costs the router a gRPC write whatever it carries; at its ceiling, answers that wait
    share messages and the sender's next requests come packed too (2 ms: about two thirds of the
    CPU a request, half again the requests a second). 0: each answer goes as soon as it is ready."""
    processes: int = Field(1, ge=1)
    """Router processes the local stack starts on the one router port (SO_REUSEPORT: the
    kernel spreads client connections across them; a channel stays on one). In
    Kubernetes, scale the router Deployment instead. Each process enforces ``1/processes`` of
    every API key's rate quota (no shared state): a caller with one connection reaches one
    process and gets that share; with k connections, on average ``1 - (1 - 1/processes)^k``
    of its quota (2 processes: 1 connection 50%, 4 connections 94%, 8 connections 99.6%)."""
    pacing_ms: float = Field(2.0, ge=0, le=100)
    """Pacing of the router's relay stream to each batching shard, while it is busy: at most one
    message per this many milliseconds on a stream whose calls have been coming at least three an
    interval (more than 1 500 a second at 2 ms). A call that comes within that of the stream's last
    message waits for the rest of it, and every call of that time shares the next message (one gRPC
    write here, one read at the batcher, for all of them); a quieter stream's calls go at once. It
    trades latency for CPU only where the router's CPU is what runs short: at most this much more
    per call. At the router's own ceiling on unary calls, 2 ms put about 5 calls in a message
    against 1.5-2.5 unpaced and took 15-25% off the router's CPU a call (``make bench``'s unpaced
    unary point beside the default). Streams gain little (their calls already arrive packed). 0:
    each event-loop turn's calls go at once."""
    http_port: int = Field(0, ge=0, le=65535)
    """Port of the router's KServe v2 HTTP/REST front door on ``host`` (``/v2/...``, beside the gRPC
    port); 0: none. The local stack always serves it, on a free port (stack.json's ``router_http``);
    the Kubernetes manifests set 8000."""


class BatcherSettings(_Section):
    """The batching tier: shards, each a process holding one queue per model the controller
    assigns it (each queue configured per model under ``batching``)."""

    shards: int = Field(1, ge=1)
    """Shared batcher processes (shards) the local stack starts; the controller spreads the models
    over them. In Kubernetes the batcher Deployment's HPA sets how many run."""
    max_concurrent_calls: int = Field(4096, ge=1)
    """Classify calls a batcher process holds at once, all its models together (queued or in a
    batch); beyond it, RESOURCE_EXHAUSTED at once. Each model's max_queue_size applies as well."""
    advertise_address: str = ""
    """host:port routers and the controller reach this batcher at; empty: the address it binds
    (``host``:port). In Kubernetes, the pod's IP and port."""


class PreprocessSettings(_Section):
    """The preprocess workers: fetch, decode and resize a batch's images, then call Triton."""

    workers: int = Field(1, ge=1)
    """Preprocess worker processes the local stack starts."""
    decode_threads: int = Field(0, ge=0)
    """Threads per worker decoding and resizing images (a batch's images are split between them);
    0: one per CPU the worker may run on. More than the worker's cores only adds hand-offs."""
    max_fetches: int = Field(64, ge=1)
    """S3 GETs a worker runs at once (each batch fetches all its images at once, on the event loop)."""
    max_object_bytes: int = Field(20 * 1024 * 1024, ge=1)
    """Stored objects larger than this are rejected with INVALID_ARGUMENT."""
    max_image_pixels: int = Field(50_000_000, ge=1)
    """JPEGs whose header declares more pixels are rejected (decompression bombs)."""
    triton_shared_memory: Literal["auto", "off"] = "auto"
    """auto: batches go to Triton replicas on this host (loopback addresses) through system shared
    memory, not in the request (a replica that cannot map it gets them inline); off: always inline."""
    triton_protocol: Literal["http", "grpc"] = "http"
    """How workers send batches to Triton: http (KServe v2 over HTTP/1.1 to each replica's
    ``endpoints.triton_http``, about a quarter of gRPC's client CPU per batch; a replica with no HTTP
    endpoint is called over gRPC) or grpc (every replica over gRPC)."""
    shared_memory_max_bytes: int = Field(256 * 1024 * 1024, ge=0)
    """Shared memory a worker may hold for batches in flight; past it a batch goes inline."""


class AutoscaleSettings(_Section):
    """When a model gains or loses copies (decisions every ``interval_s``)."""

    interval_s: float = Field(1.0, gt=0)
    """Time between autoscaling decisions."""
    queue_wait_high_ms: float = Field(100.0, gt=0)
    """Mean queue wait above this, sustained for ``scale_up_window_s``, adds a copy."""
    scale_up_window_s: float = Field(5.0, gt=0)
    """How long the queue wait must stay high before a copy is added."""
    scale_down_idle_s: float = Field(60.0, gt=0)
    """A model with no request for this long loses a copy (down to min_copies, at least 1)."""
    scale_to_zero_idle_s: float = Field(300.0, gt=0)
    """A min_copies 0 model with no request for this long is unloaded everywhere."""
    cooldown_s: float = Field(10.0, ge=0)
    """Least time between two scaling decisions for one model."""


class ShardSettings(_Section):
    """How the controller spreads models over the batching shards."""

    heartbeat_interval_s: float = Field(1.0, gt=0)
    """How often each shard reports to the controller (and learns its models)."""
    heartbeat_timeout_s: float = Field(3.0, gt=0)
    """A shard silent this long is dead: its models move to the shards still reporting."""
    hot_model_rps: float = Field(400.0, gt=0)
    """A model taking more requests/s than this per shard that holds it gets one more shard
    (up to max_shards_per_model); one below half of it on several gives one back."""
    max_shards_per_model: int = Field(4, ge=1)
    """The most shards one model's queues spread over."""
    busy_cpu_cores: float = Field(0.7, gt=0)
    """A shard using more cores than this keeps its busiest model and moves the next busiest to the
    least busy shard, one per rebalance: a hot model ends with a shard of its own."""
    rebalance_interval_s: float = Field(5.0, gt=0)
    """Least time between two moves of models for load (a dead shard's models move at once)."""
    move_grace_s: float = Field(5.0, ge=0)
    """How long a shard keeps a queue the controller took from it, so calls routed before the
    routers followed the move still land."""


class ControllerSettings(_Section):
    """The control plane: registry, placement and load/unload of models."""

    artifact_bucket: str = "flotilla-models"
    """Bucket holding model artifacts (``models upload``) and the registry's records."""
    registry_prefix: str = "registry/"
    """Key prefix of the registry's model records in ``artifact_bucket``."""
    keys_prefix: str = "keys/"
    """Key prefix of the registry's API key records (salted hashes, never keys) in ``artifact_bucket``;
    must not lie under ``registry_prefix``."""
    admin_keys: list[SecretStr] = []
    """Admin credentials (``authorization: Bearer <admin key>``) the control plane's mutating calls
    need: the controller's Deploy, Undeploy, CreateKey and RevokeKey, and a batcher's
    SetBatching. Empty refuses them all (PERMISSION_DENIED saying so); the local stack generates one
    and writes it to its stack file, where ``flotilla models``/``keys`` read it (or from
    ``FLOTILLA_ADMIN_KEY``)."""
    admin_identities: list[str] = ["flotilla-admin"]
    """With TLS on (``tls.enabled``), a caller whose client certificate (signed by ``tls.ca_file``)
    has one of these common names may make those mutating calls without an admin key."""
    replica_memory_mb: list[float] = [2048.0]
    """Memory budget of each Triton replica in MiB; the last value repeats for further replicas."""
    evict_idle_after_s: float = Field(10.0, ge=0)
    """A copy with no request for this long may be evicted to make room for another model."""
    drain_s: float = Field(0.5, ge=0)
    """Time between taking a copy out of the pools and unloading it (in-flight batches finish)."""
    load_timeout_s: float = Field(120.0, gt=0)
    """Longest one load (artifact fetch, Triton load, warm-up) may take."""
    usage_poll_interval_s: float = Field(0.5, gt=0)
    """How often the controller reads each batcher's cumulative counters."""
    triton_backend: Literal["python", "onnxruntime"] = "python"
    """How replicas run ONNX models: python (the generic Python-backend wrapper running ONNX
    Runtime; what the nvidia-pytriton binary ships) or onnxruntime (Triton's native backend,
    as in the official image on GPU clusters)."""
    instance_kind: Literal["KIND_CPU", "KIND_GPU"] = "KIND_CPU"
    """Where each model instance runs on a replica."""
    replica_dirs: list[Path] = []
    """Per Triton replica (same order as endpoints.triton): the directory holding its model
    repository (``models/``) and artifact cache (``cache/``). The local stack fills these in."""
    measure_memory: bool = True
    """Measure each copy's memory (USS of its backend stubs after a warm-up) and use it for placement."""
    deploy_configured_models: bool = False
    """Deploy the ``models:`` of this configuration that the registry lacks when the controller starts
    (each from its ``storage_uri``, retried until its artifact is there). The local stack deploys them
    itself, uploading their artifacts first; Kubernetes sets this."""
    memory_kind: Literal["host", "gpu"] = "host"
    """What replica budgets count: host (RAM of each copy's backend processes, measured after its
    warm-up) or gpu (device memory, read from each replica's Triton metrics: the growth of
    ``nv_gpu_memory_used_bytes`` a copy's load and warm-up cause, and a budget of at most
    ``nv_gpu_memory_total_bytes``; needs ``endpoints.triton_metrics``)."""
    autoscale: AutoscaleSettings = AutoscaleSettings()
    shards: ShardSettings = ShardSettings()

    def budget_mb(self, index: int) -> float:
        budgets = self.replica_memory_mb or [2048.0]
        return budgets[min(index, len(budgets) - 1)]


class TlsSettings(_Section):
    """TLS on every hop between Flotilla's processes and at the router's front doors.

    The three files are cert-manager's Secret layout (``ca.crt``, ``tls.crt``, ``tls.key``): each
    process mounts its own certificate there. One certificate serves both ends of mutual TLS: the
    server's certificate, and the client certificate a process presents when it calls another
    tier. Files are re-read when they change (servers: at the next handshake; channels: within
    ``reload_interval_s``), so a renewed certificate needs no restart.
    """

    enabled: bool = False
    """Server TLS on the router's gRPC and HTTP ports, mutual TLS between router, batchers, workers
    and controller, and TLS to Triton's gRPC endpoint (``triton``)."""
    ca_file: Path = Path("/etc/flotilla/tls/ca.crt")
    """PEM bundle of the CAs that sign the mesh's certificates (peers are checked against it)."""
    cert_file: Path = Path("/etc/flotilla/tls/tls.crt")
    """This process's PEM certificate chain: served to callers and presented to the tiers it calls."""
    key_file: Path = Path("/etc/flotilla/tls/tls.key")
    """The private key of ``cert_file`` (PEM)."""
    public_cert_file: Path | None = None
    """The certificate the router's front doors (gRPC and HTTP) serve to clients instead of
    ``cert_file``, e.g. one from a public issuer clients already trust; unset: ``cert_file``. The
    router still presents ``cert_file`` to the tiers it calls."""
    public_key_file: Path | None = None
    """The private key of ``public_cert_file``."""
    server_name: str = ""
    """The name a mesh server's certificate must carry, checked instead of the host dialled; empty: the
    host dialled. Kubernetes dials batchers and workers by pod IP, which no certificate names: there
    every mesh certificate carries one shared name (the tls component's ``flotilla-mesh``)."""
    client_auth: bool = True
    """The mesh's internal servers (controller, batchers, workers) require a client certificate signed
    by ``ca_file`` (mutual TLS). The router's front doors never do: clients authenticate with keys."""
    health_port: int = Field(0, ge=0, le=65535)
    """A plaintext port serving only ``grpc.health.v1`` (kubelet's gRPC probes cannot speak TLS); 0:
    none. Health answers reveal nothing but SERVING or not."""
    triton: bool = True
    """With TLS on, dial Triton's gRPC endpoint with TLS (and this process's certificate), and send
    workers' batches over gRPC (Triton's HTTP endpoint has no TLS). Off: Triton stays plaintext
    (a replica on the same host or pod)."""
    reload_interval_s: float = Field(5.0, gt=0)
    """How often long-lived channels look for changed files (servers check at every handshake,
    at most once a second)."""

    @model_validator(mode="after")
    def _public_pair(self) -> TlsSettings:
        if (self.public_cert_file is None) != (self.public_key_file is None):
            raise ValueError("tls.public_cert_file and tls.public_key_file go together")
        return self

    def front_door(self) -> TlsSettings:
        """The settings the router's front doors serve with: the public pair when there is one."""
        if self.public_cert_file is None or self.public_key_file is None:
            return self
        return self.model_copy(update={"cert_file": self.public_cert_file, "key_file": self.public_key_file})


class ObservabilitySettings(_Section):
    """Metrics and traces."""

    prometheus: bool = False
    """Local stack: also start a Prometheus server scraping every service and Triton replica."""
    prometheus_scrape_interval_s: float = Field(1.0, gt=0)
    """How often that Prometheus scrapes (short: a local stack is for watching things happen)."""
    tracing: bool = False
    """OpenTelemetry traces from every service (router, batcher, worker, backend call)."""
    trace_sample_ratio: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of traces kept, decided where a trace starts (a request's first tier, by its trace id)
    and followed by every tier after it; a batch is kept when any request riding in it is."""
    trace_polling: bool = False
    """Also trace the mesh's own polling (GetStats, ListStats, GetPools, GetBatching, ShardHeartbeat, WatchFleet,
    ListModels, GetModel) when no traced call made it: off, it starts no trace of its own."""
    trace_exporter: Literal["otlp", "console", "file"] = "otlp"
    """otlp: to otlp_endpoint (a collector, Jaeger, Tempo); console: into each service's log;
    file: JSON lines in trace_dir/<service>.jsonl."""
    otlp_endpoint: str = "127.0.0.1:4317"
    """host:port of the OTLP gRPC receiver."""
    otlp_insecure: bool = True
    """Plaintext gRPC to the OTLP receiver (a collector on the same host or pod). false: TLS, the
    receiver's certificate checked against otlp_certificate_file, else the system's roots."""
    otlp_certificate_file: Path | None = None
    """PEM bundle of the CAs trusted for the OTLP receiver's certificate (TLS only)."""
    otlp_client_certificate_file: Path | None = None
    """PEM certificate this service presents to the OTLP receiver (mutual TLS; with otlp_client_key_file)."""
    otlp_client_key_file: Path | None = None
    """PEM private key of otlp_client_certificate_file."""
    trace_dir: Path | None = None
    """Where the file exporter writes; the local stack uses <run_dir>/traces."""

    @model_validator(mode="after")
    def _check_otlp_tls(self) -> ObservabilitySettings:
        files = {"otlp_certificate_file": self.otlp_certificate_file,
                 "otlp_client_certificate_file": self.otlp_client_certificate_file,
                 "otlp_client_key_file": self.otlp_client_key_file}
        named = [name for name, path in files.items() if path is not None]
        if self.otlp_insecure and named:
            raise ValueError(f"{', '.join(named)} set with otlp_insecure true; set otlp_insecure: false for TLS")
        if (self.otlp_client_certificate_file is None) != (self.otlp_client_key_file is None):
            raise ValueError("otlp_client_certificate_file and otlp_client_key_file go together (mutual TLS)")
        return self


class TritonSettings(_Section):
    """The Triton Inference Server replicas of the local stack."""

    replicas: int = Field(2, ge=1)
    """Triton server processes the local stack starts (empty; the controller places models)."""
    startup_timeout_s: float = Field(180.0, gt=0)
    """How long the local stack waits for a replica to report ready."""


class Endpoints(_Section):
    """Where each tier listens (host:port). The local stack fills these in."""

    router: str = ""
    """The router (the client API)."""
    controller: str = ""
    """The controller (model registry and placement) every service follows."""
    preprocess: list[str] = []
    """The preprocess workers."""
    triton: list[str] = []
    """Triton gRPC endpoints: the replicas' names in placement (the controller loads models over gRPC)."""
    triton_http: list[str] = []
    """The same replicas' HTTP endpoints, in the same order (empty: none known). Workers send batches
    there (``preprocess.triton_protocol``)."""
    triton_metrics: list[str] = []
    """The same replicas' Prometheus metrics endpoints (host:port), in the same order; the controller
    reads GPU memory there with ``controller.memory_kind: gpu``."""

    @model_validator(mode="after")
    def _triton_http_matches(self) -> Endpoints:
        for field, listed in (("triton_http", self.triton_http), ("triton_metrics", self.triton_metrics)):
            if listed and len(listed) != len(self.triton):
                raise ValueError(
                    f"endpoints.{field} lists {len(listed)} endpoints for {len(self.triton)} Triton "
                    "replicas; give one per replica, in the order of endpoints.triton, or none"
                )
        return self


class FlotillaSettings(BaseSettings):
    """The whole mesh's configuration; each service reads the sections it needs."""

    model_config = SettingsConfigDict(
        # A refused setting is not repeated in the error: it may be a secret (a misspelt secret_key).
        env_prefix="FLOTILLA_", env_nested_delimiter="__", extra="forbid", hide_input_in_errors=True
    )

    host: str = "127.0.0.1"
    """Interface every local service binds."""
    run_dir: Path = Path(".flotilla")
    """Where the local stack keeps logs, state and S3 data."""
    shutdown_grace_s: float = Field(5.0, ge=0)
    """How long a stopping service lets in-flight calls finish."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The services' event loop: uvloop (libuv; the loop's own work and its sockets' reads and writes
    in C) or the standard library's. ``asyncio`` to rule the loop out when chasing a fault."""
    s3: S3Settings = S3Settings()
    router: RouterSettings = RouterSettings()
    batcher: BatcherSettings = BatcherSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    triton: TritonSettings = TritonSettings()
    pools: PoolSettings = PoolSettings()
    controller: ControllerSettings = ControllerSettings()
    observability: ObservabilitySettings = ObservabilitySettings()
    tls: TlsSettings = TlsSettings()
    models: dict[str, ModelSettings] = {}
    """Models the local stack deploys through the registry when it starts."""
    endpoints: Endpoints = Endpoints()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file arrives as init kwargs; environment variables win over it.
        return env_settings, init_settings

    @model_validator(mode="after")
    def _s3_trusts_the_mesh_ca(self) -> FlotillaSettings:
        """With TLS on, a store reached over HTTPS (``s3.secure``) with no ``s3.ca_file`` is checked
        against the mesh's CA (``tls.ca_file``): a store inside the mesh (the local stack's SeaweedFS, an
        in-cluster one) carries a certificate from the mesh's issuer. A store with a public certificate
        (AWS S3) under TLS needs its ``ca_file`` set (e.g. the system's bundle)."""
        if self.tls.enabled and self.s3.secure and self.s3.ca_file is None:
            self.s3 = self.s3.model_copy(update={"ca_file": self.tls.ca_file})
        return self

    def model(self, name: str) -> ModelSettings:
        """Settings of a configured model; KeyError when it is not configured."""
        return self.models[name]


def load_settings(path: Path | None = None, **overrides: Any) -> FlotillaSettings:
    """Read the YAML file (if any), apply ``overrides`` and then the environment."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        data = loaded or {}
    data.update(overrides)
    return FlotillaSettings(**data)


def dump_settings(settings: FlotillaSettings, path: Path) -> None:
    """Write settings (secrets included) as YAML that ``load_settings`` reads back, readable by the
    owner alone."""
    data = settings.model_dump(mode="json")
    data["s3"]["secret_key"] = settings.s3.secret_key.get_secret_value()
    data["router"]["api_keys"] = [k.get_secret_value() for k in settings.router.api_keys]
    data["controller"]["admin_keys"] = [k.get_secret_value() for k in settings.controller.admin_keys]
    # Private from the first byte (this module imports nothing of Flotilla's: not common.files).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its mode otherwise
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(yaml.safe_dump(data, sort_keys=False))
