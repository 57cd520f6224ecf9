"""ONNX Runtime sessions: the only module that imports onnxruntime.

A `OnnxModel` is loaded once, described by its signature, warmed up, and timed at start-up so the
batcher can choose to run it inline on the event loop (cheap models: a thread hop costs more than
the model) or in a thread pool (heavy models: ONNX Runtime releases the GIL).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from registry_client.datatypes import ORT_TO_V2
from server import heap
from server.errors import ModelError
from server.types import ModelSignature, TensorSpec

log = logging.getLogger(__name__)

_ORT_TO_V2 = ORT_TO_V2

# A batch-1 call cheaper than this runs inline on the event loop: handing it to a thread and back
# costs tens of microseconds of Python and wake-ups, more than the model itself (README, "Dynamic batching").
INLINE_THRESHOLD_S = 250e-6


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    execution: str = "auto"  # "auto" | "inline" | "executor"
    instances: int = 1
    warmup_runs: int = 5


@dataclass(frozen=True, slots=True)
class Timing:
    batch1_s: float
    batch_max_s: float
    max_batch: int


def _dims(shape: list[object]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


class OnnxModel:
    """One ONNX model loaded into one InferenceSession, safe to run from several threads.

    Guarantees: loaded once; `signature` is read from the graph (symbolic dims become -1);
    `run` returns every output in signature order, as numpy arrays, and raises `ModelError`
    (never an onnxruntime exception) when the model fails.
    """

    def __init__(self, path: str, options: RuntimeOptions | None = None) -> None:
        self.options = options or RuntimeOptions()
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.inter_op_num_threads = self.options.inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # The thread pool spinning for work steals the core the event loop needs.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        available = set(ort.get_available_providers())
        providers = [p for p in self.options.providers if p in available] or [
            "CPUExecutionProvider"
        ]
        try:
            self._session = ort.InferenceSession(path, sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"cannot load ONNX model {path}: {exc}") from exc
        self.providers = tuple(self._session.get_providers())
        self.signature = ModelSignature(
            inputs=tuple(
                TensorSpec(i.name, _ORT_TO_V2.get(i.type, i.type), _dims(i.shape))
                for i in self._session.get_inputs()
            ),
            outputs=tuple(
                TensorSpec(o.name, _ORT_TO_V2.get(o.type, o.type), _dims(o.shape))
                for o in self._session.get_outputs()
            ),
        )
        self.output_names = [o.name for o in self.signature.outputs]
        self._run = self._session.run
        self.executor: ThreadPoolExecutor | None = None
        self.timing: Timing | None = None

    @property
    def batchable(self) -> bool:
        """Every input and output has a variable first dimension."""
        return all(
            t.shape and t.shape[0] == -1 for t in (*self.signature.inputs, *self.signature.outputs)
        )

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return self._run(self.output_names, inputs)  # type: ignore[no-any-return]
        except Exception as exc:
            raise ModelError(f"model failed: {type(exc).__name__}: {exc}") from exc

    def warm_up(self, max_batch: int) -> Timing:
        """Run synthetic batches (1 and max_batch rows) and record their median cost."""
        rows = max(1, max_batch)

        def sample(n: int) -> dict[str, np.ndarray]:
            feeds = {}
            for spec in self.signature.inputs:
                shape = tuple(
                    n if i == 0 else (d if d > 0 else 1) for i, d in enumerate(spec.shape)
                )
                if spec.datatype == "BYTES":
                    feeds[spec.name] = np.full(shape, "", dtype=object)
                else:
                    feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
            return feeds

        def median_cost(feeds: dict[str, np.ndarray]) -> float:
            costs = []
            for _ in range(max(1, self.options.warmup_runs)):
                start = time.perf_counter()
                self.run(feeds)
                costs.append(time.perf_counter() - start)
            return float(np.median(costs))

        one = median_cost(sample(1))
        many = median_cost(sample(rows)) if rows > 1 else one
        self.timing = Timing(batch1_s=one, batch_max_s=many, max_batch=rows)
        return self.timing

    def runs_inline(self) -> bool:
        if self.options.execution == "inline":
            return True
        if self.options.execution == "executor":
            return False
        return self.timing is not None and self.timing.batch1_s < INLINE_THRESHOLD_S

    def start_executor(self, name: str) -> ThreadPoolExecutor:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(
                max_workers=max(1, self.options.instances), thread_name_prefix=f"ort-{name}"
            )
        return self.executor

    def close(self) -> None:
        """Release the session now, not whenever the last reference goes: its weights and
        arena go back to the allocator, and `malloc_trim` hands freed pages back to the OS
        (glibc keeps them otherwise: RSS grew ~6 MB per churn_mlp reload under traffic without
        it, see bench/reload_soak.py). Only after every batch has finished (the caller drains
        first); a run after close raises ModelError."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None
        self._run = _closed
        self._session = None
        heap.trim()


def _closed(*_args: object) -> list[np.ndarray]:
    raise RuntimeError("the session was closed")
