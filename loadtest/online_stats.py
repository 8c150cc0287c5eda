"""The statistics of an online comparison: A/B CTR difference, interleaving preference, and the queries
each method needs to detect the difference.

- A/B: each impression's clicks (on its result page) in arm a and arm b; the CTR is clicks per
  impression, and the difference's 95% interval is Welch's (scipy's t distribution).
- Interleaving: each impression is won by a, by b, or tied; b's win rate is its wins over the
  non-tied impressions, with a Wilson 95% interval, significant when the interval leaves 0.5.
- Queries needed: the smallest query count at which a method detects the difference (in the
  direction the whole log shows) in at least 80% of experiments, estimated by resampling the
  logged impressions (a bootstrap power curve over a geometric grid of counts). For A/B the count
  is both arms together. Capped at `max_factor` times the logged count (1: no extrapolation past
  what was observed): beyond that, "more than".

scipy.stats gives the t and normal quantiles; the rest is arithmetic on arrays.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
POWER = 0.8


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    n: int

    @property
    def significant(self) -> bool:
        """The interval leaves the null value (0 for a difference, 0.5 for a win rate)."""
        return self.low > self.null or self.high < self.null

    null: float = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "significant": self.significant}


def ctr_difference(clicks_a: np.ndarray, clicks_b: np.ndarray, alpha: float = ALPHA) -> Interval:
    """CTR(b) - CTR(a), clicks per impression, with Welch's interval."""
    a, b = np.asarray(clicks_a, dtype=float), np.asarray(clicks_b, dtype=float)
    if a.size < 2 or b.size < 2:
        return Interval(float("nan"), float("nan"), float("nan"), int(a.size + b.size))
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    diff, se = b.mean() - a.mean(), math.sqrt(va + vb)
    if se == 0:
        return Interval(float(diff), float(diff), float(diff), int(a.size + b.size))
    dof = (va + vb) ** 2 / ((va**2 / (a.size - 1) if va else 0) + (vb**2 / (b.size - 1) if vb else 0))
    half = float(stats.t.ppf(1 - alpha / 2, dof)) * se
    return Interval(float(diff), float(diff - half), float(diff + half), int(a.size + b.size))


def win_rate(wins_a: int, wins_b: int, alpha: float = ALPHA) -> Interval:
    """b's share of the non-tied impressions, with the Wilson score interval."""
    n = wins_a + wins_b
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, null=0.5)
    p, z = wins_b / n, float(stats.norm.ppf(1 - alpha / 2))
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, center - half, center + half, n, null=0.5)


def outcomes_win_rate(outcomes: np.ndarray, alpha: float = ALPHA) -> Interval:
    """`outcomes`: +1 b won, -1 a won, 0 tie (one per interleaved impression)."""
    o = np.asarray(outcomes)
    return win_rate(int((o < 0).sum()), int((o > 0).sum()), alpha)


def grid(start: int, stop: int, per_doubling: int = 4) -> list[int]:
    """Query counts from start to stop, geometric (per_doubling steps per doubling)."""
    points = np.unique(np.round(start * 2 ** (np.arange(0, 64) / per_doubling)).astype(int))
    return [int(p) for p in points if p <= stop] or [stop]


def queries_needed(test: Callable[[np.random.Generator, int], bool], logged: int, *, max_factor: float = 1.0,
                   resamples: int = 200, power: float = POWER, seed: int = 0) -> tuple[int | None, int]:
    """(the smallest count in the grid at which `test(rng, n)` is true in `power` of `resamples`
    draws, or None if none up to max_factor * logged; that cap). `test` draws n queries and says
    whether they detect the difference in the logged direction."""
    rng = np.random.default_rng(seed)
    cap = int(max_factor * logged)
    for n in grid(16, cap):
        hits = sum(test(rng, n) for _ in range(resamples))
        if hits >= power * resamples:
            return n, cap
    return None, cap


def ab_test(clicks_a: np.ndarray, clicks_b: np.ndarray, direction: float) -> Callable[[np.random.Generator, int], bool]:
    """A resampled A/B experiment of n queries (n/2 per arm): significant in `direction`'s sign."""
    def test(rng: np.random.Generator, n: int) -> bool:
        half = max(2, n // 2)
        interval = ctr_difference(rng.choice(clicks_a, half), rng.choice(clicks_b, half))
        return interval.significant and np.sign(interval.estimate) == direction
    return test


def interleaving_test(outcomes: np.ndarray, direction: float) -> Callable[[np.random.Generator, int], bool]:
    """A resampled interleaving experiment of n queries: significant in `direction`'s sign."""
    def test(rng: np.random.Generator, n: int) -> bool:
        interval = outcomes_win_rate(rng.choice(outcomes, n))
        return interval.significant and np.sign(interval.estimate - 0.5) == direction
    return test
