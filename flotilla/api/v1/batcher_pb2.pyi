from flotilla.api.v1 import pools_pb2 as _pools_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetBatchingRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class SetBatchingRequest(_message.Message):
    __slots__ = ("model_name", "policy")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    policy: BatchingPolicy
    def __init__(self, model_name: _Optional[str] = ..., policy: _Optional[_Union[BatchingPolicy, _Mapping]] = ...) -> None: ...

class BatchingPolicy(_message.Message):
    __slots__ = ("max_batch_size", "preferred_batch_sizes", "max_queue_delay_us", "max_queue_size", "max_inflight_batches", "priority_levels", "default_priority_level", "priority_aging_us", "default_timeout_us", "timeout_action")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_US_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_LEVELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PRIORITY_LEVEL_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_AGING_US_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_ACTION_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    preferred_batch_sizes: _containers.RepeatedScalarFieldContainer[int]
    max_queue_delay_us: int
    max_queue_size: int
    max_inflight_batches: int
    priority_levels: int
    default_priority_level: int
    priority_aging_us: int
    default_timeout_us: int
    timeout_action: str
    def __init__(self, max_batch_size: _Optional[int] = ..., preferred_batch_sizes: _Optional[_Iterable[int]] = ..., max_queue_delay_us: _Optional[int] = ..., max_queue_size: _Optional[int] = ..., max_inflight_batches: _Optional[int] = ..., priority_levels: _Optional[int] = ..., default_priority_level: _Optional[int] = ..., priority_aging_us: _Optional[int] = ..., default_timeout_us: _Optional[int] = ..., timeout_action: _Optional[str] = ...) -> None: ...

class GetStatsRequest(_message.Message):
    __slots__ = ("reset", "model_name")
    RESET_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    model_name: str
    def __init__(self, reset: _Optional[bool] = ..., model_name: _Optional[str] = ...) -> None: ...

class ListStatsRequest(_message.Message):
    __slots__ = ("reset",)
    RESET_FIELD_NUMBER: _ClassVar[int]
    reset: bool
    def __init__(self, reset: _Optional[bool] = ...) -> None: ...

class ListStatsResponse(_message.Message):
    __slots__ = ("models", "dedicated_model")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEDICATED_MODEL_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[BatcherStats]
    dedicated_model: str
    def __init__(self, models: _Optional[_Iterable[_Union[BatcherStats, _Mapping]]] = ..., dedicated_model: _Optional[str] = ...) -> None: ...

class BatchSizeCount(_message.Message):
    __slots__ = ("batch_size", "batches")
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    batches: int
    def __init__(self, batch_size: _Optional[int] = ..., batches: _Optional[int] = ...) -> None: ...

class BatcherStats(_message.Message):
    __slots__ = ("model_name", "requests", "batches", "expired", "rejected_full", "mean_batch_size", "batch_sizes", "queue_wait_p50_ms", "queue_wait_p90_ms", "queue_wait_p99_ms", "queue_depth", "inflight_batches", "total_arrivals", "total_dispatched", "total_queue_wait_s", "leaving")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FULL_FIELD_NUMBER: _ClassVar[int]
    MEAN_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_P90_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ARRIVALS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_DISPATCHED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    LEAVING_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    requests: int
    batches: int
    expired: int
    rejected_full: int
    mean_batch_size: float
    batch_sizes: _containers.RepeatedCompositeFieldContainer[BatchSizeCount]
    queue_wait_p50_ms: float
    queue_wait_p90_ms: float
    queue_wait_p99_ms: float
    queue_depth: int
    inflight_batches: int
    total_arrivals: int
    total_dispatched: int
    total_queue_wait_s: float
    leaving: bool
    def __init__(self, model_name: _Optional[str] = ..., requests: _Optional[int] = ..., batches: _Optional[int] = ..., expired: _Optional[int] = ..., rejected_full: _Optional[int] = ..., mean_batch_size: _Optional[float] = ..., batch_sizes: _Optional[_Iterable[_Union[BatchSizeCount, _Mapping]]] = ..., queue_wait_p50_ms: _Optional[float] = ..., queue_wait_p90_ms: _Optional[float] = ..., queue_wait_p99_ms: _Optional[float] = ..., queue_depth: _Optional[int] = ..., inflight_batches: _Optional[int] = ..., total_arrivals: _Optional[int] = ..., total_dispatched: _Optional[int] = ..., total_queue_wait_s: _Optional[float] = ..., leaving: _Optional[bool] = ...) -> None: ...
