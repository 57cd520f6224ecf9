"""V2 tensor codec: ModelInferRequest -> validated InferRequest, InferResult -> ModelInferResponse.

A request is validated completely here, before it can join a batch, so one bad request never
fails others. Every rejection names the field. The raw path (`raw_input_contents`) decodes to
numpy views without per-element Python; the typed path (`contents`) is supported for clients
that use it, and the response uses the same form as the request.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
from google.protobuf.json_format import ParseDict  # type: ignore[import-untyped]

from registry_client.datatypes import TYPED_FIELD as _TYPED_FIELD
from server._proto import inference_pb2 as pb
from server.errors import InvalidArgument, ServingError, TooLarge
from server.models import ServedModel
from server.types import NUMPY_TO_V2, V2_TO_NUMPY, InferRequest, InferResult, ModelSignature

# Which typed `contents` field carries each datatype (FP16 and BF16 have none: raw only).
TYPED_FIELD = _TYPED_FIELD
_CONTENT_FIELDS = tuple(sorted(set(TYPED_FIELD.values())))


class Limits:
    """Per-model bounds a request is checked against, and the decode plans already validated.

    A plan maps an exact single-input raw header (name, datatype, shape) that passed full
    validation once to what decoding it needs, so a repeated request shape costs one dict hit.
    """

    __slots__ = ("max_batch_size", "max_elements", "max_id_bytes", "plans")

    def __init__(self, max_batch_size: int, max_elements: int, max_id_bytes: int = 256) -> None:
        self.max_batch_size = max_batch_size
        self.max_elements = max_elements
        self.max_id_bytes = max_id_bytes
        self.plans: dict[tuple[str, str, tuple[int, ...]], tuple[np.dtype[Any] | None, int]] = {}


_MAX_PLANS = 1024


def _has_typed(tensor: Any) -> bool:
    if not tensor.HasField("contents"):
        return False
    contents = tensor.contents
    return any(len(getattr(contents, f)) for f in _CONTENT_FIELDS)


def _decode_raw_bytes(raw: bytes, count: int, name: str) -> np.ndarray:
    """BYTES elements on the raw path: each a 4-byte little-endian length, then the bytes."""
    items: list[bytes] = []
    offset = 0
    size = len(raw)
    # Stops at the declared count: a request can never make this loop run longer than its
    # (already bounded) shape says, whatever raw_input_contents holds.
    while offset < size and len(items) < count:
        if offset + 4 > size:
            raise InvalidArgument(
                f"input '{name}': truncated BYTES element length in raw_input_contents"
            )
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > size:
            raise InvalidArgument(f"input '{name}': BYTES element overruns raw_input_contents")
        items.append(raw[offset : offset + length])
        offset += length
    if offset < size:
        raise InvalidArgument(
            f"input '{name}': raw_input_contents holds more than the {count} BYTES elements "
            "its shape declares"
        )
    if len(items) != count:
        raise InvalidArgument(
            f"input '{name}': raw_input_contents holds {len(items)} BYTES elements; shape needs {count}"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out


def _check_shape(name: str, shape: Sequence[int], expected: tuple[int, ...], limits: Limits) -> int:
    """Validate a requested shape against the model's; return its element count."""
    if len(shape) != len(expected):
        raise InvalidArgument(
            f"input '{name}' has shape {list(shape)} (rank {len(shape)}); "
            f"model expects rank {len(expected)} {list(expected)}"
        )
    count = 1
    for i, dim in enumerate(shape):
        if dim < 0:
            raise InvalidArgument(f"input '{name}' has a negative dimension in shape {list(shape)}")
        want = expected[i]
        if want != -1 and dim != want:
            raise InvalidArgument(
                f"input '{name}' has shape {list(shape)}; model expects {list(expected)} "
                f"(dimension {i} must be {want})"
            )
        count *= dim
    if count > limits.max_elements:
        raise TooLarge(
            f"input '{name}' has {count} elements; the limit is {limits.max_elements} (max_tensor_elements)"
        )
    return count


class Decoder:
    """One transport's request decoding against a served version: its Limits (kept on the
    version, so they go with it), the signature the request's tensors are checked against
    (entity-keyed versions take ids, or features and ids), and the count of a refusal."""

    __slots__ = ("_max_elements", "_max_id_bytes", "protocol")

    def __init__(self, max_elements: int, max_id_bytes: int, protocol: str) -> None:
        self._max_elements = max_elements
        self._max_id_bytes = max_id_bytes
        self.protocol = protocol

    def decode(
        self, served: ServedModel, request: Any, version: str | None, deadline: float | None
    ) -> InferRequest:
        """`request` is a ModelInferRequest (or the REST parser's lookalike); `version` None:
        the caller named none, so routing (a canary) may choose one."""
        limits = served.decode_state
        if limits is None:
            limits = served.decode_state = Limits(
                served.max_batch_size, self._max_elements, self._max_id_bytes
            )
        signature = served.request_signature(request.inputs)
        try:
            decoded = decode_request(request, signature, limits, version, deadline)
        except ServingError as exc:
            self.refused(served, exc)
            raise
        decoded.protocol = self.protocol
        return decoded

    def refused(self, served: ServedModel, exc: ServingError) -> None:
        """Count a request refused before it reached the pipeline."""
        served.observer.request_done(0.0, exc.kind.name, self.protocol)


def decode_request(
    request: Any,
    signature: ModelSignature,
    limits: Limits,
    version: str | None,
    deadline: float | None,
) -> InferRequest:
    """Validate a ModelInferRequest against a model's signature and decode its tensors."""
    # UTF-8 takes at most 4 bytes a character: short ids skip the encode.
    if (
        len(request.id) > limits.max_id_bytes // 4
        and len(request.id.encode()) > limits.max_id_bytes
    ):
        raise InvalidArgument(
            f"id: the request id has {len(request.id.encode())} bytes; the limit is "
            f"{limits.max_id_bytes} (max_request_id_bytes)"
        )
    tensors = request.inputs
    raw_contents = request.raw_input_contents
    if len(tensors) == 1 and len(raw_contents) == 1:
        tensor = tensors[0]
        header = (tensor.name, tensor.datatype, tuple(tensor.shape))
        plan = limits.plans.get(header)
        if plan is not None and not tensor.HasField("contents"):
            dtype, nbytes = plan
            raw = raw_contents[0]
            if dtype is None:  # BYTES (entity ids): nbytes is the element count
                array = _decode_raw_bytes(raw, nbytes, header[0]).reshape(header[2])
            elif len(raw) == nbytes:
                array = np.frombuffer(raw, dtype=dtype).reshape(header[2])
            else:
                array = None
            if array is not None:
                fast = InferRequest(
                    model=request.model_name,
                    version=version,
                    id=request.id,
                    inputs={header[0]: array},
                    rows=header[2][0],
                    outputs=_requested_outputs(request, signature) if request.outputs else None,
                    raw_output=True,
                    deadline=deadline,
                )
                if request.parameters:
                    fast.observed = observed(request.parameters)
                return fast
    decoded = _decode_full(request, signature, limits, version, deadline)
    if request.parameters:
        decoded.observed = observed(request.parameters)
    if len(tensors) == 1 and len(raw_contents) == 1 and decoded.inputs:
        array = next(iter(decoded.inputs.values()))
        if len(limits.plans) >= _MAX_PLANS:
            limits.plans.clear()
        limits.plans[(tensors[0].name, tensors[0].datatype, array.shape)] = (
            (None, array.size) if array.dtype == object else (array.dtype, array.nbytes)
        )
    return decoded


_LIVE_TRAFFIC = ("", "live")


def observed(parameters: Any) -> bool:
    """Whether a request counts in drift and shadow statistics, from its parameters:
    `drift` (bool, or the string "true"/"false") false, or `traffic` (a string tag) anything but
    "live", keep it out; other parameters are the model's business and ignored here."""
    counted = True
    for key in parameters:
        if key != "drift" and key != "traffic":
            continue
        param = parameters[key]
        kind = param.WhichOneof("parameter_choice")
        if key == "drift":
            if kind == "bool_param":
                counted = counted and param.bool_param
            elif kind == "string_param" and param.string_param.lower() in ("true", "false"):
                counted = counted and param.string_param.lower() == "true"
            else:
                raise InvalidArgument(
                    "parameters.drift: expected a bool (bool_param, or string_param "
                    f'"true"/"false"), got {kind or "nothing"}'
                )
        else:
            if kind != "string_param":
                raise InvalidArgument(
                    f"parameters.traffic: expected a string tag (string_param), got {kind or 'nothing'}"
                )
            counted = counted and param.string_param in _LIVE_TRAFFIC
    return counted


def _requested_outputs(request: Any, signature: ModelSignature) -> tuple[str, ...]:
    names: list[str] = []
    for out in request.outputs:
        if signature.output(out.name) is None:
            raise InvalidArgument(
                f"unknown output '{out.name}' requested "
                f"(model has: {', '.join(o.name for o in signature.outputs)})"
            )
        if out.name in names:
            raise InvalidArgument(f"output '{out.name}' requested more than once")
        names.append(out.name)
    return tuple(names)


def _decode_full(
    request: Any,
    signature: ModelSignature,
    limits: Limits,
    version: str | None,
    deadline: float | None,
) -> InferRequest:
    specs = signature.inputs
    tensors = request.inputs
    raw_contents = request.raw_input_contents
    use_raw = len(raw_contents) > 0
    if use_raw and len(raw_contents) != len(tensors):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw_contents)} entries for {len(tensors)} inputs"
        )
    if len(tensors) != len(specs):
        seen = {t.name for t in tensors}
        missing = [s.name for s in specs if s.name not in seen]
        if missing:
            raise InvalidArgument(
                f"missing input '{missing[0]}' (model expects: {', '.join(s.name for s in specs)})"
            )
    inputs: dict[str, np.ndarray] = {}
    rows = -1
    for index, tensor in enumerate(tensors):
        name = tensor.name
        spec = signature.input(name)
        if spec is None:
            raise InvalidArgument(
                f"unknown input '{name}' (model expects: {', '.join(s.name for s in specs)})"
            )
        if name in inputs:
            raise InvalidArgument(f"input '{name}' appears more than once")
        datatype = tensor.datatype
        if datatype != spec.datatype:
            raise InvalidArgument(
                f"input '{name}' has datatype {datatype or '(empty)'}; model expects {spec.datatype}"
            )
        shape = tensor.shape
        count = _check_shape(name, shape, spec.shape, limits)
        # Rows are checked from the header, before any decoding: a [1e6] BYTES input is refused
        # without touching its contents.
        n = shape[0] if len(shape) else 1
        if n == 0:
            raise InvalidArgument("request has zero rows (batch dimension 0)")
        if n > limits.max_batch_size:
            raise InvalidArgument(
                f"request has {n} rows; the model accepts at most {limits.max_batch_size} "
                "(max_batch_size)"
            )
        dtype = V2_TO_NUMPY[datatype]
        if use_raw:
            if _has_typed(tensor):
                raise InvalidArgument(
                    f"input '{name}' has both raw_input_contents and typed contents; use one"
                )
            raw = raw_contents[index]
            if datatype == "BYTES":
                array = _decode_raw_bytes(raw, count, name).reshape(tuple(shape))
            else:
                need = count * dtype.itemsize
                if len(raw) != need:
                    raise InvalidArgument(
                        f"input '{name}': raw_input_contents holds {len(raw)} bytes; "
                        f"shape {list(shape)} of {datatype} needs {need}"
                    )
                array = np.frombuffer(raw, dtype=dtype).reshape(tuple(shape))
        else:
            array = _decode_typed(tensor, datatype, dtype, count, name).reshape(tuple(shape))
        if rows == -1:
            rows = n
        elif n != rows:
            raise InvalidArgument(
                f"input '{name}' has {n} rows but other inputs have {rows}; batch dimensions must agree"
            )
        inputs[name] = array
    if len(inputs) != len(specs):
        missing = [s.name for s in specs if s.name not in inputs]
        raise InvalidArgument(
            f"missing input '{missing[0]}' (model expects: {', '.join(s.name for s in specs)})"
        )
    if rows == 0:
        raise InvalidArgument("request has zero rows (batch dimension 0)")
    if rows > limits.max_batch_size:
        raise InvalidArgument(
            f"request has {rows} rows; the model accepts at most {limits.max_batch_size} (max_batch_size)"
        )
    outputs = _requested_outputs(request, signature) if request.outputs else None
    return InferRequest(
        model=request.model_name,
        version=version,
        id=request.id,
        inputs=inputs,
        rows=rows,
        outputs=outputs,
        raw_output=use_raw,
        deadline=deadline,
    )


def _decode_typed(
    tensor: Any, datatype: str, dtype: np.dtype[Any], count: int, name: str
) -> np.ndarray:
    field = TYPED_FIELD.get(datatype)
    if field is None:
        raise InvalidArgument(
            f"input '{name}': datatype {datatype} has no typed contents; send it in raw_input_contents"
        )
    contents = tensor.contents
    for other in _CONTENT_FIELDS:
        if other != field and len(getattr(contents, other)):
            raise InvalidArgument(
                f"input '{name}' of datatype {datatype} carries {other}; expected {field}"
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': contents.{field} holds {len(values)} values; shape needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out
    try:
        return np.array(values, dtype=dtype)
    except (OverflowError, ValueError) as exc:
        raise InvalidArgument(f"input '{name}': a value does not fit {datatype}: {exc}") from exc


def _encode_bytes(array: np.ndarray) -> bytes:
    parts = []
    for item in array.ravel():
        data = item if isinstance(item, bytes) else str(item).encode()
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def encode_result(result: InferResult) -> Any:
    """Build the ModelInferResponse for one caller: its outputs, in the order it asked."""
    response = pb.ModelInferResponse(
        model_name=result.model, model_version=result.version, id=result.id
    )
    add = response.outputs.add
    # Raw output is all or nothing per response; datatypes without a typed field (FP16, BF16)
    # force it even when the request came typed.
    if result.raw_output or any(
        NUMPY_TO_V2.get(a.dtype, "BYTES") not in TYPED_FIELD for a in result.outputs.values()
    ):
        raw = response.raw_output_contents
        for name, array in result.outputs.items():
            datatype = NUMPY_TO_V2.get(array.dtype, "BYTES")
            add(name=name, datatype=datatype, shape=array.shape)
            raw.append(_encode_bytes(array) if datatype == "BYTES" else array.tobytes())
    else:
        for name, array in result.outputs.items():
            datatype = NUMPY_TO_V2.get(array.dtype, "BYTES")
            tensor = add(name=name, datatype=datatype, shape=array.shape)
            field = TYPED_FIELD[datatype]
            flat = array.ravel()
            if datatype == "BYTES":
                getattr(tensor.contents, field).extend(
                    v if isinstance(v, bytes) else str(v).encode() for v in flat
                )
            else:
                getattr(tensor.contents, field).extend(flat.tolist())
    for key, value in result.parameters.items():
        param = response.parameters[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)
    return response


def to_message(data: dict[str, Any], message: type) -> Any:
    """A dict in the protocol's JSON shape (server/dataplane/describe) as its protobuf message,
    so a field can never differ between the gRPC and HTTP bindings."""
    return ParseDict(data, message())
