"""Figures from a per-arrival timeline (loadtest/recorder.AnswerTimeline): phases and recovery.

Pure logic, so it is unit-tested without a service. Every window is over *scheduled* offsets (the
arrival's place in the open-loop schedule): a request that arrived during an outage belongs to the
outage even if it was answered after it, and its latency counts from its scheduled time.

Definitions (docs/reliability.md uses the same words):
- **failed**: not an ok answer: an error (HTTP status other than 503, transport, timeout), a
  degraded answer (HTTP 200, `degraded: true`) or a rejection (HTTP 503). Counted apart.
- **p50 / p99** of a phase: the nearest-rank percentiles of the latencies of its *ok* answers;
  rejections have their own p99 (`rejected_p99_ms`). `n_ok` is the number of samples behind them.
- **recovery time**: from the fault's end (Redis restarted and answering PING, SIGCONT sent, the
  replica killed, the swap answered, the overload's last arrival) to the start of the first
  *healthy stretch*: windows of `window_s`, sliding by `step_s`, each healthy, for `hold_s` more
  seconds of starts (one lucky quiet window amid failures is not a recovery). A window is healthy when
  it holds at least `min_samples` arrivals, its failed fraction is at most `failed_factor` x the
  'before' phase's (0 failed when none failed before), and its ok answers' p99 is at most
  max(`p99_factor` x the 'before' p99, 'before' p99 + `p99_slack_ms`). 0 when the stretch starts at
  the fault's end; None when none does before the run ends.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.recorder import DEGRADED_ANSWER, ERROR, OK, REJECTED, UNANSWERED

COLUMNS = ("scheduled_s", "latency_ms", "status", "outcome", "cached")


def nearest_rank(values: np.ndarray, percentile: float) -> float | None:
    """The nearest-rank percentile (the smallest value with at least p% of values at or below it)."""
    if len(values) == 0:
        return None
    return float(np.percentile(values, percentile, method="inverted_cdf"))


@dataclass
class Timeline:
    """One row per arrival, in scheduled order; offsets in seconds from the schedule's start."""

    scheduled_s: np.ndarray
    latency_ms: np.ndarray
    status: np.ndarray
    outcome: np.ndarray
    cached: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any], offset_s: float = 0.0) -> Timeline:
        return cls(np.asarray(arrays["scheduled_s"], dtype=np.float64) + offset_s,
                   *(np.asarray(arrays[c]) for c in COLUMNS[1:]))

    @classmethod
    def load(cls, path: Path | str, start_monotonic: float | None = None) -> Timeline:
        """Read a `loadtest/openloop.py --timeline` file; with `start_monotonic`, offsets are moved to
        that clock's zero (another generator's file lines up with the main one)."""
        with np.load(path) as data:
            arrays = {c: data[c] for c in COLUMNS}
            own_start = float(data["start_monotonic"])
        return cls.from_arrays(arrays, 0.0 if start_monotonic is None else own_start - start_monotonic)

    @classmethod
    def concat(cls, parts: list[Timeline]) -> Timeline:
        merged = {c: np.concatenate([getattr(p, c) for p in parts]) for c in COLUMNS}
        order = np.argsort(merged["scheduled_s"], kind="stable")
        return cls(*(merged[c][order] for c in COLUMNS))

    def __len__(self) -> int:
        return len(self.scheduled_s)

    def between(self, start: float, end: float) -> Timeline:
        """The arrivals scheduled in [start, end)."""
        lo, hi = np.searchsorted(self.scheduled_s, [start, end], side="left")
        return Timeline(*(getattr(self, c)[lo:hi] for c in COLUMNS))

    @property
    def failed(self) -> np.ndarray:
        return self.outcome != OK


@dataclass
class PhaseStats:
    """What one phase (before, during, after) of a scenario saw."""

    start_s: float
    end_s: float
    requests: int
    ok: int
    errors: int
    degraded: int
    rejected: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None  # of every answer, whatever its outcome (a hang shows here)
    rejected_p99_ms: float | None
    cache_hits: int

    @property
    def failed(self) -> int:
        return self.errors + self.degraded + self.rejected

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


def phase_stats(timeline: Timeline, start: float, end: float) -> PhaseStats:
    part = timeline.between(start, end)
    ok = part.outcome == OK
    answered = np.isfinite(part.latency_ms)
    rejected = part.outcome == REJECTED
    return PhaseStats(
        start_s=start, end_s=end, requests=len(part), ok=int(ok.sum()),
        errors=int(np.isin(part.outcome, (ERROR, UNANSWERED)).sum()),
        degraded=int((part.outcome == DEGRADED_ANSWER).sum()), rejected=int(rejected.sum()),
        p50_ms=nearest_rank(part.latency_ms[ok], 50), p99_ms=nearest_rank(part.latency_ms[ok], 99),
        max_ms=float(part.latency_ms[answered].max()) if answered.any() else None,
        rejected_p99_ms=nearest_rank(part.latency_ms[rejected], 99),
        cache_hits=int((part.cached & ok).sum()),
    )


def recovery_time(timeline: Timeline, fault_end_s: float, before: PhaseStats | None, *, window_s: float,
                  step_s: float, p99_factor: float, p99_slack_ms: float, min_samples: int, hold_s: float = 0.0,
                  failed_factor: float = 2.0) -> float | None:
    """Seconds from the fault's end to the first healthy stretch (see the module's docstring)."""
    if before is None or before.p99_ms is None or len(timeline) == 0:
        return None
    limit = max(p99_factor * before.p99_ms, before.p99_ms + p99_slack_ms)
    allowed = failed_factor * before.failed / before.requests if before.requests else 0.0
    sched = timeline.scheduled_s
    failed_before = np.concatenate([[0], np.cumsum(timeline.failed)])
    starts = np.arange(fault_end_s, sched[-1] - window_s + 1e-9, step_s)
    healthy = np.zeros(len(starts), dtype=bool)
    for i, t in enumerate(starts):
        lo, hi = np.searchsorted(sched, [t, t + window_s], side="left")
        failed = failed_before[hi] - failed_before[lo]
        if hi - lo < min_samples or failed > allowed * (hi - lo):
            continue
        ok = timeline.latency_ms[lo:hi][timeline.outcome[lo:hi] == OK]
        p99 = nearest_rank(ok, 99)
        healthy[i] = p99 is not None and p99 <= limit
    hold = int(round(hold_s / step_s))
    for i in np.flatnonzero(healthy):
        if healthy[i: i + hold + 1].all():  # the last windows of the run hold for what is left
            return float(starts[i] - fault_end_s)
    return None


def first_cache_hit_after(timeline: Timeline, after_s: float) -> float | None:
    """Seconds from `after_s` to the first ok answer served from the cache scheduled at or after it."""
    part = timeline.between(after_s, np.inf)
    hits = np.flatnonzero(part.cached & (part.outcome == OK))
    return float(part.scheduled_s[hits[0]] - after_s) if len(hits) else None


def per_second(timeline: Timeline) -> list[dict[str, Any]]:
    """Arrivals, failures, ok p99 and cache hits per second of the schedule: a trace for the report."""
    rows = []
    if len(timeline) == 0:
        return rows
    for second in range(int(np.floor(timeline.scheduled_s[-1])) + 1):
        stats = phase_stats(timeline, second, second + 1)
        rows.append({"t_s": second, "requests": stats.requests, "failed": stats.failed, "p99_ms": stats.p99_ms,
                     "cache_hits": stats.cache_hits})
    return rows
