from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WireDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WIRE_DTYPE_FLOAT32: _ClassVar[WireDtype]
    WIRE_DTYPE_BFLOAT16: _ClassVar[WireDtype]
WIRE_DTYPE_FLOAT32: WireDtype
WIRE_DTYPE_BFLOAT16: WireDtype

class HelloRequest(_message.Message):
    __slots__ = ("rank", "world_size")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...

class HelloReply(_message.Message):
    __slots__ = ("rank", "world_size")
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    world_size: int
    def __init__(self, rank: _Optional[int] = ..., world_size: _Optional[int] = ...) -> None: ...

class PushChunksRequest(_message.Message):
    __slots__ = ("seq", "index", "elements", "dtype", "goodbye", "reason", "data")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    GOODBYE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    seq: int
    index: int
    elements: int
    dtype: WireDtype
    goodbye: bool
    reason: str
    data: bytes
    def __init__(self, seq: _Optional[int] = ..., index: _Optional[int] = ..., elements: _Optional[int] = ..., dtype: _Optional[_Union[WireDtype, str]] = ..., goodbye: _Optional[bool] = ..., reason: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushChunksReply(_message.Message):
    __slots__ = ("received", "seq")
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    received: int
    seq: int
    def __init__(self, received: _Optional[int] = ..., seq: _Optional[int] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("rank", "seq", "reason")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rank: int
    seq: int
    reason: str
    def __init__(self, rank: _Optional[int] = ..., seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ByeRequest(_message.Message):
    __slots__ = ("rank", "reason")
    RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rank: int
    reason: str
    def __init__(self, rank: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ByeReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
