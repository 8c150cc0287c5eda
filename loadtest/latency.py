"""Exact latency percentiles for a service that answers in a few milliseconds.

Locust rounds response times to whole milliseconds below 100 ms, which hides the difference between a
2.4 ms and a 2.6 ms p50. An HDR histogram with microsecond units keeps 3 significant digits over
1 us .. 10 min in a few tens of kB, merges exactly (worker histograms add up on the master), and encodes
to a short string for Locust's worker reports and for result files.
"""

from __future__ import annotations

import math
from typing import Any

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 600_000_000  # 10 minutes: anything slower is a failure, not a latency
SIGNIFICANT_DIGITS = 3
PERCENTILES = {"p50": 50.0, "p95": 95.0, "p99": 99.0, "p99.9": 99.9}


class LatencyRecorder:
    """Latencies in milliseconds, stored in an HDR histogram of microseconds.

    Percentiles follow HDR's rule: the value whose rank is round(p/100 * count), reported as the
    highest value equivalent to it at 3 significant digits. The mean and max are tracked exactly.
    """

    def __init__(self) -> None:
        self._hist = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        self._sum_ms = 0.0
        self._max_ms = 0.0

    def record(self, ms: float) -> None:
        """Record one latency in milliseconds (clamped to 1 us .. 10 min)."""
        if not math.isfinite(ms):
            raise ValueError(f"latency must be a finite number of milliseconds, got {ms!r}")
        us = min(max(int(round(ms * 1000.0)), LOWEST_US), HIGHEST_US)
        self._hist.record_value(us)
        self._sum_ms += ms
        self._max_ms = max(self._max_ms, ms)

    @property
    def count(self) -> int:
        return int(self._hist.get_total_count())

    def percentiles(self) -> dict[str, float]:
        """p50, p95, p99, p99.9, max and mean in milliseconds, and the count; zeros when empty."""
        count = self.count
        out: dict[str, float] = {}
        if count:
            values = self._hist.get_percentile_to_value_dict(list(PERCENTILES.values()))
            for name, p in PERCENTILES.items():  # HDR's bucket top may overshoot the exact max
                out[name] = min(values[p] / 1000.0, self._max_ms)
        else:
            out = {name: 0.0 for name in PERCENTILES}
        out["max"] = self._max_ms
        out["mean"] = self._sum_ms / count if count else 0.0
        out["count"] = count
        return out

    def value_at(self, percentile: float) -> float:
        """Latency (ms) at any percentile in [0, 100]."""
        return min(self._hist.get_value_at_percentile(percentile) / 1000.0, self._max_ms) if self.count else 0.0

    def merge(self, other: LatencyRecorder) -> None:
        """Add another recorder's samples to this one (e.g. a Locust worker's)."""
        self._hist.add(other._hist)
        self._sum_ms += other._sum_ms
        self._max_ms = max(self._max_ms, other._max_ms)

    def reset(self) -> None:
        self._hist.reset()
        self._sum_ms = 0.0
        self._max_ms = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON- and msgpack-safe form: the HDR histogram's standard base64 encoding plus exact sums."""
        return {"hdr": self._hist.encode().decode("ascii"), "sum_ms": self._sum_ms, "max_ms": self._max_ms}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyRecorder:
        rec = cls()
        if data.get("hdr"):
            rec._hist.decode_and_add(data["hdr"].encode("ascii"))
        rec._sum_ms = float(data.get("sum_ms", 0.0))
        rec._max_ms = float(data.get("max_ms", 0.0))
        return rec
