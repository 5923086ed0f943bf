from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("image_uuid", "model_name", "top_k", "request_id", "priority", "timeout_us", "model_version", "all_scores")
    IMAGE_UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALL_SCORES_FIELD_NUMBER: _ClassVar[int]
    image_uuid: str
    model_name: str
    top_k: int
    request_id: str
    priority: int
    timeout_us: int
    model_version: int
    all_scores: bool
    def __init__(self, image_uuid: _Optional[str] = ..., model_name: _Optional[str] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ..., timeout_us: _Optional[int] = ..., model_version: _Optional[int] = ..., all_scores: _Optional[bool] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("index", "label", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    label: str
    score: float
    def __init__(self, index: _Optional[int] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("image_uuid", "model_name", "classes", "request_id", "scores")
    IMAGE_UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    image_uuid: str
    model_name: str
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    request_id: str
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, image_uuid: _Optional[str] = ..., model_name: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., request_id: _Optional[str] = ..., scores: _Optional[_Iterable[float]] = ...) -> None: ...

class ClassifyStreamRequest(_message.Message):
    __slots__ = ("id", "request", "model_name", "timeout_ms", "requests")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: ClassifyRequest
    model_name: str
    timeout_ms: int
    requests: _containers.RepeatedCompositeFieldContainer[ClassifyStreamRequest]
    def __init__(self, id: _Optional[str] = ..., request: _Optional[_Union[ClassifyRequest, _Mapping]] = ..., model_name: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[ClassifyStreamRequest, _Mapping]]] = ...) -> None: ...

class StreamError(_message.Message):
    __slots__ = ("code", "message", "origin", "retry_after_ms")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_MS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    origin: str
    retry_after_ms: int
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., origin: _Optional[str] = ..., retry_after_ms: _Optional[int] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error", "responses")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: ClassifyResponse
    error: StreamError
    responses: _containers.RepeatedCompositeFieldContainer[ClassifyStreamResponse]
    def __init__(self, id: _Optional[str] = ..., response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[StreamError, _Mapping]] = ..., responses: _Optional[_Iterable[_Union[ClassifyStreamResponse, _Mapping]]] = ...) -> None: ...
