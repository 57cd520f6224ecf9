"""What a load run does: the ``Options`` the CLI fills and ``loadtest.run`` takes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CALL = "inference.GRPCInferenceService/ModelInfer"


@dataclass(frozen=True)
class Options:
    """One load run, ghz's flags as fields (durations in seconds).

    Exactly one request source at most: ``data`` (JSON text or a dict, ``-d``), ``data_file``
    (``-D``), ``binary_file`` (``-b``), ``request`` (pre-serialised bytes, API only) or ``model``
    (build a ModelInferRequest from the server's ModelMetadata); with none the request is empty.
    ``duration_s``, when set, replaces ``total``. Construction fails with ``ValueError`` naming
    the flag when a value is out of range.
    """

    target: str
    call: str = DEFAULT_CALL
    data: str | Mapping[str, Any] | None = None
    data_file: Path | None = None
    binary_file: Path | None = None
    request: bytes | None = None
    concurrency: int = 50
    total: int = 200
    duration_s: float | None = None
    rps: float = 0.0
    connections: int = 1
    timeout_s: float = 20.0
    connect_timeout_s: float = 10.0
    procs: int = 1
    skip_first: int = 0
    model: str | None = None
    rows: int = 1
    model_version: str = ""
    typed: bool = False
    # ghz's --proto / --import-paths / --protoset: resolve --call against these descriptors
    # instead of the generated V2 protocol (any unary method, or ModelStreamInfer).
    proto: Path | None = None
    import_paths: tuple[Path, ...] = ()
    protoset: Path | None = None
    # --model requests are tagged `traffic: loadtest` (kept out of drift and shadow statistics)
    # unless `live`.
    live: bool = False

    def __post_init__(self) -> None:
        checks: list[tuple[bool, str]] = [
            (self.concurrency >= 1, "-c/--concurrency must be >= 1"),
            (self.total >= 1, "-n/--total must be >= 1"),
            (self.duration_s is None or self.duration_s > 0, "-z/--duration must be > 0"),
            (self.rps >= 0, "--rps must be >= 0"),
            (self.connections >= 1, "--connections must be >= 1"),
            (
                self.connections <= self.concurrency,
                "--connections must not exceed -c/--concurrency",
            ),
            (self.timeout_s >= 0, "-t/--timeout must be >= 0 (0: no deadline)"),
            (self.connect_timeout_s > 0, "--connect-timeout must be > 0"),
            (self.procs >= 1, "--procs must be >= 1"),
            (self.procs <= self.concurrency, "--procs must not exceed -c/--concurrency"),
            (self.skip_first >= 0, "--skipFirst must be >= 0"),
            (
                self.duration_s is not None or self.skip_first < self.total,
                "--skipFirst must be smaller than -n/--total",
            ),
            (
                self.duration_s is not None or self.total - self.skip_first >= self.procs,
                "--procs must not exceed the measured calls (-n minus --skipFirst)",
            ),
            (self.rows >= 1, "--rows must be >= 1"),
            (
                self.model is not None or (self.rows == 1 and not self.typed),
                "--rows and --typed need --model",
            ),
            (
                self.model_version == "" or self.model is not None,
                "--model-version needs --model",
            ),
            (":" in self.target, f"target must be host:port, got {self.target!r}"),
            (
                self.proto is None or self.protoset is None,
                "give --proto or --protoset, not both",
            ),
            (not self.import_paths or self.proto is not None, "--import-paths needs --proto"),
        ]
        sources = [
            name
            for name, value in (
                ("-d/--data", self.data),
                ("-D/--data-file", self.data_file),
                ("-b/--binary-file", self.binary_file),
                ("request", self.request),
                ("--model", self.model),
            )
            if value is not None
        ]
        checks.append(
            (len(sources) <= 1, f"choose one request source, not {' and '.join(sources)}")
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
