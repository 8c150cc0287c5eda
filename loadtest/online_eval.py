"""Does the offline NDCG gap show up online? A/B and interleaving against the offline metric, per model pair.

For each pair of known offline NDCG@10 gap (`PAIRS`) one plain-uvicorn server (serve/uvicorn_server.py)
runs the experiment, set through its admin API while the simulated users keep searching:
1. offline: NDCG@10 of both arms' scorers on the test queries the users will send (the same lists);
2. A/B: `PUT /admin/experiment` with the two arms, 50/50 by user; `impressions` searches by simulated
   users (loadtest/online_users.py, the cascade click model by default) and their clicks;
3. interleaving: the same arms in `interleave` mode, the same number of searches;
4. statistics (loadtest/online_stats.py): the A/B differences in CTR and in the first click's
   reciprocal rank, and the interleaving win rate, with 95% intervals, and the queries each needs to
   detect the offline gap's direction 80% of the time.

    python loadtest/online_eval.py [--impressions 10000] [--click-model cascade] [--out results/online_eval]

The weakened model of the third pair is the MLP trained for one epoch (`mlp-ranknet-weak`), trained
and exported here when missing. Results: results/online_eval/<cpu>-<isa>.{md,json} with the environment
(models/environment.py); impression logs in the run folder (`--work`).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.click_models import CLICK_MODELS
from loadtest.online_stats import (
    ab_test,
    ctr_difference,
    interleaving_test,
    outcomes_win_rate,
    queries_needed,
)
from loadtest.online_users import ImpressionLog, TestQueries, simulate
from models.paths import REPO_ROOT
from serve.experiment import Arm, ExperimentConfig
from serve.security import ADMIN_TOKEN_ENV

RESULTS = REPO_ROOT / "results" / "online_eval"
PORT = 8031
WEAK_MODEL = "mlp-ranknet-weak"
MAX_DOCS = 100  # documents per test query sent (the lab's list size)


@dataclass(frozen=True)
class Pair:
    label: str
    a: Arm
    b: Arm


PAIRS = (
    Pair("int8 vs fp32 (MLP)", Arm(name="mlp-fp32", model="mlp-ranknet", variant="onnx-fp32"),
         Arm(name="mlp-int8", model="mlp-ranknet", variant="onnx-int8-dynamic")),
    Pair("attention vs MLP", Arm(name="mlp", model="mlp-ranknet", variant="onnx-fp32"),
         Arm(name="attention", model="attention-listmle", variant="onnx-fp32")),
    Pair("weakened vs MLP", Arm(name="mlp", model="mlp-ranknet", variant="onnx-fp32"),
         Arm(name="weakened", model=WEAK_MODEL, variant="onnx-fp32")),
)


def ensure_weak_model() -> None:
    """The deliberately weakened model: the MLP after one epoch, exported to onnx-fp32."""
    if (REPO_ROOT / "artifacts" / "variants" / WEAK_MODEL / "manifest.json").exists():
        return
    run = [sys.executable, "models/train.py", "--arch", "mlp", "--epochs", "1", "--name", WEAK_MODEL, "--quiet"]
    subprocess.run(run, cwd=REPO_ROOT, check=True, timeout=600)
    subprocess.run([sys.executable, "export/quantize.py", "--arch", "mlp", "--checkpoint",
                    f"artifacts/models/{WEAK_MODEL}", "--variants", "torch-eager", "onnx-fp32", "--skip-bench"],
                   cwd=REPO_ROOT, check=True, timeout=600)


def offline_ndcg(arm: Arm, split: Any, k: int = 10) -> float:
    """Mean NDCG@k of the arm's scorer over the test queries as sent (the first MAX_DOCS documents)."""
    from export.runtime import load_scorer
    from models.metrics import ndcg_at_k
    from serve.scoring import score_lists

    scorer = load_scorer(arm.variant, arm.model)
    values = []
    for i in range(split.n_queries):
        X, y = split.query(i)
        X, y = X[:MAX_DOCS], y[:MAX_DOCS]
        values.append(ndcg_at_k(score_lists(scorer, [X])[0], y, k))
    return float(np.mean(values))


def set_experiment(client: httpx.Client, token: str, config: ExperimentConfig) -> None:
    resp = client.put("/admin/experiment", json=config.model_dump(),
                      headers={"Authorization": f"Bearer {token}"}, timeout=120)
    resp.raise_for_status()


def ab_stats(log: ImpressionLog, pair: Pair, direction: float) -> dict[str, Any]:
    """Per arm: clicks per impression (the CTR), and the reciprocal rank of the first click (0 without
    one), a metric that rewards putting the satisfying document first; each with its difference's
    interval and the queries it needs."""
    answered = [i for i in log if not i.degraded and i.status == 200]
    out: dict[str, Any] = {}
    for metric, value in (("ctr", lambda i: len(i.clicks)), ("rr", lambda i: 1 / (1 + min(i.clicks)) if i.clicks else 0.0)):
        a = np.array([value(i) for i in answered if i.arm == pair.a.name], dtype=float)
        b = np.array([value(i) for i in answered if i.arm == pair.b.name], dtype=float)
        needed, cap = queries_needed(ab_test(a, b, direction), a.size + b.size)
        out[metric] = {"a": float(a.mean()), "b": float(b.mean()), "difference": ctr_difference(a, b).to_dict(),
                       "queries_needed": needed, "cap": cap}
        out["impressions_a"], out["impressions_b"] = int(a.size), int(b.size)
    return out


def interleaving_stats(log: ImpressionLog, direction: float) -> dict[str, Any]:
    o = log.interleaving_outcomes()
    needed, cap = queries_needed(interleaving_test(o, direction), o.size)
    return {"impressions": int(o.size), "wins_a": int((o < 0).sum()), "wins_b": int((o > 0).sum()),
            "ties": int((o == 0).sum()), "win_rate_b": outcomes_win_rate(o).to_dict(), "queries_needed": needed,
            "cap": cap}


def run(impressions: int, click_model: str, work: Path, seed: int = 0) -> dict[str, Any]:
    from loadtest.services import UvicornServer
    from loadtest.sweep_config import ServiceSpec
    from models.data import load_dataset
    from models.environment import collect_environment

    ensure_weak_model()
    split = load_dataset("synthetic").test
    queries = TestQueries.from_split(split, MAX_DOCS)
    model = CLICK_MODELS[click_model][1]()
    token = secrets.token_hex(16)
    os.environ[ADMIN_TOKEN_ENV] = token  # the server inherits it
    spec = ServiceSpec(server="uvicorn", encoding="msgpack", port=PORT, cache=False, admission=False,
                       model="mlp-ranknet", variant="onnx-fp32")
    started = time.perf_counter()
    service = UvicornServer(spec).start(work / "server.log", cores=None, redis_url=None, timeout_s=120)
    rows = []
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            for n, pair in enumerate(PAIRS):
                ndcg_a, ndcg_b = offline_ndcg(pair.a, split), offline_ndcg(pair.b, split)
                direction = float(np.sign(ndcg_b - ndcg_a)) or 1.0
                logs = {}
                for mode in ("ab", "interleave"):
                    set_experiment(client, token, ExperimentConfig(arms=[pair.a, pair.b], mode=mode,
                                                                   salt=f"pair-{n}"))
                    logs[mode] = simulate(client, queries, model, impressions=impressions, users=max(50, impressions // 5),
                                          seed=seed * 100 + n * 10 + (mode == "interleave"))
                    logs[mode].save(work / f"impressions-pair{n}-{mode}.jsonl")
                ab = ab_stats(logs["ab"], pair, direction)
                il = interleaving_stats(logs["interleave"], direction)
                rows.append({"pair": pair.label, "a": pair.a.model_dump(), "b": pair.b.model_dump(),
                             "offline": {"ndcg10_a": ndcg_a, "ndcg10_b": ndcg_b, "gap": ndcg_b - ndcg_a},
                             "ab": ab, "interleaving": il,
                             "failures": logs["ab"].failures + logs["interleave"].failures})
                print(f"{pair.label:<22} offline gap {ndcg_b - ndcg_a:+.4f}  A/B CTR diff "
                      f"{ab['ctr']['difference']['estimate']:+.4f}  RR diff {ab['rr']['difference']['estimate']:+.4f}  "
                      f"interleaving: b won {il['win_rate_b']['estimate']:.3f}", flush=True)
    finally:
        service.stop()
    return {"config": {"impressions_per_method": impressions, "click_model": click_model,
                       "click_model_parameters": model.__dict__, "max_docs": MAX_DOCS, "test_queries": split.n_queries,
                       "seed": seed},
            "rows": rows, "seconds": time.perf_counter() - started,
            "environment": collect_environment()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impressions", type=int, default=10000, help="searches per method per pair")
    parser.add_argument("--click-model", choices=sorted(CLICK_MODELS), default="cascade")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "artifacts" / "online_eval",
                        help="impression logs and the server log (not committed: megabytes)")
    args = parser.parse_args(argv)
    from loadtest.online_report import write_results

    report = run(args.impressions, args.click_model, args.work, args.seed)
    (args.work / "report.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {write_results(report, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
