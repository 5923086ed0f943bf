from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiKey(_message.Message):
    __slots__ = ("name", "id", "salt", "hash", "models", "rate_per_s", "burst", "expires_unix_s", "created_unix_s", "last_used_unix_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    SALT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    id: str
    salt: bytes
    hash: bytes
    models: _containers.RepeatedScalarFieldContainer[str]
    rate_per_s: float
    burst: int
    expires_unix_s: float
    created_unix_s: float
    last_used_unix_s: float
    def __init__(self, name: _Optional[str] = ..., id: _Optional[str] = ..., salt: _Optional[bytes] = ..., hash: _Optional[bytes] = ..., models: _Optional[_Iterable[str]] = ..., rate_per_s: _Optional[float] = ..., burst: _Optional[int] = ..., expires_unix_s: _Optional[float] = ..., created_unix_s: _Optional[float] = ..., last_used_unix_s: _Optional[float] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("name", "models", "rate_per_s", "burst", "expires_unix_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_S_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    models: _containers.RepeatedScalarFieldContainer[str]
    rate_per_s: float
    burst: int
    expires_unix_s: float
    def __init__(self, name: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., rate_per_s: _Optional[float] = ..., burst: _Optional[int] = ..., expires_unix_s: _Optional[float] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "token")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    token: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., token: _Optional[str] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class KeyUse(_message.Message):
    __slots__ = ("name", "last_used_unix_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    last_used_unix_s: float
    def __init__(self, name: _Optional[str] = ..., last_used_unix_s: _Optional[float] = ...) -> None: ...

class ReportKeyUseRequest(_message.Message):
    __slots__ = ("uses",)
    USES_FIELD_NUMBER: _ClassVar[int]
    uses: _containers.RepeatedCompositeFieldContainer[KeyUse]
    def __init__(self, uses: _Optional[_Iterable[_Union[KeyUse, _Mapping]]] = ...) -> None: ...

class ReportKeyUseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeployRequest(_message.Message):
    __slots__ = ("name", "spec_json", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    replace: bool
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ..., replace: _Optional[bool] = ...) -> None: ...

class UndeployRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UndeployResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetModelStatisticsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ModelRequestStatistics(_message.Message):
    __slots__ = ("name", "arrivals_total", "dispatched_total", "queue_wait_s_total", "batches_total", "succeeded_total", "success_s_total", "compute_s_total", "failed_total", "fail_s_total", "last_used_unix_s", "batch_sizes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BATCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAIL_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    name: str
    arrivals_total: int
    dispatched_total: int
    queue_wait_s_total: float
    batches_total: int
    succeeded_total: int
    success_s_total: float
    compute_s_total: float
    failed_total: int
    fail_s_total: float
    last_used_unix_s: float
    batch_sizes: _containers.RepeatedCompositeFieldContainer[BatchSizeCounters]
    def __init__(self, name: _Optional[str] = ..., arrivals_total: _Optional[int] = ..., dispatched_total: _Optional[int] = ..., queue_wait_s_total: _Optional[float] = ..., batches_total: _Optional[int] = ..., succeeded_total: _Optional[int] = ..., success_s_total: _Optional[float] = ..., compute_s_total: _Optional[float] = ..., failed_total: _Optional[int] = ..., fail_s_total: _Optional[float] = ..., last_used_unix_s: _Optional[float] = ..., batch_sizes: _Optional[_Iterable[_Union[BatchSizeCounters, _Mapping]]] = ...) -> None: ...

class BatchSizeCounters(_message.Message):
    __slots__ = ("size", "batches_total", "compute_s_total")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    size: int
    batches_total: int
    compute_s_total: float
    def __init__(self, size: _Optional[int] = ..., batches_total: _Optional[int] = ..., compute_s_total: _Optional[float] = ...) -> None: ...

class ModelStatisticsList(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelRequestStatistics]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelRequestStatistics, _Mapping]]] = ...) -> None: ...

class EnsureLoadedRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class QueueCounters(_message.Message):
    __slots__ = ("model", "arrivals_total", "dispatched_total", "queue_wait_s_total", "queue_depth", "inflight_batches", "idle_s", "batches_total", "succeeded_total", "success_s_total", "compute_s_total", "failed_total", "fail_s_total", "batch_sizes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ARRIVALS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DISPATCHED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_BATCHES_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    BATCHES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUCCEEDED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAIL_S_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZES_FIELD_NUMBER: _ClassVar[int]
    model: str
    arrivals_total: int
    dispatched_total: int
    queue_wait_s_total: float
    queue_depth: int
    inflight_batches: int
    idle_s: float
    batches_total: int
    succeeded_total: int
    success_s_total: float
    compute_s_total: float
    failed_total: int
    fail_s_total: float
    batch_sizes: _containers.RepeatedCompositeFieldContainer[BatchSizeCounters]
    def __init__(self, model: _Optional[str] = ..., arrivals_total: _Optional[int] = ..., dispatched_total: _Optional[int] = ..., queue_wait_s_total: _Optional[float] = ..., queue_depth: _Optional[int] = ..., inflight_batches: _Optional[int] = ..., idle_s: _Optional[float] = ..., batches_total: _Optional[int] = ..., succeeded_total: _Optional[int] = ..., success_s_total: _Optional[float] = ..., compute_s_total: _Optional[float] = ..., failed_total: _Optional[int] = ..., fail_s_total: _Optional[float] = ..., batch_sizes: _Optional[_Iterable[_Union[BatchSizeCounters, _Mapping]]] = ...) -> None: ...

class ShardHeartbeatRequest(_message.Message):
    __slots__ = ("address", "dedicated_model", "counters", "cpu_seconds_total", "assignment", "started")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEDICATED_MODEL_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    address: str
    dedicated_model: str
    counters: _containers.RepeatedCompositeFieldContainer[QueueCounters]
    cpu_seconds_total: float
    assignment: int
    started: bool
    def __init__(self, address: _Optional[str] = ..., dedicated_model: _Optional[str] = ..., counters: _Optional[_Iterable[_Union[QueueCounters, _Mapping]]] = ..., cpu_seconds_total: _Optional[float] = ..., assignment: _Optional[int] = ..., started: _Optional[bool] = ...) -> None: ...

class ShardModel(_message.Message):
    __slots__ = ("name", "spec_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ...) -> None: ...

class ShardHeartbeatResponse(_message.Message):
    __slots__ = ("assignment", "changed", "models", "interval_s", "removed_models", "full")
    ASSIGNMENT_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    REMOVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    assignment: int
    changed: bool
    models: _containers.RepeatedCompositeFieldContainer[ShardModel]
    interval_s: float
    removed_models: _containers.RepeatedScalarFieldContainer[str]
    full: bool
    def __init__(self, assignment: _Optional[int] = ..., changed: _Optional[bool] = ..., models: _Optional[_Iterable[_Union[ShardModel, _Mapping]]] = ..., interval_s: _Optional[float] = ..., removed_models: _Optional[_Iterable[str]] = ..., full: _Optional[bool] = ...) -> None: ...

class WatchFleetRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Condition(_message.Message):
    __slots__ = ("type", "status", "reason", "message", "last_transition_unix_s", "replica")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_TRANSITION_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    type: str
    status: str
    reason: str
    message: str
    last_transition_unix_s: float
    replica: str
    def __init__(self, type: _Optional[str] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ..., last_transition_unix_s: _Optional[float] = ..., replica: _Optional[str] = ...) -> None: ...

class Copy(_message.Message):
    __slots__ = ("replica", "state", "versions", "memory_mb")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    replica: str
    state: str
    versions: _containers.RepeatedScalarFieldContainer[int]
    memory_mb: float
    def __init__(self, replica: _Optional[str] = ..., state: _Optional[str] = ..., versions: _Optional[_Iterable[int]] = ..., memory_mb: _Optional[float] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("unix_s", "kind", "message")
    UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    unix_s: float
    kind: str
    message: str
    def __init__(self, unix_s: _Optional[float] = ..., kind: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ModelStatus(_message.Message):
    __slots__ = ("name", "spec_json", "conditions", "copies", "batchers", "memory_mb", "memory_measured", "events", "queue_wait_ms", "last_used_unix_s", "default_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    COPIES_FIELD_NUMBER: _ClassVar[int]
    BATCHERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MEASURED_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    spec_json: str
    conditions: _containers.RepeatedCompositeFieldContainer[Condition]
    copies: _containers.RepeatedCompositeFieldContainer[Copy]
    batchers: _containers.RepeatedScalarFieldContainer[str]
    memory_mb: float
    memory_measured: bool
    events: _containers.RepeatedCompositeFieldContainer[Event]
    queue_wait_ms: float
    last_used_unix_s: float
    default_version: int
    def __init__(self, name: _Optional[str] = ..., spec_json: _Optional[str] = ..., conditions: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., copies: _Optional[_Iterable[_Union[Copy, _Mapping]]] = ..., batchers: _Optional[_Iterable[str]] = ..., memory_mb: _Optional[float] = ..., memory_measured: _Optional[bool] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., queue_wait_ms: _Optional[float] = ..., last_used_unix_s: _Optional[float] = ..., default_version: _Optional[int] = ...) -> None: ...

class Fleet(_message.Message):
    __slots__ = ("generation", "models", "replicas", "delta", "removed_models", "shards", "removed_shards", "keys", "removed_keys")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    REMOVED_MODELS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_KEYS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    delta: bool
    removed_models: _containers.RepeatedScalarFieldContainer[str]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    removed_shards: _containers.RepeatedScalarFieldContainer[str]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    removed_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ..., delta: _Optional[bool] = ..., removed_models: _Optional[_Iterable[str]] = ..., shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ..., removed_shards: _Optional[_Iterable[str]] = ..., keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., removed_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class Shard(_message.Message):
    __slots__ = ("address", "dedicated_model", "models", "cpu_cores", "requests_per_s")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEDICATED_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CPU_CORES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_S_FIELD_NUMBER: _ClassVar[int]
    address: str
    dedicated_model: str
    models: int
    cpu_cores: float
    requests_per_s: float
    def __init__(self, address: _Optional[str] = ..., dedicated_model: _Optional[str] = ..., models: _Optional[int] = ..., cpu_cores: _Optional[float] = ..., requests_per_s: _Optional[float] = ...) -> None: ...

class Replica(_message.Message):
    __slots__ = ("address", "budget_mb", "used_mb", "healthy", "http_address")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_MB_FIELD_NUMBER: _ClassVar[int]
    USED_MB_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    HTTP_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    budget_mb: float
    used_mb: float
    healthy: bool
    http_address: str
    def __init__(self, address: _Optional[str] = ..., budget_mb: _Optional[float] = ..., used_mb: _Optional[float] = ..., healthy: _Optional[bool] = ..., http_address: _Optional[str] = ...) -> None: ...
