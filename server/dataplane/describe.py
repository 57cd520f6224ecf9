"""What the server says about itself and its models, once for both bindings.

Plain dicts in the Open Inference Protocol's (and Triton's) JSON shapes: the REST binding
serialises them as they are, the gRPC servicer parses them into its protobuf messages
(`google.protobuf.json_format.ParseDict`), so a field can never differ between the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from registry_client.datatypes import CONFIG_TYPES as _CONFIG_TYPES
from server import __version__
from server.models import ServedModel

EXTENSIONS = ("model_configuration", "statistics", "model_repository", "binary_tensor_data")

# V2 datatype -> Triton's model_config.proto DataType name (the one datatype table).
CONFIG_TYPES = _CONFIG_TYPES


def server_metadata() -> dict[str, Any]:
    return {"name": "batchline", "version": __version__, "extensions": list(EXTENSIONS)}


def model_metadata(served: ServedModel, versions: Sequence[str]) -> dict[str, Any]:
    # The feature input only: an entity-keyed model's entity key is in the config's parameters.
    sig = served.signature
    return {
        "name": served.key.name,
        "versions": list(versions),
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in sig.inputs
        ],
        "outputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in sig.outputs
        ],
    }


def model_config(served: ServedModel) -> dict[str, Any]:
    """Triton's ModelConfig (model_config.proto field names, enums by name)."""
    s = served.settings
    sig = served.signature
    mv = served.version_info
    config: dict[str, Any] = {
        "name": served.key.name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "max_batch_size": s.max_batch_size,
        # With max_batch_size > 0, Triton's dims leave out the batch dimension.
        "input": [
            {
                "name": t.name,
                "data_type": CONFIG_TYPES.get(t.datatype, "TYPE_INVALID"),
                "dims": list(t.shape[1:]),
            }
            for t in sig.inputs
        ],
        "output": [
            {
                "name": t.name,
                "data_type": CONFIG_TYPES.get(t.datatype, "TYPE_INVALID"),
                "dims": list(t.shape[1:]),
            }
            for t in sig.outputs
        ],
        "instance_group": [
            {
                "name": f"{served.key.name}_cpu",
                "count": 1 if served.inline else s.instances,
                "kind": "KIND_CPU",
            }
        ],
    }
    if s.dynamic_batching:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(s.preferred_batch_sizes),
            "max_queue_delay_microseconds": s.max_queue_delay_us,
            "default_queue_policy": {"max_queue_size": s.max_queue_size},
        }
    params = {
        "version": served.key.version,
        "alias": served.alias or "",
        "sha256": mv.sha256,
        "created": mv.created,
        "source": mv.source,
        "execution": "inline" if served.inline else "executor",
        **{f"metric.{k}": f"{v:.6g}" for k, v in mv.metrics.items()},
    }
    view = served.view
    if view is not None:
        # Entity-keyed serving: a request may send `entity_key` (BYTES [-1], one id per row)
        # instead of `feature_input` (the server then reads the features itself), or both (the
        # features are used; the ids route the request and label its drift record). Not among
        # `input`, nor in the metadata's inputs: clients that fill every input would send it.
        params.update(
            entity_key=view.entity_key,
            entity_key_datatype="BYTES",
            entity_key_shape="[-1]",
            feature_input=served.feature_input,
            feature_view=view.name,
        )
    config["parameters"] = {key: {"string_value": str(value)} for key, value in params.items()}
    return config


def _duration(count: int, ns: int = 0) -> dict[str, int]:
    return {"count": count, "ns": ns}


def model_statistics(chosen: Iterable[ServedModel]) -> dict[str, Any]:
    """Triton's ModelStatisticsResponse. Every duration is present (zeros where batchline keeps
    none): perf_analyzer reads each of them from the JSON."""
    out = []
    for served in chosen:
        st = served.stats
        infer = st.compute_infer
        out.append(
            {
                "name": served.key.name,
                "version": served.key.version,
                "last_inference": st.last_inference_ms,
                "inference_count": st.inference_count,
                "execution_count": st.execution_count,
                "inference_stats": {
                    "success": _duration(st.success.count, st.success.ns),
                    "fail": _duration(st.fail.count, st.fail.ns),
                    "queue": _duration(st.queue.count, st.queue.ns),
                    # perf_analyzer requires the three compute counts to agree; batchline times
                    # the model call as a whole (compute_infer), so input and output carry the
                    # count only.
                    "compute_input": _duration(infer.count),
                    "compute_infer": _duration(infer.count, infer.ns),
                    "compute_output": _duration(infer.count),
                    "cache_hit": _duration(0),
                    "cache_miss": _duration(0),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": _duration(per.compute_infer.count),
                        "compute_infer": _duration(per.compute_infer.count, per.compute_infer.ns),
                        "compute_output": _duration(per.compute_infer.count),
                    }
                    for size, per in sorted(st.batch_stats.items())
                ],
            }
        )
    return {"model_stats": out}


def repository_index(models: Iterable[ServedModel]) -> list[dict[str, str]]:
    return [{"name": m.key.name, "version": m.key.version, "state": "READY"} for m in models]


def unload_refused(name: str) -> str:
    return (
        f"batchline serves the models it was configured with; '{name}' cannot be unloaded at "
        "run time (move its alias and reload instead)"
    )
