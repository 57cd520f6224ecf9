"""`[tracing]`: which requests are traced and where their spans go (`TracingSettings`), and
the exporters that can be named. Plain values, validated on construction.
"""

from __future__ import annotations

from dataclasses import dataclass

EXPORTERS = ("none", "console", "otlp", "memory")
OTLP_MODULES = (
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
)


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """`[tracing]`: which requests are traced and where their spans go."""

    sampling_ratio: float = 0.0
    exporter: str = "none"  # none | console | otlp | memory
    service_name: str = "batchline"
    otlp_endpoint: str = ""  # empty: the exporter's default (OTEL_EXPORTER_OTLP_* or localhost)
    max_pending: int = 65536  # finished traces and batches waiting for the export thread
    export_interval_s: float = 0.2
    # console/otlp: encode and send in a separate process (off the server's GIL).
    export_process: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.sampling_ratio <= 1.0:
            raise ValueError(
                f"tracing.sampling_ratio: expected a number in [0, 1], got {self.sampling_ratio!r}"
            )
        if self.exporter not in EXPORTERS:
            raise ValueError(
                f"tracing.exporter: expected one of {', '.join(EXPORTERS)}, got {self.exporter!r}"
            )
        if self.max_pending < 1:
            raise ValueError(f"tracing.max_pending: expected >= 1, got {self.max_pending!r}")
        if self.export_interval_s <= 0:
            raise ValueError(
                f"tracing.export_interval_s: expected > 0, got {self.export_interval_s!r}"
            )
