"""Drift monitoring's statistics (serve/drift.py): PSI against a hand computation, the monitor flagging
shifted features and only those, bounded memory, and the reference file round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from serve.drift import DriftMonitor, DriftReference, DriftSettings, histogram_shares, psi


def test_psi_against_a_reference_computation() -> None:
    expected = np.array([0.25, 0.25, 0.25, 0.25])
    actual = np.array([0.10, 0.20, 0.30, 0.40])
    by_hand = sum((a - e) * math.log(a / e) for a, e in zip(actual, expected, strict=True))
    assert psi(expected, actual) == pytest.approx(by_hand)
    assert by_hand == pytest.approx(0.2282, abs=1e-4)  # (-.15 ln .4) + (-.05 ln .8) + (.05 ln 1.2) + (.15 ln 1.6)
    assert psi(expected, expected) == 0.0
    assert psi(np.array([0.5, 0.5]), np.array([1.0, 0.0])) == pytest.approx(
        0.5 * math.log(2) + (1e-4 - 0.5) * math.log(1e-4 / 0.5))  # an empty bin is floored, not infinite


def test_histogram_shares_cut_at_the_edges() -> None:
    shares = histogram_shares(np.array([0.0, 1.0, 1.5, 2.0, 3.0]), np.array([1.0, 2.0]))
    np.testing.assert_allclose(shares, [0.2, 0.4, 0.4])  # a value on an edge goes right


def training_rows(n: int = 20_000, features: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)).astype(np.float32)
    X[:, 1] = rng.integers(0, 3, n)  # a discrete feature
    X[:, 2] = 5.0  # a constant one
    return X


def test_the_monitor_flags_the_shifted_features_and_no_other() -> None:
    reference = DriftReference.from_rows(training_rows())
    settings = DriftSettings(sample_rate=1.0, rows_per_list=4, window=2000, min_rows=500)  # iid rows: 4 per list is fine
    monitor = DriftMonitor(reference, settings)
    live = training_rows(n=4000, seed=1)
    for start in range(0, 2000, 20):
        monitor.observe(live[start:start + 20])
    assert monitor.report()["flagged"] == []
    shifted = live.copy()
    shifted[:, 3] += 1.0  # one standard deviation
    shifted[:, 7] *= 3.0  # a wider spread
    shifted[:, 1] = 2.0  # the discrete feature stuck at one value
    for start in range(0, 4000, 20):
        monitor.observe(shifted[start:start + 20])
    report = monitor.report()
    assert report["flagged"] == [1, 3, 7]
    by_feature = {f["feature"]: f for f in report["features"]}
    assert by_feature[3]["psi"] > 0.25 and by_feature[3]["ks"] == pytest.approx(
        stats.ks_2samp(monitor.rows[: monitor.filled, 3], reference.sample[:, 3]).statistic)
    assert by_feature[2]["psi"] == 0.0 and by_feature[2]["out_of_range"] == 0.0
    assert max(by_feature[j]["psi"] for j in (0, 4, 5, 6, 8, 9, 10, 11)) < 0.05


def test_memory_is_bounded_and_nothing_is_flagged_before_min_rows() -> None:
    reference = DriftReference.from_rows(training_rows())
    monitor = DriftMonitor(reference, DriftSettings(sample_rate=1.0, rows_per_list=8, window=100, min_rows=50))
    far = np.full((8, 12), 100.0, dtype=np.float32)
    for _ in range(5):
        monitor.observe(far)
    report = monitor.report()
    assert report["rows"] == 40 and report["flagged"] == []  # under min_rows
    for _ in range(100):
        monitor.observe(far)
    report = monitor.report()
    assert monitor.rows.shape == (100, 12) and report["rows"] == 100 and report["rows_seen"] == 840
    assert report["features"][0]["out_of_range"] == 1.0 and 0 in report["flagged"]


def test_sampling_rate_and_a_foreign_width_are_respected() -> None:
    reference = DriftReference.from_rows(training_rows())
    monitor = DriftMonitor(reference, DriftSettings(sample_rate=0.1, rows_per_list=1, window=10_000), seed=3)
    rows = training_rows(n=10, seed=2)
    for _ in range(5000):
        monitor.observe(rows)
    assert 400 < monitor.seen < 600  # about a tenth of the lists
    monitor.observe(np.zeros((4, 7), dtype=np.float32))  # another model's width: ignored, not an error
    assert monitor.seen < 600


def test_reference_round_trip(tmp_path: Path) -> None:
    reference = DriftReference.from_rows(training_rows())
    loaded = DriftReference.load(reference.save(tmp_path / "ref.npz"))
    assert loaded.n_features == 12
    for a, b in zip(reference.edges, loaded.edges, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(reference.shares, loaded.shares, strict=True):
        np.testing.assert_allclose(a, b)
    assert loaded.edges[2].tolist() == [5.0] and loaded.shares[2].tolist() == [0.0, 1.0]  # the constant feature
    np.testing.assert_array_equal(reference.sample, loaded.sample)


def test_the_service_samples_what_it_scores_and_reports_on_get_drift(tmp_path: Path,
                                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """Plain uvicorn with --drift: GET /drift and the Prometheus gauges flag a shifted feature of the
    traffic and no other; without --drift the route is a 404 naming the field."""
    from fastapi.testclient import TestClient
    from serving_artifacts import build_test_artifacts

    from export.runtime import load_scorer
    from serve.encoding import encode_msgpack
    from serve.uvicorn_server import create_app, parse_args

    manifest = build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")
    n_features = load_scorer("onnx-fp32", manifest_path=manifest).n_features
    rng = np.random.default_rng(5)
    reference = DriftReference.from_rows(rng.normal(size=(20_000, n_features))).save(tmp_path / "ref.npz")
    base = ["--variant", "onnx-fp32", "--manifest-path", str(manifest)]
    off, _ = parse_args(base)
    with TestClient(create_app(off)) as client:
        missing = client.get("/drift")
        assert missing.status_code == 404 and missing.json()["field"] == "drift"
    on, _ = parse_args([*base, "--drift", f"reference={reference},sample_rate=1,window=400,min_rows=200"])
    assert on.drift is not None and on.drift.window == 400
    with TestClient(create_app(on)) as client:
        def send(shift: float) -> None:
            for i in range(100):
                X = rng.normal(size=(20, n_features)).astype(np.float32)
                X[:, 3] += shift
                resp = client.post("/rank", content=encode_msgpack(f"q{i}", list(range(20)), X),
                                   headers={"content-type": "application/msgpack"})
                assert resp.status_code == 200

        send(0.0)
        send(0.0)
        assert client.get("/drift").json()["flagged"] == []
        send(2.0)
        send(2.0)
        send(2.0)
        report = client.get("/drift").json()
        assert report["flagged"] == [3] and report["rows"] == 400
        metrics = client.get("/metrics").text
        assert 'rankserve_drift_flagged{feature="3"} 1.0' in metrics
        assert 'rankserve_drift_flagged{feature="4"} 0.0' in metrics
