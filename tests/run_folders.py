"""Small sweep run folders built from typed records, for the report and compare tests (no service runs).

`trial(...)` makes a TrialRecord whose latencies are a real LatencyRecorder histogram (so rows merge
trials exactly), `slo(...)` an SloResult, and `write_run(...)` a run folder of EntryRecords with the
sweep.yaml, environment.json and manifest the report reads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from loadtest.latency import LatencyRecorder
from loadtest.records import CONVERGED, EntryRecord, SloResult, SloStep, TrialRecord

SLO_MS = 50.0


def latencies(n: int, median_ms: float, *, tail_ms: float | None = None, tail: int = 0, seed: int = 0) -> np.ndarray:
    """`n` latencies around `median_ms` (lognormal, narrow), the last `tail` of them at `tail_ms`."""
    rng = np.random.default_rng(seed)
    values = rng.lognormal(np.log(median_ms), 0.1, n)
    if tail:
        values[-tail:] = tail_ms
    return values


def recorder(values: Sequence[float]) -> LatencyRecorder:
    rec = LatencyRecorder()
    for v in values:
        rec.record(float(v))
    return rec


def trial(values: Sequence[float], *, rps: float, list_size: int = 100, scenario: str = "steady", index: int = 0,
          failures: int = 0, degraded: int = 0, generator_cpu: float = 0.3, mode: str = "closed-loop",
          generator_bound: bool = False, offered: float | None = None, rate: float | None = None,
          server_total: float | None = None) -> TrialRecord:
    """A trial whose answered requests took `values` ms; failures and degraded answers come on top."""
    rec = recorder(values)
    latency = rec.percentiles()
    requests = len(values) + failures
    duration = requests / rps
    good = int(sum(v <= SLO_MS for v in values)) - degraded
    total = server_total if server_total is not None else 0.5 * latency["mean"]
    return TrialRecord(
        scenario=scenario, n_docs=list_size, encoding="json", duration_s=duration, requests=requests,
        failures=failures, error_rate=failures / requests, rps=rps, docs_per_s=rps * list_size,
        latency_ms=latency, cache_hit_ratio=0.5 if scenario == "cache-mix" else 0.0,
        server_timings_ms={"parse": 0.1 * total, "cache": 0.0, "queue": 0.2 * total, "inference": 0.5 * total,
                           "total": total},
        mode=mode, users=4, generator="Locust (closed loop)" if mode == "closed-loop" else "open loop (uvloop)",
        degraded=degraded, good=good, slo_ms=SLO_MS, goodput_per_s=good / duration,
        generator_cpu={"cpu_s": generator_cpu * duration, "wall_s": duration, "utilization": generator_cpu,
                       "processes": 1},
        generator_bound=generator_bound, offered_rate_per_s=offered, achieved_rate_per_s=rps,
        target_rate_per_s=rate, latency_hdr=rec.to_dict(), list_size=list_size, trial=index,
    )  # fmt: skip


def slo(status: str, max_rate: float | None, *, cap: float | None = None, list_size: int = 100,
        steps: Sequence[tuple[float, str, float]] = (), entry: str | None = None) -> SloResult:
    """An SLO search result; `steps` are (asked rate, outcome, p50 ms) with an open-loop trial each."""
    records = []
    for index, (rate, outcome, p50) in enumerate(steps):
        t = trial(latencies(300, p50, seed=index), rps=0.98 * rate, list_size=list_size, scenario=f"slo-step{index}",
                  mode="open-loop", generator_bound=outcome == "generator-bound", offered=0.99 * rate, rate=rate)
        records.append(SloStep(rate_per_s=rate, outcome=outcome, why="", confidence=0.99 if outcome == "pass" else 0.0,
                               trial=t.to_dict()).to_dict())
    return SloResult(
        status=status, reasons=[] if status == CONVERGED else [f"{status.lower()} (test)"], slo_p99_ms=SLO_MS,
        max_rate_per_s=max_rate, offered_rate_per_s=None if max_rate is None else 0.99 * max_rate,
        achieved_rate_per_s=None if max_rate is None else 0.98 * max_rate, p99_ms=None if max_rate is None else 40.0,
        samples=None if max_rate is None else 1200, confidence=None if max_rate is None else 0.995,
        bracket=[max_rate, cap], tolerance=0.05, profile="standard", min_queries=500, min_duration_s=2.0,
        confidence_target=0.99, stopped_by="converged" if status == CONVERGED else "max steps", steps=records,
        list_size=list_size, entry=entry,
    )  # fmt: skip


SERVICES = {
    "baseline": {"server": "baseline", "variant": "torch-eager", "device": "cpu", "encoding": "json"},
    "int8": {"server": "ray", "variant": "onnx-int8-dynamic", "device": "cpu", "encoding": "json"},
    "cache": {"server": "ray", "variant": "onnx-int8-dynamic", "device": "cpu", "encoding": "msgpack", "cache": True},
}


def entry(name: str, trials: Sequence[TrialRecord], slo_results: Sequence[SloResult] = (),
          service: dict[str, Any] | None = None) -> EntryRecord:
    return EntryRecord(entry=name, service=service or SERVICES[name], trials=[t.to_dict() for t in trials],
                       slo=[r.to_dict() for r in slo_results])


def write_run(path: Path, entries: Sequence[EntryRecord], *, errors: Sequence[dict[str, str]] = ()) -> Path:
    """A run folder: sweep.yaml (entry order, baseline, objective), environment.json, manifest, raw/."""
    for record in entries:
        record.save(path / "raw" / f"{record.entry}.json")
    (path / "raw").mkdir(parents=True, exist_ok=True)
    for error in errors:
        (path / "raw" / f"{error['entry']}.error.json").write_text(json.dumps(error))
    sweep = {"name": "test", "description": "A run built by the tests (not a measurement).", "trials": 3,
             "trial_duration_s": 2.0, "users": 4, "zipf_s": 1.1, "baseline": "baseline",
             "slo": {"p99_ms": SLO_MS, "profile": "standard"},
             "entries": [{"name": e.entry, "service": e.service} for e in entries]}
    (path / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    (path / "environment.json").write_text(json.dumps({"device": "cpu"}))
    (path / "manifests").mkdir(exist_ok=True)
    manifest = {"variants": {"torch-eager": {"size_bytes": 2 * 2**20, "accuracy": {"retention": 1.0}},
                             "onnx-int8-dynamic": {"size_bytes": 2**19, "accuracy": {"retention": 0.995}}}}
    (path / "manifests" / "mlp-lambdarank.json").write_text(json.dumps(manifest))
    return path
