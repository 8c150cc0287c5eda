"""The two-stage corpus: documents with latent factors and static features, queries with attributes.

Why a generator of its own (and not `models/data.py`'s lists): retrieval is a question about a whole
corpus. A query's relevant documents are found among all of them, not handed over in a list, so the
relevance function must be defined for every (query, document) pair and cheap to evaluate for one
query against the corpus. It is:

    utility(q, d) = <q_latent, d_latent> + 0.7 * quality(d) + 0.4 * tanh(freshness(d)) + noise(q, d)

- documents and queries sit around `N_TOPICS` topic centres in a `LATENT_DIM`-d space, so that
  nearest-neighbour structure exists (as in real embeddings) and an ANN index has clusters to use;
- the model never sees a latent factor: documents expose `DOC_FEATURES` static features (noisy
  linear views of their latent factors, noisy proxies of quality, freshness, length, pure noise),
  queries `QUERY_ATTRIBUTES` attributes (noisy views of their latent factors);
- `noise(q, d)` is drawn per query from a seeded generator, so labels are deterministic;
- grades are by rank of the noisy utility within the corpus: the top `GRADE_COUNTS[0]` documents of
  a query get grade 4, the next `GRADE_COUNTS[1]` grade 3, and so on; the relevant set is every
  document with grade >= 1 (`RELEVANT_PER_QUERY` of them, whatever the corpus size).

Queries are split by query into train / vali / test; the corpus is shared, as in production (a
retrieval model is trained on past queries and evaluated on new ones over the same documents).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LATENT_DIM = 16
N_TOPICS = 64
DOC_VIEWS = 24  # noisy linear views of the document's latent factors
DOC_FEATURES = DOC_VIEWS + 7  # + 3 quality proxies, freshness, length, 2 pure-noise features
QUERY_ATTRIBUTES = 24
GRADE_COUNTS = (3, 7, 20, 70)  # documents of grade 4, 3, 2, 1 per query
RELEVANT_PER_QUERY = sum(GRADE_COUNTS)
DEFAULT_DOCS = 100_000
DEFAULT_QUERIES = 3_000
SPLIT_SHARES = (0.7, 0.15, 0.15)
SPLIT_NAMES = ("train", "vali", "test")
_HIDDEN_SEED = 20261130  # fixes topic centres and the feature maps; `seed` draws documents and queries
_TOPIC_SPREAD = 0.8
_LABEL_NOISE = 1.0
_QUALITY_WEIGHT, _FRESHNESS_WEIGHT = 0.7, 0.4
_CHUNK_QUERIES = 64


@dataclass
class Corpus:
    """Documents and queries of one generated corpus; latent arrays are the hidden truth."""

    seed: int
    doc_latent: np.ndarray  # float32 [n_docs, LATENT_DIM]
    doc_quality: np.ndarray  # float32 [n_docs]
    doc_freshness: np.ndarray  # float32 [n_docs]
    doc_features: np.ndarray  # float32 [n_docs, DOC_FEATURES]: what the models see
    query_latent: np.ndarray  # float32 [n_queries, LATENT_DIM]
    query_attributes: np.ndarray  # float32 [n_queries, QUERY_ATTRIBUTES]: what the models see
    query_split: np.ndarray  # int8 [n_queries]: 0 train, 1 vali, 2 test

    @property
    def n_docs(self) -> int:
        return int(self.doc_latent.shape[0])

    @property
    def n_queries(self) -> int:
        return int(self.query_latent.shape[0])

    def queries_of(self, split: str) -> np.ndarray:
        """Query indices of one split, in order."""
        return np.flatnonzero(self.query_split == SPLIT_NAMES.index(split)).astype(np.int64)

    def true_utility(self, queries: np.ndarray) -> np.ndarray:
        """Noiseless utility of every document for the given queries: float32 [len(queries), n_docs]."""
        affinity = self.query_latent[queries] @ self.doc_latent.T
        static = _QUALITY_WEIGHT * self.doc_quality + _FRESHNESS_WEIGHT * np.tanh(self.doc_freshness)
        return (affinity + static[None, :]).astype(np.float32)

    def noisy_utility(self, queries: np.ndarray) -> np.ndarray:
        """The utility the labels come from: true utility plus per-(query, document) noise, seeded by query."""
        utility = self.true_utility(queries)
        for row, q in enumerate(np.asarray(queries).tolist()):
            utility[row] += np.random.default_rng((self.seed, 7, q)).normal(0, _LABEL_NOISE, self.n_docs) \
                .astype(np.float32)
        return utility

    def relevant(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(doc ids int64 [nq, RELEVANT_PER_QUERY] best first, grades float32 [nq, RELEVANT_PER_QUERY])."""
        queries = np.asarray(queries, dtype=np.int64)
        ids = np.empty((queries.size, RELEVANT_PER_QUERY), np.int64)
        for start in range(0, queries.size, _CHUNK_QUERIES):
            chunk = queries[start:start + _CHUNK_QUERIES]
            ids[start:start + chunk.size] = top_k(self.noisy_utility(chunk), RELEVANT_PER_QUERY)
        grades = np.repeat(np.arange(4, 0, -1, dtype=np.float32), GRADE_COUNTS)
        return ids, np.broadcast_to(grades, ids.shape).copy()

    def latent_top(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Exact search over the true (noiseless) utility: the best any retriever could do, [nq, k]."""
        queries = np.asarray(queries, dtype=np.int64)
        out = np.empty((queries.size, k), np.int64)
        for start in range(0, queries.size, _CHUNK_QUERIES):
            chunk = queries[start:start + _CHUNK_QUERIES]
            out[start:start + chunk.size] = top_k(self.true_utility(chunk), k)
        return out

    def fingerprint(self) -> str:
        """sha256 (16 hex) of what the models see and of the split: artifacts built on it name it."""
        digest = hashlib.sha256()
        for array in (self.doc_features, self.query_attributes, self.query_split):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def describe(self) -> dict:
        return {
            "generator": "models.corpus.make_corpus", "seed": self.seed, "docs": self.n_docs,
            "queries": {name: int((self.query_split == i).sum()) for i, name in enumerate(SPLIT_NAMES)},
            "doc_features": DOC_FEATURES, "query_attributes": QUERY_ATTRIBUTES, "latent_dim": LATENT_DIM,
            "topics": N_TOPICS, "relevant_per_query": RELEVANT_PER_QUERY, "grade_counts": list(GRADE_COUNTS),
            "hidden_function": f"<q_latent, d_latent> + {_QUALITY_WEIGHT} quality + {_FRESHNESS_WEIGHT} "
                               f"tanh(freshness) + N(0, {_LABEL_NOISE}) per (query, document)",
            "fingerprint": self.fingerprint(),
        }

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        np.savez(path, seed=np.int64(self.seed), **arrays)
        path.with_suffix(".json").write_text(json.dumps(self.describe(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> Corpus:
        with np.load(path) as data:
            return cls(seed=int(data["seed"]), **{name: data[name] for name in _ARRAYS})


_ARRAYS = ("doc_latent", "doc_quality", "doc_freshness", "doc_features", "query_latent", "query_attributes",
           "query_split")


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest scores of each row, best first (ties: lower index first)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.lexsort((part, -np.take_along_axis(scores, part, axis=1)), axis=1)
    return np.take_along_axis(part, order, axis=1).astype(np.int64)


def _hidden_maps() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(_HIDDEN_SEED)
    return {
        "topics": rng.normal(0, 1, (N_TOPICS, LATENT_DIM)),
        "doc_views": rng.normal(0, 1 / np.sqrt(LATENT_DIM), (DOC_VIEWS, LATENT_DIM)),
        "query_views": rng.normal(0, 1 / np.sqrt(LATENT_DIM), (QUERY_ATTRIBUTES, LATENT_DIM)),
        "topic_weights": rng.dirichlet(np.full(N_TOPICS, 2.0)),
    }


def make_corpus(n_docs: int = DEFAULT_DOCS, n_queries: int = DEFAULT_QUERIES, *, seed: int = 0) -> Corpus:
    """A deterministic corpus (same seed and sizes, same arrays), split by query."""
    if n_docs < 4 * RELEVANT_PER_QUERY:
        raise ValueError(f"n_docs: need at least {4 * RELEVANT_PER_QUERY} (4x the relevant set), got {n_docs}")
    if n_queries < 3:
        raise ValueError(f"n_queries: need at least 3 (one per split), got {n_queries}")
    maps = _hidden_maps()
    rng = np.random.default_rng((seed, n_docs, n_queries))
    doc_topic = rng.choice(N_TOPICS, size=n_docs, p=maps["topic_weights"])
    doc_latent = maps["topics"][doc_topic] + rng.normal(0, _TOPIC_SPREAD, (n_docs, LATENT_DIM))
    quality = rng.normal(0, 1, n_docs)
    freshness = rng.normal(0, 1, n_docs)
    views = doc_latent @ maps["doc_views"].T + rng.normal(0, 0.25, (n_docs, DOC_VIEWS))
    doc_features = np.column_stack([
        views,
        np.exp(0.8 * quality + rng.normal(0, 0.5, n_docs)) * 100.0,  # a popularity count
        quality + rng.normal(0, 0.7, n_docs),  # an editorial score
        (quality + rng.normal(0, 1.0, n_docs) > 0.5).astype(np.float64),  # a "trusted source" flag
        freshness + rng.normal(0, 0.3, n_docs),  # age, standardized
        np.exp(rng.normal(6.0, 0.8, n_docs)),  # length in words: no bearing on relevance
        rng.normal(0, 1, (n_docs, 2)),  # noise
    ])
    query_topic = rng.choice(N_TOPICS, size=n_queries, p=maps["topic_weights"])
    query_latent = maps["topics"][query_topic] + rng.normal(0, _TOPIC_SPREAD, (n_queries, LATENT_DIM))
    attributes = query_latent @ maps["query_views"].T + rng.normal(0, 0.25, (n_queries, QUERY_ATTRIBUTES))
    split = np.zeros(n_queries, np.int8)
    order = rng.permutation(n_queries)
    n_train = max(1, int(round(n_queries * SPLIT_SHARES[0])))
    n_vali = max(1, int(round(n_queries * SPLIT_SHARES[1])))
    n_train = min(n_train, n_queries - n_vali - 1)
    split[order[n_train:n_train + n_vali]] = 1
    split[order[n_train + n_vali:]] = 2
    f32 = np.float32
    return Corpus(seed=seed, doc_latent=doc_latent.astype(f32), doc_quality=quality.astype(f32),
                  doc_freshness=freshness.astype(f32), doc_features=doc_features.astype(f32),
                  query_latent=query_latent.astype(f32), query_attributes=attributes.astype(f32),
                  query_split=split)


def add_corpus_options(parser: argparse.ArgumentParser) -> None:
    """--docs, --queries, --seed: the corpus every two-stage command works on."""
    parser.add_argument("--docs", type=int, default=DEFAULT_DOCS, help="corpus size (1000000 and more work)")
    parser.add_argument("--queries", type=int, default=DEFAULT_QUERIES)
    parser.add_argument("--seed", type=int, default=0)


def corpus_path(directory: Path, n_docs: int, n_queries: int, seed: int) -> Path:
    return directory / f"corpus-{n_docs}x{n_queries}-s{seed}.npz"


def load_or_make(directory: Path, n_docs: int = DEFAULT_DOCS, n_queries: int = DEFAULT_QUERIES, *,
                 seed: int = 0) -> Corpus:
    """The corpus of these sizes and seed, generated once and kept in `directory`."""
    path = corpus_path(directory, n_docs, n_queries, seed)
    if path.is_file():
        return Corpus.load(path)
    corpus = make_corpus(n_docs, n_queries, seed=seed)
    corpus.save(path)
    return corpus
