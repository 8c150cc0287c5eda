"""Train one ranker and write the checkpoint every later stage reads (export, serving, load tests).

    python models/train.py --data synthetic --arch mlp --loss lambdarank

Early stopping on validation NDCG@10 keeps the best weights; `--max-seconds` bounds the run so a
training never holds a shared machine longer than asked. The checkpoint folder
`artifacts/models/<arch>-<loss>/` holds `model.safetensors` and `model_card.json` (what was trained on
what data, how well it ranks, at which git commit); `load_checkpoint` rebuilds the model from both.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as `python models/train.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.data import LTRDataset, LTRSplit, batch_query_indices, load_dataset, pad_queries  # noqa: E402
from models.environment import git_commit  # noqa: E402
from models.losses import LOSSES  # noqa: E402
from models.metrics import evaluate  # noqa: E402
from models.paths import DEFAULT_LOSS, model_dir  # noqa: E402
from models.rankers import RankerConfig, build_ranker, count_parameters, fit_normalizer, is_pointwise  # noqa: E402

WEIGHTS_FILE, CARD_FILE = "model.safetensors", "model_card.json"
EVAL_BATCH_DOCS = 32768  # documents per scoring batch in evaluation (pointwise)
EVAL_BATCH_QUERIES = 32  # lists per scoring batch in evaluation (listwise)


@dataclass
class TrainArgs:
    """Every knob of one training run: the CLI flags, plus `save` and `eval_train` for library callers."""

    data: str = "synthetic"
    arch: str = "mlp"
    loss: str | None = None  # None: DEFAULT_LOSS[arch]
    seed: int = 0
    n_queries: int | None = None
    hidden: tuple[int, ...] | None = None  # MLP hidden sizes; None: RankerConfig's (256, 128), 68K multiply-adds/doc
    epochs: int = 40
    max_seconds: float | None = 300.0
    patience: int = 6
    batch_size: int = 16  # queries per batch
    lr: float | None = None  # None: 2e-3 (mlp), 1e-3 (attention)
    weight_decay: float = 1e-4
    max_len: int | None = 256  # documents per list while training (evaluation uses whole lists)
    threads: int = 0  # 0: every usable core
    name: str | None = None  # checkpoint folder name; None: <arch>-<loss>
    save: bool = True
    quiet: bool = False
    eval_train: bool = True  # also score the train split for the card (compare_losses skips it)

    def resolved(self) -> TrainArgs:
        loss = self.loss or DEFAULT_LOSS[self.arch]
        if loss not in LOSSES:
            raise ValueError(f"loss: unknown {loss!r}; choose from {', '.join(LOSSES)}")
        if self.arch not in DEFAULT_LOSS:
            raise ValueError(f"arch: must be one of {', '.join(DEFAULT_LOSS)}, got {self.arch!r}")
        if self.hidden is not None and (self.arch != "mlp" or not self.hidden or min(self.hidden) < 1):
            raise ValueError(f"hidden: positive MLP layer sizes, for --arch mlp only; got {self.hidden}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size: must be >= 1, got {self.epochs} and {self.batch_size}")
        lr = self.lr if self.lr is not None else (2e-3 if self.arch == "mlp" else 1e-3)
        return TrainArgs(**{**asdict(self), "loss": loss, "lr": lr, "name": self.name or f"{self.arch}-{loss}"})


@dataclass
class TrainResult:
    model: torch.nn.Module
    card: dict
    checkpoint_dir: Path | None
    history: list[dict] = field(default_factory=list)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@torch.inference_mode()
def score_split(model: torch.nn.Module, split: LTRSplit, batch_docs: int = EVAL_BATCH_DOCS) -> np.ndarray:
    """Scores of every document of a split, in row order (whole lists, no truncation)."""
    was_training = model.training
    model.eval()
    scores = np.empty(split.n_docs, np.float32)
    if is_pointwise(model):
        for start in range(0, split.n_docs, batch_docs):
            rows = torch.from_numpy(split.X[start:start + batch_docs])
            scores[start:start + rows.shape[0]] = model(rows).numpy()
    else:
        order = np.argsort(split.lengths, kind="stable")  # similar lengths together: little padding
        for i in range(0, order.size, EVAL_BATCH_QUERIES):
            indices = order[i:i + EVAL_BATCH_QUERIES]
            features, _, mask = pad_queries(split, indices).to_torch()
            out = model(features, mask).numpy()
            for b, q in enumerate(indices):
                start, end = split.offsets[q], split.offsets[q + 1]
                scores[start:end] = out[b, :end - start]
    model.train(was_training)
    return scores


def evaluate_model(model: torch.nn.Module, dataset: LTRDataset, names: tuple[str, ...] = ("train", "vali", "test")
                   ) -> dict[str, dict[str, float]]:
    """Metrics (models.metrics.evaluate) per split."""
    splits = dataset.splits()
    return {name: {k: round(v, 5) for k, v in evaluate(splits[name], score_split(model, splits[name])).items()}
            for name in names}


def _normalization_summary(mean: np.ndarray, std: np.ndarray, config: RankerConfig) -> dict:
    return {
        "fitted_on": "train",
        "log_features": config.log_features,
        "clip": config.clip,
        "mean": {"min": float(mean.min()), "mean": float(mean.mean()), "max": float(mean.max())},
        "std": {"min": float(std.min()), "mean": float(std.mean()), "max": float(std.max())},
    }


def train(args: TrainArgs | argparse.Namespace, dataset: LTRDataset | None = None) -> TrainResult:
    """Train, keep the best-on-vali weights, evaluate every split, and (if `args.save`) write the checkpoint."""
    if isinstance(args, argparse.Namespace):
        known = {f.name for f in fields(TrainArgs)}
        args = TrainArgs(**{k: v for k, v in vars(args).items() if k in known})
    args = args.resolved()
    torch.set_num_threads(args.threads or usable_cores())
    torch.manual_seed(args.seed)
    if dataset is None:
        dataset = load_dataset(args.data, seed=args.seed, n_queries=args.n_queries)

    config = RankerConfig(arch=args.arch, n_features=dataset.n_features,
                          **({"hidden": tuple(args.hidden)} if args.hidden else {}))
    mean, std = fit_normalizer(dataset.train.X, log_features=config.log_features)
    model = build_ranker(config, mean, std)
    loss_fn = LOSSES[args.loss].fn
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=2)

    start = time.perf_counter()
    deadline = start + args.max_seconds if args.max_seconds else float("inf")
    best_ndcg, best_epoch, best_state, history, stopped = -1.0, -1, None, [], "epochs"
    progress = tqdm(range(args.epochs), desc=args.name, unit="epoch", disable=args.quiet, dynamic_ncols=True)
    for epoch in progress:
        model.train()
        total, batches, out_of_time = 0.0, 0, False
        for indices in batch_query_indices(dataset.train, args.batch_size, shuffle=True, seed=args.seed * 1000 + epoch):
            features, labels, mask = pad_queries(dataset.train, indices, max_len=args.max_len).to_torch()
            loss = loss_fn(model(features, mask), labels, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            total, batches = total + loss.item(), batches + 1
            if time.perf_counter() > deadline:
                out_of_time = True
                break
        vali_ndcg = evaluate(dataset.vali, score_split(model, dataset.vali))["ndcg@10"]
        history.append({"epoch": epoch + 1, "loss": total / max(batches, 1), "vali_ndcg@10": vali_ndcg,
                        "lr": optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - start, 1)})
        scheduler.step(vali_ndcg)
        if vali_ndcg > best_ndcg:
            best_ndcg, best_epoch = vali_ndcg, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        progress.set_postfix(loss=f"{history[-1]['loss']:.4f}", vali_ndcg10=f"{vali_ndcg:.4f}", best=f"{best_ndcg:.4f}")
        if out_of_time or epoch + 1 - best_epoch >= args.patience:
            stopped = "time limit" if out_of_time else "early stopping"
            break
    progress.close()
    train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state)
    model.eval()

    card = {
        "name": args.name,
        "version": None,  # filled from the weights file's sha256 when saved
        "arch": args.arch,
        "config": config.to_dict(),
        "pointwise": is_pointwise(model),
        "n_features": dataset.n_features,
        "data": {
            "spec": args.data, "seed": args.seed, "n_queries": args.n_queries, "name": dataset.name,
            "source": dataset.source,
            "sizes": {name: {"queries": s.n_queries, "docs": s.n_docs} for name, s in dataset.splits().items()},
            **({"oracle_ndcg@10": dataset.info["oracle_ndcg@10"]} if "oracle_ndcg@10" in dataset.info else {}),
        },
        "normalization": _normalization_summary(mean, std, config),
        "params": count_parameters(model),
        "loss": args.loss,
        "loss_family": LOSSES[args.loss].family,
        "training": {"epochs_run": len(history), "best_epoch": best_epoch, "batch_size": args.batch_size,
                     "lr": args.lr, "weight_decay": args.weight_decay, "max_len": args.max_len,
                     "max_seconds": args.max_seconds, "threads": torch.get_num_threads(),
                     "stopped": stopped},
        "metrics": evaluate_model(model, dataset, ("train", "vali", "test") if args.eval_train else ("vali", "test")),
        "train_seconds": round(train_seconds, 2),
        "git": git_commit(),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    checkpoint = save_checkpoint(model, card, model_dir(args.name)) if args.save else None
    return TrainResult(model, card, checkpoint, history)


def save_checkpoint(model: torch.nn.Module, card: dict, directory: Path) -> Path:
    """Write the weights, then the card with version = sha256(weights file)[:12]."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    card["version"] = hashlib.sha256(weights.read_bytes()).hexdigest()[:12]
    (directory / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return directory


def load_checkpoint(directory: Path | str) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, model card) of a checkpoint folder, or of a model name under artifacts/models/."""
    directory = Path(directory)
    if not (directory / CARD_FILE).is_file() and not directory.is_absolute() and len(directory.parts) == 1:
        directory = model_dir(str(directory))
    if not (directory / CARD_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no {CARD_FILE} (train one with `python models/train.py`)")
    card = json.loads((directory / CARD_FILE).read_text())
    model = build_ranker(RankerConfig.from_dict(card["config"]))
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    model.eval()
    return model, card


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    defaults = TrainArgs()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=defaults.data, help="'synthetic' or a folder with train.txt [vali.txt] test.txt")
    parser.add_argument("--arch", default=defaults.arch, choices=sorted(DEFAULT_LOSS))
    parser.add_argument("--loss", default=None, choices=sorted(LOSSES), help=f"default per arch: {DEFAULT_LOSS}")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--n-queries", type=int, default=None, help="synthetic: total queries (default 2100)")
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--max-seconds", type=float, default=defaults.max_seconds, help="wall-time bound; 0 = none")
    parser.add_argument("--patience", type=int, default=defaults.patience, help="epochs without vali gain")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="queries per batch")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-len", type=int, default=defaults.max_len, help="docs per list in training; 0 = all")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads; 0 = all cores")
    parser.add_argument("--hidden", type=int, nargs="+", default=None, metavar="N",
                        help="MLP hidden layer sizes (default 256 128: 68K multiply-adds per document; "
                             "e.g. 640 256: 250K, 1152 768: 1M); the model card and every export keep them")
    parser.add_argument("--name", default=None, help="checkpoint name (default <arch>-<loss>)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    ns = parser.parse_args(argv)
    ns.max_seconds = ns.max_seconds or None
    ns.max_len = ns.max_len or None
    known = {f.name for f in fields(TrainArgs)}
    return TrainArgs(**{k: v for k, v in vars(ns).items() if k in known})


def main(argv: list[str] | None = None) -> int:
    result = train(parse_args(argv))
    card = result.card
    print(json.dumps({"name": card["name"], "version": card["version"], "params": card["params"],
                      "train_seconds": card["train_seconds"], "metrics": card["metrics"]}, indent=2))
    if result.checkpoint_dir:
        print(f"wrote {result.checkpoint_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
