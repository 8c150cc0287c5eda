"""The accuracy gate: is an optimized variant still the model we trained? (MLPerf Inference's rule.)

A variant is valid when its test-split NDCG@10 keeps >= 99% of the fp32 torch model's, and marked
"high accuracy" at >= 99.9% (MLPerf's two targets). Beside the quality ratio we report how close
the scores themselves stay (max absolute difference) and how close the rankings stay (Kendall tau
per query, top-10 overlap), because a ranking can keep its NDCG while reordering documents.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import kendalltau

from export.manifest import HIGH_ACCURACY_RETENTION, VALID_RETENTION, AccuracyReport
from export.runtime import Scorer
from models.data import LTRSplit, pad_queries
from models.metrics import evaluate

LISTS_PER_CALL = 16  # listwise scoring: queries padded together per call (bounds memory, not results)


def score_split(scorer: Scorer, split: LTRSplit) -> np.ndarray:
    """Scores of every document of `split` (float32[n_docs], split order) through the runtime."""
    if scorer.pointwise:
        return scorer.score_documents(split.X)
    scores = np.empty(split.n_docs, dtype=np.float32)
    for start in range(0, split.n_queries, LISTS_PER_CALL):
        queries = np.arange(start, min(start + LISTS_PER_CALL, split.n_queries))
        batch = pad_queries(split, queries)
        padded = scorer.score_lists(batch.features, batch.mask)
        rows = np.concatenate([np.arange(split.offsets[q], split.offsets[q + 1]) for q in queries])
        scores[rows] = padded[batch.mask]
    return scores


def ranking_agreement(reference: np.ndarray, scores: np.ndarray, offsets: np.ndarray, k: int = 10
                      ) -> tuple[float, float]:
    """(Kendall tau mean over queries, top-k overlap mean over queries) of two score vectors.

    Queries where tau is undefined (one document, or constant scores on a side) are left out of
    the tau mean; top-k overlap is |top-k(a) ∩ top-k(b)| / min(k, n) with stable tie-breaking.
    """
    taus, overlaps = [], []
    for start, end in zip(offsets[:-1], offsets[1:], strict=True):
        a, b = reference[start:end], scores[start:end]
        if end - start >= 2:
            tau = kendalltau(a, b).statistic
            if np.isfinite(tau):
                taus.append(tau)
        top = min(k, end - start)
        if top:
            top_a = set(np.argsort(-a, kind="stable")[:top])
            top_b = set(np.argsort(-b, kind="stable")[:top])
            overlaps.append(len(top_a & top_b) / top)
    return (float(np.mean(taus)) if taus else float("nan"),
            float(np.mean(overlaps)) if overlaps else float("nan"))


def gate(reference: np.ndarray, scores: np.ndarray, split: LTRSplit) -> AccuracyReport:
    """Compare a variant's test scores with the fp32 reference's and apply the 99% / 99.9% rule."""
    reference = np.asarray(reference, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if reference.shape != scores.shape or scores.shape != (split.n_docs,):
        raise ValueError(f"scores: expected one score per test document ({split.n_docs}), "
                         f"got {scores.shape} and reference {reference.shape}")
    ref_ndcg = evaluate(split, reference)["ndcg@10"]
    finite = bool(np.all(np.isfinite(scores)))
    ndcg = evaluate(split, np.nan_to_num(scores, nan=-np.inf))["ndcg@10"] if finite else 0.0
    retention = round(ndcg / ref_ndcg, 4) if ref_ndcg > 0 else 0.0
    tau, overlap = ranking_agreement(reference, scores, split.offsets)
    valid = finite and retention >= VALID_RETENTION
    return AccuracyReport(
        ndcg10=round(ndcg, 6), reference_ndcg10=round(ref_ndcg, 6), retention=retention, valid=valid,
        high_accuracy=valid and retention >= HIGH_ACCURACY_RETENTION,
        max_abs_diff=float(np.max(np.abs(scores - reference))) if finite and scores.size else float("inf"),
        kendall_tau=round(tau, 6), top10_overlap=round(overlap, 6),
        n_queries=split.n_queries, n_docs=split.n_docs,
    )
