"""Retrain on logged feedback, then promote the candidate only through two gates.

    python models/retrain.py --url http://127.0.0.1:8002 --feedback artifacts/online_eval/feedback.jsonl \
        [--serving mlp-ranknet --variant onnx-int8-dynamic] [--name mlp-ranknet-r1] [--seconds 40]

Steps (each logged, with its figures, in the returned `RetrainOutcome`):
1. **Feedback to labels.** Each logged impression (loadtest/online_users.py) of a test-split query
   becomes training rows: every document shown gets a label from its click rate over that query's
   impressions (0 to 4 by the rate over the query's best rate; a shown, never-clicked document is 0).
   The feedback queries join the training split (`feedback_split`).
2. **Train** (models/train.py's `train`, the serving model's architecture) and **export** through
   the existing path (export/quantize.py: torch-eager, onnx-fp32 and the serving variant, each
   gated on accuracy against the candidate's own torch model).
3. **Offline gate:** the candidate's NDCG@10 on a held-out slice (the vali split, which no model
   trains on) must be no worse than the serving model's, less `tolerance`.
4. **Online gate:** the service interleaves serving and candidate (`PUT /admin/experiment`, team
   draft) for `online_impressions` simulated searches; the candidate must not lose significantly
   (the upper end of its win rate's 95% interval at least 0.5).
5. **Promotion:** `POST /admin/model` swaps the candidate in under load; the experiment ends.

A candidate that fails a gate is refused, the reason logged, and the serving model stays.
`--shuffle-labels` trains a deliberately bad candidate (the labels permuted within each query).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.data import LTRDataset, LTRSplit
from models.paths import REPO_ROOT, model_dir

logger = logging.getLogger("rankserve.retrain")


@dataclass
class RetrainOutcome:
    """What happened to one candidate: the gates' figures and the decision."""

    candidate: str
    serving: str
    promoted: bool = False
    refused_at: str | None = None  # "offline" | "online" | "promotion"
    reason: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)

    def log(self, step: str, **figures: Any) -> None:
        self.steps.append({"step": step, **figures})
        logger.info("%s %s: %s", self.candidate, step, json.dumps(figures, default=str))

    def refuse(self, gate: str, reason: str) -> RetrainOutcome:
        self.refused_at, self.reason = gate, reason
        logger.warning("%s refused at the %s gate: %s", self.candidate, gate, reason)
        self.log("refused", gate=gate, reason=reason)
        return self


def feedback_split(impressions: list[dict], source: LTRSplit, first_qid: int) -> LTRSplit:
    """Training rows from logged impressions of `source`'s queries: per query, each shown document's
    label is round(4 * its click rate / the query's best click rate); documents never shown are left
    out. Query ids start at `first_qid` (after the training split's)."""
    shown: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    clicked: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for imp in impressions:
        if imp.get("status", 200) != 200 or imp.get("degraded"):
            continue
        for position, doc in enumerate(imp["shown"]):
            shown[imp["query"]][doc] += 1
            clicked[imp["query"]][doc] += position in imp["clicks"]
    X, y, qid = [], [], []
    for n, (query, docs) in enumerate(sorted(shown.items())):
        rates = {d: clicked[query][d] / count for d, count in docs.items()}
        best = max(rates.values()) or 1.0
        features, _ = source.query(query)
        for doc, rate in rates.items():
            X.append(features[int(doc[1:])])
            y.append(float(round(4 * rate / best)))
            qid.append(first_qid + n)
    width = source.X.shape[1]
    return LTRSplit("feedback", np.array(X, dtype=np.float32).reshape(-1, width), np.array(y), np.array(qid))


def with_feedback(dataset: LTRDataset, feedback: LTRSplit, shuffle_labels: bool = False,
                  seed: int = 0) -> LTRDataset:
    """The dataset whose training split also holds the feedback queries; `shuffle_labels` permutes
    the training labels within each query (a deliberately bad candidate)."""
    train = dataset.train
    X = np.concatenate([train.X, feedback.X])
    y = np.concatenate([train.y, feedback.y])
    qid = np.concatenate([train.qid, feedback.qid])
    if shuffle_labels:
        rng = np.random.default_rng(seed)
        starts = np.flatnonzero(np.r_[True, qid[1:] != qid[:-1]])
        for a, b in zip(starts, np.r_[starts[1:], len(qid)], strict=True):
            y[a:b] = rng.permutation(y[a:b])
    return LTRDataset(dataset.name + "+feedback", dataset.source, dataset.n_features,
                      LTRSplit("train", X, y, qid), dataset.vali, dataset.test, dict(dataset.info))


def train_candidate(name: str, arch: str, dataset: LTRDataset, seconds: float) -> dict:
    """Train and save the candidate checkpoint; its model card."""
    from models.train import TrainArgs, train

    result = train(TrainArgs(arch=arch, name=name, max_seconds=seconds, quiet=True, eval_train=False), dataset)
    return result.card


def export_candidate(name: str, variants: list[str]) -> dict:
    """Export and gate the candidate's variants through export/quantize.py; its manifest."""
    from export.runtime import load_manifest

    subprocess.run([sys.executable, "export/quantize.py", "--arch", "mlp", "--checkpoint",
                    str(model_dir(name)), "--variants", "torch-eager", *variants,
                    "--skip-bench"], cwd=REPO_ROOT, check=True, timeout=900, capture_output=True)
    return load_manifest(name)


def holdout_ndcg(model: str, variant: str, split: LTRSplit) -> float:
    from export.runtime import load_scorer
    from models.metrics import evaluate
    from serve.scoring import score_lists

    scorer = load_scorer(variant, model)
    scores = np.concatenate([score_lists(scorer, [split.query(i)[0]])[0] for i in range(split.n_queries)])
    return float(evaluate(split, scores)["ndcg@10"])


def online_gate(client: Any, token: str, serving: tuple[str, str], candidate: tuple[str, str], queries: Any,
                impressions: int, seed: int = 0) -> dict[str, Any]:
    """Interleave serving (team a) and candidate (team b) on the service; the candidate's win rate."""
    from loadtest.click_models import ClickModel
    from loadtest.online_stats import outcomes_win_rate
    from loadtest.online_users import simulate
    from serve.experiment import Arm, ExperimentConfig

    config = ExperimentConfig(mode="interleave", salt=f"gate-{candidate[0]}",
                              arms=[Arm(name="serving", model=serving[0], variant=serving[1]),
                                    Arm(name="candidate", model=candidate[0], variant=candidate[1])])
    headers = {"Authorization": f"Bearer {token}"}
    client.put("/admin/experiment", json=config.model_dump(), headers=headers, timeout=300).raise_for_status()
    try:
        log = simulate(client, queries, ClickModel("cascade"), impressions=impressions, users=impressions // 5 or 1,
                       seed=seed)
    finally:
        client.delete("/admin/experiment", headers=headers, timeout=60).raise_for_status()
    return {"win_rate": outcomes_win_rate(log.interleaving_outcomes()).to_dict(), "impressions": len(log.impressions),
            "failures": log.failures}


def promote(client: Any, token: str, candidate: tuple[str, str]) -> dict:
    resp = client.post("/admin/model", json={"model": candidate[0], "variant": candidate[1]},
                       headers={"Authorization": f"Bearer {token}"}, timeout=300)
    resp.raise_for_status()
    return resp.json()


def retrain(client: Any, token: str, *, serving: tuple[str, str], name: str, feedback: list[dict],
            dataset: LTRDataset, queries: Any, seconds: float = 40.0, tolerance: float = 0.002,
            online_impressions: int = 2000, shuffle_labels: bool = False, seed: int = 0) -> RetrainOutcome:
    """The whole loop for one candidate against the model the service at `client` serves."""
    outcome = RetrainOutcome(candidate=name, serving=f"{serving[0]}:{serving[1]}")
    extra = feedback_split(feedback, dataset.test, first_qid=int(dataset.train.qid.max()) + 1)
    outcome.log("feedback", impressions=len(feedback), queries=int(len(np.unique(extra.qid))), rows=extra.n_docs,
                label_share={str(g): round(float(np.mean(extra.y == g)), 3) for g in range(5)})
    card = train_candidate(name, "mlp", with_feedback(dataset, extra, shuffle_labels, seed), seconds)
    outcome.log("trained", shuffle_labels=shuffle_labels, epochs=card["training"]["epochs_run"],
                seconds=card["train_seconds"], vali_ndcg10=card["metrics"]["vali"]["ndcg@10"])
    manifest = export_candidate(name, sorted({"onnx-fp32", serving[1]}))
    entry = manifest["variants"].get(serving[1], {})
    outcome.log("exported", variants={v: e["valid"] for v, e in manifest["variants"].items()})
    if not entry.get("valid"):
        return outcome.refuse("offline", f"its {serving[1]} variant failed the accuracy gate")
    candidate = (name, serving[1])
    ndcg_serving, ndcg_candidate = (holdout_ndcg(*serving, dataset.vali), holdout_ndcg(*candidate, dataset.vali))
    outcome.log("offline gate", serving_ndcg10=ndcg_serving, candidate_ndcg10=ndcg_candidate, tolerance=tolerance,
                holdout="vali", queries=dataset.vali.n_queries)
    if ndcg_candidate < ndcg_serving - tolerance:
        return outcome.refuse("offline", f"NDCG@10 on the held-out slice {ndcg_candidate:.4f} is below the serving "
                                         f"model's {ndcg_serving:.4f} (tolerance {tolerance})")
    online = online_gate(client, token, serving, candidate, queries, online_impressions, seed)
    outcome.log("online gate", **online)
    win = online["win_rate"]
    if win["high"] < 0.5:
        return outcome.refuse("online", f"the candidate lost the interleaving test: win rate {win['estimate']:.3f} "
                                        f"[{win['low']:.3f}, {win['high']:.3f}] over {win['n']} decided queries")
    swapped = promote(client, token, candidate)
    outcome.log("promoted", model=swapped.get("model"))
    outcome.promoted = True
    return outcome


def main(argv: list[str] | None = None) -> int:
    import argparse
    import os

    import httpx

    from loadtest.online_users import TestQueries
    from models.data import load_dataset
    from serve.security import ADMIN_TOKEN_ENV

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="the serving service (plain uvicorn), loopback")
    p.add_argument("--feedback", type=Path, required=True, help="impressions (JSON lines, loadtest/online_users.py)")
    p.add_argument("--serving", default="mlp-ranknet")
    p.add_argument("--variant", default="onnx-int8-dynamic")
    p.add_argument("--name", required=True, help="the candidate's model name")
    p.add_argument("--seconds", type=float, default=40.0, help="training time bound")
    p.add_argument("--tolerance", type=float, default=0.002, help="offline gate: NDCG@10 this far below passes")
    p.add_argument("--online-impressions", type=int, default=2000)
    p.add_argument("--shuffle-labels", action="store_true", help="a deliberately bad candidate")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    token = os.environ.get(ADMIN_TOKEN_ENV, "")
    feedback = [json.loads(line) for line in args.feedback.read_text().splitlines() if line]
    dataset = load_dataset("synthetic")
    with httpx.Client(base_url=args.url, timeout=30) as client:
        outcome = retrain(client, token, serving=(args.serving, args.variant), name=args.name, feedback=feedback,
                          dataset=dataset, queries=TestQueries.from_split(dataset.test, 100), seconds=args.seconds,
                          tolerance=args.tolerance, online_impressions=args.online_impressions,
                          shuffle_labels=args.shuffle_labels)
    print(json.dumps(asdict(outcome), indent=2, default=str))
    return 0 if outcome.promoted else 1


if __name__ == "__main__":
    raise SystemExit(main())
