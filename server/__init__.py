"""batchline: a production inference server for ONNX models (Open Inference Protocol)."""

__version__ = "0.1.0"
