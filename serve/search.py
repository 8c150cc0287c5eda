"""`POST /search`: retrieve candidates from a vector index, then rank them, in one request.

    {"query_id": "q1", "query": {"attributes": [24 floats]}, "k": 10, "candidates": 300}
    {"query_id": "q1", "query_embedding": [32 floats], "k": 10, "candidates": 300}

The path: query tower (ONNX, skipped when the client sends the embedding) -> result cache -> ANN
top-K (serve/vector_index.py) -> one MGET of the K candidates' rows from the feature store (static
features and embedding of each) -> candidate features (models/candidate_features.py) -> the ranker
-> top k. Bodies are JSON or msgpack (the same map). Every answer carries per-stage `timings_ms`,
which also go to `rankserve_search_latency_ms{stage}`.

Fallback, as for /rank: the answer is 200 with `degraded: true`, never a 500:
- the index cannot answer: the most popular documents (artifacts/two_stage/fallback_ids.npy), no scores;
- the feature store cannot answer, or the ranker fails: the candidates in retrieval order, no scores.

Load the feature store's rows once: `python serve/feature_store.py load --data two_stage`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, model_validator

from serve.cache_keys import VersionedKey, search_key
from serve.encoding import MSGPACK_TYPES, media_type
from serve.index_config import IndexUnavailableError
from serve.metrics import ServiceMetrics
from serve.ranking import in_background
from serve.schemas import Feature, QueryId, RequestError, validation_to_request_error
from serve.search_pipeline import top_results

logger = logging.getLogger(__name__)


class SearchQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attributes: list[Feature] = Field(description="the query's attributes, as the query tower takes them")


class SearchRequest(BaseModel):
    """The body of POST /search: a query (attributes, or its embedding), k results from K candidates."""

    model_config = ConfigDict(extra="forbid")
    query_id: QueryId | None = None
    query: SearchQuery | None = None
    query_embedding: list[Feature] | None = None
    k: StrictInt = Field(10, ge=1, le=1000, description="results to return")
    candidates: StrictInt = Field(100, ge=1, description="K: documents retrieved and ranked (at least k)")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.query is None) == (self.query_embedding is None):
            raise ValueError("give exactly one of query (attributes) and query_embedding")
        if self.candidates < self.k:
            raise ValueError(f"candidates ({self.candidates}) must be at least k ({self.k})")
        return self


def parse_search(body: bytes, content_type: str | None) -> SearchRequest:
    """The request, or RequestError (400 unreadable body, 422 naming the field and the rule)."""
    try:
        data = msgpack.unpackb(body, raw=False) if media_type(content_type) in MSGPACK_TYPES else orjson.loads(body)
    except Exception:
        raise RequestError(400, "body", "malformed JSON or msgpack") from None
    if not isinstance(data, dict):
        raise RequestError(422, "body", "must be an object")
    try:
        return SearchRequest.model_validate(data)
    except ValidationError as exc:
        error = validation_to_request_error(exc)
        if error.field in ("body", ""):  # a model_validator's message names its field itself
            rule = error.rule.removeprefix("Value error, ")
            raise RequestError(422, "query" if "query" in rule else "candidates", rule) from None
        raise error from None


def cache_key(ranker: dict[str, str], index_label: str, req: SearchRequest, embedding: np.ndarray,
              dataset: str) -> VersionedKey:
    """The ranker's identity, the index's configuration and the feature store's version are in the key:
    a new model, another index or reloaded rows never serve an old answer; the query is its embedding
    (float32 bytes), so equal queries share it."""
    settings = orjson.dumps(["search", index_label, req.k, req.candidates])
    return search_key(ranker, dataset, settings, np.ascontiguousarray(embedding, dtype="<f4").tobytes())


@dataclass
class SearchCore:
    """The /search request path in one process; `pipeline` None: not configured or failed to load."""

    pipeline: Any  # serve.search_pipeline.SearchPipeline | None
    metrics: ServiceMetrics
    feature_store: Any = None  # serve.feature_store.AsyncFeatureStore
    cache: Any = None  # serve.cache.AsyncResultCache
    dataset: str = "two_stage"
    max_candidates: int = 2000
    deadline_ms: float = 1000.0
    unavailable: str = "search: not configured on this server (start it with --search)"
    configured: bool = False
    _pending: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle(self, body: bytes, content_type: str | None, start: float) -> tuple[int, dict[str, Any]]:
        if self.pipeline is None:  # 404: not served here (--search off); 503: configured, failed to load
            status = 503 if self.configured else 404
            self.metrics.observe_search(status, None)
            return status, {"detail": self.unavailable, "field": "search", "rule": "must be configured"}
        try:
            t = time.perf_counter()
            req = parse_search(body, content_type)
            self._check_sizes(req)
            timings = {"parse": (time.perf_counter() - t) * 1000}
            status, response = await self._search(req, timings, start)
        except RequestError as exc:
            self.metrics.observe_search(exc.status, None)
            return exc.status, exc.to_dict()
        self.metrics.observe_search(status, response["timings_ms"])
        return status, response

    def _check_sizes(self, req: SearchRequest) -> None:
        if req.query is not None and len(req.query.attributes) != self.pipeline.attributes_width:
            raise RequestError(422, "query.attributes", f"expected {self.pipeline.attributes_width} values, "
                                                        f"got {len(req.query.attributes)}")
        if req.query_embedding is not None and len(req.query_embedding) != self.pipeline.dim:
            raise RequestError(422, "query_embedding", f"expected {self.pipeline.dim} values, "
                                                       f"got {len(req.query_embedding)}")
        if req.candidates > self.max_candidates:
            raise RequestError(422, "candidates", f"at most {self.max_candidates} (got {req.candidates})")

    async def _search(self, req: SearchRequest, timings: dict[str, float], start: float) -> tuple[int, dict]:
        pipeline = self.pipeline
        ranker = pipeline.ranker
        index_label = pipeline.index.config.label

        def answer(results: Any, candidates: int, *, cached: bool = False,
                   degraded: str | None = None) -> tuple[int, dict[str, Any]]:
            timings["total"] = (time.perf_counter() - start) * 1000
            if degraded:
                self.metrics.observe_degraded(degraded)
            return 200, {"query_id": req.query_id, "model": ranker, "index": index_label, "results": results,
                         "candidates": candidates, "cached": cached, "degraded": degraded is not None,
                         "timings_ms": timings}

        with _stage(timings, "embed"):
            embedding = (pipeline.embed(np.asarray([req.query.attributes], np.float32))[0] if req.query is not None
                         else np.asarray(req.query_embedding, np.float32))
        key = None
        if self.cache is not None:
            with _stage(timings, "cache"):
                hit, key = await self.cache.get_versioned(cache_key(ranker, index_label, req, embedding, self.dataset))
            self.metrics.observe_cache("hit" if hit is not None else "miss")
            if hit is not None:  # "<candidates>\n<results JSON>": spliced in, not parsed
                candidates, _, results = hit.partition(b"\n")
                return answer(orjson.Fragment(results), int(candidates), cached=True)

        try:
            with _stage(timings, "retrieve"):
                if pipeline.index.blocking:  # a network (or Lite's Python) call: off the event loop
                    ids, _ = await asyncio.wait_for(asyncio.to_thread(pipeline.retrieve, embedding, req.candidates),
                                                    self.deadline_ms / 1000)
                else:
                    ids, _ = pipeline.retrieve(embedding, req.candidates)
        except (IndexUnavailableError, asyncio.TimeoutError, TimeoutError) as exc:
            logger.warning("index unavailable (%s): degraded answer for %r", exc, req.query_id)
            return answer(top_results(pipeline.fallback_ids, None, req.k), 0, degraded="index")
        if not ids.size:
            return answer([], 0)

        rows = await self._read_rows(ids.tolist(), timings, req)
        if rows is None:
            return answer(top_results(ids, None, req.k), ids.size, degraded="feature_store")
        try:
            with _stage(timings, "rank"):
                scores = pipeline.rank(embedding, rows)
        except Exception:
            logger.exception("ranker failed for %r: degraded answer", req.query_id)
            return answer(top_results(ids, None, req.k), ids.size, degraded="error")
        results = orjson.dumps(top_results(ids, scores, req.k))
        if key is not None:
            in_background(self._pending, self.cache.set(key, b"%d\n" % ids.size + results))
        return answer(orjson.Fragment(results), ids.size)

    async def _read_rows(self, ids: list[int], timings: dict[str, float], req: SearchRequest) -> np.ndarray | None:
        """One MGET of the candidates' rows; None (degraded) when the store cannot give them all."""
        from serve.feature_store import FeatureStoreError, FeatureStoreUnavailableError

        if self.feature_store is None:
            logger.warning("no feature store configured: degraded answer for %r", req.query_id)
            return None
        try:
            with _stage(timings, "features"):
                return await self.feature_store.get_features(self.dataset, ids)
        except FeatureStoreUnavailableError as exc:
            logger.warning("feature store unavailable (%s): degraded answer for %r", exc, req.query_id)
        except FeatureStoreError as exc:  # the index holds documents the store lacks: ours, not the client's
            logger.error("feature store %r and the index disagree (%s): degraded answer", self.dataset, exc)
        return None



class _stage:
    """Adds the wall time of a `with` block to timings[name] (ms)."""

    def __init__(self, timings: dict[str, float], name: str) -> None:
        self.timings, self.name = timings, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timings[self.name] = self.timings.get(self.name, 0.0) + (time.perf_counter() - self.start) * 1000


def index_config_arg(text: str) -> Any:
    """`--search-index backend=faiss,kind=hnsw,ef_search=128`: IndexConfig's fields, validated there."""
    from serve.index_config import IndexConfig

    try:
        pairs = dict(item.split("=", 1) for item in text.split(",") if item)
        return IndexConfig(**pairs)
    except (ValueError, ValidationError) as exc:
        raise argparse.ArgumentTypeError(f"--search-index {text!r}: {exc}") from None


def add_search_options(p: argparse.ArgumentParser) -> None:
    """The /search options of both servers (ServiceConfig's search_* fields, declared there)."""
    from serve.config import ServiceConfig

    fields = ServiceConfig.model_fields
    p.add_argument("--search", action=argparse.BooleanOptionalAction, default=False, help=fields["search"].description)
    p.add_argument("--search-index", type=index_config_arg, default=fields["search_index"].default_factory(),
                   help="key=value,... of serve/index_config.py's IndexConfig, e.g. kind=hnsw,ef_search=128")
    for name in ("search_model", "search_variant", "search_dataset", "search_max_candidates"):
        default = fields[name].default
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                       help=fields[name].description)


def build_search_core(config: Any, metrics: ServiceMetrics, feature_store: Any, cache: Any) -> SearchCore:
    """The core for a ServiceConfig: the pipeline loaded when `config.search`, else a core answering 503.
    A pipeline that cannot load leaves /search answering 503 with the reason; /rank is unaffected."""
    pipeline, why = None, SearchCore.unavailable
    if config.search:
        from serve.search_pipeline import SearchPipeline

        try:
            pipeline = SearchPipeline.load(config.search_index, variant=config.search_variant,
                                           model=config.search_model, threads=config.threads)
        except Exception as exc:
            logger.exception("search pipeline failed to load")
            why = f"search: not available on this server ({exc})"
    return SearchCore(pipeline, metrics, feature_store=feature_store, cache=cache, dataset=config.search_dataset,
                      max_candidates=config.search_max_candidates, deadline_ms=config.deadline_ms, unavailable=why,
                      configured=config.search)
