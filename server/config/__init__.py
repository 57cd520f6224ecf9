"""Typed settings: batchline.toml, then BATCHLINE_* environment variables, then flags.

One section class per component, each in its own module here, each field with its constraint:
`server` (ServerSettings), `model_defaults` and `models.NAME` (ModelSettings, whose `batching`
is the batcher's BatchPolicy), `models.NAME.breaker` and `server.feature_breaker`
(BreakerConfig), `models.NAME.gate` (GateConfig), `drift` (DriftSettings), `tracing`
(TracingSettings). Feature modules import their section from here; this package imports no
feature module (no grpc, redis, OpenTelemetry or onnxruntime), so reading the settings is cheap.

Every key can be set in the environment as BATCHLINE_<SECTION>__<KEY>, nested with `__`
(BATCHLINE_SERVER__GRPC_PORT=9001, BATCHLINE_MODELS__CHURN__MAX_BATCH_SIZE=32,
BATCHLINE_DRIFT__SAMPLE_RATIO=0.1; lists and tables as JSON). Every problem stops start-up in
one ConfigError that lists them all, each naming its key, e.g.
`models.churn.max_batch_size: expected an integer >= 1, got 0`.

    [server]
    host = "0.0.0.0"
    grpc_port = 8001
    http_port = 8000             # the V2 REST binding; 0: any free port; -1: off
    metrics_port = 8002          # 0: any free port; -1: no metrics endpoint
    registry = "demo-registry"   # a file registry folder
    workers = 1
    grace_period_s = 10.0
    max_message_bytes = 67108864
    max_tensor_elements = 4194304
    max_request_id_bytes = 256   # longer request ids: INVALID_ARGUMENT

    [model_defaults]             # applied to every model, overridden per model
    max_batch_size = 64

    [models.churn]
    ref = "churn@production"
    max_queue_delay_us = 500
"""

from __future__ import annotations

from server.config.batching import BatchPolicy
from server.config.breaker import BreakerConfig
from server.config.drift import AlertRule, DriftSettings
from server.config.gate import GateConfig
from server.config.loader import (
    LEGACY_ENV,
    BatchlineSettings,
    Settings,
    env_name,
    load_settings,
)
from server.config.models import ModelDefaults, ModelSettings
from server.config.server import ServerSettings
from server.config.tracing import TracingSettings
from server.errors import ConfigError

__all__ = [
    "LEGACY_ENV",
    "AlertRule",
    "BatchPolicy",
    "BatchlineSettings",
    "BreakerConfig",
    "ConfigError",
    "DriftSettings",
    "GateConfig",
    "ModelDefaults",
    "ModelSettings",
    "ServerSettings",
    "Settings",
    "TracingSettings",
    "env_name",
    "load_settings",
]
