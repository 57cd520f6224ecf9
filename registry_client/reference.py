"""Reference profiles for any model: a table of the data it was trained on -> profile.json.

`batchline registry register ... --reference data.csv` (and `registry profile NAME VERSION
--reference data.csv` for a version that has none) reads the feature columns of a CSV, Parquet,
.npy or .npz file, runs the model itself (ONNX Runtime) to get its scores on those rows, and
builds the same profile build-demo writes (registry_client.profile): per-feature and score
histograms the drift sidecar compares live traffic with.

Which columns: the `--features` names in order when given; otherwise every column of the table,
which must then be as many as the model's feature input is wide. The score is what the drift
producer reads from a served request: the model's first floating-point output, its last column
for class probabilities [N, C].
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from registry_client.errors import RegistryError
from registry_client.profile import ReferenceProfile, build_profile

_FLOAT_OUTPUTS = ("tensor(float)", "tensor(double)", "tensor(float16)")
_CHUNK_ROWS = 4096


def _table(path: Path) -> tuple[tuple[str, ...], Any]:
    """(column names, rows as a 2-d float array or a list of dicts) of a reference file."""
    suffix = path.suffix.lower()
    if suffix in (".npy", ".npz"):
        data = np.load(path)
        if suffix == ".npz":
            key = "X" if "X" in data.files else data.files[0]
            data = data[key]
        matrix = np.asarray(data, dtype=np.float64)
        if matrix.ndim != 2:
            raise RegistryError(
                f"--reference {path}: expected a 2-d array, got shape {matrix.shape}"
            )
        return tuple(f"f{i}" for i in range(matrix.shape[1])), matrix
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq  # type: ignore[import-untyped]
        except ImportError:
            raise RegistryError(
                f"--reference {path}: reading Parquet needs pyarrow (pip install pyarrow), "
                "or give a CSV"
            ) from None
        table = pq.read_table(path)
        return tuple(table.column_names), table.to_pylist()
    with path.open(newline="") as fh:
        try:
            reader = csv.DictReader(fh)
            rows = list(reader)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise RegistryError(f"--reference {path}: not a readable CSV file: {exc}") from exc
    return tuple(reader.fieldnames or ()), rows


def read_reference(
    path: Path, features: Sequence[str], width: int
) -> tuple[npt.NDArray[np.float64], tuple[str, ...]]:
    """The reference rows [n, width] and their feature names; errors name the columns."""
    if not path.is_file():
        raise RegistryError(f"--reference {path}: no such file")
    columns, data = _table(path)
    found = ", ".join(columns[:20]) + (" ..." if len(columns) > 20 else "") or "none"
    names = tuple(features) if features else columns
    if len(names) != width:
        raise RegistryError(
            f"--reference {path}: {len(names)} columns ({found}) for a model whose feature "
            f"input takes {width}: pass --features with the {width} column names in order"
        )
    if isinstance(data, np.ndarray):
        if features and data.shape[1] != width:
            raise RegistryError(
                f"--reference {path}: {data.shape[1]} columns, the model takes {width}"
            )
        matrix = data
    else:
        missing = [n for n in names if n not in columns]
        if missing:
            raise RegistryError(
                f"--reference {path}: no column {', '.join(repr(m) for m in missing[:10])} "
                f"(columns found: {found})"
            )
        matrix = np.empty((len(data), width), dtype=np.float64)
        for i, row in enumerate(data):
            for j, name in enumerate(names):
                value = row.get(name)
                try:
                    matrix[i, j] = float(value) if value not in (None, "") else np.nan
                except (TypeError, ValueError):
                    raise RegistryError(
                        f"--reference {path}: row {i + 1}, column {name!r}: {value!r} is not a number"
                    ) from None
    if matrix.shape[0] == 0:
        raise RegistryError(f"--reference {path}: no rows (columns found: {found})")
    return matrix, tuple(names)


def profile_model(model: Path, reference: Path, features: Sequence[str] = ()) -> ReferenceProfile:
    """The reference profile of the ONNX model at `model` on the rows in `reference`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 2 or not isinstance(inputs[0].shape[1], int):
        shown = ", ".join(f"{i.name} {i.shape}" for i in inputs)
        raise RegistryError(
            f"--reference needs a model with one feature input [N, features]; {model} has {shown}"
        )
    spec = inputs[0]
    if spec.type not in _FLOAT_OUTPUTS:
        raise RegistryError(f"--reference: input {spec.name} is {spec.type}, not a float tensor")
    score_index = next(
        (i for i, o in enumerate(session.get_outputs()) if o.type in _FLOAT_OUTPUTS), None
    )
    if score_index is None:
        raise RegistryError(f"--reference: {model} has no floating-point output to profile")
    X, names = read_reference(reference, features, int(spec.shape[1]))
    dtype = np.float64 if spec.type == "tensor(double)" else np.float32
    scores = []
    for start in range(0, X.shape[0], _CHUNK_ROWS):
        out = session.run(None, {spec.name: X[start : start + _CHUNK_ROWS].astype(dtype)})
        score = np.asarray(out[score_index], dtype=np.float64)
        scores.append(score[:, -1] if score.ndim == 2 else score.ravel())
    return build_profile(X, np.concatenate(scores), feature_names=names)
