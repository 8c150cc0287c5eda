"""Pairwise vs listwise, with data: every loss on both rankers beside the LightGBM reference.

    python models/compare_losses.py            # `make losses`; writes results/ltr_losses.md and .csv

Each neural ranker trains on the same splits under the same wall-time bound (`--seconds-mlp`,
`--seconds-attention`), stops early on validation NDCG@10, and is scored on test with
`models.metrics.evaluate`, like LightGBM. The table says which loss to make the default
(`models.train.DEFAULT_LOSS`) and whether a neural ranker is worth serving instead of trees.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as `python models/compare_losses.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pandas as pd  # noqa: E402

from models.data import load_dataset  # noqa: E402
from models.environment import collect_environment, environment_markdown  # noqa: E402
from models.gbdt import GBDTConfig, train_lightgbm  # noqa: E402
from models.losses import LOSSES  # noqa: E402
from models.paths import RESULTS  # noqa: E402
from models.train import TrainArgs, train, usable_cores  # noqa: E402

METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "mrr", "map")


def run(args: argparse.Namespace) -> pd.DataFrame:
    dataset = load_dataset(args.data, seed=args.seed, n_queries=args.n_queries)
    rows = []
    gbdt = train_lightgbm(dataset, GBDTConfig(seed=args.seed)) if not args.skip_gbdt else None
    if gbdt is not None:
        rows.append({"model": "lightgbm", "loss": "lambdarank", "family": "pairwise (trees)",
                     **gbdt.metrics["test"], "vali_ndcg@10": gbdt.metrics["vali"]["ndcg@10"],
                     "train_seconds": gbdt.train_seconds, "params": None,
                     "notes": f"{gbdt.best_iteration} trees"})
        print(f"lightgbm: test ndcg@10 {gbdt.metrics['test']['ndcg@10']:.4f} in {gbdt.train_seconds:.0f} s", flush=True)
    for arch in args.archs:
        for loss in args.losses:
            seconds = args.seconds_mlp if arch == "mlp" else args.seconds_attention
            result = train(TrainArgs(data=args.data, arch=arch, loss=loss, seed=args.seed, n_queries=args.n_queries,
                                     max_seconds=seconds, save=False, quiet=True, eval_train=False), dataset=dataset)
            card = result.card
            rows.append({"model": arch, "loss": loss, "family": LOSSES[loss].family, **card["metrics"]["test"],
                         "vali_ndcg@10": card["metrics"]["vali"]["ndcg@10"], "train_seconds": card["train_seconds"],
                         "params": card["params"],
                         "notes": f"{card['training']['epochs_run']} epochs, best {card['training']['best_epoch']}, "
                                  f"stopped by {card['training']['stopped']}"})
            print(f"{arch}-{loss}: test ndcg@10 {card['metrics']['test']['ndcg@10']:.4f} "
                  f"in {card['train_seconds']:.0f} s", flush=True)
    frame = pd.DataFrame(rows)
    frame.attrs["dataset"] = dataset.describe()
    return frame


def write_report(frame: pd.DataFrame, out_dir: Path, args: argparse.Namespace) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "ltr_losses.csv", index=False, float_format="%.4f")
    data = frame.attrs["dataset"]
    neural = frame[frame["model"] != "lightgbm"]
    gbdt = frame[frame["model"] == "lightgbm"]
    lines = ["# Pairwise vs listwise, with data", "",
             f"`python models/compare_losses.py` on `{args.data}` (seed {args.seed}): "
             + ", ".join(f"{name} {s['queries']} queries / {s['docs']} docs" for name, s in data["splits"].items())
             + f", {data['n_features']} features. Test-split metrics (`models/metrics.py`: exponential gain, a query "
             "without relevant documents counts 1, relevant = label >= 1). Neural rankers stop early on "
             f"validation NDCG@10 within {args.seconds_mlp:.0f} s (MLP) / {args.seconds_attention:.0f} s (attention) "
             "of training each; LightGBM lambdarank: up to 500 trees, learning rate 0.05, 31 leaves, early "
             "stopping on validation.", ""]
    if "oracle_ndcg@10" in data:
        lines += [f"Oracle (the hidden noiseless utility) test NDCG@10: {data['oracle_ndcg@10']['test']:.4f}.", ""]
    shown = frame[["model", "loss", "family", *METRICS, "vali_ndcg@10", "train_seconds", "params", "notes"]].copy()
    for column in (*METRICS, "vali_ndcg@10"):
        shown[column] = shown[column].map("{:.4f}".format)
    shown["train_seconds"] = shown["train_seconds"].map("{:.1f}".format)
    shown["params"] = shown["params"].map(lambda p: "" if pd.isna(p) else f"{int(p):,}")
    align = ["right" if c in (*METRICS, "vali_ndcg@10", "train_seconds", "params") else "left" for c in shown.columns]
    lines += [shown.to_markdown(index=False, disable_numparse=True, colalign=align), ""]
    if not neural.empty:
        best = neural.loc[neural["ndcg@10"].idxmax()]
        lines.append(f"Best neural ranker: **{best['model']} + {best['loss']}**, test NDCG@10 {best['ndcg@10']:.4f}.")
        for arch in neural["model"].unique():
            top = neural[neural["model"] == arch].sort_values("ndcg@10", ascending=False).iloc[0]
            lines.append(f"- best loss for {arch}: {top['loss']} ({top['ndcg@10']:.4f})")
        if not gbdt.empty:
            ratio = best["ndcg@10"] / gbdt.iloc[0]["ndcg@10"]
            lines.append("")
            lines.append(f"Best neural / LightGBM test NDCG@10: **{ratio:.3f}** "
                         f"({'at least' if ratio >= 1 else 'below'} the LightGBM reference).")
    else:
        lines.append("No neural ranker trained.")
    if gbdt.empty:
        lines.append("LightGBM reference: not run (lightgbm not installed: `pip install 'rankserve[gbdt]'`).")
    lines += ["", "## Environment", "", environment_markdown(collect_environment()), ""]
    path = out_dir / "ltr_losses.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="synthetic")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-queries", type=int, default=None)
    parser.add_argument("--archs", nargs="+", default=["mlp", "attention"], choices=["mlp", "attention"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--seconds-mlp", type=float, default=15.0, help="training-time bound per MLP")
    parser.add_argument("--seconds-attention", type=float, default=45.0, help="training-time bound per attention model")
    parser.add_argument("--skip-gbdt", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for ltr_losses.md and ltr_losses.csv")
    args = parser.parse_args(argv)
    print(f"comparing {len(args.losses)} losses x {args.archs} on {args.data} with {usable_cores()} cores", flush=True)
    start = time.perf_counter()
    frame = run(args)
    path = write_report(frame, args.out, args)
    print(f"wrote {path} and {path.with_suffix('.csv')} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
