"""Triton python-backend model running ONNX Runtime on each dynamic batch (the Triton peer).

bench/field.py copies this file to ``REPO/NAME/1/model.py`` beside ``model.onnx`` and
``sys_path.json``. The backend stub does not inherit PYTHONPATH, so the site-packages holding
numpy and onnxruntime (the triton venv's) are read from ``sys_path.json`` and put on sys.path
before they are imported. Runs inside tritonserver's stub process, not the project's venv.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for entry in reversed(json.loads((HERE / "sys_path.json").read_text())):
    if entry not in sys.path:
        sys.path.insert(0, entry)

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


class TritonPythonModel:
    """Concatenates the batch's inputs, runs one ORT session call, splits the outputs."""

    def initialize(self, args):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(HERE / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        per_request = [
            [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names]
            for r in requests
        ]
        sizes = [tensors[0].shape[0] for tensors in per_request]
        if len(per_request) == 1:
            feeds = dict(zip(self.input_names, per_request[0], strict=True))
        else:
            feeds = {
                name: np.concatenate([tensors[i] for tensors in per_request])
                for i, name in enumerate(self.input_names)
            }
        results = self.session.run(self.output_names, feeds)
        responses = []
        start = 0
        for n in sizes:
            responses.append(
                pb_utils.InferenceResponse(
                    [
                        pb_utils.Tensor(name, value[start : start + n])
                        for name, value in zip(self.output_names, results, strict=True)
                    ]
                )
            )
            start += n
        return responses
