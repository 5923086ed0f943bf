"""Typed configuration: one YAML file, overridden by ``FLOTILLA_*`` variables.

Precedence, highest first: environment (``FLOTILLA_`` prefix, ``__`` between
nested names, e.g. ``FLOTILLA_TRITON__REPLICAS=3``), then the YAML file, then
the defaults below. Nothing is read at import time: call ``load_settings``.
Every duration and size carries its unit in its name.
"""

from __future__ import annotations

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
    """What the model's input tensor looks like, and how to make it from a JPEG."""

    name: str = "images"
    """Input tensor name in the backend model."""
    height_px: int = Field(224, ge=1)
    width_px: int = Field(224, ge=1)
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    """Tensor layout of the batch."""
    dtype: Literal["UINT8", "FP32"] = "UINT8"
    """UINT8 ships raw pixels (normalisation folded into the model); FP32 applies mean/std."""
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per-channel (RGB) value subtracted from 0..255 pixels, FP32 only."""
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-channel (RGB) divisor applied after the mean, FP32 only."""
    resize: Literal["stretch", "center_crop"] = "stretch"
    """stretch: resize straight to height x width; center_crop: scale the short side, crop the centre."""
    crop_fraction: float = Field(0.875, gt=0.0, le=1.0)
    """center_crop only: the crop covers this fraction of the scaled short side."""


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


class ModelSettings(_Section):
    """One served model."""

    backend_model: str | None = None
    """The model's name in the inference backend; defaults to the Flotilla name."""
    input: InputSpec = InputSpec()
    output_name: str = "probabilities"
    """Output tensor holding per-class probabilities."""
    labels_file: Path | None = None
    """One class name per line; index = line number. Without it, labels are the indices."""
    batching: BatchingSettings = BatchingSettings()
    backend: BackendSettings = BackendSettings()


class RouterSettings(_Section):
    api_keys: list[SecretStr] = []
    """Accepted API keys (``authorization: Bearer <key>``). Empty rejects every request."""


class PreprocessSettings(_Section):
    workers: int = Field(1, ge=1)
    """Preprocess worker processes the local stack starts."""
    fetch_threads: int = Field(8, ge=1)
    """Threads per worker fetching and decoding the images of a batch concurrently."""
    max_object_bytes: int = Field(20 * 1024 * 1024, ge=1)
    """Stored objects larger than this are rejected with INVALID_ARGUMENT."""
    max_image_pixels: int = Field(50_000_000, ge=1)
    """JPEGs whose header declares more pixels are rejected (decompression bombs)."""


class TritonSettings(_Section):
    replicas: int = Field(2, ge=1)
    """Triton server processes the local stack starts, each serving every model."""
    model_repository: Path = Path("build/model-repository")
    """Triton model repository the local stack serves."""
    startup_timeout_s: float = Field(180.0, gt=0)
    """How long the local stack waits for a replica to report its models ready."""


class Endpoints(_Section):
    """Where each tier listens (host:port). The local stack fills these in."""

    router: str = ""
    batchers: dict[str, list[str]] = {}
    """Model name -> that model's batcher replicas."""
    preprocess: list[str] = []
    triton: list[str] = []
    """Triton gRPC endpoints."""


class FlotillaSettings(BaseSettings):
    """The whole mesh's configuration; each service reads the sections it needs."""

    model_config = SettingsConfigDict(
        env_prefix="FLOTILLA_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = "127.0.0.1"
    """Interface every local service binds."""
    run_dir: Path = Path(".flotilla")
    """Where the local stack keeps logs, state and S3 data."""
    shutdown_grace_s: float = Field(5.0, ge=0)
    """How long a stopping service lets in-flight calls finish."""
    s3: S3Settings = S3Settings()
    router: RouterSettings = RouterSettings()
    preprocess: PreprocessSettings = PreprocessSettings()
    triton: TritonSettings = TritonSettings()
    pools: PoolSettings = PoolSettings()
    models: dict[str, ModelSettings] = {"efficientnet-lite0": ModelSettings()}
    endpoints: Endpoints = Endpoints()

    @model_validator(mode="after")
    def _check_models(self) -> FlotillaSettings:
        if not self.models:
            raise ValueError("models: configure at least one model")
        return self

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
    """Write settings (secrets included) as YAML that ``load_settings`` reads back."""
    data = settings.model_dump(mode="json")
    data["s3"]["secret_key"] = settings.s3.secret_key.get_secret_value()
    data["router"]["api_keys"] = [k.get_secret_value() for k in settings.router.api_keys]
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
