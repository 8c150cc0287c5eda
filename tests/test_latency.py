"""LatencyRecorder: HDR percentiles agree with numpy on known samples, merge exactly, round-trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loadtest.latency import LatencyRecorder

# HDR keeps 3 significant digits (error < 1/1024 of the value) of microsecond-rounded values.
REL, ABS_MS = 1e-3, 1e-3


def _recorder(samples: np.ndarray) -> LatencyRecorder:
    rec = LatencyRecorder()
    for v in samples:
        rec.record(float(v))
    return rec


@pytest.mark.parametrize("dist", ["lognormal", "uniform", "bimodal"])
def test_percentiles_match_numpy(dist: str) -> None:
    rng = np.random.default_rng(1)
    n = 10_001  # a size where HDR's rank rule round(p*n) and numpy's inverted_cdf ceil(p*n) agree
    if dist == "lognormal":
        x = rng.lognormal(mean=1.0, sigma=0.8, size=n)  # ~ms-scale service latencies with a tail
    elif dist == "uniform":
        x = rng.uniform(0.2, 5.0, size=n)  # sub-millisecond values included
    else:
        x = np.concatenate([rng.normal(2.0, 0.2, n // 2), rng.normal(40.0, 5.0, n - n // 2)]).clip(0.05)
    got = _recorder(x).percentiles()
    for name, q in [("p50", 50), ("p95", 95), ("p99", 99), ("p99.9", 99.9)]:
        ref = float(np.percentile(x, q, method="inverted_cdf"))
        assert got[name] == pytest.approx(ref, rel=REL, abs=ABS_MS), name
    assert got["max"] == pytest.approx(float(x.max()))
    assert got["mean"] == pytest.approx(float(x.mean()))
    assert got["count"] == n


def test_sub_millisecond_resolution() -> None:
    rec = _recorder(np.array([0.25, 0.251, 0.252, 1.234, 2.345]))
    p = rec.percentiles()
    assert p["p50"] == pytest.approx(0.252, abs=ABS_MS)  # not rounded to 0 or 1 ms
    assert rec.value_at(100) == pytest.approx(2.345, rel=REL)


def test_merge_equals_recording_everything() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.lognormal(0.5, 0.5, 3000), rng.lognormal(2.0, 0.3, 2000)
    merged = _recorder(a)
    merged.merge(_recorder(b))
    assert merged.percentiles() == pytest.approx(_recorder(np.concatenate([a, b])).percentiles())


def test_encoded_round_trip() -> None:
    rec = _recorder(np.random.default_rng(3).exponential(3.0, 5000))
    back = LatencyRecorder.from_dict(rec.to_dict())
    assert back.percentiles() == rec.percentiles()
    empty = LatencyRecorder.from_dict(LatencyRecorder().to_dict())
    assert empty.count == 0


def test_empty_and_bad_values() -> None:
    p = LatencyRecorder().percentiles()
    assert p["count"] == 0 and p["p99"] == 0.0 and p["mean"] == 0.0
    rec = LatencyRecorder()
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            rec.record(bad)
    rec.record(0.0)  # clamped to 1 us, not an error
    assert rec.count == 1
