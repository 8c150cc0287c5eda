"""Metrics: hand-computed cases, the documented conventions, and agreement with scikit-learn and LightGBM."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from models.metrics import (
    average_precision,
    evaluate,
    evaluate_padded,
    metrics_padded,
    mrr,
    ndcg_at_k,
)


def test_ndcg_hand_computed() -> None:
    labels = np.array([3, 2, 0, 1])
    scores = np.array([0.9, 0.1, 0.8, 0.3])
    # Ranking by score: labels 3, 0, 1, 2.
    dcg = 7 / math.log2(2) + 0 / math.log2(3) + 1 / math.log2(4) + 3 / math.log2(5)
    ideal = 7 / math.log2(2) + 3 / math.log2(3) + 1 / math.log2(4) + 0
    assert ndcg_at_k(scores, labels, 4) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(scores, labels, 10) == pytest.approx(dcg / ideal)  # k beyond the list
    assert ndcg_at_k(scores, labels, 1) == pytest.approx(1.0)
    dcg2 = 7 + 0 / math.log2(3)
    ideal2 = 7 + 3 / math.log2(3)
    assert ndcg_at_k(scores, labels, 2) == pytest.approx(dcg2 / ideal2)


def test_mrr_and_map_hand_computed() -> None:
    labels = np.array([0, 0, 1, 0, 2])
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0])
    assert mrr(scores, labels) == pytest.approx(1 / 3)
    assert average_precision(scores, labels) == pytest.approx((1 / 3 + 2 / 5) / 2)
    assert average_precision(-scores, labels) == pytest.approx((1 / 1 + 2 / 3) / 2)  # ranks 1 and 3


def test_ties_broken_by_original_order() -> None:
    scores = np.array([1.0, 1.0, 1.0])
    assert ndcg_at_k(scores, np.array([0, 3, 0]), 1) == 0.0
    assert ndcg_at_k(scores, np.array([3, 0, 0]), 1) == 1.0
    assert mrr(scores, np.array([0, 0, 2])) == pytest.approx(1 / 3)


def test_query_without_relevant_documents_counts_as_one() -> None:
    scores = np.array([0.3, 0.1, 0.2])
    labels = np.zeros(3)
    assert ndcg_at_k(scores, labels, 5) == 1.0
    assert mrr(scores, labels) == 1.0
    assert average_precision(scores, labels) == 1.0


def _random_split(rng: np.random.Generator, n_queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = rng.integers(1, 40, size=n_queries)
    lengths[0] = 1
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    labels = rng.integers(0, 5, size=offsets[-1]).astype(np.float32)
    labels[offsets[1] : offsets[2]] = 0  # a query without relevant documents
    scores = rng.normal(size=offsets[-1]).astype(np.float32)
    scores[offsets[3] : offsets[4]] = np.round(scores[offsets[3] : offsets[4]])  # ties
    return offsets, scores, labels


def test_evaluate_matches_per_query_functions() -> None:
    rng = np.random.default_rng(0)
    offsets, scores, labels = _random_split(rng, 60)
    result = evaluate(offsets, scores, labels)
    assert set(result) == {"ndcg@1", "ndcg@5", "ndcg@10", "mrr", "map"}
    queries = [(scores[a:b], labels[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    for k in (1, 5, 10):
        assert result[f"ndcg@{k}"] == pytest.approx(np.mean([ndcg_at_k(s, y, k) for s, y in queries]))
    assert result["mrr"] == pytest.approx(np.mean([mrr(s, y) for s, y in queries]))
    assert result["map"] == pytest.approx(np.mean([average_precision(s, y) for s, y in queries]))

    split = SimpleNamespace(offsets=offsets, y=labels)
    assert evaluate(split, scores) == result


def test_evaluate_padded_ignores_padding() -> None:
    rng = np.random.default_rng(1)
    offsets, scores, labels = _random_split(rng, 20)
    max_len = int(np.diff(offsets).max()) + 3
    pad_scores = np.full((20, max_len), 1e6)  # junk that would rank first if not masked
    pad_labels = np.full((20, max_len), 4.0)
    mask = np.zeros((20, max_len), dtype=bool)
    for q, (a, b) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
        pad_scores[q, : b - a] = scores[a:b]
        pad_labels[q, : b - a] = labels[a:b]
        mask[q, : b - a] = True
    expected = evaluate(offsets, scores, labels)
    got = evaluate_padded(pad_scores, pad_labels, mask)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value)


def test_evaluate_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="offsets"):
        evaluate(np.array([0, 3, 2]), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="labels"):
        evaluate(np.array([0, 3]), np.zeros(3))
    with pytest.raises(ValueError, match="scores"):
        evaluate(np.array([0, 5]), np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="shape"):
        metrics_padded(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 4), dtype=bool))


def test_ndcg_matches_scikit_learn() -> None:
    from sklearn.metrics import ndcg_score

    rng = np.random.default_rng(2)
    for _ in range(30):
        n = int(rng.integers(2, 30))
        labels = rng.integers(0, 5, size=n)
        if labels.max() == 0:
            labels[0] = 1  # scikit-learn scores such queries 0; our convention is 1 (tested above)
        scores = rng.normal(size=n)  # continuous: no ties (scikit-learn averages over ties)
        for k in (1, 5, 10):
            # scikit-learn uses linear gain: feed it our exponential gain as the relevance.
            expected = ndcg_score([2.0**labels - 1], [scores], k=k)
            assert ndcg_at_k(scores, labels, k) == pytest.approx(expected, abs=1e-12)


def test_ndcg_and_map_match_lightgbm() -> None:
    lgb = pytest.importorskip("lightgbm")
    rng = np.random.default_rng(3)
    offsets, scores, labels = _random_split(rng, 40)
    scores = rng.normal(size=scores.size)  # no ties: keep the comparison about gains and discounts
    # With constant features, every tree is a single leaf: a constant shift that keeps the ranking,
    # so LightGBM's metric after one round is its metric of our scores (given as init_score).
    n_docs = scores.size
    data = lgb.Dataset(
        np.zeros((n_docs, 1)), label=labels, group=np.diff(offsets), init_score=scores, free_raw_data=False
    )
    params = {
        "objective": "lambdarank",
        "metric": ["ndcg", "map"],
        "eval_at": [1, 5, 10, 1000],
        "verbosity": -1,
        "num_threads": 1,
        "min_data_in_leaf": 1,
    }
    record: dict = {}
    lgb.train(
        params,
        data,
        num_boost_round=1,
        valid_sets=[data],
        valid_names=["train"],
        callbacks=[lgb.record_evaluation(record)],
    )
    ours = evaluate(offsets, scores, labels)
    for k in (1, 5, 10):
        assert ours[f"ndcg@{k}"] == pytest.approx(record["train"][f"ndcg@{k}"][0], abs=1e-6)
    assert ours["map"] == pytest.approx(record["train"]["map@1000"][0], abs=1e-6)
