"""The Ray Serve application, in one of two topologies (`ServiceConfig.topology`).

- **colocated** (the default): one deployment, `RankingService`. Each replica parses, reads the
  cache and the feature store, and scores in-process through serve/ranking.py's `RankingCore`: no
  handle call, no second hop. It scales by `num_replicas` (`replicas`) or `autoscaling_config`
  (`replicas` .. `autoscaling_max_replicas`).
- **split**: an `Ingress` deployment runs the same core and calls a separate batched `Ranker`
  deployment through a handle. It pays where a separate model stage does: a GPU ranker, or the
  attention model at large lists, batched across many ingress replicas.

Both HTTP fronts serve the one FastAPI app of serve/http_app.py through `serve.ingress(builder)`:
the builder runs on each replica and builds the app over that replica's `HttpService`, so Ray, plain
uvicorn (serve/uvicorn_server.py) and the baseline serve the same routes, written once.

Scoring in a replica (`ReplicaScorer`: the colocated replica, split's ranker): the variant comes from
the deployment's `user_config` (variant, model, threads, inline_max_docs, batching). A list of at most
`inline_max_docs` documents is scored on the replica's event loop (cheaper than the thread hop: see
serve/scoring.py's `timed_score`); a longer one, and every batch, in a dedicated inference thread pool
(ONNX Runtime releases the GIL). With batching,
`@serve.batch` batches on the total number of documents (`batch_size_fn`), not the number of
requests; a list larger than the batch budget is scored on its own; `max_ongoing_requests` is at
least a full batch of small lists (a batch never fills past the replica's concurrency).

Swapping the model while traffic flows: `POST /admin/model {"variant", "model"}`, on any replica,
redeploys the app with a new `user_config`. Deployment versions are pinned (a hash of everything
except the model fields), so Serve reconfigures every running replica in place, and the call returns
once all have. A batch already running finishes on the scorer it started with, and every answer
names the version that scored it. The cache key is the model that scores here: in colocated mode
the replica's own scorer; in split mode the model in the ingress's `user_config` (the version every
replica agrees on once the swap is done), and an answer is stored under the model that scored it.

`build_app(ServiceConfig)` is what serve/run.py deploys; `app_builder(args)` is the entry point of
`serve run serve/config.yaml` / `serve deploy`.
"""

from __future__ import annotations

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
from fastapi import FastAPI
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from serve.admission import Overloaded
from serve.config import MODEL_FIELDS, ServiceConfig
from serve.experiment import ExperimentConfig, RunningExperiment, load_arms
from serve.http_app import HttpService, build_http_app, freeze_startup_objects
from serve.metrics import ServiceMetrics
from serve.ray_setup import DEPLOYMENT_SHUTDOWN_OPTIONS, ray_metrics_enabled
from serve.schemas import RequestError
from serve.scoring import ScoreOutcome, local_outcome, model_identity, model_of, name_of, timed_score

logger = logging.getLogger("ray.serve")
RANKER_FIELDS = frozenset(ServiceConfig().ranker_user_config())
RELOAD_FIELDS = ("variant", "model", "manifest_path", "threads")  # a change loads the scorer again


@dataclass
class _Item:
    """One list waiting in a replica's batch queue."""

    features: np.ndarray
    arrival: float  # perf_counter() when the replica received it

    @property
    def n_docs(self) -> int:
        return len(self.features)


def _docs_in(items: list[_Item]) -> int:
    """`@serve.batch`'s batch size: documents, not requests."""
    return sum(item.n_docs for item in items)


class ReplicaScorer:
    """A scorer in this replica, set (and swapped) by `reconfigure(user_config)`; a ScoringBackend.

    Scores lists off the event loop in a dedicated thread pool, batched by document budget when
    `batching` is on. Used by the colocated `RankingService` and by split's `Ranker`.
    """

    def _start_scoring(self, inference_workers: int) -> None:
        self._executor = ThreadPoolExecutor(inference_workers, thread_name_prefix="rankserve-infer")
        self._scorer: Any = None
        self._scoring_config: dict[str, Any] = {}

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Load (or swap to) the variant in `config`; requests keep flowing on the old scorer meanwhile."""
        from export.runtime import load_scorer

        if self._scorer is None or any(config.get(k) != self._scoring_config.get(k) for k in RELOAD_FIELDS):
            scorer = await asyncio.to_thread(
                load_scorer,
                config["variant"],
                config.get("model"),
                threads=config.get("threads", 1),
                manifest_path=config.get("manifest_path"),
            )
            self._scorer = scorer  # one assignment: a running batch keeps its own reference
            logger.info("now serving %s", name_of(scorer))
        self._score_batch.set_max_batch_size(int(config["max_batch_docs"]))
        self._score_batch.set_batch_wait_timeout_s(float(config["batch_wait_ms"]) / 1000)
        self._scoring_config = dict(config)
        freeze_startup_objects(collect=False)  # the replica and its model, out of the full GC passes

    async def model_info(self) -> dict[str, Any]:
        scorer = self._scorer
        if scorer is None:
            raise RuntimeError("no model loaded yet")
        return model_of(scorer)

    async def probe(self) -> dict[str, Any]:
        return await self.model_info()

    def _batched(self, features: np.ndarray) -> bool:
        """Whether this list goes through `@serve.batch` (batching on, and it fits a batch)."""
        config = self._scoring_config
        return bool(config.get("batching")) and len(features) <= config["max_batch_docs"]

    def score_inline(self, features: np.ndarray) -> ScoreOutcome | None:
        """A short list scored now, on the replica's event loop (None: a batch or the inference threads)."""
        if self._batched(features) or len(features) > self._scoring_config.get("inline_max_docs", 0):
            return None
        scorer = self._scorer
        return local_outcome(scorer, features, time.perf_counter(), *timed_score(scorer, [features]))

    async def score(self, features: np.ndarray) -> ScoreOutcome:
        arrival = time.perf_counter()
        if self._batched(features):
            return await self._score_batch(_Item(features, arrival))
        outcome = self.score_inline(features)
        if outcome is not None:
            return outcome
        scorer = self._scorer
        loop = asyncio.get_running_loop()
        timed = await loop.run_in_executor(self._executor, timed_score, scorer, [features])
        return local_outcome(scorer, features, arrival, *timed)

    @serve.batch(max_batch_size=4096, batch_wait_timeout_s=0.002, batch_size_fn=_docs_in)
    async def _score_batch(self, items: list[_Item]) -> list[ScoreOutcome]:
        scorer = self._scorer
        loop = asyncio.get_running_loop()
        start, end, scores = await loop.run_in_executor(
            self._executor, timed_score, scorer, [item.features for item in items]
        )
        model = name_of(scorer)
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


class RayHttpService(HttpService):
    """The HTTP service of one Ray replica: a swap redeploys the app with the new model's user_config."""

    async def apply_swap(self, new_config: ServiceConfig) -> dict[str, Any]:
        from serve.app import build_app  # by name: the replica's copy of this module may be a pickled one

        # Returns once every replica runs the new user_config (this one included).
        await asyncio.to_thread(serve.run, build_app(new_config), name=new_config.app_name,
                                route_prefix=new_config.route_prefix)
        return await self.backend.probe()

    async def load_experiment(self, experiment: ExperimentConfig | None) -> RunningExperiment | None:
        """Redeploy with the experiment in the replicas' user_config: every replica loads the arms in
        `RankingService.reconfigure` (colocated only: split's ranker serves one model)."""
        if self.config.topology != "colocated":
            raise RequestError(409, "experiment", "the split topology's ranker serves one model; deploy colocated")
        from serve.app import build_app

        new_config = self.config.model_copy(update={"experiment": experiment})
        await asyncio.to_thread(serve.run, build_app(new_config), name=new_config.app_name,
                                route_prefix=new_config.route_prefix)
        return self.core.experiment  # set by this replica's reconfigure


def _service_for(config: ServiceConfig, backend: Any) -> RayHttpService:
    """A replica's service; $REDIS_URL is read here, never written into the config (a swap redeploys it)."""
    try:
        replica = serve.get_replica_context().replica_tag
    except Exception:  # outside a replica (unit tests)
        replica = None
    # Mirrored to Ray's metrics only where Ray collects them: a record costs every request otherwise.
    return RayHttpService(config, backend, metrics=ServiceMetrics(use_ray=ray_metrics_enabled()), parse_mode="fast",
                          redis_url=config.redis_url or os.environ.get("REDIS_URL"), cache_needs_redis=False,
                          replica=replica)


def _with_model(config: ServiceConfig, user_config: dict[str, Any]) -> ServiceConfig:
    """The replica's config once `user_config` names the model it serves (its init args may be older)."""
    return config.model_copy(update={k: user_config[k] for k in MODEL_FIELDS if k in user_config})


def replica_http_app() -> FastAPI:
    """`serve.ingress`'s builder, run on each replica: serve/http_app.py's app over this replica's service."""

    def this_replicas_service() -> HttpService:
        return serve.get_replica_context().servable_object.service

    return build_http_app(this_replicas_service)


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(replica_http_app)
class RankingService(ReplicaScorer):
    """Colocated: HTTP, parsing, cache, feature store and scoring in one replica."""

    def __init__(self, config: dict[str, Any]) -> None:
        settings = ServiceConfig(**config)
        self._start_scoring(settings.inference_workers)
        self.service = _service_for(settings, backend=self)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        await ReplicaScorer.reconfigure(self, config)
        self.service.config = _with_model(self.service.config, config)
        experiment = ExperimentConfig(**config["experiment"]) if config.get("experiment") else None
        running = self.service.core.experiment
        if experiment != (running.config if running else None):  # load the arms here, then switch at once
            settings = self.service.config
            self.service.core.experiment = None if experiment is None else await asyncio.to_thread(
                load_arms, experiment, model=settings.model, manifest_path=settings.manifest_path,
                threads=settings.threads, inline_max_docs=settings.inline_max_docs)
            self.service.config = settings.model_copy(update={"experiment": experiment})
            freeze_startup_objects(collect=False)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class Ranker(ReplicaScorer):
    """Split: one model variant; scores lists for the ingress, batched by document budget when batching is on."""

    def __init__(self, inference_workers: int = 1) -> None:
        self._start_scoring(inference_workers)

    async def info(self) -> dict[str, Any]:
        return await self.model_info()


class RankerHandleBackend:
    """Split's backend: the ranker deployment through a handle; the cache is keyed on the model in
    the ingress's user_config (`identity`)."""

    def __init__(self, ranker: DeploymentHandle) -> None:
        self.ranker = ranker
        self.identity: dict[str, Any] | None = None

    async def model_info(self) -> dict[str, Any]:
        if self.identity is None:
            raise RuntimeError("no model configured yet")
        return self.identity

    async def probe(self) -> dict[str, Any]:
        return await self.ranker.info.remote()

    async def score(self, features: np.ndarray) -> ScoreOutcome:
        try:
            return await self.ranker.score.remote(features)
        except BackPressureError as exc:  # the ranker's queue is at max_queued_requests
            raise Overloaded("ranker_queue") from exc


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(replica_http_app)
class Ingress:
    """Split: HTTP, parsing, cache and feature store; scoring by the ranker deployment."""

    def __init__(self, config: dict[str, Any], ranker: DeploymentHandle) -> None:
        self.backend = RankerHandleBackend(ranker)
        self.service = _service_for(ServiceConfig(**config), backend=self.backend)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """The model the ranker serves (from the manifest: nothing is loaded here)."""
        self.backend.identity = await asyncio.to_thread(
            model_identity, config["variant"], config.get("model"), config.get("manifest_path"))
        self.service.config = _with_model(self.service.config, config)
        freeze_startup_objects(collect=False)


def _pinned_version(config: ServiceConfig, role: str) -> str:
    """A stable code version: the same for two configs that differ only in the user_config fields,
    so that a swap reconfigures replicas instead of restarting them."""
    fixed = config.model_dump(exclude=set(RANKER_FIELDS))
    return hashlib.sha256(orjson.dumps([role, fixed], option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def _scale(config: ServiceConfig) -> dict[str, Any]:
    """Fixed `num_replicas`, or `autoscaling_config` from `replicas` to `autoscaling_max_replicas`;
    `max_replicas_per_node` spreads them (replicas reserve no CPU, so Ray would place them anywhere)."""
    spread = {} if config.max_replicas_per_node is None else {"max_replicas_per_node": config.max_replicas_per_node}
    if config.autoscaling_max_replicas is None:
        return {"num_replicas": config.replicas, **spread}
    return {"autoscaling_config": {"min_replicas": config.replicas, "initial_replicas": config.replicas,
                                   "max_replicas": config.autoscaling_max_replicas}, **spread}


def deployment_options(config: ServiceConfig) -> dict[str, dict[str, Any]]:
    """The Serve options of each deployment of `config`'s topology, by deployment name."""
    stop = DEPLOYMENT_SHUTDOWN_OPTIONS  # a stop in seconds (serve/ray_setup.py)
    if config.topology == "colocated":
        return {"RankingService": {**_scale(config), "max_ongoing_requests": config.colocated_ongoing_requests,
                                   "max_queued_requests": config.queued_requests,
                                   "user_config": config.ranker_user_config(), **stop}}
    return {
        "Ranker": {**_scale(config), "max_ongoing_requests": config.ongoing_requests,
                   "max_queued_requests": config.queued_requests,
                   "user_config": config.ranker_user_config(), **stop},
        "Ingress": {"num_replicas": config.ingress_replicas,
                    "max_ongoing_requests": config.ingress_max_ongoing_requests,
                    "max_queued_requests": config.ingress_queued_requests,
                    "user_config": config.model_user_config(), **stop},
    }


def build_app(config: ServiceConfig) -> serve.Application:
    """The Serve application for one configuration."""
    options = deployment_options(config)
    if config.topology == "colocated":
        service = RankingService.options(**options["RankingService"]).options(
            version=_pinned_version(config, "colocated"), _internal=True)
        return service.bind(config.model_dump())
    ranker = Ranker.options(**options["Ranker"]).options(version=_pinned_version(config, "ranker"), _internal=True)
    ingress = Ingress.options(**options["Ingress"]).options(version=_pinned_version(config, "ingress"),
                                                            _internal=True)
    return ingress.bind(config.model_dump(), ranker.bind(config.inference_workers))


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Entry point for `serve run serve/config.yaml` / `serve deploy`: `args` are ServiceConfig fields."""
    return build_app(ServiceConfig(**(args or {})))
