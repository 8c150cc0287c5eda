"""Feature-store mode: requests name only document ids, and their features come from Redis.

Why: in production the ranker rarely receives features in the request; it looks them up by
document id. One MGET per request (never one round trip per document) keeps that lookup to a single
Redis round trip. Each key `rankserve:features:<dataset>:<doc_id>` holds one document's features
as little-endian float32 bytes; doc ids are `"<split>-<row index in the split>"`. Every load bumps
the dataset's version (`rankserve:features-version:<dataset>`), which the result cache's keys hold
in feature-store mode (serve/cache_keys.py): answers computed from old rows are never served again.

Note: the features share the server with the result cache, whose eviction policy is allkeys-lru.
Size `maxmemory` for the features plus the cache; `load` warns when Redis evicted keys while loading.

Usage::

    python serve/feature_store.py load --data synthetic [--split test] [--redis-url URL]
    python serve/feature_store.py load --data two_stage        # the two-stage corpus (serve/search.py)
    python serve/feature_store.py get --dataset synthetic test-0 test-1 [--redis-url URL]

    from serve.feature_store import AsyncFeatureStore, FeatureStore, MissingFeaturesError, load_features
    load_features(url, "synthetic", splits=("test",))            # or load_split(url, name, split)
    X = FeatureStore(url).get_features("synthetic", ["test-0", "test-1"])    # float32 [2, F]
    X = await AsyncFeatureStore(url).get_features("synthetic", doc_ids)      # in async def
    # unknown ids raise MissingFeaturesError (a ValueError: answer 4xx); a down Redis, or a store
    # with no record of the dataset (empty, or still loading), raises FeatureStoreUnavailableError
    # (the service answers degraded).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from serve.cache_keys import store_version_key

if TYPE_CHECKING:
    from models.data import LTRSplit

KEY_PREFIX = "rankserve:features"
META_PREFIX = "rankserve:features-meta"
DEFAULT_TIMEOUT_S = 1.0
LOAD_TIMEOUT_S = 10.0
MAX_LISTED_MISSING = 10
REDIS_FAILURES: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)


class FeatureStoreError(ValueError):
    """The request's documents cannot be turned into a feature matrix (bad input: answer 4xx)."""


class MissingFeaturesError(FeatureStoreError):
    """Some document ids have no features in the store; `.missing` holds the first few."""

    def __init__(self, dataset: str, missing: Sequence[str], n_missing: int, n_requested: int):
        self.dataset = dataset
        self.missing = list(missing)
        self.n_missing = n_missing
        listed = ", ".join(repr(doc_id) for doc_id in self.missing)
        more = f" and {n_missing - len(self.missing)} more" if n_missing > len(self.missing) else ""
        super().__init__(
            f"doc_ids: {n_missing} of {n_requested} documents have no features in feature store "
            f"{dataset!r}: {listed}{more}"
        )


class FeatureStoreUnavailableError(RuntimeError):
    """Redis did not answer (answer 503): feature-store mode cannot score without features."""


def feature_key(dataset: str, doc_id: str | int) -> str:
    return f"{KEY_PREFIX}:{dataset}:{doc_id}"


def doc_ids_of(split: LTRSplit) -> list[str]:
    """The store's ids for a split's rows, in row order: `"<split>-<row>"`."""
    return [f"{split.name}-{row}" for row in range(split.n_docs)]


def _decode(dataset: str, doc_ids: Sequence[str | int], values: Sequence[bytes | None]) -> np.ndarray:
    """Stack MGET's values into float32 [n, F]; raises MissingFeaturesError naming the first few."""
    missing = [str(doc_id) for doc_id, value in zip(doc_ids, values, strict=True) if value is None]
    if missing:
        raise MissingFeaturesError(dataset, missing[:MAX_LISTED_MISSING], len(missing), len(doc_ids))
    width = len(values[0])
    if width == 0 or width % 4 or any(len(value) != width for value in values):
        raise FeatureStoreError(f"feature store {dataset!r} holds rows of different or invalid byte lengths")
    # A bytearray makes the array writable (torch.from_numpy warns on read-only arrays).
    matrix = np.frombuffer(bytearray(b"".join(values)), dtype="<f4").reshape(len(values), width // 4)
    return matrix.astype(np.float32, copy=False)


def meta_key(dataset: str) -> str:
    """The hash `load` writes once a split's rows are all in: its absence means "not loaded"."""
    return f"{META_PREFIX}:{dataset}"


def _not_loaded(url: str, dataset: str) -> FeatureStoreUnavailableError:
    """Ids missing from a store with no dataset record: the store is empty or still loading (a Redis
    restarted without persistence): the server's state, answered degraded, not the client's 422."""
    return FeatureStoreUnavailableError(f"feature store at {url}: dataset {dataset!r} is not loaded "
                                        f"(no {meta_key(dataset)}); load it with serve/feature_store.py load")


def _check_ids(doc_ids: Sequence[str | int]) -> list[str]:
    if len(doc_ids) == 0:
        raise FeatureStoreError("doc_ids: must name at least one document")
    return [str(doc_id) for doc_id in doc_ids]


class FeatureStore:
    """Synchronous reader: one MGET per call, short timeouts, no retries."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url
        self.client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
        )

    def get_features(self, dataset: str, doc_ids: Sequence[str | int]) -> np.ndarray:
        ids = _check_ids(doc_ids)
        try:
            values = self.client.mget([feature_key(dataset, doc_id) for doc_id in ids])
            if any(value is None for value in values) and not self.client.exists(meta_key(dataset)):
                raise _not_loaded(self.url, dataset)
        except REDIS_FAILURES as exc:
            raise FeatureStoreUnavailableError(f"feature store at {self.url}: {exc}") from exc
        return _decode(dataset, ids, values)

    def describe(self, dataset: str) -> dict[str, str]:
        """What `load` recorded for the dataset (n_features, source, docs per split); {} if unknown."""
        meta = self.client.hgetall(meta_key(dataset))
        return {key.decode(): value.decode() for key, value in meta.items()}

    def close(self) -> None:
        self.client.close()


class AsyncFeatureStore:
    """The same reader over `redis.asyncio`, for `async def` handlers."""

    def __init__(self, url: str, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.url = url
        self.client = redis.asyncio.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=AsyncRetry(NoBackoff(), 0)
        )

    async def get_features(self, dataset: str, doc_ids: Sequence[str | int]) -> np.ndarray:
        ids = _check_ids(doc_ids)
        try:
            values = await self.client.mget([feature_key(dataset, doc_id) for doc_id in ids])
            if any(value is None for value in values) and not await self.client.exists(meta_key(dataset)):
                raise _not_loaded(self.url, dataset)
        except REDIS_FAILURES as exc:
            raise FeatureStoreUnavailableError(f"feature store at {self.url}: {exc}") from exc
        return _decode(dataset, ids, values)

    async def aclose(self) -> None:
        await self.client.aclose()


def _loader_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=LOAD_TIMEOUT_S, socket_connect_timeout=LOAD_TIMEOUT_S)


def write_rows(client: redis.Redis, dataset: str, ids: Sequence[str | int], rows: np.ndarray,
               chunk_size: int) -> None:
    """SET each row (little-endian float32 bytes) under its id, one pipeline per chunk of rows.

    The dataset's version (serve/cache_keys.py) is bumped before the first row and after the last:
    cached answers keyed on the old version are never read again, and one computed from rows read
    while the load ran is keyed on a version the final bump retires."""
    version = store_version_key(dataset)
    client.incr(version)
    for start in range(0, len(ids), chunk_size):
        pipe = client.pipeline(transaction=False)
        for row in range(start, min(start + chunk_size, len(ids))):
            pipe.set(feature_key(dataset, ids[row]), rows[row].tobytes())
        pipe.execute()
    client.incr(version)


def store_version(client: redis.Redis, dataset: str) -> int:
    """The dataset's version now (0: never loaded since versions were kept)."""
    return int(client.get(store_version_key(dataset)) or 0)


def load_split(url: str, dataset: str, split: LTRSplit, chunk_size: int = 1000) -> int:
    """Write one split's rows under `<split>-<row>` ids, one pipeline of SETs per chunk; returns rows."""
    client = _loader_client(url)
    try:
        features = np.ascontiguousarray(split.X, dtype="<f4")
        ids = doc_ids_of(split)
        write_rows(client, dataset, ids, features, chunk_size)
        client.hset(
            meta_key(dataset),
            mapping={"n_features": features.shape[1], f"docs:{split.name}": len(ids)},
        )
    finally:
        client.close()
    return len(ids)


def load_features(
    url: str,
    data: str = "synthetic",
    splits: Iterable[str] = ("test",),
    *,
    name: str | None = None,
    seed: int = 0,
    n_queries: int | None = None,
    chunk_size: int = 1000,
) -> dict[str, Any]:
    """Load a dataset's splits into Redis; returns a summary (dataset name, rows per split, evictions)."""
    # Imported here: models.data pulls in scikit-learn (seconds), which the serving path never needs.
    from models.data import load_dataset

    ds = load_dataset(data, seed=seed, n_queries=n_queries)
    dataset = name or ds.name
    client = _loader_client(url)
    try:
        evicted_before = int(client.info("stats").get("evicted_keys", 0))
        docs = {split: load_split(url, dataset, ds.splits()[split], chunk_size) for split in splits}
        client.hset(f"{META_PREFIX}:{dataset}", mapping={"source": ds.source, "seed": seed})
        evicted = int(client.info("stats").get("evicted_keys", 0)) - evicted_before
        memory = client.info("memory")
    finally:
        client.close()
    return {
        "dataset": dataset,
        "n_features": ds.n_features,
        "docs": docs,
        "evicted_keys": evicted,
        "used_memory": memory.get("used_memory_human"),
        "maxmemory": memory.get("maxmemory_human"),
    }


def load_two_stage(url: str, dataset: str = "two_stage", chunk_size: int = 2000) -> int:
    """The two-stage corpus (serve/search.py): every document's row, its static features then its
    embedding, under its row number; returns rows."""
    from models.candidate_features import store_rows
    from models.corpus import Corpus
    from models.paths import DOC_EMBEDDINGS_FILE, two_stage_dir

    directory = two_stage_dir()
    corpora = sorted(directory.glob("corpus-*.npz"), key=lambda p: p.stat().st_mtime)
    if not corpora or not (directory / DOC_EMBEDDINGS_FILE).is_file():
        raise FileNotFoundError(f"{directory}: no corpus or embeddings; run `python models/two_stage.py` first")
    embeddings = np.load(directory / DOC_EMBEDDINGS_FILE)
    corpus = next((c for c in map(Corpus.load, reversed(corpora)) if c.n_docs == len(embeddings)), None)
    if corpus is None:
        raise ValueError(f"{directory}: no corpus of {len(embeddings)} documents beside the embeddings")
    rows = np.ascontiguousarray(store_rows(corpus.doc_features, embeddings), dtype="<f4")
    client = _loader_client(url)
    try:
        write_rows(client, dataset, range(len(rows)), rows, chunk_size)
        client.hset(meta_key(dataset), mapping={"n_features": rows.shape[1], "docs:corpus": len(rows),
                                                "source": "models.corpus", "fingerprint": corpus.fingerprint()})
    finally:
        client.close()
    return len(rows)


def _redis_url(arg: str | None) -> str:
    url = arg or os.environ.get("REDIS_URL")
    if not url:
        sys.exit(
            "no Redis: pass --redis-url or set REDIS_URL "
            "(an embedded one: python serve/redis_server.py prints its URL)"
        )
    return url


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Load or read rankserve's Redis feature store.")
    commands = parser.add_subparsers(dest="command", required=True)
    load = commands.add_parser("load", help="load a dataset's features into Redis")
    load.add_argument("--data", default="synthetic",
                      help='"synthetic", a folder with train/test files, or "two_stage" (the retrieval corpus)')
    load.add_argument("--split", default="test", choices=["train", "vali", "test", "all"])
    load.add_argument("--name", default=None, help="dataset name in the keys (default: the dataset's name)")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--n-queries", type=int, default=None)
    load.add_argument("--chunk-size", type=int, default=1000)
    load.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
    get = commands.add_parser("get", help="read some documents' features (one MGET)")
    get.add_argument("--dataset", default="synthetic")
    get.add_argument("--redis-url", default=None, help="default: $REDIS_URL")
    get.add_argument("doc_ids", nargs="+")
    args = parser.parse_args(argv)

    url = _redis_url(args.redis_url)
    if args.command == "load" and args.data == "two_stage":
        started = time.perf_counter()
        rows = load_two_stage(url, args.name or "two_stage", chunk_size=args.chunk_size)
        print(f"loaded {rows} two-stage documents into {url} in {time.perf_counter() - started:.1f} s")
    elif args.command == "load":
        splits = ("train", "vali", "test") if args.split == "all" else (args.split,)
        try:
            summary = load_features(url, args.data, splits, name=args.name, seed=args.seed,
                                    n_queries=args.n_queries, chunk_size=args.chunk_size)
        except redis.RedisError as exc:
            sys.exit(f"feature store at {url}: {exc}")
        print(f"loaded {summary['docs']} documents of {summary['dataset']!r} "
              f"({summary['n_features']} features) into {url}; memory {summary['used_memory']} "
              f"of maxmemory {summary['maxmemory']}")
        if summary["evicted_keys"]:
            print(f"WARNING: Redis evicted {summary['evicted_keys']} keys while loading: raise maxmemory",
                  file=sys.stderr)
    else:
        store = FeatureStore(url)
        try:
            features = store.get_features(args.dataset, args.doc_ids)
        except (FeatureStoreError, FeatureStoreUnavailableError) as exc:
            sys.exit(str(exc))
        np.set_printoptions(precision=4, suppress=True, linewidth=120, threshold=40)
        for doc_id, row in zip(args.doc_ids, features, strict=True):
            print(doc_id, row)


if __name__ == "__main__":
    main()
