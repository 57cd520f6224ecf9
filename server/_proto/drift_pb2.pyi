from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PRIMARY: _ClassVar[Role]
    ROLE_CANARY: _ClassVar[Role]
    ROLE_SHADOW: _ClassVar[Role]
ROLE_UNSPECIFIED: Role
ROLE_PRIMARY: Role
ROLE_CANARY: Role
ROLE_SHADOW: Role

class PredictionRecord(_message.Message):
    __slots__ = ("model", "version", "role", "request_id", "entity_id", "rows", "n_features", "features", "scores", "labels", "latency_s", "time_unix_ns")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENTITY_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    N_FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    role: Role
    request_id: str
    entity_id: str
    rows: int
    n_features: int
    features: _containers.RepeatedScalarFieldContainer[float]
    scores: _containers.RepeatedScalarFieldContainer[float]
    labels: _containers.RepeatedScalarFieldContainer[int]
    latency_s: float
    time_unix_ns: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[_Union[Role, str]] = ..., request_id: _Optional[str] = ..., entity_id: _Optional[str] = ..., rows: _Optional[int] = ..., n_features: _Optional[int] = ..., features: _Optional[_Iterable[float]] = ..., scores: _Optional[_Iterable[float]] = ..., labels: _Optional[_Iterable[int]] = ..., latency_s: _Optional[float] = ..., time_unix_ns: _Optional[int] = ...) -> None: ...

class PredictionBatch(_message.Message):
    __slots__ = ("records", "producer", "dropped_total")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    DROPPED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[PredictionRecord]
    producer: str
    dropped_total: int
    def __init__(self, records: _Optional[_Iterable[_Union[PredictionRecord, _Mapping]]] = ..., producer: _Optional[str] = ..., dropped_total: _Optional[int] = ...) -> None: ...

class RecordAck(_message.Message):
    __slots__ = ("received",)
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    received: int
    def __init__(self, received: _Optional[int] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("request_id", "labels")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    labels: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., labels: _Optional[_Iterable[int]] = ...) -> None: ...

class LabelBatch(_message.Message):
    __slots__ = ("labels",)
    LABELS_FIELD_NUMBER: _ClassVar[int]
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    def __init__(self, labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ...) -> None: ...

class LabelAck(_message.Message):
    __slots__ = ("matched", "unknown", "mismatched")
    MATCHED_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    MISMATCHED_FIELD_NUMBER: _ClassVar[int]
    matched: int
    unknown: int
    mismatched: int
    def __init__(self, matched: _Optional[int] = ..., unknown: _Optional[int] = ..., mismatched: _Optional[int] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("model", "version", "refresh")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    refresh: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., refresh: _Optional[bool] = ...) -> None: ...

class VariableDrift(_message.Message):
    __slots__ = ("name", "psi", "level", "ks_statistic", "ks_pvalue", "js_distance", "missing_rate", "out_of_range_rate", "count", "edges", "reference_shares", "current_shares")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PSI_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    KS_STATISTIC_FIELD_NUMBER: _ClassVar[int]
    KS_PVALUE_FIELD_NUMBER: _ClassVar[int]
    JS_DISTANCE_FIELD_NUMBER: _ClassVar[int]
    MISSING_RATE_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_RANGE_RATE_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_SHARES_FIELD_NUMBER: _ClassVar[int]
    CURRENT_SHARES_FIELD_NUMBER: _ClassVar[int]
    name: str
    psi: float
    level: str
    ks_statistic: float
    ks_pvalue: float
    js_distance: float
    missing_rate: float
    out_of_range_rate: float
    count: int
    edges: _containers.RepeatedScalarFieldContainer[float]
    reference_shares: _containers.RepeatedScalarFieldContainer[float]
    current_shares: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., psi: _Optional[float] = ..., level: _Optional[str] = ..., ks_statistic: _Optional[float] = ..., ks_pvalue: _Optional[float] = ..., js_distance: _Optional[float] = ..., missing_rate: _Optional[float] = ..., out_of_range_rate: _Optional[float] = ..., count: _Optional[int] = ..., edges: _Optional[_Iterable[float]] = ..., reference_shares: _Optional[_Iterable[float]] = ..., current_shares: _Optional[_Iterable[float]] = ...) -> None: ...

class WindowReport(_message.Message):
    __slots__ = ("model", "version", "role", "records_total", "rows_total", "window_rows", "evaluated_unix_s", "has_profile", "score", "features", "labelled_rows", "accuracy", "auc", "active_alerts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    RECORDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ROWS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    WINDOW_ROWS_FIELD_NUMBER: _ClassVar[int]
    EVALUATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    HAS_PROFILE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    LABELLED_ROWS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    AUC_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_ALERTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: str
    role: str
    records_total: int
    rows_total: int
    window_rows: int
    evaluated_unix_s: float
    has_profile: bool
    score: VariableDrift
    features: _containers.RepeatedCompositeFieldContainer[VariableDrift]
    labelled_rows: int
    accuracy: float
    auc: float
    active_alerts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, model: _Optional[str] = ..., version: _Optional[str] = ..., role: _Optional[str] = ..., records_total: _Optional[int] = ..., rows_total: _Optional[int] = ..., window_rows: _Optional[int] = ..., evaluated_unix_s: _Optional[float] = ..., has_profile: _Optional[bool] = ..., score: _Optional[_Union[VariableDrift, _Mapping]] = ..., features: _Optional[_Iterable[_Union[VariableDrift, _Mapping]]] = ..., labelled_rows: _Optional[int] = ..., accuracy: _Optional[float] = ..., auc: _Optional[float] = ..., active_alerts: _Optional[_Iterable[str]] = ...) -> None: ...

class DriftReport(_message.Message):
    __slots__ = ("windows", "generated_unix_s", "records_total", "rejected_total", "alerts_fired_total")
    WINDOWS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    RECORDS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIRED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    windows: _containers.RepeatedCompositeFieldContainer[WindowReport]
    generated_unix_s: float
    records_total: int
    rejected_total: int
    alerts_fired_total: int
    def __init__(self, windows: _Optional[_Iterable[_Union[WindowReport, _Mapping]]] = ..., generated_unix_s: _Optional[float] = ..., records_total: _Optional[int] = ..., rejected_total: _Optional[int] = ..., alerts_fired_total: _Optional[int] = ...) -> None: ...
