"""models/retrain.py: logged feedback to training labels, and a deliberately bad candidate refused at a gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from serving_artifacts import MODEL, build_test_artifacts

from models.data import LTRSplit
from models.paths import REPO_ROOT
from models.retrain import feedback_split, with_feedback


def test_feedback_labels_follow_click_rates_within_each_query() -> None:
    X = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    source = LTRSplit("test", X, np.zeros(8), np.array([0, 0, 0, 0, 1, 1, 1, 1]))
    impressions = [
        {"query": 0, "shown": ["d0", "d1", "d2"], "clicks": [1]},
        {"query": 0, "shown": ["d0", "d1", "d2"], "clicks": [0, 1]},
        {"query": 1, "shown": ["d3", "d0"], "clicks": []},
        {"query": 1, "shown": ["d3", "d0"], "clicks": [0], "degraded": True},  # never clicked on: skipped
    ]
    split = feedback_split(impressions, source, first_qid=100)
    # query 0: d1 clicked 2/2 (label 4), d0 1/2 (label 2), d2 never (0); query 1 shown, never clicked: all 0
    assert split.qid.tolist() == [100, 100, 100, 101, 101]
    assert split.y.tolist() == [2.0, 4.0, 0.0, 0.0, 0.0]
    np.testing.assert_array_equal(split.X[:3], X[:3])
    np.testing.assert_array_equal(split.X[3:], X[[7, 4]])  # query 1's rows d3 and d0


def test_shuffled_labels_keep_each_querys_labels_and_the_feedback_joins_training() -> None:
    from models.data import LTRDataset

    rng = np.random.default_rng(0)
    split = LTRSplit("train", rng.normal(size=(40, 3)), rng.integers(0, 5, 40), np.repeat(np.arange(4), 10))
    dataset = LTRDataset("d", "synthetic", 3, split, split, split)
    extra = LTRSplit("feedback", rng.normal(size=(5, 3)), np.ones(5), np.full(5, 9))
    shuffled = with_feedback(dataset, extra, shuffle_labels=True)
    assert shuffled.train.n_queries == 5 and shuffled.train.n_docs == 45
    for q in range(4):
        assert sorted(shuffled.train.y[shuffled.train.qid == q]) == sorted(split.y[split.qid == q])
    assert not np.array_equal(shuffled.train.y[:40], split.y)


@pytest.mark.slow
def test_a_deliberately_bad_candidate_is_refused_at_the_offline_gate(tmp_path_factory: pytest.TempPathFactory,
                                                                      tmp_path: Path) -> None:
    """Labels shuffled within each query: trained and exported for real, then refused on NDCG@10 of the
    held-out slice, with the reason, before it reaches the service (the URL is never called)."""
    root = tmp_path_factory.getbasetemp() / "serve-artifacts"
    build_test_artifacts(root)
    feedback = tmp_path / "feedback.jsonl"
    feedback.write_text("".join(json.dumps({"query": q, "shown": ["d0", "d1", "d2"], "clicks": [0]}) + "\n"
                                for q in range(20)))
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(root)}
    proc = subprocess.run(
        [sys.executable, "models/retrain.py", "--url", "http://127.0.0.1:9", "--feedback", str(feedback),
         "--serving", MODEL, "--variant", "onnx-fp32", "--name", "mlp-shuffled", "--shuffle-labels",
         "--seconds", "5"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert outcome["promoted"] is False and outcome["refused_at"] == "offline"
    assert "NDCG@10 on the held-out slice" in outcome["reason"]
    assert "refused at the offline gate" in proc.stderr
    steps = [s["step"] for s in outcome["steps"]]
    assert steps == ["feedback", "trained", "exported", "offline gate", "refused"]
