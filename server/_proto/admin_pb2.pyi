from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetRouteRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ShadowTarget(_message.Message):
    __slots__ = ("version", "sample_percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: str
    sample_percent: float
    def __init__(self, version: _Optional[str] = ..., sample_percent: _Optional[float] = ...) -> None: ...

class RouteSpec(_message.Message):
    __slots__ = ("model", "primary", "canary", "canary_percent", "shadows")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    CANARY_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SHADOWS_FIELD_NUMBER: _ClassVar[int]
    model: str
    primary: str
    canary: str
    canary_percent: float
    shadows: _containers.RepeatedCompositeFieldContainer[ShadowTarget]
    def __init__(self, model: _Optional[str] = ..., primary: _Optional[str] = ..., canary: _Optional[str] = ..., canary_percent: _Optional[float] = ..., shadows: _Optional[_Iterable[_Union[ShadowTarget, _Mapping]]] = ...) -> None: ...

class ReloadModelRequest(_message.Message):
    __slots__ = ("model", "ref")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    model: str
    ref: str
    def __init__(self, model: _Optional[str] = ..., ref: _Optional[str] = ...) -> None: ...

class ReloadModelResponse(_message.Message):
    __slots__ = ("model", "version", "previous_version", "changed", "message")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    previous_version: str
    changed: bool
    message: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., previous_version: _Optional[str] = ..., changed: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class ModelStatusRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelState(_message.Message):
    __slots__ = ("name", "version", "ref", "alias", "sha256", "state", "last_error", "loaded_at_unix_ms", "last_check_unix_ms", "metrics", "tags", "source", "created", "execution", "reloads", "failed_reloads")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECK_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    FAILED_RELOADS_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    ref: str
    alias: str
    sha256: str
    state: str
    last_error: str
    loaded_at_unix_ms: int
    last_check_unix_ms: int
    metrics: _containers.ScalarMap[str, float]
    tags: _containers.ScalarMap[str, str]
    source: str
    created: str
    execution: str
    reloads: int
    failed_reloads: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., ref: _Optional[str] = ..., alias: _Optional[str] = ..., sha256: _Optional[str] = ..., state: _Optional[str] = ..., last_error: _Optional[str] = ..., loaded_at_unix_ms: _Optional[int] = ..., last_check_unix_ms: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., tags: _Optional[_Mapping[str, str]] = ..., source: _Optional[str] = ..., created: _Optional[str] = ..., execution: _Optional[str] = ..., reloads: _Optional[int] = ..., failed_reloads: _Optional[int] = ...) -> None: ...

class ModelStatusResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelState]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelState, _Mapping]]] = ...) -> None: ...
