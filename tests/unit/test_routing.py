"""Canary split, shadow sampling and Route validation."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest

from server.routing import (
    CANARY,
    PRIMARY,
    Route,
    ShadowSpec,
    canary_bucket,
    choose_version,
    mirror_targets,
    shadow_bucket,
    should_mirror,
)

KEYS = [f"entity-{i}" for i in range(100_000)]

# ---- the hash ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "canary", "shadow"),
    [
        ("customer-42", 83.09758501262898, 64.92672930095647),
        ("req-0001", 5.986043285099285, 32.6073977723219),
        ("ünïcode", 64.78307192228236, 98.18702537316106),
    ],
)
def test_buckets_are_fixed_known_values(key: str, canary: float, shadow: float) -> None:
    """Changing the hash would move live customers between versions: these values must hold."""
    assert canary_bucket(key) == canary
    assert shadow_bucket(key) == shadow


def test_canary_bucket_is_blake2b_top_53_bits_scaled_to_100() -> None:
    digest = hashlib.blake2b(b"customer-42", digest_size=8, person=b"batchline-canary").digest()
    expected = (int.from_bytes(digest, "big") >> 11) / 2**53 * 100
    assert canary_bucket("customer-42") == expected


def test_buckets_lie_in_0_to_100() -> None:
    buckets = [canary_bucket(k) for k in KEYS[:20_000]] + [shadow_bucket(k) for k in KEYS[:20_000]]
    assert min(buckets) >= 0.0
    assert max(buckets) < 100.0


# ---- choose_version ---------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [10.0, 25.0, 50.0])
def test_canary_share_converges_to_configured_percent(percent: float) -> None:
    route = Route("churn", "1", "2", percent)
    canary = sum(choose_version(route, k)[1] == CANARY for k in KEYS)
    assert abs(canary / len(KEYS) * 100 - percent) < 1.0


def test_same_key_always_gets_same_version() -> None:
    route = Route("churn", "1", "2", 30.0)
    first = [choose_version(route, k) for k in KEYS[:2000]]
    again = [choose_version(route, k) for k in KEYS[:2000]]
    assert first == again
    assert {v for v, _ in first} == {"1", "2"}


def test_version_and_role_agree() -> None:
    route = Route("churn", "1", "2", 50.0)
    for key in KEYS[:500]:
        version, role = choose_version(route, key)
        assert (version, role) in (("1", PRIMARY), ("2", CANARY))


def test_raising_the_share_keeps_canary_keys_on_the_canary() -> None:
    small, large = Route("churn", "1", "2", 5.0), Route("churn", "1", "2", 10.0)
    for key in KEYS[:5000]:
        if choose_version(small, key)[1] == CANARY:
            assert choose_version(large, key)[1] == CANARY


def test_zero_percent_never_picks_the_canary() -> None:
    route = Route("churn", "1", "2", 0.0)
    assert all(choose_version(route, k) == ("1", PRIMARY) for k in KEYS[:5000])


def test_hundred_percent_always_picks_the_canary() -> None:
    route = Route("churn", "1", "2", 100.0)
    assert all(choose_version(route, k) == ("2", CANARY) for k in KEYS[:5000])


def test_no_canary_always_picks_the_primary() -> None:
    route = Route("churn", "1")
    assert choose_version(route, "anyone") == ("1", PRIMARY)


def test_empty_key_draws_from_the_random_source() -> None:
    route = Route("churn", "1", "2", 10.0)
    assert choose_version(route, "", rng=lambda: 0.05) == ("2", CANARY)
    assert choose_version(route, "", rng=lambda: 0.5) == ("1", PRIMARY)


# ---- shadow sampling --------------------------------------------------------------------------


def test_shadow_sampling_converges_to_its_percent() -> None:
    spec = ShadowSpec("3", 20.0)
    share = sum(should_mirror(spec, k) for k in KEYS) / len(KEYS) * 100
    assert abs(share - 20.0) < 1.0


def test_shadow_sampling_is_independent_of_the_canary_split() -> None:
    route = Route("churn", "1", "2", 50.0)
    spec = ShadowSpec("3", 50.0)
    canary = np.array([choose_version(route, k)[1] == CANARY for k in KEYS], dtype=float)
    mirrored = np.array([should_mirror(spec, k) for k in KEYS], dtype=float)
    assert abs(np.corrcoef(canary, mirrored)[0, 1]) < 0.02


def test_shadow_sampling_is_sticky_and_edge_percents_are_exact() -> None:
    spec = ShadowSpec("3", 37.0)
    assert [should_mirror(spec, k) for k in KEYS[:1000]] == [
        should_mirror(spec, k) for k in KEYS[:1000]
    ]
    assert all(should_mirror(ShadowSpec("3", 100.0), k) for k in KEYS[:1000])
    assert not any(should_mirror(ShadowSpec("3", 0.0), k) for k in KEYS[:1000])


def test_mirror_targets_lists_sampled_shadows_in_order() -> None:
    route = Route("churn", "1", shadows=(ShadowSpec("3"), ShadowSpec("4", 0.0), ShadowSpec("5")))
    assert [s.version for s in mirror_targets(route, "k")] == ["3", "5"]


# ---- Route validation and serialisation -------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": ""}, "model"),
        ({"primary": ""}, "primary"),
        ({"canary": "2", "canary_percent": 101.0}, "canary_percent"),
        ({"canary": "2", "canary_percent": -1.0}, "canary_percent"),
        ({"canary": "2", "canary_percent": float("nan")}, "canary_percent"),
        ({"canary": "2", "canary_percent": True}, "canary_percent"),
        ({"canary_percent": 10.0}, "canary_percent"),
        ({"canary": "1", "canary_percent": 10.0}, "canary"),
        ({"canary": "", "canary_percent": 10.0}, "canary"),
        ({"shadows": (ShadowSpec("1"),)}, "shadows"),
        ({"canary": "2", "shadows": (ShadowSpec("2"),)}, "shadows"),
        ({"shadows": (ShadowSpec("3"), ShadowSpec("3", 5.0))}, "shadows"),
    ],
)
def test_route_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    args: dict[str, Any] = {"model": "churn", "primary": "1", **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}"):
        Route(**args)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"version": ""}, "shadows.version"),
        ({"version": "3", "sample_percent": 150.0}, "shadows.sample_percent"),
    ],
)
def test_shadow_spec_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}"):
        ShadowSpec(**kwargs)


def test_route_round_trips_through_dict() -> None:
    route = Route("churn", "1", "2", 12.5, (ShadowSpec("3"), ShadowSpec("4", 25.0)))
    assert Route.from_dict(route.to_dict()) == route
    assert route.versions == ("1", "2", "3", "4")


def test_route_from_dict_accepts_bare_shadow_versions_and_no_canary() -> None:
    route = Route.from_dict({"model": "churn", "primary": "1", "canary": "", "shadows": ["3"]})
    assert route == Route("churn", "1", shadows=(ShadowSpec("3", 100.0),))


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"model": "churn", "primary": "1", "canry": "2"}, "canry"),
        ({"model": "churn"}, "primary"),
        ({"model": "churn", "primary": "1", "shadows": "3"}, "shadows"),
        ({"model": "churn", "primary": "1", "shadows": [{"version": "3", "x": 1}]}, "shadows.x"),
    ],
)
def test_route_from_dict_refuses_bad_input_naming_the_key(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}"):
        Route.from_dict(data)


def test_with_primary_drops_the_promoted_canary_or_shadow() -> None:
    route = Route("churn", "1", "2", 20.0, (ShadowSpec("3"), ShadowSpec("4")))
    assert route.with_primary("2") == Route("churn", "2", shadows=route.shadows)
    assert route.with_primary("3") == Route("churn", "3", "2", 20.0, (ShadowSpec("4"),))
    assert route.with_primary("9") == Route("churn", "9", "2", 20.0, route.shadows)
