"""Malformed ModelInferRequests: each is refused with the right status and a message naming the
offending field, and the server keeps serving. A table of known cases, then Hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from server._proto import inference_pb2 as pb
from server._proto import inference_pb2_grpc as pb_grpc
from tests.support.apps import AppFactory
from tests.support.processes import ServerProcess
from tests.support.requests import infer_request
from tests.support.requests import typed_request as typed_contents_request

Request = Any  # a server._proto ModelInferRequest (generated, untyped)
TIMEOUT = 5.0
MAX_BATCH_SIZE = 8
MAX_MESSAGE_BYTES = 4096
MAX_TENSOR_ELEMENTS = 150  # 10 rows of 15 features
LIMITS_TOML = f"[server]\nmax_message_bytes = {MAX_MESSAGE_BYTES}\nmax_tensor_elements = {MAX_TENSOR_ELEMENTS}\n"

RNG = np.random.default_rng(7)
ROWS = RNG.normal(size=(80, 15)).astype(np.float32)


def good_request(rows: int = 2, model: str = "churn") -> Request:
    return infer_request(ROWS[:rows], model, id="good")


def typed_request(rows: int = 2) -> Request:
    return typed_contents_request(ROWS[:rows], "churn")


# ---- the table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    build: Callable[[], Request]
    code: grpc.StatusCode
    needle: str  # the part of the message that names the offending field or value


def _with(**fields: Any) -> Callable[[], Request]:
    def build() -> Request:
        request = good_request()
        for name, value in fields.items():
            setattr(request, name, value)
        return request

    return build


def _missing_input() -> Request:
    return pb.ModelInferRequest(model_name="churn")


def _unknown_input() -> Request:
    request = good_request()
    request.inputs[0].name = "features"
    return request


def _duplicate_input() -> Request:
    request = good_request()
    request.inputs.add().CopyFrom(request.inputs[0])
    request.raw_input_contents.append(request.raw_input_contents[0])
    return request


def _tensor(
    datatype: str | None = None, shape: list[int] | None = None, raw: bytes | None = None
) -> Callable[[], Request]:
    def build() -> Request:
        request = good_request()
        if datatype is not None:
            request.inputs[0].datatype = datatype
        if shape is not None:
            request.inputs[0].shape[:] = shape
        if raw is not None:
            request.raw_input_contents[0] = raw
        return request

    return build


def _two_raw_entries() -> Request:
    request = good_request()
    request.raw_input_contents.append(b"\x00" * 8)
    return request


def _raw_and_typed() -> Request:
    request = good_request()
    request.inputs[0].contents.fp32_contents.extend([0.0] * 30)
    return request


def _typed_wrong_field() -> Request:
    request = pb.ModelInferRequest(model_name="churn")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 15])
    tensor.contents.int64_contents.extend(range(30))
    return request


def _typed_count_mismatch() -> Request:
    request = typed_request()
    del request.inputs[0].contents.fp32_contents[-1]
    return request


def _outputs(*names: str) -> Callable[[], Request]:
    def build() -> Request:
        request = good_request()
        for name in names:
            request.outputs.add(name=name)
        return request

    return build


INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

CASES = {
    "unknown-model": Case(_with(model_name="churn_xgb"), NOT_FOUND, "'churn_xgb'"),
    "unknown-version": Case(_with(model_version="99"), NOT_FOUND, "'99'"),
    "empty-model-name": Case(_with(model_name=""), INVALID, "model_name"),
    "unknown-input-name": Case(_unknown_input, INVALID, "'features'"),
    "missing-input": Case(_missing_input, INVALID, "missing input 'input'"),
    "duplicate-input": Case(_duplicate_input, INVALID, "'input' appears more than once"),
    "wrong-datatype": Case(_tensor(datatype="FP64"), INVALID, "datatype FP64"),
    "empty-datatype": Case(_tensor(datatype=""), INVALID, "datatype (empty)"),
    "wrong-rank": Case(_tensor(shape=[30]), INVALID, "rank 1"),
    "wrong-non-batch-dim": Case(
        _tensor(shape=[2, 14], raw=ROWS[:2].ravel()[:28].tobytes()),
        INVALID,
        "dimension 1 must be 15",
    ),
    "negative-dim": Case(_tensor(shape=[-2, 15]), INVALID, "negative dimension"),
    "zero-rows": Case(_tensor(shape=[0, 15], raw=b""), INVALID, "zero rows"),
    "raw-length-mismatch": Case(_tensor(raw=b"\x00" * 100), INVALID, "holds 100 bytes"),
    "raw-count-mismatch": Case(_two_raw_entries, INVALID, "raw_input_contents has 2 entries"),
    "raw-and-typed": Case(_raw_and_typed, INVALID, "both raw_input_contents and typed contents"),
    "typed-wrong-field": Case(_typed_wrong_field, INVALID, "int64_contents"),
    "typed-count-mismatch": Case(_typed_count_mismatch, INVALID, "fp32_contents holds 29 values"),
    "unknown-output": Case(_outputs("probs"), INVALID, "unknown output 'probs'"),
    "duplicate-output": Case(
        _outputs("label", "label"), INVALID, "'label' requested more than once"
    ),
    "too-many-rows": Case(lambda: good_request(MAX_BATCH_SIZE + 1), INVALID, "max_batch_size"),
    # Rows are checked from the header before the contents are read: garbage contents behind
    # too many rows still get the rows message, not a decoding one.
    "too-many-rows-before-decoding": Case(
        _tensor(shape=[MAX_BATCH_SIZE + 1, 15], raw=b"\x00" * 3), INVALID, "max_batch_size"
    ),
    "request-id-too-long": Case(_with(id="x" * 257), INVALID, "id: the request id has 257 bytes"),
    "request-id-too-long-in-bytes": Case(
        _with(id="\u00e9" * 129), INVALID, "258 bytes; the limit is 256 (max_request_id_bytes)"
    ),
    "over-max-tensor-elements": Case(lambda: good_request(11), EXHAUSTED, "max_tensor_elements"),
    "over-max-message-bytes": Case(
        lambda: good_request(80),
        EXHAUSTED,
        f"larger than max ({80 * 60 + 35} vs. {MAX_MESSAGE_BYTES})",
    ),
}


@pytest.fixture
async def limited_stub(start_app: AppFactory, tmp_path: Path) -> Any:
    """churn alone, max_batch_size 8, and the small message/tensor limits of LIMITS_TOML."""
    config = tmp_path / "batchline.toml"
    config.write_text(LIMITS_TOML)
    app = await start_app(
        models=("churn@production",), config=str(config), max_batch_size=MAX_BATCH_SIZE
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
async def test_malformed_request_is_refused_naming_the_field_and_the_server_keeps_serving(
    limited_stub: Any, case: Case
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await limited_stub.ModelInfer(case.build(), timeout=TIMEOUT)

    assert err.value.code() == case.code, err.value.details()
    assert case.needle in (err.value.details() or "")
    reply = await limited_stub.ModelInfer(good_request(), timeout=TIMEOUT)
    assert [o.name for o in reply.outputs] == ["label", "probabilities"]


async def test_good_requests_at_the_limits_succeed(limited_stub: Any) -> None:
    """The table's limits are exact: 8 rows (max_batch_size) on the raw and typed paths pass."""
    raw = await limited_stub.ModelInfer(good_request(MAX_BATCH_SIZE), timeout=TIMEOUT)
    at_id_limit = good_request()
    at_id_limit.id = "x" * 256
    assert (await limited_stub.ModelInfer(at_id_limit, timeout=TIMEOUT)).id == "x" * 256
    typed = await limited_stub.ModelInfer(typed_request(MAX_BATCH_SIZE), timeout=TIMEOUT)

    assert list(raw.outputs[1].shape) == [MAX_BATCH_SIZE, 2]
    assert list(typed.outputs[1].shape) == [MAX_BATCH_SIZE, 2]
    assert len(typed.outputs[1].contents.fp32_contents) == 2 * MAX_BATCH_SIZE


async def test_unknown_model_with_a_very_long_name_is_not_found(stub: Any) -> None:
    """The name echoed in the status message must not push the trailers past gRPC's metadata
    limit (16 KiB hard): the caller must still see NOT_FOUND, not a transport error."""
    request = good_request()
    request.model_name = "m" * 20_000

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ModelInfer(request, timeout=TIMEOUT)

    assert err.value.code() == NOT_FOUND, err.value.details()


# ---- Hypothesis: random and mutated requests ------------------------------------------------


@pytest.fixture(scope="module")
def sync_stub(server_process: ServerProcess) -> Iterator[Any]:
    with grpc.insecure_channel(server_process.address) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


ALLOWED = {grpc.StatusCode.OK, INVALID, NOT_FOUND, EXHAUSTED}
V2_TYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
            "FP16", "FP32", "FP64", "BYTES", "BF16"]  # fmt: skip
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=16)
model_names = st.one_of(st.sampled_from(["churn", "churn_mlp", "", "CHURN", "churn "]), TEXT)
versions = st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "01"]), TEXT)
input_names = st.one_of(st.sampled_from(["input", "INPUT", ""]), TEXT)
output_names = st.one_of(st.sampled_from(["label", "probabilities", ""]), TEXT)
datatypes = st.one_of(
    st.sampled_from(V2_TYPES), st.sampled_from(["", "fp32", "FLOAT", "TYPE_FP32"]), TEXT
)
dims = st.one_of(
    st.integers(-3, 20),
    st.sampled_from([15, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
)
shapes = st.lists(dims, max_size=4)
TYPED_VALUES = {
    "bool_contents": st.booleans(),
    "int_contents": st.integers(-(2**31), 2**31 - 1),
    "int64_contents": st.integers(-(2**63), 2**63 - 1),
    "uint_contents": st.integers(0, 2**32 - 1),
    "uint64_contents": st.integers(0, 2**64 - 1),
    "fp32_contents": st.floats(width=32),
    "fp64_contents": st.floats(),
    "bytes_contents": st.binary(max_size=8),
}


@st.composite
def typed_contents(draw: st.DrawFn) -> tuple[str, list[Any]]:
    field = draw(st.sampled_from(sorted(TYPED_VALUES)))
    return field, draw(st.lists(TYPED_VALUES[field], max_size=64))


def mostly(usual: Any, strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Three times in four the value a valid request has, else anything from `strategy`."""
    return st.integers(0, 3).flatmap(lambda i: st.just(usual) if i else strategy)


@st.composite
def random_requests(draw: st.DrawFn) -> Request:
    """Anything the schema allows: random names, datatypes, shapes, raw bytes and contents,
    each half the time the value a valid request has, so that later checks are reached too."""
    request = pb.ModelInferRequest(
        model_name=draw(mostly("churn", model_names)),
        model_version=draw(mostly("", versions)),
        id=draw(TEXT),
    )
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(mostly("input", input_names)),
            datatype=draw(mostly("FP32", datatypes)),
            shape=draw(st.tuples(st.integers(-1, 5), st.just(15)).map(list) | shapes),
        )
        if draw(st.booleans()):
            field, values = draw(typed_contents())
            getattr(tensor.contents, field).extend(values)
    rows_of_bytes = st.integers(0, 5).flatmap(lambda k: st.binary(min_size=60 * k, max_size=60 * k))
    request.raw_input_contents.extend(
        draw(st.lists(rows_of_bytes | st.binary(max_size=256), max_size=3))
    )
    for name in draw(st.lists(output_names, max_size=3)):
        request.outputs.add(name=name)
    return request


def _mutate(draw: st.DrawFn, request: Request, mutation: str) -> None:
    tensor = request.inputs[0]
    if mutation == "model_name":
        request.model_name = draw(model_names)
    elif mutation == "model_version":
        request.model_version = draw(versions)
    elif mutation == "input_name":
        tensor.name = draw(input_names)
    elif mutation == "datatype":
        tensor.datatype = draw(datatypes)
    elif mutation == "shape":
        tensor.shape[:] = draw(shapes)
    elif mutation == "raw_bytes":
        del request.raw_input_contents[:]
        request.raw_input_contents.append(draw(st.binary(max_size=512)))
    elif mutation == "drop_raw":
        del request.raw_input_contents[:]
    elif mutation == "typed_contents":
        field, values = draw(typed_contents())
        getattr(tensor.contents, field).extend(values)
    elif mutation == "extra_input":
        extra = request.inputs.add(
            name=draw(input_names), datatype=draw(datatypes), shape=draw(shapes)
        )
        if request.raw_input_contents and draw(st.booleans()):
            request.raw_input_contents.append(draw(st.binary(max_size=128)))
        else:
            extra.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=30)))
    elif mutation == "drop_input":
        del request.inputs[:]
    elif mutation == "outputs":
        del request.outputs[:]
        for name in draw(st.lists(output_names, max_size=3)):
            request.outputs.add(name=name)
    elif mutation == "parameters":
        param = request.parameters[draw(TEXT)]
        kind = draw(st.sampled_from(["bool_param", "int64_param", "string_param"]))
        value = {"bool_param": st.booleans(), "int64_param": st.integers(-(2**63), 2**63 - 1)}
        setattr(param, kind, draw(value.get(kind, TEXT)))
    elif mutation == "values":  # right size, any float32 bit pattern (NaN, inf, denormals)
        size = len(request.raw_input_contents[0]) if request.raw_input_contents else 0
        if size:
            request.raw_input_contents[0] = draw(st.binary(min_size=size, max_size=size))
        else:
            values = tensor.contents.fp32_contents
            values[:] = draw(
                st.lists(st.floats(width=32), min_size=len(values), max_size=len(values))
            )


MUTATIONS = ("model_name", "model_version", "input_name", "datatype", "shape", "raw_bytes",
             "drop_raw", "typed_contents", "extra_input", "drop_input", "outputs", "parameters",
             "values")  # fmt: skip


@st.composite
def mutated_requests(draw: st.DrawFn) -> Request:
    """A valid request (either model, 1 to 4 rows, raw or typed) changed in one field."""
    rows = draw(st.integers(1, 4))
    model = draw(st.sampled_from(["churn", "churn_mlp"]))
    request = good_request(rows, model) if draw(st.booleans()) else typed_request(rows)
    request.model_name = model
    request.id = draw(TEXT)
    _mutate(draw, request, draw(st.sampled_from(MUTATIONS)))
    return request


def _call_and_check(stub: Any, request: Request) -> None:
    try:
        reply = stub.ModelInfer(request, timeout=TIMEOUT)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        reply, code, details = None, exc.code(), exc.details()
    event(code.name)
    assert code in ALLOWED, f"{code}: {details}"
    if reply is not None:
        assert reply.id == request.id
    reply = stub.ModelInfer(good_request(), timeout=TIMEOUT)
    assert [o.name for o in reply.outputs] == ["label", "probabilities"]


HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@HYPOTHESIS
@given(request=random_requests())
def test_random_requests_never_get_internal_unknown_or_a_hang(
    sync_stub: Any, request: Request
) -> None:
    """Runs against the `server_process` subprocess with a sync channel (Hypothesis and async
    fixtures don't mix); every call has a deadline, so a hang shows as DEADLINE_EXCEEDED, which
    is not allowed. After each example a good request must still succeed."""
    _call_and_check(sync_stub, request)


@HYPOTHESIS
@given(request=mutated_requests())
def test_valid_requests_mutated_in_one_field_never_get_internal_unknown_or_a_hang(
    sync_stub: Any, request: Request
) -> None:
    """As above, for a valid request changed in one field (which may leave it valid: OK)."""
    _call_and_check(sync_stub, request)
