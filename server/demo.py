"""`batchline demo`: build the demo models, serve them, send a burst of real gRPC requests,
print predictions and a latency / batch-size summary, and stop cleanly."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import numpy as np

from registry_client import FileRegistry
from registry_client.demo import DEMO_MODELS, build_demo, load_reference
from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from server.app import App, open_feature_store
from server.config import load_settings
from server.features.materialize import materialize, read_rows
from server.features.view import FeatureView

MODELS = DEMO_MODELS


def _request(model: str, rows: np.ndarray, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="input", datatype="FP32", shape=rows.shape)
    request.raw_input_contents.append(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
    return request


def _probabilities(response: pb.ModelInferResponse) -> np.ndarray:
    for i, out in enumerate(response.outputs):
        if out.name == "probabilities":
            if not response.raw_output_contents:  # a typed request gets a typed reply
                return np.array(out.contents.fp32_contents, dtype=np.float32).reshape(
                    tuple(out.shape)
                )
            return np.frombuffer(response.raw_output_contents[i], dtype=np.float32).reshape(
                tuple(out.shape)
            )
    raise KeyError("probabilities")


async def _burst(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str, X: np.ndarray, total: int, concurrency: int
) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(total))

    async def worker() -> None:
        for i in counter:
            row = X[i % len(X)][None, :]
            start = time.perf_counter()
            await stub.ModelInfer(_request(model, row, f"{model}-{i}"), timeout=10)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def _demo(registry: Path, requests: int, concurrency: int) -> None:
    # The embedded feature store: the entity table training read, materialized through the view.
    store_url = f"sqlite:///{registry / 'features.db'}"
    store = FileRegistry(registry)
    mv = store.resolve("churn@production")
    view = FeatureView.from_json(
        store.attachment(mv.name, mv.version, "feature_view.json").read_text()
    )
    feature_store = open_feature_store(store_url)
    try:
        table = store.attachment(mv.name, mv.version, "entities.csv")
        written = await materialize(view, read_rows(table), feature_store)
    finally:
        await feature_store.close()
    settings = load_settings(
        server_overrides={
            "registry": str(registry),
            "grpc_port": 0,
            "http_port": 0,
            "metrics_port": 0,
            "host": "127.0.0.1",
            "feature_store": store_url,
        },
        model_refs=tuple(f"{m}@production" for m in MODELS),
    )
    app = App(settings)
    await app.start()
    try:
        print(
            f"\nserving on 127.0.0.1:{app.grpc_port} (gRPC), http://127.0.0.1:{app.http_port}/v2 "
            f"(REST), metrics on :{app.metrics_port}/metrics\n"
        )
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
            print(f"server {meta.name} {meta.version}, extensions: {', '.join(meta.extensions)}")
            for model in MODELS:
                served = app.models.get(model)
                X, y = load_reference(registry, model, served.key.version)
                reply = await stub.ModelInfer(_request(model, X[:5], "preview"))
                probs = _probabilities(reply)
                print(f"\n{model} version {reply.model_version}: first five customers")
                print("  churn probability   predicted   actual")
                for p, actual in zip(probs[:, 1], y[:5], strict=True):
                    print(f"  {p:17.4f}   {int(p >= 0.5):9d}   {int(actual):6d}")
            print(
                f"\nfeatures by customer id: {len(written.entities)} customers of view "
                f"{view.name} materialized into {store_url}"
            )
            ids = [written.entities[0], written.entities[1], "cust-unknown"]
            request = pb.ModelInferRequest(model_name="churn", id="by-entity")
            tensor = request.inputs.add(name=view.entity_key, datatype="BYTES", shape=[len(ids)])
            tensor.contents.bytes_contents.extend(i.encode() for i in ids)
            reply = await stub.ModelInfer(request)
            probs = _probabilities(reply)
            defaulted = (
                reply.parameters["defaulted_rows"].string_param
                if "defaulted_rows" in reply.parameters
                else ""
            )
            flagged = {int(i) for i in defaulted.split(",") if i}
            for i, customer in enumerate(ids):
                note = "  (unknown: the view's defaults)" if i in flagged else ""
                print(f"  {customer:<14} churn probability {probs[i, 1]:.4f}{note}")
            print(
                f"\nburst: {requests} requests of one row per model, concurrency {concurrency} "
                "(the client shares this process and event loop; make bench measures properly)"
            )
            print(
                f"{'model':<11} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'mean batch':>11}"
            )
            for model in MODELS:
                served = app.models.get(model)
                X, _ = load_reference(registry, model, served.key.version)
                before = served.stats.execution_count, served.stats.inference_count
                start = time.perf_counter()
                lat = await _burst(stub, model, X, requests, concurrency)
                elapsed = time.perf_counter() - start
                batches = served.stats.execution_count - before[0]
                rows = served.stats.inference_count - before[1]
                p50, p95, p99 = (np.percentile(lat, q) * 1e3 for q in (50, 95, 99))
                print(
                    f"{model:<11} {len(lat) / elapsed:8.0f} {p50:8.2f} {p95:8.2f} {p99:8.2f} "
                    f"{rows / max(batches, 1):11.1f}"
                )
    finally:
        await app.stop(grace=5)
    print("\nstopped cleanly")


def run_demo(registry: Path, *, requests: int = 2000, concurrency: int = 32) -> int:
    registry = registry.resolve()
    present = registry.exists() and set(MODELS) <= set(FileRegistry(registry).list_models())
    if not present:
        print(f"building the demo models into {registry} (scikit-learn + skl2onnx) ...")
        build_demo(registry)
    try:
        import uvloop

        uvloop.run(_demo(registry, requests, concurrency))
    except ImportError:  # pragma: no cover
        asyncio.run(_demo(registry, requests, concurrency))
    return 0
