"""The first stage's vector index: one interface over FAISS (in process) and Milvus (Lite or a server).

Why: the two-stage service retrieves candidates by maximum inner product against document embeddings
(not normalized: a document's norm carries meaning), then ranks them. Which index answers, and with
which parameters, is configuration (`IndexConfig`), so a benchmark compares FAISS and Milvus, exact
and approximate, on one code path, and `exact_search`/`recall_at_k` say what each approximation costs.

    cfg = IndexConfig(kind="hnsw", ef_search=64)
    ensure_index(cfg, embeddings, index_dir)      # builds, or skips when the sidecar json matches
    index = open_index(cfg, index_dir)            # FaissIndex or MilvusIndex
    scores, ids = index.search(queries, k=100)    # float32 / int64 [nq, k], best first, ids -1 = none

Errors: a backend that cannot answer (file missing or corrupt, Milvus down, collection missing)
raises `IndexUnavailableError` from `open_index` or `search`; the service answers degraded.

Milvus Lite (milvus-lite 3.2.2, pure Python on FAISS), checked by trying it:
- IVF_PQ: Lite accepts the index and `describe_index` reports it "Finished", but its segment build
  raises NotImplementedError (it builds FLAT, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8) and every search falls
  back to brute force. So kind "ivfpq" on a Lite URI is refused (ValueError); a server has IVF_PQ.
- One process per .db: the ".db file" is a folder, and its first opener holds an exclusive flock on
  `<db>/LOCK` until that process exits (pymilvus keeps the embedded server alive after
  `MilvusClient.close()`). A second process gets "Open local milvus failed": the builder cannot
  write while a service has the file open, and replicas in separate processes cannot share one .db.
  `open_index` says so (IndexUnavailableError); `close()` here stops this process's embedded server
  once its last user closes. Several replicas need a Milvus server (`uri="http://host:19530"`).
- Latency, measured 2026-11-30 on the lab's 2-core AMD EPYC, 100k x 32 random vectors: Lite answers
  one top-100 search in ~120-250 ms for FLAT/HNSW/IVF_FLAT alike, while the FAISS HNSW search inside
  it takes ~1.3 ms; the rest is `milvus_lite/search/executor_indexed.py::_build_local_mask`, a
  per-row Python loop (MVCC dedup and tombstones) over every row of the collection on each search.
  So Lite's cost grows with the corpus, not the index; a Milvus server does not have this loop.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import faiss
import numpy as np

from serve.index_config import IndexConfig, IndexUnavailableError  # noqa: F401 - re-exported

log = logging.getLogger(__name__)

MILVUS_INDEX_TYPE = {"flat": "FLAT", "hnsw": "HNSW", "ivf_flat": "IVF_FLAT", "ivfpq": "IVF_PQ"}
INSERT_CHUNK = 10_000


class VectorIndex(ABC):
    """Maximum inner product search over documents whose ids are row numbers 0..size-1."""

    blocking: ClassVar[bool] = False  # True: too slow for an event loop, call it in a thread
    config: IndexConfig
    dim: int
    size: int

    @abstractmethod
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [nq, k], ids int64 [nq, k]), best first; id -1 (score -inf) = not found."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def params(self) -> dict[str, Any]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"backend": self.config.backend, "kind": self.config.kind, "label": self.config.label,
                "size": self.size, "dim": self.dim, "params": self.params()}


def mips_augment(x: np.ndarray) -> np.ndarray:
    """Documents for maximum inner product search on a nearest-neighbour graph (Bachrach et al. 2014):
    append sqrt(M^2 - |d|^2), M the largest norm, so every document has norm M. A query gets a 0
    appended (`_with_zero`), so each inner product is unchanged, and on equal norms it ranks as
    cosine and L2 do: the metric structure HNSW's graph needs. Without it (raw inner products with
    norms that carry quality) HNSW found only 0.38-0.44 of the exact top-K here."""
    norms = np.linalg.norm(x, axis=1)
    extra = np.sqrt(np.maximum(norms.max() ** 2 - norms ** 2, 0.0))
    return np.hstack([x, extra[:, None]]).astype(np.float32)


def _with_zero(q: np.ndarray) -> np.ndarray:
    return np.hstack([q, np.zeros((len(q), 1), np.float32)])


def _as_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    q = np.ascontiguousarray(queries, dtype=np.float32)
    q = q.reshape(1, -1) if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [nq, {dim}], got {queries.shape}")
    return q


class FaissIndex(VectorIndex):
    blocking = False  # a few ms for small k on one core: fine on an event loop

    def __init__(self, config: IndexConfig, path: Path, threads: int = 1) -> None:
        # Process-wide OpenMP setting. A serving replica owns one core: more threads per query
        # would contend with the other replicas and the ranker instead of cutting latency.
        faiss.omp_set_num_threads(threads)
        self.config, self.path = config, path
        if not path.is_file():
            raise IndexUnavailableError(f"faiss index {path} is missing; run export/build_index.py")
        try:
            self.index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexUnavailableError(f"faiss index {path} is unreadable: {exc}") from exc
        self.dim, self.size = int(self.index.d) - config.mips_augmented, int(self.index.ntotal)
        base = self.index
        if isinstance(self.index, faiss.IndexRefineFlat):
            self.index.k_factor = float(config.refine_factor)
            base = faiss.downcast_index(self.index.base_index)
        if hasattr(base, "hnsw"):
            base.hnsw.efSearch = config.ef_search
        if hasattr(base, "nprobe"):
            base.nprobe = config.nprobe
        self._base = base
        self._hnsw_params = hasattr(base, "hnsw") and base is self.index

    def params(self) -> dict[str, Any]:
        base, out = self._base, {"file": self.path.name, "threads": faiss.omp_get_max_threads()}
        out |= {"ef_search": base.hnsw.efSearch} if hasattr(base, "hnsw") else {}
        out |= {"nlist": base.nlist, "nprobe": base.nprobe} if hasattr(base, "nprobe") else {}
        return out | ({"refine_factor": self.index.k_factor} if base is not self.index else {})

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        try:
            q = _as_queries(queries, self.dim)
            q = _with_zero(q) if self.config.mips_augmented else q
            if self._hnsw_params:  # HNSW returns at most efSearch results: explore at least k (as Milvus does)
                params = faiss.SearchParametersHNSW(efSearch=max(self.config.ef_search, k))
                scores, ids = self.index.search(q, k, params=params)
            else:
                scores, ids = self.index.search(q, k)
        except RuntimeError as exc:
            raise IndexUnavailableError(f"faiss search failed: {exc}") from exc
        ids = ids.astype(np.int64, copy=False)
        scores[ids < 0] = -np.inf
        return scores, ids


# Milvus Lite: one embedded server per .db path and process; stop it when its last user closes, so
# that another process (the builder, the service) can take the file's lock.
_lite_users: Counter[str] = Counter()
_lite_guard = threading.Lock()


def _connect(uri: str, timeout: float | None) -> Any:
    from pymilvus import MilvusClient

    lite = uri.endswith(".db")
    try:
        client = MilvusClient(uri=uri, timeout=timeout)
    except Exception as exc:
        if lite and _lite_locked(Path(uri)):
            raise IndexUnavailableError(
                f"Milvus Lite {uri} is open in another process: Lite allows one process per .db "
                "(stop the service or the builder, or use a Milvus server URI)") from exc
        raise IndexUnavailableError(f"cannot connect to Milvus at {uri}: {exc}") from exc
    if lite:
        with _lite_guard:
            _lite_users[os.path.abspath(uri)] += 1
    return client


def _disconnect(client: Any, uri: str) -> None:
    client.close()
    if not uri.endswith(".db"):
        return
    key = os.path.abspath(uri)  # the embedded server's key (milvus_lite.server_manager)
    with _lite_guard:
        _lite_users[key] -= 1
        last = _lite_users[key] <= 0
    if last:
        from milvus_lite.server_manager import server_manager_instance

        server_manager_instance.release_server(key)


def _lite_locked(db: Path) -> bool:
    """True when another process holds the .db's flock (only asked after this process failed to open)."""
    if not (db / "LOCK").exists():
        return False
    with open(db / "LOCK", "rb") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


class MilvusIndex(VectorIndex):
    blocking = True  # a network (or Lite: a Python) round trip per search: run it in a thread

    def __init__(self, config: IndexConfig, index_dir: Path, timeout: float = 10.0) -> None:
        from pymilvus import MilvusException

        self.config, self.uri, self.timeout = config, config.resolve_uri(index_dir), timeout
        self.name = config.collection_name
        if config.is_lite and not Path(self.uri).is_dir():
            raise IndexUnavailableError(f"Milvus Lite {self.uri} does not exist; run export/build_index.py")
        self.client = _connect(self.uri, timeout)
        try:
            if not self.client.has_collection(self.name):
                raise IndexUnavailableError(f"Milvus collection {self.name} does not exist at {self.uri}")
            self.client.load_collection(self.name)
            fields = self.client.describe_collection(self.name)["fields"]
            self.dim = int(next(f for f in fields if f["name"] == "emb")["params"]["dim"]) - config.mips_augmented
            self.size = int(self.client.get_collection_stats(self.name)["row_count"])
        except MilvusException as exc:
            self.close()
            raise IndexUnavailableError(f"Milvus collection {self.name}: {exc}") from exc
        except IndexUnavailableError:
            self.close()
            raise

    def params(self) -> dict[str, Any]:
        return {"uri": self.uri, "collection": self.name, **self._search_params(0)["params"]}

    def _search_params(self, k: int) -> dict[str, Any]:
        kind, params = self.config.kind, {}
        if kind == "hnsw":
            params["ef"] = max(self.config.ef_search, k)  # a Milvus server refuses ef < k
        elif kind in ("ivf_flat", "ivfpq"):
            params["nprobe"] = self.config.nprobe
        return {"metric_type": "IP", "params": params}

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        q = _as_queries(queries, self.dim)
        try:
            sent = _with_zero(q) if self.config.mips_augmented else q
            hits = self.client.search(self.name, data=sent.tolist(), anns_field="emb", limit=k, output_fields=["id"],
                                      search_params=self._search_params(k), timeout=self.timeout)
        except Exception as exc:  # MilvusException, grpc errors, a closed client
            raise IndexUnavailableError(f"Milvus search on {self.name} failed: {exc}") from exc
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        for row, found in enumerate(hits):
            for col, hit in enumerate(found[:k]):
                scores[row, col], ids[row, col] = hit["distance"], hit["id"]
        return scores, ids

    def close(self) -> None:
        if getattr(self, "client", None) is not None:
            _disconnect(self.client, self.uri)
            self.client = None


def _effective_nlist(nlist: int, n: int) -> int:
    cap = max(1, n // 39)  # faiss wants >= 39 training points per cell
    if nlist > cap:
        log.warning("nlist %d clamped to %d for %d documents (n_docs // 39)", nlist, cap, n)
    return min(nlist, cap)


def _check_build(config: IndexConfig, embeddings: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty [n_docs, dim] matrix, got {embeddings.shape}")
    if config.kind == "ivfpq" and x.shape[1] % config.pq_m:
        raise ValueError(f"pq_m: {config.pq_m} does not divide the embedding dim {x.shape[1]}")
    return x


def _build_faiss(config: IndexConfig, x: np.ndarray, path: Path) -> dict[str, Any]:
    n, d = x.shape
    ip = faiss.METRIC_INNER_PRODUCT
    nlist = _effective_nlist(config.nlist, n)
    if config.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, config.hnsw_m, ip)
        index.hnsw.efConstruction = config.ef_construction
    elif config.kind == "ivf_flat":
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, ip)
    else:
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, nlist, config.pq_m, config.pq_nbits, ip)
    if config.kind in ("ivf_flat", "ivfpq"):
        if config.refined:
            index = faiss.IndexRefineFlat(index)
        rows = np.random.default_rng(0).permutation(n)[: 256 * nlist]
        index.train(x[np.sort(rows)])
    index.add(x)
    faiss.write_index(index, str(path))
    return {"nlist_effective": nlist} if config.kind in ("ivf_flat", "ivfpq") else {}


def _build_milvus(config: IndexConfig, x: np.ndarray, index_dir: Path) -> dict[str, Any]:
    from pymilvus import DataType, MilvusClient

    uri, name = config.resolve_uri(index_dir), config.collection_name
    params: dict[str, int] = {}
    if config.kind == "hnsw":
        params = {"M": config.hnsw_m, "efConstruction": config.ef_construction}
    elif config.kind in ("ivf_flat", "ivfpq"):
        params = {"nlist": _effective_nlist(config.nlist, len(x))}
    if config.kind == "ivfpq":
        params |= {"m": config.pq_m, "nbits": config.pq_nbits}
    client = _connect(uri, timeout=None)  # a server may take minutes to index and load
    try:
        if client.has_collection(name):
            client.drop_collection(name)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("emb", DataType.FLOAT_VECTOR, dim=x.shape[1])
        client.create_collection(name, schema=schema)
        for start in range(0, len(x), INSERT_CHUNK):
            chunk = x[start : start + INSERT_CHUNK].tolist()
            client.insert(name, [{"id": start + i, "emb": v} for i, v in enumerate(chunk)])
        client.flush(name)
        index_params = client.prepare_index_params()
        index_params.add_index(field_name="emb", index_type=MILVUS_INDEX_TYPE[config.kind],
                               metric_type="IP", params=params)
        # a server builds in the background: wait for it (sync); Lite builds in load_collection
        client.create_index(name, index_params, sync=not config.is_lite)
        client.load_collection(name)
    finally:
        _disconnect(client, uri)
    return {"uri": uri, "collection": name, "index_params": params}


def _sidecar(config: IndexConfig, index_dir: Path) -> Path:
    return index_dir / f"{config.file_name()}.json"


def _fingerprint(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()[:16]


def _built_path(config: IndexConfig, index_dir: Path) -> Path:
    return Path(config.resolve_uri(index_dir)) if config.is_lite else index_dir / config.file_name()


def build_index(config: IndexConfig, embeddings: np.ndarray, index_dir: Path) -> Path:
    """Build and save the index (faiss file, or a fresh Milvus collection), plus its json sidecar."""
    x = _check_build(config, embeddings)
    index_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    indexed = mips_augment(x) if config.mips_augmented else x
    if config.backend == "faiss":
        extra = _build_faiss(config, indexed, index_dir / config.file_name())
    else:
        extra = _build_milvus(config, indexed, index_dir)
    seconds = time.perf_counter() - started
    meta = {"config": config.model_dump(), "build_key": config.build_key(), "n": len(x), "dim": x.shape[1],
            "sha256": _fingerprint(x), "build_seconds": round(seconds, 3), **extra}
    _sidecar(config, index_dir).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("built %s %s in %.1f s", config.backend, config.label, seconds)
    return _built_path(config, index_dir)


def ensure_index(config: IndexConfig, embeddings: np.ndarray, index_dir: Path) -> Path:
    """build_index, unless the sidecar says this build (params, n, embeddings) already exists."""
    path, n = _built_path(config, index_dir), len(embeddings)
    try:
        meta = json.loads(_sidecar(config, index_dir).read_text())
    except (OSError, ValueError):
        meta = {}
    fresh = (meta.get("build_key") == config.build_key() and meta.get("n") == n
             and meta.get("sha256") == _fingerprint(embeddings))
    if fresh and config.backend == "milvus":
        fresh = meta.get("uri") == config.resolve_uri(index_dir) and _collection_rows(config, index_dir) == n
    elif fresh:
        fresh = path.is_file()
    if fresh:
        log.info("index %s %s is up to date, not rebuilt", config.backend, config.label)
        return path
    return build_index(config, embeddings, index_dir)


def _collection_rows(config: IndexConfig, index_dir: Path) -> int:
    try:
        index = MilvusIndex(config, index_dir)
    except IndexUnavailableError:
        return -1
    index.close()
    return index.size


def open_index(config: IndexConfig, index_dir: Path, threads: int = 1) -> VectorIndex:
    """The built index for `config`; IndexUnavailableError when it is missing or unreachable."""
    if config.backend == "faiss":
        return FaissIndex(config, index_dir / config.file_name(), threads=threads)
    return MilvusIndex(config, index_dir)


def exact_search(embeddings: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force maximum inner product top-k in numpy: the reference for ANN recall."""
    x = np.asarray(embeddings, dtype=np.float32)
    q = _as_queries(queries, x.shape[1])
    n, kk = len(x), min(k, len(x))
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    ids = np.full((len(q), k), -1, dtype=np.int64)
    step = max(1, (1 << 24) // max(n, 1))  # about 64 MB of scores per chunk
    for lo in range(0, len(q), step):
        s = q[lo : lo + step] @ x.T
        top = np.argpartition(-s, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (len(s), 1))
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        ids[lo : lo + step, :kk] = np.take_along_axis(top, order, axis=1)
        scores[lo : lo + step, :kk] = np.take_along_axis(top_s, order, axis=1)
    return scores, ids


def recall_at_k(found_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean over queries of |found ∩ true| / |true|, ignoring -1 (queries with no true ids count 1)."""
    per_query = []
    for found, true in zip(np.asarray(found_ids), np.asarray(true_ids), strict=True):
        truth = set(true[true >= 0].tolist())
        per_query.append(len(truth & set(found[found >= 0].tolist())) / len(truth) if truth else 1.0)
    return float(np.mean(per_query)) if per_query else 1.0
