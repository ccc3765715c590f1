import datetime

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2 as _ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2 as _rls_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReserveRequest(_message.Message):
    __slots__ = ("domain", "descriptors", "amount", "ttl")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    domain: str
    descriptors: _containers.RepeatedCompositeFieldContainer[_ratelimit_pb2.RateLimitDescriptor]
    amount: int
    ttl: _duration_pb2.Duration
    def __init__(self, domain: _Optional[str] = ..., descriptors: _Optional[_Iterable[_Union[_ratelimit_pb2.RateLimitDescriptor, _Mapping]]] = ..., amount: _Optional[int] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("code", "reservation_id")
    CODE_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    code: _rls_pb2.RateLimitResponse.Code
    reservation_id: str
    def __init__(self, code: _Optional[_Union[_rls_pb2.RateLimitResponse.Code, str]] = ..., reservation_id: _Optional[str] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("domain", "descriptors", "reservation_id", "actual_amount")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTORS_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ACTUAL_AMOUNT_FIELD_NUMBER: _ClassVar[int]
    domain: str
    descriptors: _containers.RepeatedCompositeFieldContainer[_ratelimit_pb2.RateLimitDescriptor]
    reservation_id: str
    actual_amount: int
    def __init__(self, domain: _Optional[str] = ..., descriptors: _Optional[_Iterable[_Union[_ratelimit_pb2.RateLimitDescriptor, _Mapping]]] = ..., reservation_id: _Optional[str] = ..., actual_amount: _Optional[int] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("reservation_released",)
    RESERVATION_RELEASED_FIELD_NUMBER: _ClassVar[int]
    reservation_released: bool
    def __init__(self, reservation_released: _Optional[bool] = ...) -> None: ...
