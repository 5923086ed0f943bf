from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class CallFrame(_message.Message):
    __slots__ = ("id", "method", "request", "timeout_s", "headers", "cancel")
    ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    id: int
    method: str
    request: bytes
    timeout_s: float
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    cancel: bool
    def __init__(self, id: _Optional[int] = ..., method: _Optional[str] = ..., request: _Optional[bytes] = ..., timeout_s: _Optional[float] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., cancel: _Optional[bool] = ...) -> None: ...

class CallFrames(_message.Message):
    __slots__ = ("calls",)
    CALLS_FIELD_NUMBER: _ClassVar[int]
    calls: _containers.RepeatedCompositeFieldContainer[CallFrame]
    def __init__(self, calls: _Optional[_Iterable[_Union[CallFrame, _Mapping]]] = ...) -> None: ...

class AnswerFrame(_message.Message):
    __slots__ = ("id", "code", "response", "message", "origin")
    ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    id: int
    code: int
    response: bytes
    message: str
    origin: str
    def __init__(self, id: _Optional[int] = ..., code: _Optional[int] = ..., response: _Optional[bytes] = ..., message: _Optional[str] = ..., origin: _Optional[str] = ...) -> None: ...

class AnswerFrames(_message.Message):
    __slots__ = ("answers",)
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    answers: _containers.RepeatedCompositeFieldContainer[AnswerFrame]
    def __init__(self, answers: _Optional[_Iterable[_Union[AnswerFrame, _Mapping]]] = ...) -> None: ...

class OpaqueStreamRequest(_message.Message):
    __slots__ = ("id", "request", "model_name", "timeout_ms", "requests")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    request: bytes
    model_name: str
    timeout_ms: int
    requests: _containers.RepeatedCompositeFieldContainer[OpaqueStreamRequest]
    def __init__(self, id: _Optional[str] = ..., request: _Optional[bytes] = ..., model_name: _Optional[str] = ..., timeout_ms: _Optional[int] = ..., requests: _Optional[_Iterable[_Union[OpaqueStreamRequest, _Mapping]]] = ...) -> None: ...

class OpaqueStreamResponse(_message.Message):
    __slots__ = ("id", "response", "error", "responses")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RESPONSES_FIELD_NUMBER: _ClassVar[int]
    id: str
    response: bytes
    error: OpaqueStreamError
    responses: _containers.RepeatedCompositeFieldContainer[OpaqueStreamResponse]
    def __init__(self, id: _Optional[str] = ..., response: _Optional[bytes] = ..., error: _Optional[_Union[OpaqueStreamError, _Mapping]] = ..., responses: _Optional[_Iterable[_Union[OpaqueStreamResponse, _Mapping]]] = ...) -> None: ...

class OpaqueStreamError(_message.Message):
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
