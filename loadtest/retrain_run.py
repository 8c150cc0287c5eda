"""The retraining loop in one scripted run: a good candidate promoted, a bad one refused, traffic throughout.

1. One plain-uvicorn server serves a stale model (the MLP after one epoch, `mlp-ranknet-weak`).
2. Background traffic: the test queries sent one after another for the whole run; every answer is
   checked (an error or a degraded answer is a failure) and the model that answered is recorded.
3. Feedback: simulated users (loadtest/online_users.py) search against the serving model; their
   impressions are the logged feedback.
4. A candidate retrained on the training split plus that feedback goes through models/retrain.py's
   gates (offline NDCG@10 on the held-out vali split, online interleaving on the service) and is
   swapped in under the background traffic if it passes.
5. A deliberately bad candidate (labels shuffled within each query) goes through the same gates
   against the model now serving, and must be refused with its reason.

    python loadtest/retrain_run.py [--feedback-impressions 3000] [--seconds 40]

Results: results/online_eval/<cpu>-<isa>-retrain.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtest.click_models import ClickModel
from loadtest.online_eval import WEAK_MODEL, ensure_weak_model
from loadtest.online_users import TestQueries, simulate
from models.paths import REPO_ROOT
from serve.security import ADMIN_TOKEN_ENV

RESULTS = REPO_ROOT / "results" / "online_eval"
PORT = 8033
SERVING = (WEAK_MODEL, "onnx-fp32")


class BackgroundTraffic:
    """Searches sent one after another on a thread until stopped; each answer checked."""

    def __init__(self, url: str, queries: TestQueries, max_s: float = 3600.0) -> None:
        self.url, self.queries, self.max_s = url, queries, max_s
        self.requests = self.failures = 0
        self.models: list[tuple[float, str]] = []  # (seconds, model name) whenever the answering model changed
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.start = time.monotonic()

    def __enter__(self) -> BackgroundTraffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() - self.start < self.max_s:
                query = self.queries.queries[int(rng.integers(len(self.queries.queries)))]
                try:
                    resp = client.post("/rank", content=query.body, headers={"content-type": "application/msgpack"})
                    answer = resp.json()
                    failed = resp.status_code != 200 or answer.get("degraded", True)
                except (httpx.HTTPError, ValueError) as exc:
                    failed, answer = True, {}
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.requests += 1
                self.failures += failed
                name = (answer.get("model") or {}).get("name")
                if name and (not self.models or self.models[-1][1] != name):
                    self.models.append((time.monotonic() - self.start, name))


def run(feedback_impressions: int, seconds: float, online_impressions: int, work: Path) -> dict[str, Any]:
    from loadtest.services import UvicornServer
    from loadtest.sweep_config import ServiceSpec
    from models.data import load_dataset
    from models.environment import collect_environment
    from models.retrain import retrain

    ensure_weak_model()
    dataset = load_dataset("synthetic")
    queries = TestQueries.from_split(dataset.test, 100)
    token = secrets.token_hex(16)
    os.environ[ADMIN_TOKEN_ENV] = token
    spec = ServiceSpec(server="uvicorn", encoding="msgpack", port=PORT, cache=False, admission=False,
                       model=SERVING[0], variant=SERVING[1])
    started = time.perf_counter()
    service = UvicornServer(spec).start(work / "retrain-server.log", cores=None, redis_url=None, timeout_s=120)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client, \
                BackgroundTraffic(service.url, queries) as traffic:
            log = simulate(client, queries, ClickModel("cascade"), impressions=feedback_impressions,
                           users=max(1, feedback_impressions // 5), seed=7)
            log.save(work / "feedback.jsonl")
            feedback = [json.loads(i.to_json()) for i in log]
            good = retrain(client, token, serving=SERVING, name=f"mlp-ranknet-r{stamp}", feedback=feedback,
                           dataset=dataset, queries=queries, seconds=seconds, online_impressions=online_impressions)
            now_serving = (good.candidate, SERVING[1]) if good.promoted else SERVING
            bad = retrain(client, token, serving=now_serving, name=f"mlp-ranknet-bad{stamp}", feedback=feedback,
                          dataset=dataset, queries=queries, seconds=seconds / 2, online_impressions=online_impressions,
                          shuffle_labels=True)
            time.sleep(1.0)  # a last second of traffic on whatever serves now
    finally:
        service.stop()
    return {"config": {"serving": list(SERVING), "feedback_impressions": feedback_impressions,
                       "train_seconds": seconds, "online_impressions": online_impressions},
            "candidates": [asdict(good), asdict(bad)],
            "traffic": {"requests": traffic.requests, "failures": traffic.failures, "models": traffic.models,
                        "errors": traffic.errors[:5]},
            "seconds": time.perf_counter() - started, "environment": collect_environment()}


def main(argv: list[str] | None = None) -> int:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--feedback-impressions", type=int, default=3000)
    parser.add_argument("--seconds", type=float, default=40.0, help="training time bound of the good candidate")
    parser.add_argument("--online-impressions", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=REPO_ROOT / "artifacts" / "online_eval")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    from loadtest.retrain_report import write_results

    report = run(args.feedback_impressions, args.seconds, args.online_impressions, args.work)
    print(f"wrote {write_results(report, args.out)}")
    good, bad = report["candidates"]
    return 0 if good["promoted"] and not bad["promoted"] and report["traffic"]["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
