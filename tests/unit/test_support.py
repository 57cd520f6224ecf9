"""The shared test and bench helpers hold what the tests rely on: `eventually()` fails naming
what did not happen, the metrics parser keys and sums samples as written, requests carry the
tensors they were given, free ports are free."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from bench.processes import free_ports
from tests.support.metrics import metric, parse, totals
from tests.support.polling import eventually, eventually_blocking, settled
from tests.support.requests import binary_body, entity_request, infer_request, typed_request

EXPOSITION = """\
# HELP batchline_requests_total Requests answered.
# TYPE batchline_requests_total counter
batchline_requests_total{model="churn",status="OK",version="1"} 7.0
batchline_requests_total{model="churn",status="INVALID_ARGUMENT",version="1"} 2.0
batchline_requests_total{model="churn_mlp",status="OK",version="1"} 5.0
# HELP batchline_queue_rows Rows waiting.
# TYPE batchline_queue_rows gauge
batchline_queue_rows{model="churn",version="1"} 3.0
"""


async def test_eventually_returns_once_the_check_holds_and_awaits_async_checks() -> None:
    calls: list[int] = []

    async def third_time() -> bool:
        calls.append(1)
        return len(calls) >= 3

    took = await eventually(third_time, timeout=30, what="the third call", every=0)
    assert len(calls) == 3
    assert took >= 0


async def test_eventually_checks_once_even_with_no_time_left() -> None:
    assert await eventually(lambda: True, timeout=0, what="already true") >= 0


async def test_eventually_fails_naming_what_did_not_happen_and_what_was_seen() -> None:
    with pytest.raises(AssertionError, match=r"the queue draining did not happen within 0s: 42"):
        await eventually(lambda: False, timeout=0, what="the queue draining", detail=lambda: 42)


def test_eventually_blocking_fails_the_same_way() -> None:
    with pytest.raises(AssertionError, match=r"nothing did not happen within 0s"):
        eventually_blocking(lambda: False, timeout=0, what="nothing")


def test_settled_returns_the_value_two_reads_agree_on() -> None:
    reads = iter([1, 2, 3, 3, 4])
    assert settled(lambda: next(reads), timeout=30, every=0) == 3


def test_metrics_are_keyed_by_name_and_sorted_labels_and_summed_by_label_subset() -> None:
    samples = parse(EXPOSITION)
    key = (("model", "churn"), ("status", "OK"), ("version", "1"))
    assert samples["batchline_requests_total", key] == 7.0
    assert metric(samples, "batchline_requests_total", model="churn") == 9.0
    assert metric(samples, "batchline_requests_total", status="OK") == 12.0
    assert metric(samples, "batchline_requests_total", model="nope") == 0.0
    assert totals(samples) == {"batchline_requests_total": 14.0, "batchline_queue_rows": 3.0}


def test_requests_carry_the_rows_they_were_given() -> None:
    x = np.arange(30, dtype=np.float64).reshape(2, 15)
    raw = infer_request(x, "churn_mlp", id="r1", version="2")
    assert (raw.model_name, raw.id, raw.model_version) == ("churn_mlp", "r1", "2")
    assert (raw.inputs[0].name, raw.inputs[0].datatype, list(raw.inputs[0].shape)) == (
        "input",
        "FP32",
        [2, 15],
    )
    np.testing.assert_array_equal(
        np.frombuffer(raw.raw_input_contents[0], np.float32).reshape(2, 15), x
    )
    typed = typed_request(x)
    assert list(typed.inputs[0].contents.fp32_contents) == x.ravel().tolist()
    entity = entity_request(["c1", "c2"])
    assert list(entity.inputs[0].contents.bytes_contents) == [b"c1", b"c2"]
    assert list(entity.inputs[0].shape) == [2]


def test_binary_body_says_where_its_json_header_ends() -> None:
    x = np.ones((3, 15), np.float32)
    body, headers = binary_body(x)
    length = int(headers["Inference-Header-Content-Length"])
    head = json.loads(body[:length])
    assert head["inputs"][0]["parameters"]["binary_data_size"] == x.nbytes
    assert body[length:] == x.tobytes()


def test_free_ports_are_consecutive_and_bindable() -> None:
    ports = free_ports(3)
    assert ports == list(range(ports[0], ports[0] + 3))
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
