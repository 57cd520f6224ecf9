"""Build the demo registry: churn models trained on synthetic data, exported to ONNX.

Run ``python -m registry_client.demo --registry DIR [--quick] [--force]``. Training needs the
"train" extra (scikit-learn, skl2onnx, onnx); those are imported only inside the functions that
train or convert, so serving never depends on them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from registry_client.datatypes import ONNX_TO_V2
from registry_client.errors import AliasNotFound, ModelNotFound, RegistryError
from registry_client.file_registry import FileRegistry
from registry_client.profile import PROFILE_FILE, build_profile
from registry_client.refs import DEFAULT_ALIAS, ModelRef
from registry_client.types import ModelVersion, Signature, TensorInfo

DEMO_SOURCE = "batchline build-demo"
N_FEATURES = 15
FEATURES: tuple[str, ...] = tuple(f"f{i}" for i in range(N_FEATURES))
INPUT_NAME = "input"
REFERENCE_FILE = "reference.npz"
HOLDOUT_FILE = "holdout.npz"
# Online features: the view serving reads through (server/features/view.py defines the format)
# and the entity table training read, keyed by customer_id.
FEATURE_VIEW_FILE = "feature_view.json"
ENTITIES_FILE = "entities.csv"
ENTITY_KEY = "customer_id"
DEMO_MODELS = ("churn", "churn_mlp")

_N_SAMPLES = 6000
_QUICK_TRAIN_ROWS = 2000
_REFERENCE_ROWS = 2000
_TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}

# onnx.TensorProto element type number -> KServe V2 datatype name.
_ONNX_TO_V2 = ONNX_TO_V2

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True, eq=False)
class Holdout:
    """Held-out rows and what scikit-learn predicted for them when the version was built.

    The golden outputs let tests check the served ONNX model against scikit-learn without
    scikit-learn installed.
    """

    X: FloatArray
    y: IntArray
    probabilities: npt.NDArray[np.float64]
    labels: IntArray


@dataclass(frozen=True, slots=True, eq=False)
class _Data:
    X_train: FloatArray
    y_train: IntArray
    X_test: FloatArray
    y_test: IntArray
    seed: int


@dataclass(frozen=True, slots=True)
class _Candidate:
    algorithm: str
    description: str
    make: Callable[[], Any]
    alias: str | None


def build_demo(
    root: Path, *, seed: int = 42, quick: bool = False, force: bool = False
) -> dict[str, list[ModelVersion]]:
    """Train, export and register the demo models into the FileRegistry at `root`.

    Models: ``churn`` (v1 a gradient-boosted ensemble aliased ``production``, v2 another one
    aliased ``candidate``) and ``churn_mlp`` (a 3x1024 MLP aliased ``production``), each taking
    ``input`` FP32 [-1, 15] and giving ``label`` INT64 [-1] and ``probabilities`` FP32 [-1, 2].
    A model that already has a ``production`` alias is left alone unless `force`, in which case
    fresh versions are registered and the aliases move to them. Returns, per model, the versions
    built now, or all its registered versions when it was left alone. `quick` trains on fewer
    rows, trees and epochs (for tests); inputs, outputs and architecture stay the same.
    """
    registry = FileRegistry(root)
    pending = [name for name in DEMO_MODELS if force or not _has_production(registry, name)]
    built: dict[str, list[ModelVersion]] = {}
    if pending:
        data = _make_data(seed, quick)
        for name in pending:
            built[name] = _build_model(registry, name, _candidates(name, quick), data)
    return {name: built.get(name) or registry.list_versions(name) for name in DEMO_MODELS}


def load_reference(root: Path, name: str, version: str) -> tuple[FloatArray, IntArray]:
    """The training-feature sample (X float32 [n, 15], y int64 [n]) stored with a version."""
    path = FileRegistry(root).attachment(name, version, REFERENCE_FILE)
    with np.load(path) as npz:
        return npz["X"].astype(np.float32, copy=False), npz["y"].astype(np.int64, copy=False)


def load_holdout(root: Path, name: str, version: str) -> Holdout:
    """The holdout rows and scikit-learn's predictions for them, stored with a version."""
    path = FileRegistry(root).attachment(name, version, HOLDOUT_FILE)
    with np.load(path) as npz:
        return Holdout(
            X=npz["X"].astype(np.float32, copy=False),
            y=npz["y"].astype(np.int64, copy=False),
            probabilities=npz["probabilities"].astype(np.float64, copy=False),
            labels=npz["labels"].astype(np.int64, copy=False),
        )


def onnx_signature(model_path: Path) -> Signature:
    """Read input/output names, V2 datatypes and shapes (-1 for a symbolic dim) from the graph."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {init.name for init in graph.initializer}

    def info(value: onnx.ValueInfoProto) -> TensorInfo:
        tensor = value.type.tensor_type
        if tensor.elem_type not in _ONNX_TO_V2:
            raise RegistryError(
                f"{model_path}: tensor {value.name!r} has ONNX element type {tensor.elem_type}, "
                "which has no V2 datatype"
            )
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorInfo(value.name, _ONNX_TO_V2[tensor.elem_type], dims)

    return Signature(
        inputs=tuple(info(v) for v in graph.input if v.name not in initializers),
        outputs=tuple(info(v) for v in graph.output),
    )


def _has_production(registry: FileRegistry, name: str) -> bool:
    try:
        registry.resolve(ModelRef(name, alias=DEFAULT_ALIAS))
    except (ModelNotFound, AliasNotFound):
        return False
    return True


def _candidates(name: str, quick: bool) -> list[_Candidate]:
    from sklearn.ensemble import GradientBoostingClassifier
    from sklearn.neural_network import MLPClassifier

    if name == "churn":
        trees_v1, trees_v2 = (40, 60) if quick else (200, 300)
        return [
            _Candidate(
                "GradientBoostingClassifier",
                f"gradient-boosted trees, {trees_v1} x depth 5, lr 0.05",
                lambda: GradientBoostingClassifier(
                    n_estimators=trees_v1,
                    max_depth=5,
                    learning_rate=0.05,
                    subsample=0.8,
                    random_state=42,
                ),
                DEFAULT_ALIAS,
            ),
            _Candidate(
                "GradientBoostingClassifier",
                f"gradient-boosted trees, {trees_v2} x depth 4, lr 0.08",
                lambda: GradientBoostingClassifier(
                    n_estimators=trees_v2,
                    max_depth=4,
                    learning_rate=0.08,
                    subsample=0.9,
                    random_state=7,
                ),
                "candidate",
            ),
        ]
    if name == "churn_mlp":
        epochs = 2 if quick else 8
        return [
            _Candidate(
                "MLPClassifier",
                f"MLP 3 x 1024 relu, {epochs} adam epochs: heavy enough that batching pays",
                lambda: MLPClassifier(
                    hidden_layer_sizes=(1024, 1024, 1024),
                    activation="relu",
                    solver="adam",
                    alpha=1e-4,
                    batch_size=256,
                    learning_rate_init=1e-3,
                    max_iter=epochs,
                    early_stopping=False,
                    random_state=42,
                ),
                DEFAULT_ALIAS,
            )
        ]
    raise ValueError(f"no demo model named {name!r}")


def _make_data(seed: int, quick: bool) -> _Data:
    from sklearn.datasets import make_classification
    from sklearn.model_selection import train_test_split

    X, y = make_classification(
        n_samples=_N_SAMPLES,
        n_features=N_FEATURES,
        n_informative=8,
        n_redundant=3,
        random_state=seed,
    )
    X_train, X_test, y_train, y_test = train_test_split(
        X.astype(np.float32), y.astype(np.int64), test_size=0.2, random_state=seed, stratify=y
    )
    if quick:
        X_train, y_train = X_train[:_QUICK_TRAIN_ROWS], y_train[:_QUICK_TRAIN_ROWS]
    return _Data(X_train, y_train, X_test, y_test, seed)


def _build_model(
    registry: FileRegistry, name: str, candidates: list[_Candidate], data: _Data
) -> list[ModelVersion]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, roc_auc_score

    rng = np.random.default_rng(data.seed)
    ref_rows = rng.choice(len(data.X_train), min(_REFERENCE_ROWS, len(data.X_train)), replace=False)
    versions = []
    with tempfile.TemporaryDirectory(prefix="batchline-demo-") as tmp:
        work = Path(tmp)
        np.savez(work / REFERENCE_FILE, X=data.X_train[ref_rows], y=data.y_train[ref_rows])
        _write_entities(work / ENTITIES_FILE, data.X_train[ref_rows])
        (work / FEATURE_VIEW_FILE).write_text(_feature_view(data.X_train))
        for candidate in candidates:
            model = candidate.make()
            with warnings.catch_warnings():
                # A few epochs is the point (a heavy model that trains fast), not a mistake.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(data.X_train, data.y_train)
            proba = np.asarray(model.predict_proba(data.X_test), dtype=np.float64)
            labels = np.asarray(model.predict(data.X_test), dtype=np.int64)
            np.savez(
                work / HOLDOUT_FILE,
                X=data.X_test,
                y=data.y_test,
                probabilities=proba,
                labels=labels,
            )
            # The drift sidecar's reference: features as trained on, scores as on unseen rows.
            profile = build_profile(data.X_train, proba[:, 1], feature_names=FEATURES)
            (work / PROFILE_FILE).write_text(profile.to_json())
            artifact = work / "model.onnx"
            signature = _export_onnx(model, artifact, name)
            mv = registry.register(
                name,
                artifact,
                signature=signature,
                metrics={
                    "accuracy": float(accuracy_score(data.y_test, labels)),
                    "roc_auc": float(roc_auc_score(data.y_test, proba[:, 1])),
                },
                tags={"algorithm": candidate.algorithm},
                features=FEATURES,
                source=DEMO_SOURCE,
                description=candidate.description,
                attachments={
                    REFERENCE_FILE: work / REFERENCE_FILE,
                    HOLDOUT_FILE: work / HOLDOUT_FILE,
                    PROFILE_FILE: work / PROFILE_FILE,
                    FEATURE_VIEW_FILE: work / FEATURE_VIEW_FILE,
                    ENTITIES_FILE: work / ENTITIES_FILE,
                },
            )
            if candidate.alias is not None:
                registry.set_alias(name, candidate.alias, mv.version)
            versions.append(mv)
    return versions


def entity_id(row: int) -> str:
    return f"cust-{row:05d}"


def _write_entities(path: Path, X: FloatArray) -> None:
    """The offline entity table: one customer per reference row, the features as trained on."""
    lines = [",".join((ENTITY_KEY, *FEATURES))]
    lines += [",".join((entity_id(i), *(repr(float(v)) for v in row))) for i, row in enumerate(X)]
    path.write_text("\n".join(lines) + "\n")


def _feature_view(X_train: FloatArray) -> str:
    """The demo models' feature view; a missing value defaults to the training mean."""
    means = X_train.mean(axis=0)
    view = {
        "name": "churn_customer",
        "version": 1,
        "entity_key": ENTITY_KEY,
        "features": [
            {"name": f, "default": round(float(m), 6)} for f, m in zip(FEATURES, means, strict=True)
        ],
        "layout": "packed",
        "missing_entity": "default",
        "on_store_error": "unavailable",
        "description": "demo customers: 15 numeric features, as trained on",
    }
    return json.dumps(view, indent=2)


def _export_onnx(model: Any, path: Path, graph_name: str) -> Signature:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    # No ZipMap: probabilities come out as a plain FP32 [-1, 2] tensor, which V2 can carry.
    # A fixed graph name (skl2onnx defaults to a random one) makes equal models equal bytes.
    onx = convert_sklearn(
        model,
        name=graph_name,
        initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
        options={id(model): {"zipmap": False}},
        target_opset=_TARGET_OPSET,
    )
    path.write_bytes(onx.SerializeToString())
    signature = onnx_signature(path)
    expected = Signature(
        inputs=(TensorInfo(INPUT_NAME, "FP32", (-1, N_FEATURES)),),
        outputs=(
            TensorInfo("label", "INT64", (-1,)),
            TensorInfo("probabilities", "FP32", (-1, 2)),
        ),
    )
    if signature != expected:
        raise RegistryError(f"skl2onnx produced {signature}, expected {expected}")
    return signature


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m registry_client.demo", description="Build the batchline demo registry."
    )
    parser.add_argument("--registry", type=Path, default=Path("demo-registry"), help="root folder")
    parser.add_argument("--seed", type=int, default=42, help="seed of the synthetic data")
    parser.add_argument("--quick", action="store_true", help="train less (for tests)")
    parser.add_argument("--force", action="store_true", help="rebuild even if already built")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    built = build_demo(args.registry, seed=args.seed, quick=args.quick, force=args.force)
    registry = FileRegistry(args.registry)
    for name, versions in built.items():
        aliases = registry.aliases(name)
        for mv in versions:
            pointing = sorted(a for a, v in aliases.items() if v == mv.version)
            metrics = " ".join(f"{k}={v:.4f}" for k, v in sorted(mv.metrics.items()))
            print(
                f"{name}@{mv.version} [{', '.join(pointing) or '-'}] {metrics} "
                f"sha256={mv.sha256[:12]} {mv.artifact}"
            )
    print(f"registry {registry.root} ready in {time.perf_counter() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
