"""The locustfile for real: headless Locust subprocesses against a live /rank server.

Locust is never imported into the pytest process (its gevent monkey-patching would leak into other
tests); every check runs Locust in a subprocess, through loadtest/runner.py as the sweep does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from loadtest_rank_app import free_port, running_rank_app, running_server

from loadtest.payloads import build_payloads
from loadtest.runner import LOCUSTFILE, REPO_ROOT, TrialResult, run_closed_loop
from serve.metrics import STAGES

pytestmark = pytest.mark.slow  # starts real Locust runs (a few seconds each)

LARGE_SLO = {"RANKSERVE_SLO_MS": "1000000"}  # every success is within it: good == successes


@pytest.fixture(scope="module")
def payload_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ps = build_payloads([10, 100], "json", n_queries=8, seed=0, dataset_n_queries=60)
    return ps.save(tmp_path_factory.mktemp("payloads") / "mix.msgpack")


@pytest.fixture(scope="module")
def degraded_url() -> Iterator[str]:
    """The small server answering every request with the degraded fallback (HTTP 200, scores null)."""
    with running_rank_app(degraded=1.0) as url:
        yield url


@pytest.fixture(scope="module")
def half_degraded_url() -> Iterator[str]:
    """The small server answering a random half of the requests degraded."""
    with running_rank_app(degraded=0.5) as url:
        yield url


def _raw(r: TrialResult) -> dict:
    return json.loads(Path(r.raw_path or "").read_text())


def _check_counts(raw: dict, processes: int = 1) -> None:
    """The result file's counts agree with each other, with the per-size breakdown and with Locust's."""
    n, failures, degraded, good = raw["requests"], raw["failures"], raw["degraded"], raw["good"]
    successes = n - failures - degraded
    assert n > 0 and 0 <= good <= successes
    assert raw["latency_ms"]["count"] == successes  # neither errors nor degraded answers are latencies
    assert raw["error_rate"] == pytest.approx(failures / n) and raw["degraded_rate"] == pytest.approx(degraded / n)
    assert raw["goodput_per_s"] == pytest.approx(good / raw["duration_s"])
    by_name = raw["outcomes_by_name"]
    for key in ("requests", "failures", "degraded", "good"):
        assert sum(o[key] for o in by_name.values()) == raw[key]
    for name, hist in raw["latency_by_name_ms"].items():
        o = by_name[name]
        assert hist["count"] == o["requests"] - o["failures"] - o["degraded"]
    assert raw["locust"]["requests"] == n and raw["locust"]["failures"] == failures + degraded
    cpu = raw["generator_cpu"]
    assert set(cpu) == {"cpu_s", "wall_s", "utilization", "processes"}
    assert cpu["processes"] == processes and cpu["cpu_s"] > 0 and cpu["wall_s"] > 0 and cpu["utilization"] > 0
    if processes == 1:
        assert cpu["utilization"] == pytest.approx(cpu["cpu_s"] / cpu["wall_s"])


def _check_trial(r: TrialResult, processes: int = 1) -> None:
    assert r.requests > 0 and r.failures == 0 and r.error_rate == 0.0
    assert {"p50", "p95", "p99", "p99.9", "max", "mean"} <= set(r.latency_ms)
    assert 0 < r.latency_ms["p50"] <= r.latency_ms["p99"] <= r.latency_ms["max"]
    assert r.rps > 0 and r.docs_per_s > 0
    assert set(r.server_timings_ms) == set(STAGES)
    assert r.extra["locust"]["requests"] == r.requests  # Locust's own count agrees with ours
    _check_counts(_raw(r), processes)


def test_selection_of_users_and_shapes() -> None:
    """Which classes Locust itself would load, per RANKSERVE_SCENARIO (Locust runs the first shape)."""
    code = f"""
import json, os, sys
from locust.util.load_locustfile import load_locustfile
out = {{}}
for scenario, argv in [("", []), ("", ["--class-picker"]), ("steady", []), ("ramp", []), ("spike", []),
                       ("cache-mix", []), ("list-mix", []), ("bogus", [])]:
    os.environ["RANKSERVE_SCENARIO"] = scenario
    sys.argv = ["locust", *argv]
    try:
        u, s = load_locustfile({str(LOCUSTFILE)!r})
        out[scenario + "".join(argv)] = [sorted(u), sorted(type(x).__name__ for x in s)]
    except ValueError as e:
        out[scenario] = str(e)
print(json.dumps(out))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANKSERVE_")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    all_users = ["CacheMixUser", "ListMixUser", "SteadyUser"]
    assert got[""] == [all_users, []]  # Locust's own class picking: `locust -f ... SteadyUser`
    assert got["--class-picker"] == [all_users, ["SpikeShape", "StepRampShape"]]
    assert got["steady"] == [["SteadyUser"], []]
    assert got["ramp"] == [["SteadyUser"], ["StepRampShape"]]
    assert got["spike"] == [["SteadyUser"], ["SpikeShape"]]
    assert got["cache-mix"] == [["CacheMixUser"], []]
    assert got["list-mix"] == [["ListMixUser"], []]
    assert "RANKSERVE_SCENARIO must be one of" in got["bogus"]


def test_steady_run(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    cpu = min(os.sched_getaffinity(0))
    r = run_closed_loop(rank_url, payload_file, 4, 3, "steady", tmp_path, cpus=[cpu])
    _check_trial(r)
    assert r.extra["cpu_affinity"] == [cpu]  # the load generator was pinned
    assert r.mode == "closed-loop" and r.users == 4 and r.scenario == "steady" and r.encoding == "json"
    assert r.cache_hit_ratio == 0.0  # unique query ids: a result cache never answers a steady run
    raw = json.loads(Path(r.raw_path or "").read_text())
    assert raw["latency_hdr"]["hdr"] and raw["latency_ms"]["count"] == r.requests
    # Locust's own table is no longer rounded to whole milliseconds (3 significant digits instead)
    assert raw["locust"]["p50_ms"] == pytest.approx(r.latency_ms["p50"], rel=0.02)
    assert (tmp_path / "locust-steady_stats.csv").exists()


def test_cache_mix_hit_ratio_follows_zipf_skew(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    hot = run_closed_loop(rank_url, payload_file, 2, 3, "cache-mix", tmp_path / "hot", zipf_s=2.0)
    cold = run_closed_loop(rank_url, payload_file, 2, 3, "cache-mix", tmp_path / "cold", zipf_s=0.0)
    _check_trial(hot)
    _check_trial(cold)
    # s=2 over 100000 queries: >60% of requests go to the top query; s=0: almost never a repeat
    assert (hot.cache_hit_ratio or 0) > 0.5
    assert (cold.cache_hit_ratio or 0) < 0.1


def test_list_mix_sends_every_size(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    r = run_closed_loop(rank_url, payload_file, 2, 3, "list-mix", tmp_path)
    _check_trial(r)
    assert set(r.extra["latency_by_name_ms"]) == {"/rank [10 docs]", "/rank [100 docs]"}
    assert r.sizes == [10, 100] and 10 < r.n_docs < 100


def test_step_ramp_shape_headless(rank_url: str, payload_file: Path, tmp_path: Path) -> None:
    env = {"RANKSERVE_RAMP_STEP_USERS": "2", "RANKSERVE_RAMP_STEP_S": "1", "RANKSERVE_RAMP_MAX_USERS": "6"}
    r = run_closed_loop(rank_url, payload_file, 1, 60, "ramp", tmp_path, env=env)
    _check_trial(r)
    assert r.users == 6  # the shape, not -u, set the user count
    assert r.duration_s < 30  # the shape ended the test after its 3 steps, long before -t 60s


def test_distributed_workers_merge_histograms(half_degraded_url: str, payload_file: Path, tmp_path: Path) -> None:
    r = run_closed_loop(half_degraded_url, payload_file, 4, 3, "steady", tmp_path, processes=2, env=LARGE_SLO)
    # includes: merged counts, per-size outcomes and HDR counts agree with Locust's aggregate over both
    # workers; each worker's CPU use arrived (processes == 2)
    _check_trial(r, processes=2)
    raw = _raw(r)
    assert 0 < raw["degraded"] < raw["requests"]  # both kinds of answer crossed the wire
    assert raw["good"] == raw["requests"] - raw["degraded"] > 0
    cpu = raw["generator_cpu"]
    assert cpu["utilization"] < cpu["cpu_s"] / cpu["wall_s"]  # the busiest worker's, not the sum of both


def test_degraded_answers_are_not_successes(degraded_url: str, payload_file: Path, tmp_path: Path) -> None:
    """A service that answers every request with its fallback: fast and error-free, but no goodput."""
    r = run_closed_loop(degraded_url, payload_file, 2, 2, "steady", tmp_path)
    raw = _raw(r)
    _check_counts(raw)
    assert raw["requests"] > 0 and raw["degraded"] == raw["requests"] and raw["degraded_rate"] == 1.0
    assert raw["failures"] == 0 and raw["error_rate"] == 0.0 and r.failures == 0
    assert raw["good"] == 0 and raw["goodput_per_s"] == 0.0 and raw["slo_ms"] == 50.0  # the default objective
    assert raw["rps"] > 0  # throughput is still there: goodput is what tells
    assert raw["latency_ms"]["count"] == 0 and raw["docs"] == 0 and raw["server_timings_ms"] == {}
    assert raw["locust"]["failures"] == raw["requests"]  # Locust's own table shows them failed
    assert set(raw["outcomes_by_name"]) == {"/rank [10 docs]", "/rank [100 docs]"}
    assert all(o["degraded"] == o["requests"] for o in raw["outcomes_by_name"].values())
    assert "degraded answer" in (tmp_path / "locust-steady_failures.csv").read_text()


def test_goodput_follows_the_objective(half_degraded_url: str, payload_file: Path, tmp_path: Path) -> None:
    tight = _raw(run_closed_loop(half_degraded_url, payload_file, 2, 2, "steady", tmp_path / "tight",
                                 env={"RANKSERVE_SLO_MS": "0.001"}))  # fmt: skip
    loose = _raw(run_closed_loop(half_degraded_url, payload_file, 2, 2, "steady", tmp_path / "loose", env=LARGE_SLO))
    for raw in (tight, loose):
        _check_counts(raw)
        assert raw["failures"] == 0 and 0 < raw["degraded"] < raw["requests"]
    assert tight["slo_ms"] == 0.001 and tight["good"] == 0 and tight["goodput_per_s"] == 0.0
    assert loose["slo_ms"] == 1e6 and loose["good"] == loose["requests"] - loose["degraded"] > 0
    assert loose["goodput_per_s"] > 0
    assert loose["goodput_per_s"] == pytest.approx(loose["good"] / loose["duration_s"])
    assert loose["goodput_per_s"] < loose["rps"]  # the degraded half is throughput, not goodput


_BASELINE_LAUNCHER = """
import sys
import uvicorn
from export.runtime import TorchScorer
from models.rankers import RankerConfig, build_ranker
from serve.baseline import create_app, parse_args
scorer = TorchScorer(build_ranker(RankerConfig(arch="mlp", n_features=136)), pointwise=True, n_features=136)
scorer.variant, scorer.model, scorer.version = "torch-eager", "untrained-mlp", "test"
# The baseline's own settings (no cache, no batching, no admission control: a slow CI machine's queue
# must not turn into 503s here), with the untrained scorer.
config, parse_mode = parse_args([])
app = create_app(config, scorer=scorer, parse_mode=parse_mode)
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


@pytest.fixture(scope="module")
def baseline_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """serve/baseline.py's app with an untrained MLP (no trained artifacts needed), on uvicorn."""
    if not (REPO_ROOT / "serve" / "baseline.py").exists():
        pytest.skip("serve/baseline.py is not there")
    port = free_port()
    with running_server(["-c", _BASELINE_LAUNCHER, str(port)], port, timeout_s=120, cwd=REPO_ROOT) as url:
        yield url


def test_end_to_end_against_the_baseline_service(baseline_url: str, payload_file: Path, tmp_path: Path) -> None:
    r = run_closed_loop(baseline_url, payload_file, 2, 3, "list-mix", tmp_path)
    _check_trial(r)
    assert r.cache_hit_ratio == 0.0
