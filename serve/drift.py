"""Feature drift: a sample of the features the service scores, compared with the training distribution.

Why: a ranker's inputs move (a logging change, a new upstream feature version, a shift in traffic)
long before its offline metrics are recomputed; the service is the one place that sees them all.
It keeps a bounded sample of the rows it scores and compares each feature with the training split:

- PSI, the population stability index: sum over the reference's decile bins of
  (p_now - p_ref) * ln(p_now / p_ref), with both shares floored at 1e-4. The usual reading:
  below 0.1 stable, 0.1-0.25 a moderate shift, above 0.25 a large one.
- KS: the two-sample Kolmogorov-Smirnov statistic (scipy.stats.ks_2samp) against a stored sample
  of the reference.
- out of range: the share of sampled values outside the training minimum and maximum.

A feature is flagged when its PSI passes `psi_threshold` or its KS statistic `ks_threshold`, once
the window holds at least `min_rows` rows. The sample is a ring buffer of `window` rows (136 float32
features: 0.5 MB at 1,000 rows); each scored list adds `rows_per_list` random rows (default one:
the documents of one list share their query-level features, so a second row of the same list would
count one query's value twice) with probability `sample_rate`, so the request path pays one random
draw and a copy of a row. The statistics are
computed off the request path, in a thread, by `DriftMonitor.report()` (`GET /drift` and the
Prometheus gauges it refreshes).

    reference = DriftReference.from_rows(train.X)           # or DriftReference.load(path)
    reference.save("artifacts/drift/synthetic.npz")          # python serve/drift.py reference
    monitor = DriftMonitor(reference, DriftSettings(sample_rate=0.2))
    monitor.observe(features)                                # per scored list, cheap
    monitor.report()                                         # {"features": [...], "flagged": [...]}
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python serve/drift.py` puts serve/ first on sys.path; drop it so `import serve` is our package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import argparse  # noqa: E402
import threading  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from scipy import stats  # noqa: E402

PSI_FLOOR = 1e-4
REFERENCE_SAMPLE = 4000  # rows of the training split kept for KS
DEFAULT_REFERENCE = Path("artifacts") / "drift" / "synthetic.npz"


class DriftSettings(BaseModel):
    """The monitor's settings (ServiceConfig.drift)."""

    model_config = ConfigDict(extra="forbid")

    reference: str = Field(str(DEFAULT_REFERENCE), description="the training distribution (python serve/drift.py "
                                                                "reference writes it)")
    sample_rate: float = Field(0.1, gt=0, le=1, description="share of scored lists that add rows to the sample")
    rows_per_list: int = Field(1, ge=1, le=64, description="random rows a sampled list adds (a query-level "
                                                            "feature has one value per list: more rows of one list "
                                                            "add no information about it)")
    window: int = Field(2000, ge=100, le=100_000, description="rows kept (a ring buffer): the bound on memory")
    min_rows: int = Field(500, ge=10, description="no feature is flagged before the window holds this many rows")
    psi_threshold: float = Field(0.2, gt=0, description="flag a feature whose PSI passes this")
    ks_threshold: float = Field(0.15, gt=0, le=1, description="flag a feature whose KS statistic passes this")


@dataclass
class DriftReference:
    """Per feature: decile bin edges of the training split, its share per bin, min and max, and a
    sample of rows for KS."""

    edges: list[np.ndarray]  # per feature: inner bin edges (unique; a constant feature has none)
    shares: list[np.ndarray]  # per feature: the training share of each bin (len(edges) + 1)
    low: np.ndarray
    high: np.ndarray
    sample: np.ndarray  # [rows, features] float32

    @property
    def n_features(self) -> int:
        return len(self.edges)

    @classmethod
    def from_rows(cls, X: np.ndarray, bins: int = 10, seed: int = 0) -> DriftReference:
        X = np.asarray(X, dtype=np.float32)
        qs = np.linspace(0, 1, bins + 1)[1:-1]
        edges = [np.unique(np.quantile(X[:, j], qs)) for j in range(X.shape[1])]
        shares = [histogram_shares(X[:, j], e) for j, e in enumerate(edges)]
        rng = np.random.default_rng(seed)
        sample = X[rng.choice(len(X), min(REFERENCE_SAMPLE, len(X)), replace=False)]
        return cls(edges, shares, X.min(axis=0), X.max(axis=0), sample)

    def save(self, path: Path | str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, low=self.low, high=self.high, sample=self.sample,
                            edge_counts=np.array([len(e) for e in self.edges]),
                            edges=np.concatenate(self.edges) if self.edges else np.zeros(0),
                            shares=np.concatenate(self.shares) if self.shares else np.zeros(0))
        return path

    @classmethod
    def load(cls, path: Path | str) -> DriftReference:
        with np.load(path) as f:
            counts = f["edge_counts"]
            cuts = np.cumsum(counts)[:-1]
            edges = np.split(f["edges"], cuts)
            shares = np.split(f["shares"], np.cumsum(counts + 1)[:-1])
            return cls(list(edges), list(shares), f["low"], f["high"], f["sample"])


def histogram_shares(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The share of `values` in each bin cut at `edges` (a value equal to an edge goes right)."""
    counts = np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)
    return counts / max(len(values), 1)


def psi(expected: np.ndarray, actual: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """Population stability index of `actual` bin shares against `expected` ones."""
    e, a = np.maximum(expected, floor), np.maximum(actual, floor)
    return float(np.sum((a - e) * np.log(a / e)))


class DriftMonitor:
    """The sample of scored rows and the comparison with the reference. Thread-safe: `observe` is
    called on the event loop, `report` in a worker thread."""

    def __init__(self, reference: DriftReference, settings: DriftSettings, seed: int = 0) -> None:
        self.reference, self.settings = reference, settings
        self.rows = np.zeros((settings.window, reference.n_features), dtype=np.float32)
        self.filled = 0
        self.next = 0
        self.seen = 0  # rows ever sampled
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def observe(self, features: np.ndarray) -> None:
        """Maybe sample a few rows of one scored list (`features`: [docs, n_features])."""
        if features.shape[1] != self.reference.n_features or self._rng.random() >= self.settings.sample_rate:
            return
        take = features[self._rng.integers(0, len(features), min(self.settings.rows_per_list, len(features)))]
        with self._lock:
            for row in take:
                self.rows[self.next] = row
                self.next = (self.next + 1) % self.settings.window
            self.filled = min(self.filled + len(take), self.settings.window)
            self.seen += len(take)

    def report(self) -> dict[str, Any]:
        """Per feature: PSI, KS statistic, share out of the training range, flagged; and the flagged
        features' indices. Blocking: about 10-20 ms for 136 features and 2,000 rows."""
        with self._lock:
            window = self.rows[: self.filled].copy()
            seen = self.seen
        ref = self.reference
        features = []
        for j in range(ref.n_features):
            values = window[:, j]
            if len(values):
                p = psi(ref.shares[j], histogram_shares(values, ref.edges[j]))
                ks = float(stats.ks_2samp(values, ref.sample[:, j]).statistic)
                out = float(np.mean((values < ref.low[j]) | (values > ref.high[j])))
            else:
                p = ks = out = 0.0
            flagged = len(values) >= self.settings.min_rows and (
                p > self.settings.psi_threshold or ks > self.settings.ks_threshold)
            features.append({"feature": j, "psi": p, "ks": ks, "out_of_range": out, "flagged": flagged})
        return {"rows": len(window), "rows_seen": seen, "window": self.settings.window,
                "settings": self.settings.model_dump(), "features": features,
                "flagged": [f["feature"] for f in features if f["flagged"]]}


def drift_arg(text: str) -> DriftSettings:
    """`--drift on` (the defaults) or `--drift sample_rate=0.2,window=4000`: DriftSettings' fields."""
    from pydantic import ValidationError

    try:
        pairs = dict(item.split("=", 1) for item in text.split(",") if item and item != "on")
        return DriftSettings(**pairs)
    except (ValueError, ValidationError) as exc:
        raise argparse.ArgumentTypeError(f"--drift {text!r}: {exc}") from None


def drift_flag(settings: DriftSettings) -> str:
    """The `--drift` value that gives `settings` back (loadtest/services.py writes it)."""
    return ",".join(f"{k}={v}" for k, v in settings.model_dump(exclude_defaults=True).items()) or "on"


def load_monitor(settings: DriftSettings) -> DriftMonitor:
    """The monitor of a server started with `settings`; ValueError naming the field when the
    reference file is missing."""
    path = Path(settings.reference)
    if not path.is_absolute():
        from models.paths import REPO_ROOT

        path = REPO_ROOT / path
    if not path.exists():
        raise ValueError(f"drift.reference: {path} does not exist (python serve/drift.py reference writes it)")
    return DriftMonitor(DriftReference.load(path), settings)


def main(argv: list[str] | None = None) -> int:
    """`python serve/drift.py reference [--data synthetic] [--out artifacts/drift/synthetic.npz]`:
    the training split's distribution, which the service's drift monitor compares with."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.data import load_dataset
    from models.paths import REPO_ROOT

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("command", choices=["reference"])
    p.add_argument("--data", default="synthetic")
    p.add_argument("--out", type=Path, default=REPO_ROOT / DEFAULT_REFERENCE)
    args = p.parse_args(argv)
    train = load_dataset(args.data).train
    path = DriftReference.from_rows(train.X).save(args.out)
    print(f"wrote {path} ({train.n_docs} training rows, {train.X.shape[1]} features)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
