"""Side-by-side shadow evaluation, one module per job: `mirror` runs the mirrored work, `pairs`
holds what it yields, `log` keeps the pairs, `compare` reports on them, `gate` judges a report,
`promotion` acts on the judgement, `render` and `cli` make `batchline shadow report`.

The names below are re-exported so `from server.shadow import X` keeps working. `promotion` is
not (it needs the model manager; import it from `server.shadow.promotion`).
"""

from __future__ import annotations

from server.shadow.cli import configure_parser, main, parse_window, run_report
from server.shadow.compare import PSI_BINS, ShadowReport, compare, score_psi
from server.shadow.gate import GateAction, GateConfig, GateDecision, evaluate_gate
from server.shadow.log import (
    DEFAULT_BACKUPS,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_MEMORY_BYTES,
    DEFAULT_MAX_PAIRS,
    PairLog,
    log_files,
    read_log,
)
from server.shadow.mirror import MirrorCounters, MirrorJob, ShadowMirror
from server.shadow.pairs import (
    CountRecord,
    LogContents,
    ShadowPair,
    label_rows,
    pair_bytes,
    score_rows,
)
from server.shadow.render import render_html, render_text

__all__ = [
    "DEFAULT_BACKUPS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_MEMORY_BYTES",
    "DEFAULT_MAX_PAIRS",
    "PSI_BINS",
    "CountRecord",
    "GateAction",
    "GateConfig",
    "GateDecision",
    "LogContents",
    "MirrorCounters",
    "MirrorJob",
    "PairLog",
    "ShadowMirror",
    "ShadowPair",
    "ShadowReport",
    "compare",
    "configure_parser",
    "evaluate_gate",
    "label_rows",
    "log_files",
    "main",
    "pair_bytes",
    "parse_window",
    "read_log",
    "render_html",
    "render_text",
    "run_report",
    "score_psi",
    "score_rows",
]
