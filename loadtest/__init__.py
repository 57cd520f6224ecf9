"""A ghz-style load generator for batchline's V2 gRPC API (``python -m loadtest``).

from loadtest import Options, run
report = run(Options("127.0.0.1:8001", model="churn", concurrency=64, total=20_000))
print(report.rps, report.to_dict()["latencyDistribution"])
"""

from __future__ import annotations

from loadtest.options import Options
from loadtest.runner import SetupError, run
from loadtest.stats import Report

__all__ = ["Options", "Report", "SetupError", "run"]
