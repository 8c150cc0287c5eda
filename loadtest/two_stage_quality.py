"""Offline quality of one two-stage configuration: ANN recall, retrieval recall, NDCG@10 and its ceiling.

Why offline, beside the load test: recall and NDCG need the hidden labels of a sample of test
queries, and the ceiling needs the ranker on every document of the corpus (100k scores a query),
which no service request does. The steps are serve/search_pipeline.py's (the code that serves);
only the feature rows come from memory instead of Redis (the same float32 rows the store holds).

- `ann_recall_at_k`: the share of the exact top-K (brute-force inner product over the same document
  embeddings) that the index returned: what the approximation costs.
- `retrieval_recall`: the share of the query's relevant documents (grade >= 1, models/corpus.py)
  among the K candidates: what the first stage lets through.
- `ndcg10`: NDCG@10 of the final top 10, with the ideal DCG over the whole corpus's relevant set
  (not over the candidates: a retriever that misses relevant documents must lose NDCG for it).
- `ndcg10_ceiling`: the same ranker scoring every document of the corpus (no retrieval at all).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from models.corpus import GRADE_COUNTS
from models.two_stage import TwoStageArtifacts

_IDEAL_GRADES = np.repeat(np.arange(4, 0, -1, dtype=np.float64), GRADE_COUNTS)[:10]


def dcg(grades: np.ndarray) -> float:
    grades = np.asarray(grades, np.float64)
    return float(np.sum((2.0 ** grades - 1.0) / np.log2(np.arange(2, grades.size + 2))))


IDEAL_DCG10 = dcg(_IDEAL_GRADES)


def ndcg10(ranked: np.ndarray, relevant: np.ndarray, grades: np.ndarray) -> float:
    """NDCG@10 of `ranked` doc ids against the corpus-wide relevant set of one query."""
    label = dict(zip(relevant.tolist(), grades.tolist(), strict=True))
    return dcg(np.array([label.get(d, 0.0) for d in np.asarray(ranked)[:10].tolist()])) / IDEAL_DCG10


@dataclass
class QuerySample:
    """The sampled test queries with their embeddings (through the exported query tower) and labels."""

    queries: np.ndarray
    embeddings: np.ndarray
    relevant: np.ndarray
    grades: np.ndarray

    @classmethod
    def of(cls, artifacts: TwoStageArtifacts, n: int, seed: int = 0) -> QuerySample:
        test = artifacts.corpus.queries_of("test")
        queries = np.sort(np.random.default_rng(seed).choice(test, min(n, test.size), replace=False))
        relevant, grades = artifacts.corpus.relevant(queries)
        return cls(queries, artifacts.query_embeddings(queries), relevant, grades)


def exact_top(artifacts: TwoStageArtifacts, sample: QuerySample, k: int) -> np.ndarray:
    from serve.vector_index import exact_search

    return exact_search(artifacts.doc_embeddings, sample.embeddings, k)[1]


def evaluate(pipeline, artifacts: TwoStageArtifacts, sample: QuerySample, k_candidates: int,
             exact: np.ndarray) -> dict[str, float]:
    """Quality and offline per-stage means (ms) of `pipeline` at K = k_candidates over the sample."""
    ann, retrieval, ndcg = [], [], []
    spent = {"retrieve": 0.0, "rank": 0.0}
    for i in range(sample.queries.size):
        t = time.perf_counter()
        ids, _ = pipeline.retrieve(sample.embeddings[i], k_candidates)
        t1 = time.perf_counter()
        scores = pipeline.rank(sample.embeddings[i], artifacts.rows[ids])
        spent["retrieve"] += t1 - t
        spent["rank"] += time.perf_counter() - t1
        top = ids[np.argsort(-scores, kind="stable")[:10]]
        ann.append(np.intersect1d(ids, exact[i, :k_candidates]).size / k_candidates)
        retrieval.append(np.intersect1d(ids, sample.relevant[i]).size / sample.relevant.shape[1])
        ndcg.append(ndcg10(top, sample.relevant[i], sample.grades[i]))
    n = max(sample.queries.size, 1)
    return {"ann_recall_at_k": float(np.mean(ann)), "retrieval_recall": float(np.mean(retrieval)),
            "ndcg10": float(np.mean(ndcg)), "offline_retrieve_ms": spent["retrieve"] * 1000 / n,
            "offline_rank_ms": spent["rank"] * 1000 / n, "queries": int(sample.queries.size)}


def ceiling(scorer, artifacts: TwoStageArtifacts, sample: QuerySample, chunk: int = 25_000) -> float:
    """Mean NDCG@10 of `scorer` ranking the whole corpus for each sampled query."""
    from models.candidate_features import candidate_features

    values = []
    n_docs = artifacts.corpus.n_docs
    for i in range(sample.queries.size):
        scores = np.concatenate([
            np.asarray(scorer.score_documents(candidate_features(sample.embeddings[i], artifacts.rows[a:a + chunk])),
                       np.float32).reshape(-1)
            for a in range(0, n_docs, chunk)])
        top = np.argpartition(-scores, 10)[:10]
        top = top[np.argsort(-scores[top], kind="stable")]
        values.append(ndcg10(top, sample.relevant[i], sample.grades[i]))
    return float(np.mean(values))
