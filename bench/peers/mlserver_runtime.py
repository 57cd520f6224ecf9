"""An MLServer 1.7.1 runtime running ONNX Runtime (the MLServer peer).

MLServer 1.7.1 has no ONNX runtime package, so this is the smallest MLModel that serves an ONNX
file: load one session (one thread), decode the batched input with NumpyCodec, run, encode the
outputs. Adaptive batching (max_batch_size / max_batch_time in model-settings.json) merges
requests before ``predict``. bench/field.py copies it beside each model's model-settings.json.

For the bench's mean batch size it counts rows and predict calls and writes them, every 200 ms,
to the JSON file named by the model's ``parameters.extra.stats_file``. Runs inside MLServer's own
venv, not the project's.
"""

import json
import os
import threading
import time

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        path = await get_model_uri(self._settings)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._rows = 0
        self._calls = 0
        params = self._settings.parameters
        extra = (params.extra if params is not None else None) or {}
        stats_file = extra.get("stats_file")
        if stats_file:
            threading.Thread(target=self._write_stats, args=(stats_file,), daemon=True).start()
        return True

    def _write_stats(self, path: str) -> None:
        while True:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"rows": self._rows, "calls": self._calls}, f)
            os.replace(tmp, path)
            time.sleep(0.2)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {
            name: NumpyCodec.decode_input(tensor).astype(np.float32, copy=False)
            for name, tensor in zip(self._inputs, payload.inputs, strict=True)
        }
        results = self._session.run(self._outputs, feeds)
        self._rows += len(next(iter(feeds.values())))
        self._calls += 1
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self._outputs, results, strict=True)
            ],
        )
