"""`[tracing]`: which requests are traced and where their spans go (server/observability/tracing)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import Field
from pydantic.dataclasses import dataclass

from server.config.validation import SECTION, Bool, Float, Int, Str, between, section

Exporter = Literal["none", "console", "otlp", "memory"]
EXPORTERS: tuple[str, ...] = get_args(Exporter)


@section("tracing")
@dataclass(frozen=True, slots=True, config=SECTION)
class TracingSettings:
    """`[tracing]`: which requests are traced and where their spans go."""

    sampling_ratio: Annotated[Float, between(0, 1, what="a number in [0, 1]")] = 0.0
    exporter: Exporter = "none"
    service_name: Str = "batchline"
    otlp_endpoint: Str = ""  # empty: the exporter's default (OTEL_EXPORTER_OTLP_* or localhost)
    # Finished traces and batches waiting for the export thread.
    max_pending: Annotated[Int, Field(ge=1)] = 65536
    export_interval_s: Annotated[Float, Field(gt=0)] = 0.2
    # console/otlp: encode and send in a separate process (off the server's GIL).
    export_process: Bool = True
