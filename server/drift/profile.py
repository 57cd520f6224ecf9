"""Reference profiles, shared with the registry side (see registry_client/profile.py)."""

from __future__ import annotations

from registry_client.profile import (
    DEFAULT_BINS,
    DEFAULT_SAMPLE_ROWS,
    PROFILE_FILE,
    SCORE_NAME,
    Histogram,
    ReferenceProfile,
    bin_counts,
    bin_shares,
    build_histogram,
    build_profile,
    quantile_edges,
)

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_SAMPLE_ROWS",
    "PROFILE_FILE",
    "SCORE_NAME",
    "Histogram",
    "ReferenceProfile",
    "bin_counts",
    "bin_shares",
    "build_histogram",
    "build_profile",
    "quantile_edges",
]
