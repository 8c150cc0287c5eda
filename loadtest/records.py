"""Typed run records: a trial, an SLO search and a sweep entry, each saving and loading itself.

The sweep writes them, report.py and compare.py read them; one definition means the report never
guesses a key. Each record carries what makes its figure honest: which generator made it, whether
that generator kept its schedule (open loop) or its core (closed loop), how many samples a
percentile rests on, and the degraded answers counted apart from errors (both are failures).
`from_dict` ignores keys it does not know and fills what older run files lack, so committed runs
from earlier code still load.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from scipy import stats

LATENCY_KEYS = ("p50", "p95", "p99", "p99.9", "max", "mean", "count")
GENERATOR_CPU_LIMIT = 0.9  # a closed-loop generator at or above this share of its core may be the bottleneck
MIN_SAMPLES = {"p99": 100, "p99.9": 1000}  # fewer and the percentile is (nearly) the maximum: marked

# SLO search statuses (docs/loadtest.md).
CONVERGED = "CONVERGED"  # a passing and a failing rate within the tolerance: the service's limit
LOWER_BOUND = "LOWER-BOUND"  # every step passed, or the budget ran out first: the limit is higher
GENERATOR_BOUND = "GENERATOR-BOUND"  # the generator could not keep a higher rate's schedule
INVALID = "INVALID"  # no rate met the objective (errors, degraded answers or latency)
STATUSES = (CONVERGED, LOWER_BOUND, GENERATOR_BOUND, INVALID)

R = TypeVar("R", bound="Record")


class Record:
    """to_dict / from_dict / save / load for a dataclass record."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any]) -> R:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path | str) -> Path:
        """Write through a temporary file so that an interruption never leaves half a record."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls: type[R], path: Path | str) -> R:
        return cls.from_dict(json.loads(Path(path).read_text()))


def tail_confidence(samples: int, over: int, percentile: float = 99.0) -> float:
    """Confidence that the true `percentile` is within the objective, given `over` of `samples` above it.

    MLPerf's early-stopping rule: the hypothesis "more than (100 - percentile)% of queries miss the
    objective" is rejected when seeing at most `over` misses in `samples` would be unlikely under it;
    the confidence is 1 - P(Binomial(samples, 1 - percentile/100) <= over). With no miss, 459 samples
    give 99% confidence in a p99 (299 give 95%).
    """
    if samples <= 0:
        return 0.0
    return float(1.0 - stats.binom.cdf(over, samples, 1.0 - percentile / 100.0))


def samples_for(confidence: float, percentile: float = 99.0) -> int:
    """The fewest samples whose early-stopping bound can reach `confidence` (no miss at all)."""
    return math.ceil(math.log(1.0 - confidence) / math.log(percentile / 100.0))


@dataclass
class TrialRecord(Record):
    """One trial's figures (latencies in ms from an HDR histogram; open-loop trials carry both views)."""

    scenario: str
    n_docs: int  # documents per request (the mean, for a list-size mix; see `sizes`)
    encoding: str
    duration_s: float
    requests: int
    failures: int  # errors: HTTP status, transport, timeouts, bodies that are not a ranking
    error_rate: float
    rps: float
    docs_per_s: float
    latency_ms: dict[str, float]  # p50 .. p99.9, max, mean, and `count`: the samples they rest on
    uncorrected_latency_ms: dict[str, float] | None = None
    late_sends: int | None = None
    cache_hit_ratio: float | None = None
    server_timings_ms: dict[str, float] = field(default_factory=dict)
    mode: str = "closed-loop"  # or "open-loop"
    users: int | None = None
    target_rate_per_s: float | None = None
    sizes: list[int] = field(default_factory=list)
    raw_path: str | None = None  # the generator's own result file
    extra: dict[str, Any] = field(default_factory=dict)
    # Honesty fields.
    generator: str = ""
    degraded: int = 0  # fallback answers (HTTP 200, degraded: true): failures, apart from errors
    good: int | None = None  # answers neither errors nor degraded, within slo_ms
    slo_ms: float | None = None
    goodput_per_s: float | None = None
    offered_rate_per_s: float | None = None  # open loop: scheduled arrivals / scheduled duration
    achieved_rate_per_s: float | None = None
    late_fraction: float | None = None
    generator_bound: bool = False  # open loop: more than 1% of sends left late by the generator's fault
    generator_cpu: dict[str, float] = field(default_factory=dict)
    latency_hdr: dict[str, Any] | None = None  # LatencyRecorder.to_dict(): rows merge trials exactly
    list_size: int | None = None
    trial: int = 0
    role: str = "load"  # or "probe": a trial at probe_users (1 connection) for the per-request cost

    @property
    def samples(self) -> int:
        return int(self.latency_ms.get("count", 0) or 0)

    @property
    def answered_ok(self) -> int:
        return self.requests - self.failures - self.degraded

    @property
    def over_slo(self) -> int:
        """Good-looking answers that missed the objective (needs `good`, i.e. a trial run with slo_ms)."""
        return self.answered_ok - (self.good if self.good is not None else self.answered_ok)

    @property
    def generator_cpu_bound(self) -> bool:
        """A closed-loop generator that used 90% or more of its core may have set the pace itself."""
        return float(self.generator_cpu.get("utilization", 0.0) or 0.0) >= GENERATOR_CPU_LIMIT

    def flags(self) -> list[str]:
        """What a reader must know before trusting this trial's figures."""
        out = []
        if self.generator_bound:
            out.append(GENERATOR_BOUND)
        if self.mode == "closed-loop" and self.generator_cpu_bound:
            out.append(f"generator CPU {self.generator_cpu['utilization']:.0%}")
        if self.degraded:
            out.append(f"{self.degraded} degraded")
        if self.failures:
            out.append(f"{self.failures} errors")
        return out


@dataclass
class SloStep(Record):
    """One rate an SLO search tried, and what it concluded there."""

    rate_per_s: float
    outcome: str  # "pass", "fail" or "generator-bound"
    why: str
    confidence: float  # that the true p99 met the objective (tail_confidence)
    trial: dict[str, Any]  # TrialRecord.to_dict()

    @property
    def trial_record(self) -> TrialRecord:
        return TrialRecord.from_dict(self.trial)


@dataclass
class SloResult(Record):
    """The highest Poisson arrival rate whose p99 met the objective, and how sure we are of it."""

    status: str
    reasons: list[str]
    slo_p99_ms: float
    max_rate_per_s: float | None  # the best passing step's nominal (asked) rate
    offered_rate_per_s: float | None  # what that step really scheduled (arrivals / scheduled duration)
    achieved_rate_per_s: float | None
    p99_ms: float | None
    samples: int | None  # the best step's latency samples
    confidence: float | None
    bracket: list[float | None]  # [highest passing rate, lowest rate that failed or outran the generator]
    tolerance: float
    profile: str
    min_queries: int
    min_duration_s: float
    confidence_target: float
    stopped_by: str
    steps: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0
    zipf_s: float | None = None
    list_size: int | None = None
    start_rate_per_s: float | None = None
    entry: str | None = None
    note: str | None = None

    def step_records(self) -> list[SloStep]:
        return [SloStep.from_dict(s) for s in self.steps]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SloResult:
        data = dict(data)
        if "steps" not in data or not isinstance(data["steps"], list):  # runs before records.py
            data["steps"] = [{"rate_per_s": t.get("rate_per_s"), "outcome": "pass" if t.get("meets_slo") else "fail",
                              "why": "", "confidence": 0.0, "trial": t} for t in data.get("trials", [])]
        if data.get("status") == "VALID":  # the old status said only "no error"
            data["status"] = LOWER_BOUND
        data.setdefault("offered_rate_per_s", None)
        data.setdefault("achieved_rate_per_s", data.get("achieved_rps"))
        data.setdefault("samples", None)
        data.setdefault("confidence", None)
        data.setdefault("bracket", [data.get("max_rate_per_s"), None])
        data.setdefault("tolerance", 0.0)
        data.setdefault("profile", "")
        data.setdefault("min_queries", 0)
        data.setdefault("min_duration_s", 0.0)
        data.setdefault("confidence_target", 0.0)
        data.setdefault("stopped_by", "")
        data.setdefault("reasons", [])
        data.setdefault("p99_ms", None)
        data.setdefault("max_rate_per_s", None)
        data.setdefault("slo_p99_ms", 0.0)
        return super().from_dict(data)


@dataclass
class EntryRecord(Record):
    """Everything measured on one sweep entry: its service, trials and SLO searches."""

    entry: str
    description: str = ""
    base: str | None = None
    group: str = "ladder"
    service: dict[str, Any] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)  # TrialRecord dicts
    slo: list[dict[str, Any]] = field(default_factory=list)  # SloResult dicts
    started_at: str | None = None
    finished_at: str | None = None
    startup_s: float | None = None
    exit_code: int | None = None
    command: list[str] = field(default_factory=list)
    cache_keys_cleared: int | None = None
    warmup_requests: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def trial_records(self) -> list[TrialRecord]:
        return [TrialRecord.from_dict(t) for t in self.trials]

    def slo_results(self) -> list[SloResult]:
        return [SloResult.from_dict(s) for s in self.slo]
