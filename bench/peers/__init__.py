"""Peer servers for `python -m bench.field`: a naive per-request grpc.aio server (naive_server),
Triton's python backend running ONNX Runtime (triton_model.py, copied into a model repository)
and an MLServer 1.7.1 runtime running ONNX Runtime (mlserver_runtime.py). The Triton and MLServer
files run inside their own virtual environments (scripts/install_peers.sh), not the project's."""
