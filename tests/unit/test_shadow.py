"""Shadow pairs, the pair log, the comparison report (checked against a hand computation), the
promotion gate and `batchline shadow report`."""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.shadow import (
    GateConfig,
    PairLog,
    ShadowPair,
    ShadowReport,
    compare,
    evaluate_gate,
    main,
    pair_bytes,
    parse_window,
    read_log,
)


def _pair(
    i: int,
    primary: list[float],
    shadow: list[float],
    *,
    version: str = "2",
    labels: bool = True,
    t: int | None = None,
    model: str = "churn",
) -> ShadowPair:
    return ShadowPair(
        model=model,
        primary_version="1",
        shadow_version=version,
        request_id=f"req-{i}",
        entity_id=f"c{i}",
        time_unix_ns=t if t is not None else 1_700_000_000_000_000_000 + i,
        primary_scores=tuple(primary),
        shadow_scores=tuple(shadow),
        primary_labels=tuple(int(s >= 0.5) for s in primary) if labels else (),
        shadow_labels=tuple(int(s >= 0.5) for s in shadow) if labels else (),
        primary_latency_s=0.001 + (i % 17) * 1e-4,
        shadow_latency_s=0.002 + (i % 23) * 2e-4,
    )


def _pairs(n: int, *, seed: int = 7, noise: float = 0.08, **kwargs: Any) -> list[ShadowPair]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        rows = rng.randint(1, 3)
        primary = [rng.random() for _ in range(rows)]
        shadow = [min(1.0, max(0.0, p + rng.gauss(0.02, noise))) for p in primary]
        out.append(_pair(i, primary, shadow, **kwargs))
    return out


def _hand_psi(primary: list[float], shadow: list[float]) -> float:
    """Deciles of the primary scores (numpy's 'lower' quantile: the floor(q (n-1))-th smallest),
    deduplicated; bin = number of edges strictly below the value; shares floored at 1e-4."""
    ordered = sorted(primary)
    n = len(ordered)
    edges = sorted({ordered[math.floor(q / 10 * (n - 1))] for q in range(1, 10)})

    def shares(values: list[float]) -> list[float]:
        counts = [0] * (len(edges) + 1)
        for v in values:
            counts[sum(1 for e in edges if e < v)] += 1
        return [max(c / len(values), 1e-4) for c in counts]

    e, a = shares(primary), shares(shadow)
    return sum((ai - ei) * math.log(ai / ei) for ai, ei in zip(a, e, strict=True))


def _q(values: list[float], pct: int) -> float:
    """Linear-interpolation percentile, independently of numpy."""
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


# ---- compare ----------------------------------------------------------------------------------


def test_compare_matches_a_hand_computation() -> None:
    pairs = _pairs(400)
    (report,) = compare(pairs, shed_count=5)
    primary = [s for p in pairs for s in p.primary_scores]
    shadow = [s for p in pairs for s in p.shadow_scores]
    diffs = [abs(a - b) for a, b in zip(primary, shadow, strict=True)]
    plabels = [x for p in pairs for x in p.primary_labels]
    slabels = [x for p in pairs for x in p.shadow_labels]
    agreement = sum(a == b for a, b in zip(plabels, slabels, strict=True)) / len(plabels)

    assert report.model == "churn"
    assert report.shadow_version == "2"
    assert report.primary_versions == ("1",)
    assert report.requests == 400
    assert report.rows == len(diffs)
    assert report.label_agreement == pytest.approx(agreement, abs=1e-12)
    assert 0.5 < agreement < 1.0
    assert report.mean_abs_diff == pytest.approx(sum(diffs) / len(diffs), rel=1e-9)
    assert report.p99_abs_diff == pytest.approx(_q(diffs, 99), rel=1e-9)
    assert report.psi == pytest.approx(_hand_psi(primary, shadow), rel=1e-9)
    assert report.psi > 0
    p_lat = [p.primary_latency_s for p in pairs]
    s_lat = [p.shadow_latency_s for p in pairs]
    assert report.primary_latency_p50_s == pytest.approx(_q(p_lat, 50), rel=1e-9)
    assert report.primary_latency_p99_s == pytest.approx(_q(p_lat, 99), rel=1e-9)
    assert report.shadow_latency_p50_s == pytest.approx(_q(s_lat, 50), rel=1e-9)
    assert report.shadow_latency_p99_s == pytest.approx(_q(s_lat, 99), rel=1e-9)
    assert report.shed == 5


def test_psi_of_identical_scores_is_zero_and_of_shifted_scores_is_large() -> None:
    same = [_pair(i, [i / 500], [i / 500]) for i in range(500)]
    shifted = [_pair(i, [i / 1000], [0.5 + i / 1000]) for i in range(500)]
    assert compare(same)[0].psi == 0.0
    (report,) = compare(shifted)
    assert report.psi > 0.25
    assert report.psi == pytest.approx(
        _hand_psi([i / 1000 for i in range(500)], [0.5 + i / 1000 for i in range(500)])
    )


def test_psi_with_few_distinct_primary_scores_uses_fewer_bins() -> None:
    pairs = [_pair(i, [float(i % 2)], [float(i % 3 == 0)]) for i in range(300)]
    primary = [s for p in pairs for s in p.primary_scores]
    shadow = [s for p in pairs for s in p.shadow_scores]
    assert compare(pairs)[0].psi == pytest.approx(_hand_psi(primary, shadow))


def test_compare_reports_each_shadow_version_and_model_apart() -> None:
    pairs = _pairs(50, version="3") + _pairs(30, version="2") + _pairs(20, model="fraud")
    reports = compare(pairs, shed_count={"churn": 4}, failures={("churn", "4"): 2})
    assert [(r.model, r.shadow_version, r.requests) for r in reports] == [
        ("churn", "2", 30),
        ("churn", "3", 50),
        ("churn", "4", 0),
        ("fraud", "2", 20),
    ]
    assert [r.shed for r in reports] == [4, 4, 4, 0]
    assert reports[2].failures == 2
    assert math.isnan(reports[2].mean_abs_diff)


def test_compare_without_labels_reports_agreement_as_unmeasured() -> None:
    (report,) = compare(_pairs(20, labels=False))
    assert math.isnan(report.label_agreement)
    assert report.to_dict()["label_agreement"] is None
    assert not math.isnan(report.mean_abs_diff)


def test_non_finite_scores_are_left_out_of_the_score_numbers() -> None:
    pairs = [_pair(0, [0.2, math.nan], [0.4, 0.1]), _pair(1, [0.6], [0.5])]
    (report,) = compare(pairs)
    assert report.rows == 2
    assert report.mean_abs_diff == pytest.approx(0.15)


def test_pair_needs_matching_rows() -> None:
    with pytest.raises(ValueError, match="shadow_scores"):
        _pair(0, [0.1, 0.2], [0.1])


def test_pair_from_outputs_takes_the_last_probability_column() -> None:
    pair = ShadowPair.from_outputs(
        model="churn",
        primary_version="1",
        shadow_version="2",
        request_id="r",
        entity_id="",
        time_unix_ns=5,
        primary_scores=np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32),
        shadow_scores=np.array([[0.7, 0.3], [0.4, 0.6]], dtype=np.float32),
        primary_labels=np.array([0, 1], dtype=np.int64),
        shadow_labels=np.array([0, 1], dtype=np.int64),
        primary_latency_s=0.001,
        shadow_latency_s=0.002,
    )
    assert pair.primary_scores == pytest.approx((0.1, 0.8))
    assert pair.shadow_labels == (0, 1)
    assert ShadowPair.from_dict(pair.to_dict()) == pair


# ---- PairLog ----------------------------------------------------------------------------------


def test_pair_log_keeps_the_newest_max_pairs_in_memory() -> None:
    log = PairLog(max_pairs=5)
    pairs = _pairs(8)
    for pair in pairs:
        log.append(pair)
    assert log.pairs() == pairs[3:]
    assert log.pairs(since_ns=pairs[6].time_unix_ns) == pairs[6:]


def test_pair_log_file_rotates_at_its_size_limit(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    log = PairLog(max_pairs=1000, path=path, max_bytes=2000, backups=2)
    pairs = _pairs(200)
    for pair in pairs:
        log.append(pair)
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["pairs.jsonl", "pairs.jsonl.1", "pairs.jsonl.2"]
    assert all((tmp_path / f).stat().st_size <= 2000 for f in files)
    kept = read_log(path).pairs
    # The newest pairs survive, in order, as one unbroken run up to the last one appended.
    assert kept == pairs[-len(kept) :]
    assert 0 < len(kept) < 200


def test_pair_log_without_backups_starts_the_file_afresh(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    log = PairLog(path=path, max_bytes=1500, backups=0)
    for pair in _pairs(50):
        log.append(pair)
    log.close()
    assert [p.name for p in tmp_path.iterdir()] == ["pairs.jsonl"]
    assert path.stat().st_size <= 1500


def test_shed_and_failure_counts_are_logged_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    log = PairLog(path=path, now_ns=lambda: 1_700_000_000_000_000_000)
    log.note_shed("churn", 3)
    log.note_failure("churn", "2")
    assert log.contents().shed == {"churn": 3}
    for pair in _pairs(4):
        log.append(pair)
    log.note_shed("churn")
    log.close()
    contents = read_log(path)
    assert contents.shed == {"churn": 4}
    assert contents.failures == {("churn", "2"): 1}
    assert len(contents.pairs) == 4
    assert log.contents().shed == {"churn": 4}


def test_read_log_skips_a_line_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    log = PairLog(path=path)
    for pair in _pairs(3):
        log.append(pair)
    log.close()
    with path.open("a") as f:
        f.write('{"type":"pair","model":"ch')
    contents = read_log(path)
    assert len(contents.pairs) == 3
    assert contents.skipped_lines == 1


# ---- the gate ---------------------------------------------------------------------------------


def _report(**overrides: Any) -> ShadowReport:
    values: dict[str, Any] = {
        "model": "churn",
        "shadow_version": "2",
        "primary_versions": ("1",),
        "requests": 1000,
        "rows": 1000,
        "label_agreement": 0.995,
        "mean_abs_diff": 0.01,
        "p99_abs_diff": 0.05,
        "psi": 0.01,
        "primary_latency_p50_s": 0.001,
        "primary_latency_p99_s": 0.002,
        "shadow_latency_p50_s": 0.001,
        "shadow_latency_p99_s": 0.002,
    }
    values.update(overrides)
    return ShadowReport(**values)


GATE = GateConfig(min_requests=500, min_agreement=0.99, max_mean_abs_diff=0.05, max_error_rate=0.01)


def test_gate_promotes_when_every_threshold_holds() -> None:
    decision = evaluate_gate(_report(), 2, GATE)
    assert decision.action == "promote"
    assert len(decision.reasons) == 3
    assert decision.numbers["error_rate"] == pytest.approx(2 / 1002)
    assert "promote" in decision.summary()


def test_gate_waits_for_enough_requests() -> None:
    decision = evaluate_gate(_report(requests=100), 0, GATE)
    assert decision.action == "wait"
    assert decision.reasons == ["100 of 500 requests observed"]


@pytest.mark.parametrize(
    ("overrides", "errors", "reason"),
    [
        ({"label_agreement": 0.9}, 0, "label agreement"),
        ({"mean_abs_diff": 0.2}, 0, "mean |score diff|"),
        ({}, 50, "error rate"),
        ({"requests": 0, "rows": 0}, 600, "error rate"),
    ],
)
def test_gate_rolls_back_when_a_threshold_breaks(
    overrides: dict[str, Any], errors: int, reason: str
) -> None:
    decision = evaluate_gate(_report(**overrides), errors, GATE)
    assert decision.action == "rollback"
    assert any(r.startswith(reason) for r in decision.reasons)


def test_gate_waits_when_a_threshold_cannot_be_measured() -> None:
    no_labels = _report(label_agreement=math.nan)
    assert evaluate_gate(no_labels, 0, GATE).action == "wait"
    regressor_gate = GateConfig(500, 0.0, 0.05, 0.01)
    assert evaluate_gate(no_labels, 0, regressor_gate).action == "promote"


def test_gate_without_scores_as_its_docstring_says_max_mean_abs_diff_inf() -> None:
    no_scores = _report(mean_abs_diff=math.nan)
    assert evaluate_gate(no_scores, 0, GATE).action == "wait"
    unscored = GateConfig(500, 0.99, float("inf"), 0.01)
    decision = evaluate_gate(no_scores, 0, unscored)
    assert decision.action == "promote"
    assert "inf" in decision.summary()
    assert GateConfig.from_dict({"max_mean_abs_diff": math.inf}).max_mean_abs_diff == math.inf


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_requests": 0}, "min_requests"),
        ({"min_agreement": 1.5}, "min_agreement"),
        ({"max_error_rate": -0.1}, "max_error_rate"),
        ({"max_mean_abs_diff": -1.0}, "max_mean_abs_diff"),
        ({"max_mean_abs_diff": math.nan}, "max_mean_abs_diff"),
        ({"max_mean_abs_diff": True}, "max_mean_abs_diff"),
    ],
)
def test_gate_config_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}"):
        GateConfig(**kwargs)


def test_gate_config_from_dict_refuses_unknown_keys() -> None:
    assert GateConfig.from_dict({"min_requests": 10}) == GateConfig(min_requests=10)
    with pytest.raises(ValueError, match=r"^unknown key min_request\b"):
        GateConfig.from_dict({"min_request": 10})


# ---- batchline shadow report ------------------------------------------------------------------


def _write_log(path: Path, pairs: list[ShadowPair]) -> None:
    log = PairLog(path=path)
    for pair in pairs:
        log.append(pair)
    log.note_shed("churn", 7)
    log.close()


def test_report_json_matches_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pairs.jsonl"
    pairs = _pairs(120) + _pairs(40, version="3", labels=False)
    _write_log(path, pairs)
    assert main(["--log", str(path), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    expected = [r.to_dict() for r in compare(pairs, shed_count={"churn": 7})]
    assert printed["reports"] == expected
    assert printed["reports"][1]["label_agreement"] is None


def test_report_window_keeps_only_recent_pairs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "pairs.jsonl"
    now = time.time_ns()
    old = _pairs(30, t=now - 3600 * 10**9)
    recent = _pairs(20, seed=3, t=now - 10**9)
    _write_log(path, old + recent)
    assert main(["--log", str(path), "--format", "json", "--window", "10m"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["window_s"] == 600.0
    assert [r["requests"] for r in printed["reports"]] == [20]


def test_report_text_and_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pairs.jsonl"
    _write_log(path, _pairs(60))
    page = tmp_path / "report.html"
    assert main(["--log", str(path), "--html", str(page)]) == 0
    text = capsys.readouterr().out
    assert "churn: shadow version 2 vs 1" in text
    assert "requests compared   60" in text
    html = page.read_text()
    assert html.startswith("<!doctype html>")
    assert "<table>" in html
    assert "<svg" in html
    assert "<rect" in html


def test_report_fails_clearly_on_a_missing_log_or_bad_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--log", str(tmp_path / "none.jsonl")]) == 2
    assert "no shadow pair log" in capsys.readouterr().err
    _write_log(tmp_path / "p.jsonl", _pairs(2))
    assert main(["--log", str(tmp_path / "p.jsonl"), "--window", "ten minutes"]) == 2
    assert "--window" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10m", 600.0), ("90s", 90.0), ("2h", 7200.0), ("1d", 86400.0), ("250ms", 0.25), ("5", 5.0)],
)
def test_parse_window(text: str, seconds: float) -> None:
    assert parse_window(text) == seconds


def _deep_size(pair: ShadowPair) -> int:
    """What a pair really holds, measured: the object, its strings, tuples and numbers."""
    total = sys.getsizeof(pair)
    for name in ShadowPair.__slots__:
        value = getattr(pair, name)
        total += sys.getsizeof(value)
        if isinstance(value, tuple):
            total += sum(sys.getsizeof(v) for v in value)
    return total


def test_pair_log_memory_is_bounded_in_bytes_and_evictions_are_counted() -> None:
    small, big = _pairs(3), [_pair(100 + i, [0.5] * 500, [0.4] * 500) for i in range(10)]
    for pair in (*small, *big):
        assert pair_bytes(pair) >= _deep_size(pair)  # the charge is an upper bound
    cap = 4 * pair_bytes(big[0])
    log = PairLog(max_pairs=1000, max_memory_bytes=cap)
    for pair in (*small, *big):
        log.append(pair)
        assert log.memory_bytes <= cap
    assert log.pairs() == big[-4:]
    assert log.evicted == {"pairs": 0, "bytes": 3 + 6}
    assert log.memory_bytes == sum(pair_bytes(p) for p in big[-4:])


def test_pair_log_counts_evictions_by_count_apart() -> None:
    log = PairLog(max_pairs=2)
    for pair in _pairs(5):
        log.append(pair)
    assert log.evicted == {"pairs": 3, "bytes": 0}
