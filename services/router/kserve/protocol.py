"""KServe v2 / Open Inference Protocol as the mesh speaks it: names and value objects, no transport.

A model of the mesh takes one input, ``IMAGE_UUID`` (BYTES, shape ``[N]`` or ``[N, 1]``: the uuids of
uploaded JPEGs) and gives ``PROBABILITIES`` (FP32 ``[N, classes]``) and ``LABELS`` (BYTES ``[N, top_k]``).
The transports decode a call into ``InferRequest`` and encode ``InferResult`` and the descriptions;
``core.KServeFront`` does the work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

UUID_INPUT = "IMAGE_UUID"
PROBABILITIES_OUTPUT = "PROBABILITIES"
LABELS_OUTPUT = "LABELS"
OUTPUTS = (PROBABILITIES_OUTPUT, LABELS_OUTPUT)
"""Every output, in the order a request that names none gets them."""
TOP_K_PARAMETER = "top_k"
PRIORITY_PARAMETER = "priority"
TIMEOUT_PARAMETER = "timeout"
"""Queue timeout in microseconds (tritonclient's ``infer(timeout=)``); it can only lower the model's."""
CLASSIFICATION_PARAMETER = "classification"
"""On a requested output: return the best k classes as ``score:index:label`` strings (Triton's extension)."""
BYTES = "BYTES"
FP32 = "FP32"
DEFAULT_TOP_K = 5
"""Labels per image when a request sets no ``top_k`` (the Flotilla API's default)."""
PLATFORM = "flotilla"
SERVER_NAME = "flotilla"
EXTENSIONS = ("classification",)
UNKNOWN_DIM = -1

ParameterValue = bool | int | float | str


@dataclass(frozen=True)
class InputTensor:
    """One input of a request, its elements decoded by the transport (``raw_input_contents``, ``contents``
    or JSON ``data``) into ``values``: for BYTES, one ``bytes`` per element."""

    name: str
    datatype: str
    shape: Sequence[int]
    values: Sequence[bytes]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    classification: int = 0
    """The ``classification`` parameter: k > 0 turns the output into its best k classes as strings."""


@dataclass(frozen=True)
class InferRequest:
    model: str
    inputs: Sequence[InputTensor]
    version: str = ""
    """"" runs the model's default version."""
    id: str = ""
    outputs: Sequence[RequestedOutput] = ()
    """Empty: every output (``OUTPUTS``)."""
    parameters: Mapping[str, ParameterValue] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: NDArray[np.float32] | list[bytes]
    """FP32: an array of ``shape``; BYTES: the elements in row-major order."""


@dataclass(frozen=True)
class InferResult:
    model: str
    version: str
    """The version that ran."""
    id: str
    outputs: list[OutputTensor]


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]
    """-1 for a dimension of any size (the first: the images of a request)."""


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


@dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: list[str]


@dataclass(frozen=True)
class ConfigTensor:
    """An input or output as Triton's model configuration states it: the dims of one image's."""

    name: str
    data_type: str
    """Triton's DataType name (``TYPE_STRING``, ``TYPE_FP32``)."""
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelConfigView:
    """What of Triton's model configuration means something for a model of the mesh: its tensors and
    its batcher's policy (``BatchingSettings``), stated in Triton's names."""

    name: str
    platform: str
    max_batch_size: int
    inputs: list[ConfigTensor]
    outputs: list[ConfigTensor]
    preferred_batch_sizes: list[int]
    max_queue_delay_us: int
    priority_levels: int
    default_priority_level: int
    timeout_action: str
    """REJECT or DELAY."""
    default_timeout_us: int
    max_queue_size: int

    def triton_json(self) -> dict[str, Any]:
        """The configuration as Triton's JSON (protobuf field names; the gRPC layer parses it into a
        ModelConfig)."""
        return {
            "name": self.name,
            "platform": self.platform,
            "max_batch_size": self.max_batch_size,
            "input": [{"name": t.name, "data_type": t.data_type, "dims": list(t.dims)} for t in self.inputs],
            "output": [{"name": t.name, "data_type": t.data_type, "dims": list(t.dims)} for t in self.outputs],
            "dynamic_batching": {
                "preferred_batch_size": self.preferred_batch_sizes,
                "max_queue_delay_microseconds": self.max_queue_delay_us,
                "priority_levels": self.priority_levels,
                "default_priority_level": self.default_priority_level,
                "default_queue_policy": {
                    "timeout_action": self.timeout_action,
                    "default_timeout_microseconds": self.default_timeout_us,
                    "allow_timeout_override": True,
                    "max_queue_size": self.max_queue_size,
                },
            },
        }


READY = "READY"
UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class ModelIndexEntry:
    """One model version of the repository index (Triton's model repository extension)."""

    name: str
    version: str
    state: str
    """``READY`` or ``UNAVAILABLE``."""
    reason: str = ""
    """Why it is not ready; "" when it is."""


@dataclass(frozen=True)
class Duration:
    """Triton's StatisticDuration: how many, and their cumulative time in nanoseconds."""

    count: int = 0
    ns: int = 0


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
"""The durations of Triton's InferStatistics a ``ModelStatisticsView`` carries, by name."""
BATCH_DURATIONS = ("compute_input", "compute_infer", "compute_output")
"""The durations of Triton's InferBatchStatistics a ``BatchStatisticsView`` carries, by name."""


@dataclass(frozen=True)
class BatchStatisticsView:
    """One batch size's entry of a model's batch_stats: its executions (batches), and their times."""

    batch_size: int
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


@dataclass(frozen=True)
class ModelStatisticsView:
    """One model's entry of ModelStatistics (Triton's statistics extension), over the whole fleet."""

    name: str
    version: str
    last_inference_ms: int
    """Unix milliseconds of its latest request; 0 for none."""
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batch_stats: tuple[BatchStatisticsView, ...] = ()
    """By batch size, ascending (only sizes seen)."""
