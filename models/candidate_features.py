"""The second stage's input: one feature row per (query, candidate document), shared offline and online.

Why one module without torch: the ranker is trained on rows built here (models/two_stage.py) and
the service builds the same rows at request time (serve/search.py), so the two cannot drift; the
service must not import torch to do it.

A row is `QUERY_DOC_FEATURES` computed at request time from the query embedding and the document's
embedding (the dot product the retriever ranked by, the cosine, both norms, and the element-wise
products of the first `N_PRODUCTS` embedding dimensions: cross features a ranker can weigh
differently from the dot product), followed by the document's static features as the feature store
holds them. The store keeps, per document, its static features then its embedding, so that one
MGET gives both.
"""

from __future__ import annotations

import numpy as np

from models.corpus import DOC_FEATURES

N_PRODUCTS = 8
QUERY_DOC_FEATURES = 4 + N_PRODUCTS
RANKER_FEATURES = QUERY_DOC_FEATURES + DOC_FEATURES
FEATURE_NAMES = (["dot", "cosine", "query_norm", "doc_norm"] + [f"product_{i}" for i in range(N_PRODUCTS)]
                 + [f"doc_{i}" for i in range(DOC_FEATURES)])


def store_rows(doc_features: np.ndarray, doc_embeddings: np.ndarray) -> np.ndarray:
    """What the feature store holds per document: static features then embedding, float32."""
    return np.hstack([doc_features, doc_embeddings]).astype(np.float32)


def candidate_features(query_embedding: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 [K, RANKER_FEATURES] for one query (embedding [d]) and its candidates' store rows [K, F + d]."""
    q = np.asarray(query_embedding, dtype=np.float32).reshape(-1)
    static, emb = rows[:, :DOC_FEATURES], rows[:, DOC_FEATURES:]
    if emb.shape[1] != q.size:
        raise ValueError(f"rows: expected {DOC_FEATURES} static features + {q.size} embedding values, "
                         f"got {rows.shape[1]} columns")
    dot = emb @ q
    q_norm = np.float32(np.linalg.norm(q))
    d_norm = np.linalg.norm(emb, axis=1)
    cosine = dot / np.maximum(d_norm * q_norm, 1e-6)
    out = np.empty((rows.shape[0], RANKER_FEATURES), np.float32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = dot, cosine, q_norm, d_norm
    out[:, 4:QUERY_DOC_FEATURES] = emb[:, :N_PRODUCTS] * q[:N_PRODUCTS]
    out[:, QUERY_DOC_FEATURES:] = static
    return out
