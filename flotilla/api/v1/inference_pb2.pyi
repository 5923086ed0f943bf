from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ClassifyRequest(_message.Message):
    __slots__ = ("image_uuid", "model_name", "top_k", "request_id", "priority", "timeout_us", "model_version")
    IMAGE_UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_US_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    image_uuid: str
    model_name: str
    top_k: int
    request_id: str
    priority: int
    timeout_us: int
    model_version: int
    def __init__(self, image_uuid: _Optional[str] = ..., model_name: _Optional[str] = ..., top_k: _Optional[int] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ..., timeout_us: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("image_uuid", "model_name", "classes", "request_id")
    IMAGE_UUID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image_uuid: str
    model_name: str
    classes: _containers.RepeatedCompositeFieldContainer[ClassScore]
    request_id: str
    def __init__(self, image_uuid: _Optional[str] = ..., model_name: _Optional[str] = ..., classes: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...
