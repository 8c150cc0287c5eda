"""What one load generator saw: one recorder class for the open-loop generator and for Locust.

Both generators classify every answer the same way (`classify_answer`): an error (HTTP status,
transport, a body that is not a ranking, a wrong number of results), a *degraded* answer (HTTP 200
with `degraded: true`: the service's fallback, every score null) or a good one. A degraded answer is
not a success: a broken model answers fast and without errors, so counting it as one would call a
broken service fast. Degraded answers are counted apart from errors; both are failures for the SLO,
and neither enters the latency histograms. Goodput is the rate of good answers within the objective
(`slo_ms`), beside throughput. The recorder merges exactly (HDR histograms add up), so Locust's
workers and the open-loop generator's processes report to one summary.
"""

from __future__ import annotations

import math
import resource
import time
from typing import Any

import orjson

from loadtest.latency import LatencyRecorder
from serve.metrics import STAGES

TIMING_KEYS = STAGES  # the server's timings_ms stages
DEGRADED = "degraded answer"


def classify_answer(status: int, body: bytes, n_docs: int) -> tuple[str | None, dict[str, Any] | None]:
    """(None, answer) for a good answer, (DEGRADED, answer) for a fallback, (reason, None) for an error."""
    if status != 200:
        return f"HTTP {status}", None
    try:
        data = orjson.loads(body)
        results = data["results"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "response is not a ranking", None
    if not isinstance(results, list) or len(results) != n_docs:
        return "wrong number of results", None
    if data.get("degraded"):
        return DEGRADED, data
    return None, data


class CpuClock:
    """The process's own CPU seconds over a wall-clock window: is the generator near its core's limit?"""

    def __init__(self) -> None:
        self.start()

    @staticmethod
    def _now() -> tuple[float, float]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime, time.monotonic()

    def start(self) -> None:
        self._start, self._stop = self._now(), None

    def stop(self) -> None:
        """End the window: later reads give the same figures."""
        if self._stop is None:
            self._stop = self._now()

    def read(self) -> dict[str, float]:
        """cpu_s, wall_s and utilization (cpu_s / wall_s: a fraction of one core) over the window."""
        (cpu0, wall0), (cpu1, wall1) = self._start, self._stop or self._now()
        cpu, wall = cpu1 - cpu0, wall1 - wall0
        return {"cpu_s": cpu, "wall_s": wall, "utilization": cpu / wall if wall > 0 else 0.0, "processes": 1}


def merge_cpu(figures: list[dict[str, float]]) -> dict[str, float]:
    """Several generator processes: CPU seconds add up; the busiest process's utilization counts."""
    if not figures:
        return {"cpu_s": 0.0, "wall_s": 0.0, "utilization": 0.0, "processes": 0}
    return {
        "cpu_s": sum(f["cpu_s"] for f in figures),
        "wall_s": max(f["wall_s"] for f in figures),
        "utilization": max(f["utilization"] for f in figures),
        "processes": int(sum(f.get("processes", 1) for f in figures)),
    }


OUTCOME_KEYS = ("requests", "failures", "degraded", "good")  # per request name (list size)


class AnswerRecorder:
    """Counts, latencies and server timings of one generator process; merges with its peers.

    `latency` is measured from the request's scheduled send time in an open loop (corrected for
    coordinated omission) and from its send time in a closed loop; `uncorrected` (open loop only) from
    the actual send time. A request `name` (Locust's, e.g. "/rank [100 docs]") adds a breakdown.
    """

    def __init__(self, slo_ms: float | None = None, *, open_loop: bool = False) -> None:
        self.slo_ms = slo_ms
        self.open_loop = open_loop
        self.reset()

    def reset(self) -> None:
        self.latency = LatencyRecorder()
        self.uncorrected = LatencyRecorder() if self.open_loop else None
        self.requests = self.failures = self.degraded = self.good = self.cache_hits = self.docs = 0
        self.errors: dict[str, int] = {}
        self.server_sum = dict.fromkeys(TIMING_KEYS, 0.0)
        self.server_n = dict.fromkeys(TIMING_KEYS, 0)
        self.by_name: dict[str, LatencyRecorder] = {}  # good-looking answers only, like `latency`
        self.outcomes_by_name: dict[str, list[int]] = {}  # name -> OUTCOME_KEYS counts

    # -- recording -------------------------------------------------------------------------------
    def answer(self, status: int, body: bytes, n_docs: int, latency_ms: float,
               uncorrected_ms: float | None = None, name: str | None = None) -> str | None:
        """Classify and record one HTTP answer; returns why it failed (None when it was good)."""
        reason, data = classify_answer(status, body, n_docs)
        self.record(reason, latency_ms, n_docs, data, uncorrected_ms, name)
        return reason

    def error(self, reason: str, name: str | None = None) -> None:
        """A request that got no usable answer (HTTP status, transport, timeout, not a ranking)."""
        self.record(reason, 0.0, 0, None, None, name)

    def record(self, outcome: str | None, latency_ms: float, n_docs: int, data: dict[str, Any] | None,
               uncorrected_ms: float | None = None, name: str | None = None) -> None:
        """One request: `outcome` None (an answer), DEGRADED, or an error's reason."""
        self.requests += 1
        counts = self.outcomes_by_name.setdefault(name, [0] * len(OUTCOME_KEYS)) if name else None
        if counts:
            counts[0] += 1
        if outcome is not None and outcome != DEGRADED:
            self.failures += 1
            self.errors[outcome] = self.errors.get(outcome, 0) + 1
            if counts:
                counts[1] += 1
            return
        if outcome == DEGRADED:
            self.degraded += 1
            if counts:
                counts[2] += 1
            return
        self.latency.record(latency_ms)
        if name:
            self.by_name.setdefault(name, LatencyRecorder()).record(latency_ms)
        if self.uncorrected is not None and uncorrected_ms is not None:
            self.uncorrected.record(uncorrected_ms)
        self.docs += n_docs
        if self.slo_ms is None or latency_ms <= self.slo_ms:
            self.good += 1
            if counts:
                counts[3] += 1
        if data:
            self.cache_hits += bool(data.get("cached"))
            timings = data.get("timings_ms")
            if isinstance(timings, dict):
                for key, value in timings.items():
                    if key in self.server_sum and isinstance(value, int | float) and math.isfinite(value):
                        self.server_sum[key] += float(value)
                        self.server_n[key] += 1

    # -- merging (Locust workers, generator processes) --------------------------------------------
    def to_wire(self) -> dict[str, Any]:
        """A msgpack- and pickle-safe form; `merge_wire` adds it to another recorder."""
        return {
            "slo_ms": self.slo_ms,
            "counts": [self.requests, self.failures, self.degraded, self.good, self.cache_hits, self.docs],
            "errors": self.errors,
            "server": [self.server_sum, self.server_n],
            "latency": self.latency.to_dict(),
            "uncorrected": self.uncorrected.to_dict() if self.uncorrected is not None else None,
            "by_name": {k: v.to_dict() for k, v in self.by_name.items()},
            "outcomes_by_name": self.outcomes_by_name,
        }

    def merge_wire(self, data: dict[str, Any]) -> None:
        r, f, d, g, c, n = data["counts"]
        self.requests += r
        self.failures += f
        self.degraded += d
        self.good += g
        self.cache_hits += c
        self.docs += n
        for reason, count in data["errors"].items():
            self.errors[reason] = self.errors.get(reason, 0) + count
        sums, ns = data["server"]
        for key in TIMING_KEYS:
            self.server_sum[key] += sums.get(key, 0.0)
            self.server_n[key] += ns.get(key, 0)
        self.latency.merge(LatencyRecorder.from_dict(data["latency"]))
        if data.get("uncorrected"):
            if self.uncorrected is None:
                self.uncorrected = LatencyRecorder()
            self.uncorrected.merge(LatencyRecorder.from_dict(data["uncorrected"]))
        for name, hist in data.get("by_name", {}).items():
            self.by_name.setdefault(name, LatencyRecorder()).merge(LatencyRecorder.from_dict(hist))
        for name, counts in data.get("outcomes_by_name", {}).items():
            mine = self.outcomes_by_name.setdefault(name, [0] * len(OUTCOME_KEYS))
            for i, count in enumerate(counts):
                mine[i] += count

    # -- the summary every trial file carries -----------------------------------------------------
    @property
    def answered_ok(self) -> int:
        """Answers that were neither errors nor degraded."""
        return self.requests - self.failures - self.degraded

    def summary(self, duration_s: float) -> dict[str, Any]:
        ok, n = self.answered_ok, self.requests
        out: dict[str, Any] = {
            "requests": n,
            "failures": self.failures,  # errors only: HTTP status, transport, not a ranking, wrong count
            "degraded": self.degraded,
            "errors": dict(self.errors),
            "error_rate": self.failures / n if n else 0.0,
            "degraded_rate": self.degraded / n if n else 0.0,
            "duration_s": duration_s,
            "rps": n / duration_s if duration_s > 0 else 0.0,
            "slo_ms": self.slo_ms,
            "good": self.good,
            "goodput_per_s": self.good / duration_s if duration_s > 0 else 0.0,
            "docs": self.docs,
            "docs_per_s": self.docs / duration_s if duration_s > 0 else 0.0,
            "latency_ms": self.latency.percentiles(),
            "latency_hdr": self.latency.to_dict(),
            "cache_hits": self.cache_hits,
            "cache_hit_ratio": self.cache_hits / ok if ok else 0.0,
            "server_timings_ms": {k: self.server_sum[k] / self.server_n[k] for k in TIMING_KEYS if self.server_n[k]},
        }
        if self.uncorrected is not None:
            out["uncorrected_latency_ms"] = self.uncorrected.percentiles()
        if self.outcomes_by_name:
            out["latency_by_name_ms"] = {k: v.percentiles() for k, v in sorted(self.by_name.items())}
            out["outcomes_by_name"] = {k: dict(zip(OUTCOME_KEYS, v, strict=True))
                                       for k, v in sorted(self.outcomes_by_name.items())}
        return out


# Outcome codes of AnswerTimeline rows.
OK, DEGRADED_ANSWER, REJECTED, ERROR, UNANSWERED = 0, 1, 2, 3, -1
OUTCOME_NAMES = {OK: "ok", DEGRADED_ANSWER: "degraded", REJECTED: "rejected", ERROR: "error", UNANSWERED: "unanswered"}


class AnswerTimeline:
    """One row per scheduled arrival: what a fault suite needs to see figures change over time.

    The recorder's histograms say how a whole trial went; a fault is a moment, so loadtest/faults.py
    needs each answer's time: the arrival's scheduled offset (seconds from the schedule's start), its
    latency from that time (the corrected latency, also for errors and rejections), the HTTP status
    (0: no answer), the outcome (OK, DEGRADED_ANSWER, REJECTED for a 503, ERROR) and the `cached`
    flag. Optional (`OpenLoopConfig.timeline`): about 20 bytes an arrival, which sweeps never pay.
    """

    def __init__(self, scheduled_s: Any) -> None:
        import numpy as np

        n = len(scheduled_s)
        self.scheduled_s = np.asarray(scheduled_s, dtype=np.float64)
        self.latency_ms = np.full(n, np.nan, dtype=np.float32)
        self.status = np.zeros(n, dtype=np.int16)
        self.outcome = np.full(n, UNANSWERED, dtype=np.int8)
        self.cached = np.zeros(n, dtype=np.bool_)

    def record(self, index: int, status: int, reason: str | None, latency_ms: float, cached: bool = False) -> None:
        """Arrival `index` got `status` (0: none) and was classified `reason` (classify_answer's)."""
        self.latency_ms[index] = latency_ms
        self.status[index] = status
        if reason is None:
            self.outcome[index] = OK
        elif reason == DEGRADED:
            self.outcome[index] = DEGRADED_ANSWER
        elif status == 503:
            self.outcome[index] = REJECTED
        else:
            self.outcome[index] = ERROR
        self.cached[index] = cached

    def to_arrays(self, offset_s: float = 0.0) -> dict[str, Any]:
        """Columns as numpy arrays; `offset_s` is added to the scheduled offsets (another share's clock)."""
        return {"scheduled_s": self.scheduled_s + offset_s, "latency_ms": self.latency_ms, "status": self.status,
                "outcome": self.outcome, "cached": self.cached}

    @staticmethod
    def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
        """Several shares' columns as one table, in scheduled order."""
        import numpy as np

        if not parts:
            return {}
        merged = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        order = np.argsort(merged["scheduled_s"], kind="stable")
        return {key: column[order] for key, column in merged.items()}
