"""The Ray Serve application: a FastAPI ingress and a batched ranker deployment.

- `Ranker` holds one variant from the manifest (its `user_config`: variant, model, threads,
  batching). `@serve.batch` batches on the total number of documents (`batch_size_fn`), not the
  number of requests, so a 1000-document list and ten 100-document lists fill a batch alike; a
  list larger than the batch budget is scored on its own. Inference runs in a dedicated thread
  (ONNX Runtime releases the GIL), never on the replica's event loop.
- `Ingress` reads the raw body and runs serve/ranking.py's `RankingCore`: parse, validate, cache,
  call the ranker under a deadline, sort, fallback.
- Swapping the model while traffic flows: `POST /admin/model {"variant", "model"}` redeploys the
  app with a new ranker `user_config`. Deployment versions are pinned (a hash of everything except
  the user_config), so Serve reconfigures the running replicas in place; a batch already running
  finishes on the scorer it started with, and every answer names the version that scored it.

`build_app(ServiceConfig)` is what serve/run.py deploys; `app_builder(args)` is the entry point of
`serve run serve/config.yaml` / `serve deploy`.
"""


import asyncio
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.config import ServiceConfig
from serve.metrics import ServiceMetrics
from serve.ranking import RankingCore, ScoreOutcome, dumps, score_lists
from serve.schemas import ModelSwap, RankResponse, Readiness, install_openapi, rank_openapi_extra

logger = logging.getLogger("ray.serve")
RANKER_FIELDS = frozenset(ServiceConfig().ranker_user_config())


@dataclass
class _Item:
    """One list waiting in the ranker's batch queue."""

    features: np.ndarray
    arrival: float  # perf_counter() when the replica received it

    @property
    def n_docs(self) -> int:
        return len(self.features)


def _docs_in(items: list[_Item]) -> int:
    """`@serve.batch`'s batch size: documents, not requests."""
    return sum(item.n_docs for item in items)


def _timed_score(scorer: Any, lists: list[np.ndarray]) -> tuple[float, float, list[np.ndarray]]:
    """Runs in the inference thread: (start, end, scores per list)."""
    start = time.perf_counter()
    scores = score_lists(scorer, lists)
    return start, time.perf_counter(), scores


def _model_of(scorer: Any) -> dict[str, str]:
    return {"name": scorer.model, "variant": scorer.variant, "version": scorer.version}


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ranker:
    """One model variant; scores lists, batched by document budget when batching is on."""

    def __init__(self, inference_workers: int = 1) -> None:
        self._executor = ThreadPoolExecutor(inference_workers, thread_name_prefix="rankserve-infer")
        self._scorer: Any = None
        self._config: dict[str, Any] = {}

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Load (or swap to) the variant in `config`; requests keep flowing on the old scorer meanwhile."""
        from export.runtime import load_scorer

        if self._scorer is None or any(
            config.get(k) != self._config.get(k) for k in ("variant", "model", "manifest_path", "threads")
        ):
            scorer = await asyncio.to_thread(
                load_scorer,
                config["variant"],
                config.get("model"),
                threads=config.get("threads", 1),
                manifest_path=config.get("manifest_path"),
            )
            self._scorer = scorer  # one assignment: a running batch keeps its own reference
            logger.info("ranker now serves %s", _model_of(scorer))
        self._score_batch.set_max_batch_size(int(config["max_batch_docs"]))
        self._score_batch.set_batch_wait_timeout_s(float(config["batch_wait_ms"]) / 1000)
        self._config = dict(config)

    async def info(self) -> dict[str, Any]:
        scorer = self._scorer
        return {**_model_of(scorer), "n_features": scorer.n_features, "pointwise": scorer.pointwise}

    async def score(self, features: np.ndarray) -> ScoreOutcome:
        arrival = time.perf_counter()
        if self._config.get("batching") and len(features) <= self._config["max_batch_docs"]:
            return await self._score_batch(_Item(features, arrival))
        scorer = self._scorer
        loop = asyncio.get_running_loop()
        start, end, scores = await loop.run_in_executor(self._executor, _timed_score, scorer, [features])
        return ScoreOutcome(
            scores=scores[0],
            model=_model_of(scorer),
            queue_ms=(start - arrival) * 1000,
            inference_ms=(end - start) * 1000,
            batch_docs=len(features),
            batch_requests=1,
            batch_first=True,
        )

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002, batch_size_fn=_docs_in)
    async def _score_batch(self, items: list[_Item]) -> list[ScoreOutcome]:
        scorer = self._scorer
        loop = asyncio.get_running_loop()
        start, end, scores = await loop.run_in_executor(
            self._executor, _timed_score, scorer, [item.features for item in items]
        )
        model = _model_of(scorer)
        n_docs = _docs_in(items)
        return [
            ScoreOutcome(
                scores=s,
                model=model,
                queue_ms=(start - item.arrival) * 1000,
                inference_ms=(end - start) * 1000,
                batch_docs=n_docs,
                batch_requests=len(items),
                batch_first=i == 0,
            )
            for i, (item, s) in enumerate(zip(items, scores, strict=True))
        ]


fastapi_app = FastAPI(
    title="rankserve",
    version="0.1.0",
    description="Learning-to-rank serving: POST /rank returns documents best first.",
)
install_openapi(fastapi_app)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class Ingress:
    """HTTP front: the shared ranking core over a handle to the ranker deployment."""

    def __init__(self, config: dict[str, Any], ranker: DeploymentHandle) -> None:
        from serve.cache import AsyncResultCache
        from serve.feature_store import AsyncFeatureStore

        self.config = ServiceConfig(**config)
        self.ranker = ranker
        self.metrics = ServiceMetrics(use_ray=True)
        redis_url = self.config.redis_url or os.environ.get("REDIS_URL")
        self.cache = None
        if self.config.cache and redis_url:
            self.cache = AsyncResultCache(redis_url, ttl_s=self.config.cache_ttl_s, timeout_s=self.config.redis_timeout_s)
        elif self.config.cache:
            logger.warning("cache on but no redis_url and no $REDIS_URL: running without the cache")
        self.feature_store = AsyncFeatureStore(redis_url) if redis_url else None
        self._info: dict[str, Any] | None = None
        self.core = RankingCore(
            backend=self,
            metrics=self.metrics,
            cache=self.cache,
            feature_store=self.feature_store,
            feature_dataset=self.config.feature_dataset,
            max_docs=self.config.max_docs,
            max_body_bytes=self.config.max_body_bytes,
            deadline_ms=self.config.deadline_ms,
            parse_mode="fast",
        )

    # ScoringBackend ------------------------------------------------------------------------------
    async def model_info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self.ranker.info.remote()
        return self._info

    async def score(self, features: np.ndarray) -> ScoreOutcome:
        outcome: ScoreOutcome = await self.ranker.score.remote(features)
        if self._info is not None and outcome.model["version"] != self._info["version"]:
            # Another replica (or a swap) serves a different model now: key the cache on it.
            self._info = await self.ranker.info.remote()
        return outcome

    # HTTP ----------------------------------------------------------------------------------------
    @fastapi_app.post(
        "/rank",
        response_model=RankResponse,
        openapi_extra=rank_openapi_extra(),
        responses={400: {}, 413: {}, 415: {}, 422: {}},
    )
    async def rank(self, request: Request) -> Response:
        status, payload = await self.core.handle_request(request)
        return Response(dumps(payload), status_code=status, media_type="application/json")

    @fastapi_app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @fastapi_app.get("/readyz", response_model=Readiness)
    async def readyz(self) -> JSONResponse:
        try:
            self._info = await asyncio.wait_for(self.ranker.info.remote(), timeout=5)
            loaded = True
        except Exception:
            loaded = False
        redis_state = await self._redis_state()
        body = {"model_loaded": loaded, "redis": redis_state, "model": self._info if loaded else None}
        return JSONResponse(body, status_code=200 if loaded else 503)

    async def _redis_state(self) -> str:
        client = self.cache or self.feature_store
        if client is None:
            return "disabled"
        try:
            ok = await asyncio.wait_for(client.client.ping(), timeout=1)
        except Exception:
            ok = False
        return "up" if ok else "down"

    @fastapi_app.get("/metrics")
    async def metrics(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    @fastapi_app.post("/admin/model")
    async def swap_model(self, swap: ModelSwap) -> JSONResponse:
        """Serve another variant/model: a rolling in-place reconfigure of the ranker replicas."""
        from export.runtime import load_manifest
        from serve.app import build_app  # by name: the replica's copy of this class is a pickled one

        try:
            manifest = await asyncio.to_thread(load_manifest, swap.model or self.config.model, self.config.manifest_path)
        except (FileNotFoundError, ValueError) as exc:
            return JSONResponse({"detail": f"model: {exc}", "field": "model"}, status_code=422)
        entry = manifest["variants"].get(swap.variant)
        if entry is None:
            return JSONResponse(
                {"detail": f"variant: {swap.variant!r} is not in the manifest (has {sorted(manifest['variants'])})",
                 "field": "variant"},
                status_code=422,
            )
        if not entry["valid"]:
            return JSONResponse({"detail": f"variant: {swap.variant!r} failed the accuracy gate", "field": "variant"},
                                status_code=422)
        new_config = self.config.model_copy(update={"variant": swap.variant, "model": swap.model or self.config.model})
        try:
            await asyncio.to_thread(
                serve.run, build_app(new_config), name=new_config.app_name, route_prefix=new_config.route_prefix
            )
        except Exception as exc:  # e.g. an app deployed with `serve deploy` must be updated by config
            logger.exception("model swap failed")
            return JSONResponse({"detail": f"swap failed: {exc}"}, status_code=409)
        self.config = new_config
        self._info = await self.ranker.info.remote()
        return JSONResponse({"model": self._info})


def _pinned_version(config: ServiceConfig, role: str) -> str:
    """A stable code version: the same for two configs that differ only in the ranker's user_config,
    so that a swap reconfigures replicas instead of restarting them."""
    fixed = config.model_dump(exclude=set(RANKER_FIELDS))
    return hashlib.sha256(orjson.dumps([role, fixed], option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def build_app(config: ServiceConfig) -> serve.Application:
    """The Serve application for one configuration."""
    ranker = Ranker.options(
        num_replicas=config.replicas,
        max_ongoing_requests=config.ongoing_requests,
        user_config=config.ranker_user_config(),
    ).options(version=_pinned_version(config, "ranker"), _internal=True)
    ingress = Ingress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
    ).options(version=_pinned_version(config, "ingress"), _internal=True)
    return ingress.bind(config.model_dump(), ranker.bind(config.inference_workers))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run serve/config.yaml` / `serve deploy`: `args` are ServiceConfig fields."""
    return build_app(ServiceConfig(**(args or {})))
