from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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

class EnsureLoadedRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class RegisterBatcherRequest(_message.Message):
    __slots__ = ("model_name", "address")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    address: str
    def __init__(self, model_name: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class RegisterBatcherResponse(_message.Message):
    __slots__ = ("spec_json",)
    SPEC_JSON_FIELD_NUMBER: _ClassVar[int]
    spec_json: str
    def __init__(self, spec_json: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("generation", "models", "replicas")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    generation: int
    models: _containers.RepeatedCompositeFieldContainer[ModelStatus]
    replicas: _containers.RepeatedCompositeFieldContainer[Replica]
    def __init__(self, generation: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelStatus, _Mapping]]] = ..., replicas: _Optional[_Iterable[_Union[Replica, _Mapping]]] = ...) -> None: ...

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
