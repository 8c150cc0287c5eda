"""The two-stage pipeline's synchronous steps: query tower, ANN top-K, candidate features, ranker.

Why apart from serve/search.py: the service (serve/search.py, async, feature rows from Redis) and the
offline evaluation of the ladder (loadtest/two_stage_quality.py, rows from memory) run these same
steps, so an NDCG in the table is the NDCG of the code that serves. Nothing here imports torch.

Artifacts (artifacts/two_stage/, from `python models/two_stage.py` and `python export/build_index.py`):
`query_tower.onnx`, `index/` (the vector indexes), `fallback_ids.npy` (the degraded answer's
documents: the most popular ones), and the ranker's variants in artifacts/variants/two-stage-mlp/.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.candidate_features import candidate_features
from models.paths import FALLBACK_FILE, QUERY_TOWER_FILE, two_stage_dir
from serve.index_config import IndexConfig, IndexUnavailableError

logger = logging.getLogger(__name__)

INDEX_FOLDER = "index"


def index_dir(directory: Path | None = None) -> Path:
    return (directory or two_stage_dir()) / INDEX_FOLDER


@dataclass
class SearchPipeline:
    """One process's query tower, vector index and ranker."""

    index: Any  # serve.vector_index.VectorIndex
    scorer: Any  # export.runtime.Scorer of the two-stage ranker
    query_tower: Any  # onnxruntime.InferenceSession
    fallback_ids: np.ndarray  # int64: the degraded answer's documents, best first

    @classmethod
    def load(cls, index: IndexConfig, *, variant: str, model: str, threads: int = 1,
             directory: Path | None = None, manifest_path: Path | None = None) -> SearchPipeline:
        """Open everything; raises (FileNotFoundError naming the command to run) when an artifact is missing."""
        import onnxruntime as ort

        from export.runtime import load_scorer

        directory = directory or two_stage_dir()
        tower_path = directory / QUERY_TOWER_FILE
        if not tower_path.is_file():
            raise FileNotFoundError(f"{tower_path}: no query tower; run `python models/two_stage.py` first")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(tower_path), options, providers=["CPUExecutionProvider"])
        scorer = load_scorer(variant, model, threads=threads, manifest_path=manifest_path)
        fallback = np.load(directory / FALLBACK_FILE) if (directory / FALLBACK_FILE).is_file() \
            else np.zeros(0, np.int64)
        return cls(index=ReopeningIndex(index, index_dir(directory), threads), scorer=scorer,
                   query_tower=session, fallback_ids=fallback)

    @property
    def attributes_width(self) -> int:
        return int(self.query_tower.get_inputs()[0].shape[1])

    @property
    def dim(self) -> int:
        """The embedding width (the query tower's output: known even while the index is unavailable)."""
        return int(self.query_tower.get_outputs()[0].shape[1])

    @property
    def ranker(self) -> dict[str, str]:
        """The ranker's identity, as every answer names it."""
        return {"name": self.scorer.model, "variant": self.scorer.variant, "version": self.scorer.version}

    def embed(self, attributes: np.ndarray) -> np.ndarray:
        """Query attributes float32 [n, A] -> embeddings [n, d]."""
        return self.query_tower.run(["embedding"], {"attributes": np.asarray(attributes, np.float32)})[0]

    def retrieve(self, embedding: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One query's top-k candidates: (ids int64, inner products float32), best first, none missing."""
        scores, ids = self.index.search(np.asarray(embedding, np.float32).reshape(1, -1), k)
        found = ids[0] >= 0
        return ids[0][found], scores[0][found]

    def rank(self, embedding: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Ranker scores of the candidates whose feature-store rows are `rows` [K, F + d]."""
        features = candidate_features(embedding, rows)
        return np.asarray(self.scorer.score_documents(features), np.float32).reshape(-1)

    def close(self) -> None:
        self.index.close()


class ReopeningIndex:
    """The configured index, opened now and, while it cannot be, reopened at most every `retry_s`.

    Why: an index that cannot open (a file not built yet, a Milvus server down at start-up) must not
    stop the service or turn /search into errors: until it opens, `search` raises
    IndexUnavailableError and the service answers degraded, and /rank is untouched.
    """

    def __init__(self, config: IndexConfig, directory: Path, threads: int = 1, retry_s: float = 5.0) -> None:
        self.config, self.directory, self.threads, self.retry_s = config, directory, threads, retry_s
        self.opened: Any = None
        self.why = ""
        self._last_try = -float("inf")
        self._open()

    def _open(self) -> None:
        from serve.vector_index import open_index  # imports faiss: only in a process that searches

        self._last_try = time.monotonic()
        try:
            self.opened = open_index(self.config, self.directory, threads=self.threads)
        except IndexUnavailableError as exc:
            self.why = str(exc)
            logger.warning("index %s unavailable: %s", self.config.label, exc)

    @property
    def blocking(self) -> bool:
        """Milvus, or an index still to be opened (opening may take a network round trip): a thread's work."""
        return self.opened is None or self.opened.blocking

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.opened is None and time.monotonic() - self._last_try >= self.retry_s:
            self._open()
        if self.opened is None:
            raise IndexUnavailableError(self.why)
        return self.opened.search(queries, k)

    def close(self) -> None:
        if self.opened is not None:
            self.opened.close()


def top_results(ids: np.ndarray, scores: np.ndarray | None, k: int) -> list[dict[str, Any]]:
    """The first k documents by score (stable: ties keep retrieval order); scores None: in the given order."""
    if scores is None:
        return [{"id": int(i), "score": None} for i in ids[:k].tolist()]
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"id": int(ids[i]), "score": float(scores[i])} for i in order.tolist()]
