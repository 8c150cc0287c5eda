"""The LightGBM lambdarank reference: what a neural ranker must match to be worth serving.

Gradient-boosted trees are the strong, cheap baseline of learning to rank (MSLR leaderboards), so
every loss comparison prints them beside the neural rankers, trained on the same splits and scored
with the same `models.metrics.evaluate`. LightGBM is an optional extra (`pip install rankserve[gbdt]`).

    python models/gbdt.py --data synthetic
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

if __package__ in (None, ""):  # run as `python models/gbdt.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.data import LTRDataset, load_dataset  # noqa: E402
from models.metrics import evaluate  # noqa: E402

INSTALL_HINT = "lightgbm is not installed (pip install 'rankserve[gbdt]'): skipping the LightGBM reference"


@dataclass
class GBDTConfig:
    """Sensible lambdarank defaults (not tuned down): 500 trees at most, early stopping on vali."""

    n_estimators: int = 500
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_child_samples: int = 20
    subsample: float = 0.8
    subsample_freq: int = 1
    colsample_bytree: float = 0.8
    early_stopping_rounds: int = 50
    seed: int = 0
    n_jobs: int = 0  # 0: every usable core


@dataclass
class GBDTResult:
    config: GBDTConfig
    best_iteration: int
    train_seconds: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def lightgbm_available() -> bool:
    try:
        import lightgbm  # noqa: F401
    except ImportError:
        return False
    return True


def train_lightgbm(dataset: LTRDataset, config: GBDTConfig | None = None) -> GBDTResult | None:
    """Fit lambdarank on train, stop early on vali NDCG@10, evaluate every split. None without lightgbm."""
    try:
        import lightgbm as lgb
    except ImportError:
        print(INSTALL_HINT)
        return None
    config = config or GBDTConfig()
    params = {
        "objective": "lambdarank", "metric": "ndcg", "ndcg_eval_at": [10], "learning_rate": config.learning_rate,
        "num_leaves": config.num_leaves, "min_data_in_leaf": config.min_child_samples,
        "bagging_fraction": config.subsample, "bagging_freq": config.subsample_freq,
        "feature_fraction": config.colsample_bytree, "seed": config.seed,
        "num_threads": config.n_jobs or len(os.sched_getaffinity(0)), "verbose": -1,
    }
    train, vali = dataset.train, dataset.vali
    # The core API (not LGBMRanker) keeps one call shape across lightgbm 4.x (eval_set is deprecated in 4.7).
    train_set = lgb.Dataset(train.X, train.y.astype(np.int32), group=train.lengths)
    vali_set = lgb.Dataset(vali.X, vali.y.astype(np.int32), group=vali.lengths, reference=train_set)
    start = time.perf_counter()
    booster = lgb.train(params, train_set, num_boost_round=config.n_estimators, valid_sets=[vali_set],
                        callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False)])
    seconds = time.perf_counter() - start
    best = int(booster.best_iteration or config.n_estimators)
    metrics = {name: evaluate(split, booster.predict(split.X, num_iteration=best))
               for name, split in dataset.splits().items()}
    return GBDTResult(config, best, round(seconds, 2), metrics)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic", help="'synthetic' or a folder with train.txt [vali.txt] test.txt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-queries", type=int, default=None)
    parser.add_argument("--n-estimators", type=int, default=GBDTConfig.n_estimators)
    args = parser.parse_args(argv)
    if not lightgbm_available():
        print(INSTALL_HINT)
        return 0
    dataset = load_dataset(args.data, seed=args.seed, n_queries=args.n_queries)
    result = train_lightgbm(dataset, GBDTConfig(n_estimators=args.n_estimators, seed=args.seed))
    print(json.dumps(result.to_dict() if result else None, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
