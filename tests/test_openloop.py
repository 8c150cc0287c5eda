"""Open-loop load: the Poisson schedule, loopback-only, achieved rate, coordinated-omission correction,
and the max-throughput-under-SLO search (pure search logic, then one short live search)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from loadtest.openloop import poisson_schedule, require_loopback
from loadtest.payloads import build_payloads
from loadtest.runner import TrialResult, max_throughput_under_slo, run_open_loop, search_rate


@pytest.fixture(scope="module")
def payload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ps = build_payloads(10, "json", n_queries=16, seed=0, dataset_n_queries=60)
    return ps.save(tmp_path_factory.mktemp("payloads") / "p10.msgpack")


# ---- the schedule (pure) -----------------------------------------------------------------------


def test_schedule_is_deterministic_and_bounded() -> None:
    a, b, c = poisson_schedule(100, 5, seed=1), poisson_schedule(100, 5, seed=1), poisson_schedule(100, 5, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:10], c[:10])
    assert np.all(np.diff(a) > 0) and a[0] > 0 and a[-1] < 5
    assert len(poisson_schedule(1000, 60, seed=0, max_requests=50)) == 50
    for bad in [(0, 1), (-1, 1), (10, 0), (math.inf, 1)]:
        with pytest.raises(ValueError):
            poisson_schedule(*bad)


def test_schedule_is_poisson() -> None:
    rate = 250.0
    t = poisson_schedule(rate, 400.0, seed=0)
    gaps = np.diff(np.concatenate([[0.0], t]))
    # exponential inter-arrivals: KS test against Exp(1/rate), and their mean and variance
    assert stats.kstest(gaps, "expon", args=(0, 1 / rate)).pvalue > 0.01
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.02)
    assert gaps.var() == pytest.approx(1 / rate**2, rel=0.05)
    # counts per second: Poisson(rate), so dispersion index (variance / mean) ~ 1
    counts = np.bincount(t.astype(int), minlength=400)
    assert counts.mean() == pytest.approx(rate, rel=0.02)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)


# ---- loopback only -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:8001", "http://[::1]:8000", "127.0.0.5"])
def test_loopback_hosts_are_accepted(url: str) -> None:
    require_loopback(url)


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000", ""])
def test_other_hosts_are_refused(url: str, payload_file: Path) -> None:
    with pytest.raises(ValueError, match="loopback"):
        require_loopback(url)
    if url:
        with pytest.raises(ValueError, match="loopback"):
            run_open_loop(url, payload_file, 10, 1)


# ---- live runs ---------------------------------------------------------------------------------


def test_achieved_rate_matches_target(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    rate, duration = 200.0, 3.0
    # seed 7: a schedule of 597 arrivals (expected 600), so the check measures the generator,
    # not the Poisson noise of a 3-second sample (sd ~4%)
    seed = 7
    scheduled = len(poisson_schedule(rate, duration, seed))
    r = run_open_loop(rank_url, payload_file, rate, duration, seed=seed, out_dir=tmp_path)
    assert isinstance(r, TrialResult) and r.mode == "open-loop" and r.target_rate_per_s == rate
    assert r.failures == 0 and r.error_rate == 0.0
    assert r.requests == r.extra["sent"] == r.extra["scheduled"] == scheduled
    assert r.rps == pytest.approx(rate, rel=0.10)
    assert r.extra["mean_interarrival_ms"] == pytest.approx(1000 / rate, rel=0.10)
    assert set(r.latency_ms) == {"p50", "p95", "p99", "p99.9", "max", "mean"}
    assert set(r.uncorrected_latency_ms or {}) == set(r.latency_ms)
    assert 0 <= (r.late_sends or 0) <= r.requests
    assert r.n_docs == 10 and r.docs_per_s == pytest.approx(10 * r.rps)
    assert r.cache_hit_ratio == 0.0  # every request had a fresh query id
    assert set(r.server_timings_ms) == {"parse", "cache", "queue", "inference", "total"}
    assert Path(r.raw_path or "").exists()


def test_corrected_latency_counts_the_wait(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    # One request in flight at a time, offered faster than one connection answers: arrivals queue
    # behind the slot, so they leave late and their corrected latency includes the wait.
    r = run_open_loop(rank_url, payload_file, 1000.0, 1.0, seed=0, max_in_flight=1, out_dir=tmp_path)
    assert r.failures == 0
    assert r.extra["waited_for_slot"] > 0 and (r.late_sends or 0) > 0
    assert r.uncorrected_latency_ms is not None
    for k in ("p50", "p99", "max", "mean"):  # every request: corrected >= uncorrected
        assert r.latency_ms[k] >= r.uncorrected_latency_ms[k] * (1 - 1e-3)
    assert r.latency_ms["p99"] > 2 * r.uncorrected_latency_ms["p99"]


def test_generator_is_pinned_to_the_given_cpus(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    r = run_open_loop(rank_url, payload_file, 50.0, 0.5, cpus=[cpu], out_dir=tmp_path)
    assert r.failures == 0 and r.extra["cpu_affinity"] == [cpu]


def test_cache_hits_when_queries_repeat(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    r = run_open_loop(rank_url, payload_file, 100.0, 1.0, seed=1, unique_queries=False, out_dir=tmp_path)
    assert r.failures == 0 and r.requests > 16
    # 16 distinct bodies: all but the first sight of each are cache hits (earlier tests may have warmed it)
    assert (r.cache_hit_ratio or 0) >= 1 - 16 / r.requests - 1e-9


# ---- max throughput under a latency objective --------------------------------------------------


def _fake_trial(capacity: float) -> callable:
    """A service whose p99 is 10 ms below `capacity` requests/s and 100 ms above (pure logic)."""

    def trial(rate: float) -> TrialResult:
        p99 = 10.0 if rate <= capacity else 100.0
        return TrialResult("slo", 10, "json", 10.0, int(rate * 10), 0, 0.0, rate, rate * 10,
                           {"p50": 1.0, "p95": 5.0, "p99": p99, "p99.9": p99, "max": p99, "mean": 2.0})

    return trial


def test_search_grows_then_bisects() -> None:
    best, history, why = search_rate(_fake_trial(730.0), 50.0, start_rate_per_s=50, max_steps=30, tolerance=0.02)
    rates = [r for r, _, _ in history]
    assert rates[:5] == [50, 100, 200, 400, 800]  # exponential growth until the first failure
    assert why == "converged" and best is not None
    assert 730 / 1.02 <= best[0] <= 730
    assert all(ok == (r <= 730) for r, _, ok in history)


def test_search_is_bounded() -> None:
    _, history, why = search_rate(_fake_trial(1e9), 50.0, max_steps=4)
    assert len(history) == 4 and why == "max steps"
    best, history, why = search_rate(_fake_trial(0.5), 50.0, start_rate_per_s=8, min_rate_per_s=1)
    assert best is None and why == "min rate" and [r for r, _, _ in history] == [8, 4, 2, 1]
    _, history, why = search_rate(_fake_trial(100), 50.0, deadline=0.0, trial_cost_s=lambda r: 1.0)
    assert history == [] and why == "time budget"


def test_max_throughput_under_slo_live(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    out = max_throughput_under_slo(
        rank_url, payload_file, slo_p99_ms=500.0, min_duration_s=1.0, min_queries=40, profile="quick",
        start_rate_per_s=25.0, max_steps=3, time_budget_s=120.0, out_dir=tmp_path,
    )  # fmt: skip
    assert out["status"] == "VALID", out["reasons"]
    assert out["steps"] == len(out["trials"]) <= 3
    assert out["max_rate_per_s"] in [t["rate_per_s"] for t in out["trials"] if t["meets_slo"]]
    assert out["p99_ms"] <= 500.0 and out["best_trial"]["failures"] == 0
    assert out["best_trial"]["requests"] >= 40 and out["best_trial"]["duration_s"] >= 1.0
    assert "quick profile" in out["note"]


def test_max_throughput_invalid_when_nothing_meets_the_slo(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    out = max_throughput_under_slo(
        rank_url, payload_file, slo_p99_ms=0.001, min_duration_s=0.5, min_queries=5,
        start_rate_per_s=10.0, max_steps=1, time_budget_s=60.0, out_dir=tmp_path,
    )  # fmt: skip
    assert out["status"] == "INVALID" and out["max_rate_per_s"] is None
    assert "no tried rate" in out["reasons"][0] and "note" not in out
