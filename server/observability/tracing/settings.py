"""`[tracing]`: `TracingSettings` (a section of the settings, server/config/tracing.py), the
exporters that can be named, and the modules the OTLP exporter may come from.
"""

from __future__ import annotations

from server.config.tracing import EXPORTERS, TracingSettings

OTLP_MODULES = (
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)

__all__ = ["EXPORTERS", "OTLP_MODULES", "TracingSettings"]
