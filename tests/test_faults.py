"""The fault suite (loadtest/faults.py): the timeline's windows and recovery (pure logic), the scenario
files, the verdicts, the generator's per-arrival timeline for real, and the short `redis_kill`
scenario for real: plain uvicorn with the cache on, an embedded Redis killed and restarted under load."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from serving_artifacts import build_test_artifacts

from loadtest.faults import run_profile, select
from loadtest.faults_config import FAULTS_DIR, Acceptance, FaultFileError, Profile, Scenario, load_profile
from loadtest.faults_report import FAIL, PASS, RECORDED, isa_slug, judge, results_stem, verdict
from loadtest.faults_timeline import Timeline, first_cache_hit_after, phase_stats, recovery_time
from loadtest.openloop import OpenLoopConfig, run_trial
from loadtest.payloads import build_payloads
from loadtest.recorder import DEGRADED, DEGRADED_ANSWER, ERROR, OK, REJECTED, AnswerTimeline
from loadtest.sweep_config import ServiceSpec
from models.environment import collect_environment
from serve.cache import DEFAULT_OPEN_S
from serve.redis_server import free_port


def make_timeline(rate: float, seconds: float, latency, outcome=None, cached=None) -> Timeline:
    """Evenly spaced arrivals; latency / outcome / cached as functions of the scheduled time."""
    t = np.arange(0.0, seconds, 1.0 / rate)
    lat = np.array([latency(x) for x in t], dtype=np.float32)
    out = np.array([(outcome or (lambda _: OK))(x) for x in t], dtype=np.int8)
    hit = np.array([(cached or (lambda _: False))(x) for x in t], dtype=bool)
    status = np.where(out == REJECTED, 503, 200).astype(np.int16)
    return Timeline(t, lat, status, out, hit)


RECOVERY = {"window_s": 1.0, "step_s": 0.1, "hold_s": 1.0, "p99_factor": 2.0, "p99_slack_ms": 2.0,
            "failed_factor": 2.0, "min_samples": 20}


# ---- the timeline: phases and recovery (pure) -------------------------------------------------


def test_phases_count_outcomes_apart_and_take_percentiles_of_ok_answers_only() -> None:
    def outcome(x: float) -> int:
        return REJECTED if 5 <= x < 6 else DEGRADED_ANSWER if 6 <= x < 6.5 else ERROR if 6.5 <= x < 6.6 else OK

    tl = make_timeline(100, 10, lambda x: 1000.0 if 5 <= x < 6 else 5.0 + (x % 1), outcome)
    before, during = phase_stats(tl, 0, 5), phase_stats(tl, 5, 7)
    assert (before.requests, before.ok, before.failed) == (500, 500, 0)
    assert (during.rejected, during.degraded, during.errors) == (100, 50, 10)
    assert during.failed == 160 and during.ok == 40
    assert during.rejected_p99_ms == pytest.approx(1000.0)  # the rejections' own percentile
    assert during.p99_ms < 7  # the ok answers' latency, not the rejections'
    assert before.p50_ms == pytest.approx(5.49, abs=0.01)  # nearest rank of 5.00 .. 5.99
    assert during.max_ms == pytest.approx(1000.0)


def test_recovery_is_the_first_healthy_stretch_after_the_fault() -> None:
    # failures until 7 s, slow (40 ms against 5 ms before) until 8 s, healthy from 8 s
    tl = make_timeline(200, 15, lambda x: 40.0 if 7 <= x < 8 else 5.0,
                       lambda x: ERROR if 5 <= x < 7 else OK)
    before = phase_stats(tl, 0, 5)
    assert recovery_time(tl, 6.0, before, **RECOVERY) == pytest.approx(2.0, abs=0.11)
    # a fault that ends when all is healthy already recovered at once
    assert recovery_time(tl, 9.0, before, **RECOVERY) == pytest.approx(0.0)
    # a looser latency bound accepts the slow second: recovery as soon as the failures stop
    loose = {**RECOVERY, "p99_factor": 10.0}
    assert recovery_time(tl, 6.0, before, **loose) == pytest.approx(1.0, abs=0.11)


def test_one_quiet_window_amid_failures_is_not_a_recovery() -> None:
    # failures from 5 s to 10 s except a quiet second at 7 s; healthy from 10 s
    tl = make_timeline(200, 15, lambda x: 5.0, lambda x: OK if x < 5 or 7 <= x < 8 or x >= 10 else REJECTED)
    before = phase_stats(tl, 0, 5)
    assert recovery_time(tl, 5.0, before, **RECOVERY) == pytest.approx(5.0, abs=0.11)
    assert recovery_time(tl, 5.0, before, **{**RECOVERY, "hold_s": 0.0}) == pytest.approx(2.0, abs=0.11)


def test_a_baseline_with_failures_is_recovered_to_its_own_failure_rate() -> None:
    # 1 in 50 rejected all along (2%), 30% during 5..8 s: back to 2% is recovered, 0% is not asked
    tl = make_timeline(200, 15, lambda x: 5.0,
                       lambda x: REJECTED if (5 <= x < 8 and round(x * 200) % 10 < 3) or round(x * 200) % 50 == 0
                       else OK)
    before = phase_stats(tl, 0, 5)
    assert before.failed == 20
    assert recovery_time(tl, 5.0, before, **RECOVERY) == pytest.approx(3.0, abs=0.11)


def test_no_recovery_when_failures_last_to_the_end_or_samples_are_too_few() -> None:
    broken = make_timeline(200, 10, lambda x: 5.0, lambda x: DEGRADED_ANSWER if x >= 5 else OK)
    assert recovery_time(broken, 5.0, phase_stats(broken, 0, 5), **RECOVERY) is None
    sparse = make_timeline(10, 10, lambda x: 5.0)  # 10 arrivals a second, fewer than min_samples
    assert recovery_time(sparse, 5.0, phase_stats(sparse, 0, 5), **RECOVERY) is None
    assert recovery_time(sparse, 5.0, None, **RECOVERY) is None  # nothing to compare with


def test_first_cache_hit_after_a_restart() -> None:
    tl = make_timeline(100, 10, lambda x: 2.0, cached=lambda x: x < 5 or x >= 8.5)
    assert first_cache_hit_after(tl, 6.0) == pytest.approx(2.5, abs=0.011)
    assert first_cache_hit_after(tl, 9.99) is None or first_cache_hit_after(tl, 9.99) < 0.02
    assert first_cache_hit_after(make_timeline(100, 10, lambda x: 2.0), 1.0) is None


def test_answer_timeline_classifies_each_arrival() -> None:
    tl = AnswerTimeline(np.array([0.1, 0.2, 0.3, 0.4, 0.5]))
    tl.record(0, 200, None, 3.0, cached=True)
    tl.record(1, 200, DEGRADED, 4.0)
    tl.record(2, 503, "HTTP 503", 0.5)
    tl.record(3, 500, "HTTP 500", 9.0)
    tl.record(4, 0, "timeout", 30000.0)
    arrays = tl.to_arrays(offset_s=1.0)
    assert arrays["outcome"].tolist() == [OK, DEGRADED_ANSWER, REJECTED, ERROR, ERROR]
    assert arrays["cached"].tolist() == [True, False, False, False, False]
    assert arrays["scheduled_s"].tolist() == pytest.approx([1.1, 1.2, 1.3, 1.4, 1.5])
    merged = AnswerTimeline.merge([arrays, AnswerTimeline(np.array([1.25])).to_arrays()])
    assert merged["scheduled_s"].tolist() == pytest.approx([1.1, 1.2, 1.25, 1.3, 1.4, 1.5])


# ---- scenario files and verdicts (pure) ---------------------------------------------------------


def test_both_profiles_load_and_cover_every_fault() -> None:
    for name in ("short", "full"):
        profile = load_profile(FAULTS_DIR / f"{name}.yaml")
        kinds = {s.fault.kind for s in profile.scenarios}
        assert kinds == {"redis_kill", "redis_pause", "replica_kill", "model_swap", "overload", "none"}, name
        assert {"redis_kill", "feature_store_down", "overload", "soak"} <= {s.name for s in profile.scenarios}
    full = {s.name: s for s in load_profile(FAULTS_DIR / "full.yaml").scenarios}
    assert full["soak"].load.duration_s >= 600 and full["overload"].fault.duration_s >= 60
    assert full["overload"].fault.factor == 3.0


def _scenario(**fault: object) -> dict:
    return {"name": "x", "service": {"server": "uvicorn", "cache": True, "encoding": "msgpack"},
            "load": {"rate_per_s": 10, "duration_s": 10}, "fault": fault}


@pytest.mark.parametrize(("fault", "service", "message"), [
    ({"kind": "redis_kill", "at_s": 5, "restart_after_s": 6}, {}, "not before the load's end"),
    ({"kind": "replica_kill", "at_s": 5}, {}, "needs service.server 'ray'"),
    ({"kind": "redis_pause", "at_s": 5, "resume_after_s": 1}, {"cache": False}, "uses no Redis"),
    ({"kind": "redis_kill", "at_s": 5, "restart_after_s": 1, "variant": "onnx-fp32"}, {}, "variant"),
    ({"kind": "model_swap", "at_s": 5, "variant": "onnx-fp32"}, {"topology": "split"}, "topology"),
])
def test_a_bad_scenario_names_its_field(fault: dict, service: dict, message: str) -> None:
    data = _scenario(**fault)
    data["service"].update(service)
    with pytest.raises(ValueError, match=message):
        Scenario.model_validate(data)


def test_only_names_scenarios_of_the_profile() -> None:
    profile = Profile.model_validate({"name": "p", "scenarios": [
        _scenario(kind="redis_kill", at_s=2, restart_after_s=1)]})
    assert [s.name for s in select(profile, ["x"])] == ["x"]
    with pytest.raises(FaultFileError, match="nope"):
        select(profile, ["nope"])


def _result(**overrides: object) -> dict:
    phase = {"requests": 100, "ok": 100, "errors": 0, "degraded": 0, "rejected": 0, "failed": 0, "p50_ms": 2.0,
             "p99_ms": 5.0, "max_ms": 6.0, "rejected_p99_ms": None, "cache_hits": 10}
    result = {"total": dict(phase), "phases": {"before": dict(phase), "during": {**phase, "p99_ms": 12.0},
                                               "after": dict(phase)},
              "recovery_s": 1.5, "cache_hits_back_s": 0.4, "alive_after": True, "readyz_after": 200}
    result.update(overrides)
    return result


def test_checks_show_threshold_and_value_and_fail_when_past_it() -> None:
    acceptance = Acceptance(max_failed=0, max_during_p99_ratio=2.0, max_recovery_s=5, cache_hits_back_s=5)
    checks = {c.name: c for c in judge(_result(), acceptance)}
    assert not checks["p99 during / before"].passed and "2.40x" in checks["p99 during / before"].value
    assert checks["failed"].passed and checks["recovery"].passed and checks["cache hits back after the restart"].passed
    assert verdict(list(checks.values())) == FAIL
    ok = judge(_result(phases={"before": _result()["phases"]["before"],
                               "during": _result()["phases"]["before"]}), acceptance)
    assert verdict(ok) == PASS
    never = {c.name: c for c in judge(_result(recovery_s=None, cache_hits_back_s=None), acceptance)}
    assert not never["recovery"].passed and never["recovery"].value == "never"
    assert not never["cache hits back after the restart"].passed
    assert verdict(judge(_result(), Acceptance(alive_after=False))) == RECORDED


def test_results_are_named_by_cpu_and_isa() -> None:
    env = {"cpu": {"model": "AMD EPYC", "isa_flags": ["avx", "avx2", "avx512f", "avx512_vnni"], "arch": "x86_64"}}
    assert isa_slug(env) == "avx512-vnni" and results_stem(env, "full") == "amd-epyc-avx512-vnni"
    env["cpu"]["isa_flags"] = ["avx", "avx2"]
    assert results_stem(env, "short") == "amd-epyc-avx2-short"


# ---- the generator's timeline, for real ---------------------------------------------------------


def test_the_generator_keeps_one_row_per_arrival_from_a_given_start(rank_url: str) -> None:
    payloads = build_payloads(10, "json", n_queries=8, seed=0, dataset_n_queries=60)
    start_at = time.monotonic() + 0.5
    cfg = OpenLoopConfig(host=rank_url, rate_per_s=200, duration_s=1.5, timeline=True, start_at=start_at,
                         unique_queries=False)
    result = run_trial(cfg, payloads)
    tl = Timeline.from_arrays(result["timeline"])
    assert result["timeline_start_monotonic"] == start_at
    assert len(tl) == result["scheduled"] == result["requests"]
    assert np.all(np.diff(tl.scheduled_s) > 0) and 0 < tl.scheduled_s[0] and tl.scheduled_s[-1] < 1.5
    assert int((tl.outcome == OK).sum()) == result["requests"] - result["failures"] - result["degraded"]
    assert int(tl.cached.sum()) == result["cache_hits"] > 0  # the payloads repeat: the app caches them
    assert np.isfinite(tl.latency_ms).all() and set(tl.status.tolist()) == {200}
    assert "timeline" not in run_trial(OpenLoopConfig(host=rank_url, rate_per_s=50, duration_s=0.2), payloads)


# ---- the short redis_kill scenario, for real ----------------------------------------------------


@pytest.mark.slow
def test_short_redis_kill_on_uvicorn_loses_no_request_and_the_cache_comes_back(tmp_path_factory, tmp_path) -> None:
    """Redis SIGKILL at 5 s, restarted 4 s later, under Zipf traffic against plain uvicorn with the cache
    on: the short profile's scenario, on the test model and a free port.

    The load runs longer than the profile's 15 s: its 'after' window (4 s) is shorter than the circuit
    breaker's open time (5 s), so a breaker that re-opened once after the restart (three calls timing
    out together in one stall of a busy machine: fail-open working) left that window without hits, as
    in one CI run. Here 'after' outlasts one re-open; /metrics' breaker counter is in the message.

    Admission control is off here: this test is about the cache failing open (a cache that blocked
    would show as timeouts or deadline-degraded answers), and on a busy shared machine admission's
    fast 503s under CPU starvation would count as failures too; the suite's own scenario keeps the
    service's defaults and reports them."""
    manifest = build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")
    profile = load_profile(FAULTS_DIR / "short.yaml")
    scenario = select(profile, ["redis_kill"])[0]
    scenario.service = ServiceSpec.model_validate({**scenario.service.model_dump(), "manifest_path": str(manifest),
                                                   "port": free_port(), "admission": False})
    fault_end = scenario.fault.at_s + scenario.fault.restart_after_s
    scenario.load = scenario.load.model_copy(update={
        "duration_s": fault_end + scenario.recovery.after_skip_s + DEFAULT_OPEN_S + 4.0})
    results, paths = run_profile(profile, [scenario], tmp_path / "out", tmp_path / "work", collect_environment())
    result = results[0]
    assert result.get("error") is None, result.get("error")
    total, during = result["total"], result["phases"]["during"]
    assert result["fault"]["end_s"] - result["fault"]["start_s"] >= 4.0  # Redis really was down 4 s
    assert during["cache_hits"] == 0 < result["phases"]["before"]["cache_hits"]  # ... and the cache with it
    assert total["requests"] > 1000 and total["failed"] == 0, total
    assert result["cache_hits_back_s"] is not None and result["cache_hits_back_s"] <= 5.0
    assert result["phases"]["after"]["cache_hits"] > 0, (result["service_counters"], result["per_second"])
    assert result["alive_after"] and result["readyz_after"] == 200
    row = json.loads(paths["json"].read_text())["results"][0]
    assert row["scenario"] == "redis_kill" and paths["md"].read_text().count("redis_kill") >= 2
    assert "failed" in paths["csv"].read_text().splitlines()[0]
