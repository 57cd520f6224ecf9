"""The process heap: the cyclic garbage collector kept off the request path, freed pages given back.

CPython's collector runs a full (oldest-generation) pass whenever enough objects have survived
two younger passes; under load, a request's objects live long enough (tens of milliseconds) to
be promoted, so full passes came about once a second, and each walked every object the process
holds (the ONNX Runtime and gRPC modules, numpy, pydantic, the models' own objects): ~50 ms on
the event loop, every request in flight waiting behind it. That was most of batchline's p99 at
c=64 (perf_analyzer, churn, 2-core machine: p99 61-65 ms with, 25-34 ms without; README,
"Against the field").

`settle()` collects once and then freezes what survived (`gc.freeze`: moved to a permanent
generation no pass walks), so later passes walk only what was made since. It runs once the
server has loaded its models (before it says it is ready) and again after model versions are
retired (one settle per loop turn however many retired in it), where it first unfreezes: what a
retired version held in reference cycles is freed then, not leaked (one full pass per reload,
on the loop, outside the steady state). Objects freed by reference counting are freed as
always; only cycles wait for a settle, and cycles that were alive at a settle (a request in
flight then) wait for the next one. Freed pages go back to the OS where the runtime closes a
session (runtime.py calls `trim`).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

_MALLOC_TRIM: Any = None


def settle() -> float:
    """Undo an earlier freeze, collect all garbage, then exempt the survivors from later
    passes; return the seconds it took."""
    began = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    took = time.perf_counter() - began
    log.debug("heap settled in %.1f ms (%d objects frozen)", took * 1e3, gc.get_freeze_count())
    return took


def release() -> None:
    """Undo `settle`'s freeze (cheap: the frozen objects join the oldest generation)."""
    gc.unfreeze()


def trim() -> None:
    """Give freed heap pages back to the OS where the C library can (glibc's malloc_trim)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
