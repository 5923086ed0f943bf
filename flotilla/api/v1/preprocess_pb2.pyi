from flotilla.api.v1 import inference_pb2 as _inference_pb2
from flotilla.api.v1 import pools_pb2 as _pools_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BatchItem(_message.Message):
    __slots__ = ("image_uuid", "top_k", "request_id", "model_version", "traceparent", "all_scores")
    IMAGE_UUID_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRACEPARENT_FIELD_NUMBER: _ClassVar[int]
    ALL_SCORES_FIELD_NUMBER: _ClassVar[int]
    image_uuid: str
    top_k: int
    request_id: str
    model_version: int
    traceparent: str
    all_scores: bool
    def __init__(self, image_uuid: _Optional[str] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., model_version: _Optional[int] = ..., traceparent: _Optional[str] = ..., all_scores: _Optional[bool] = ...) -> None: ...

class ProcessBatchRequest(_message.Message):
    __slots__ = ("model_name", "items", "model_version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    model_version: int
    def __init__(self, model_name: _Optional[str] = ..., items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message", "origin")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    origin: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., origin: _Optional[str] = ...) -> None: ...

class ItemResult(_message.Message):
    __slots__ = ("response", "error")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    response: _inference_pb2.ClassifyResponse
    error: ItemError
    def __init__(self, response: _Optional[_Union[_inference_pb2.ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ProcessBatchResponse(_message.Message):
    __slots__ = ("results", "backend")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ItemResult]
    backend: str
    def __init__(self, results: _Optional[_Iterable[_Union[ItemResult, _Mapping]]] = ..., backend: _Optional[str] = ...) -> None: ...
