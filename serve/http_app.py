"""The one HTTP API of every ranking server: a FastAPI app built once, over an `HttpService`.

Routes: `POST /rank`, `POST /search` (two-stage: serve/search.py), `GET /healthz`, `GET /readyz`, `GET /metrics`,
`GET /drift` (serve/drift.py), `POST /admin/model`, `PUT|GET|DELETE /admin/experiment` (serve/experiment.py), and the
OpenAPI (`/openapi.json`, `/docs`). The Ray Serve deployments (serve/app.py, through
`serve.ingress(builder)`), the plain-uvicorn server (serve/uvicorn_server.py) and the baseline
(serve/baseline.py) all serve `build_http_app(...)`, so the endpoints are written once and a
comparison between the servers isolates what is around the app (Ray, or nothing).

An `HttpService` holds what the routes run: the ranking core (serve/ranking.py) over a scoring
backend, the metrics, the Redis clients, readiness and the model swap. Where the servers differ is
only how a swap reaches the scorers (`apply_swap`): plain uvicorn loads the new variant in-process;
Ray redeploys the app with a new `user_config`, which every replica applies in `reconfigure`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from serve.admission import RETRY_AFTER_S, AdmissionControl, AdmissionLimits
from serve.config import ServiceConfig
from serve.encoding import ParseMode
from serve.experiment import ExperimentConfig, RunningExperiment
from serve.metrics import ServiceMetrics
from serve.ranking import RankingCore, dumps, read_request_body
from serve.schemas import (
    ModelSwap,
    RankResponse,
    Readiness,
    RequestError,
    install_openapi,
    rank_openapi_extra,
    search_openapi_extra,
)
from serve.scoring import ScoringBackend
from serve.search import build_search_core
from serve.security import ADMIN_RESPONSES, admin_auth

logger = logging.getLogger(__name__)
PROBE_TIMEOUT_S = 5.0


class ServiceBackend(ScoringBackend, Protocol):
    async def probe(self) -> dict[str, Any]:
        """For /readyz: the identity of the model that scores now; raises if none can."""
        ...


class HttpService:
    """What the routes run, for one process (a uvicorn server or one Ray replica)."""

    def __init__(
        self,
        config: ServiceConfig,
        backend: ServiceBackend,
        *,
        metrics: ServiceMetrics,
        parse_mode: ParseMode = "fast",
        redis_url: str | None = None,
        cache_needs_redis: bool = True,
        replica: str | None = None,
    ) -> None:
        """`redis_url` is passed separately from `config.redis_url`: a Ray replica resolves $REDIS_URL
        without changing the config it redeploys on a swap. With `cache_needs_redis` a cache without
        Redis is refused (ValueError); without it the service runs with the cache off and says so."""
        from serve.cache import AsyncResultCache
        from serve.feature_store import AsyncFeatureStore

        self.config = config
        self.backend = backend
        self.metrics = metrics
        self.replica = replica
        self.cache = None
        if config.cache and redis_url:
            self.cache = AsyncResultCache(redis_url, ttl_s=config.cache_ttl_s, timeout_s=config.redis_timeout_s)
        elif config.cache and cache_needs_redis:
            raise ValueError("cache: needs --redis-url or $REDIS_URL")
        elif config.cache:
            logger.warning("cache on but no redis_url and no $REDIS_URL: running without the cache")
        self.feature_store = AsyncFeatureStore(redis_url) if redis_url else None
        self.core = RankingCore(
            backend=backend,
            metrics=metrics,
            cache=self.cache,
            feature_store=self.feature_store,
            feature_dataset=config.feature_dataset,
            max_docs=config.max_docs,
            max_body_bytes=config.max_body_bytes,
            deadline_ms=config.deadline_ms,
            parse_mode=parse_mode,
        )
        self.search = build_search_core(config, metrics, self.feature_store, self.cache)
        if config.drift is not None:
            from serve.drift import load_monitor

            self.core.drift = load_monitor(config.drift)

    async def drift_report(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of GET /drift: the monitor's report (computed in a thread), or 404 when off;
        the Prometheus gauges are refreshed with it."""
        if self.core.drift is None:
            return 404, {"detail": "drift: not monitored here (start the server with --drift)", "field": "drift",
                         "rule": "must be configured"}
        report = await asyncio.to_thread(self.core.drift.report)
        self.metrics.observe_drift(report)
        return 200, report

    async def search_request(self, request: Request) -> tuple[int, dict[str, Any]]:
        """Read and answer one POST /search: the same body rules (type, size) as /rank."""
        start = time.perf_counter()
        try:
            body = await read_request_body(request, self.config.max_body_bytes)
        except RequestError as exc:
            self.metrics.observe_search(exc.status, None)
            return exc.status, exc.to_dict()
        return await self.search.handle(body, request.headers.get("content-type"), start)

    async def readiness(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of /readyz: 200 once a model scores here, else 503."""
        try:
            info = await asyncio.wait_for(self.backend.probe(), timeout=PROBE_TIMEOUT_S)
        except Exception:
            info = None
        body = {"model_loaded": info is not None, "redis": await self.redis_state(), "model": info,
                "replica": self.replica}
        return (200 if info is not None else 503), body

    async def redis_state(self) -> str:
        client = self.cache or self.feature_store
        if client is None:
            return "disabled"
        try:
            ok = await asyncio.wait_for(client.client.ping(), timeout=1)
        except Exception:
            ok = False
        return "up" if ok else "down"

    async def swap_model(self, swap: ModelSwap) -> tuple[int, dict[str, Any]]:
        """(status, body) of POST /admin/model: 422 naming the field for a model or variant that
        cannot be served, 409 when the swap itself failed, else 200 with the model that serves now."""
        try:
            new_config = await asyncio.to_thread(checked_swap, self.config, swap)
        except RequestError as exc:
            return exc.status, exc.to_dict()
        try:
            info = await self.apply_swap(new_config)
        except Exception as exc:  # e.g. an app deployed with `serve deploy` must be updated by its config
            logger.exception("model swap failed")
            return 409, {"detail": f"swap failed: {exc}"}
        self.config = new_config
        return 200, {"model": info}

    async def apply_swap(self, new_config: ServiceConfig) -> dict[str, Any]:
        """Make every scorer of this service serve new_config's model; return its identity."""
        raise NotImplementedError

    async def set_experiment(self, experiment: ExperimentConfig | None) -> tuple[int, dict[str, Any]]:
        """(status, body) of PUT / DELETE /admin/experiment: 422 naming the arm's field for a model or
        variant that cannot be served (or arms whose models take different feature counts), 409 when
        loading failed, else 200 with the experiment now in force. The arms are loaded beside the
        serving model, then switched to in one assignment: requests keep being answered throughout."""
        if experiment is not None:
            try:
                await asyncio.to_thread(checked_experiment, self.config, experiment)
            except RequestError as exc:
                return exc.status, exc.to_dict()
        try:
            running = await self.load_experiment(experiment)
        except RequestError as exc:
            return exc.status, exc.to_dict()
        except Exception as exc:
            logger.exception("experiment failed to load")
            return 409, {"detail": f"experiment failed to load: {exc}"}
        self.core.experiment = running
        self.config = self.config.model_copy(update={"experiment": experiment})
        return 200, {"experiment": experiment.model_dump() if experiment else None}

    async def load_experiment(self, experiment: ExperimentConfig | None) -> RunningExperiment | None:
        """The experiment's arms, loaded in this server's way (every replica's, on Ray); None ends it."""
        raise NotImplementedError


def freeze_startup_objects(*, collect: bool = True) -> None:
    """Put every object alive now (modules, the app, the model) out of the garbage collector's reach.

    Why: a full collection walks every long-lived object, and in a server process that is ~82,000 of
    them: ~90 ms on the lab's machine, a stall of the event loop that showed in the fault suite's
    runs as a p99 spike and a burst of admission refusals. Frozen objects are never walked again;
    new ones are collected as before. `collect=False` (a model swap under traffic) skips the
    collection first, so freezing costs nothing on the request path; the little garbage alive at that
    moment is kept for good.
    """
    if collect:
        gc.collect()
    gc.freeze()


def checked_experiment(config: ServiceConfig, experiment: ExperimentConfig) -> None:
    """RequestError(422) naming `arms[i].model` or `arms[i].variant` for an arm that cannot be
    served. Blocking (reads the manifests)."""
    for i, arm in enumerate(experiment.arms):
        try:
            checked_swap(config, ModelSwap(variant=arm.variant, model=arm.model))
        except RequestError as exc:
            raise RequestError(exc.status, f"arms[{i}].{exc.field}", exc.rule) from None
        except ValueError as exc:  # ModelSwap's own name rules
            raise RequestError(422, f"arms[{i}]", str(exc).splitlines()[-1].strip()) from None


def checked_swap(config: ServiceConfig, swap: ModelSwap) -> ServiceConfig:
    """The config after `swap`, or RequestError(422) naming the field. Blocking (reads the manifest)."""
    from export.runtime import load_manifest
    from models.paths import REPO_ROOT

    model = swap.model or config.model
    try:
        manifest = load_manifest(model, config.manifest_path)
    except (OSError, ValueError) as exc:
        raise RequestError(422, "model", str(exc).replace(str(REPO_ROOT), ".")) from None
    entry = manifest["variants"].get(swap.variant)
    if entry is None:
        raise RequestError(422, "variant",
                           f"{swap.variant!r} is not in the manifest (has {sorted(manifest['variants'])})")
    if not entry["valid"]:
        raise RequestError(422, "variant", f"{swap.variant!r} failed the accuracy gate")
    return config.model_copy(update={"variant": swap.variant, "model": model})


def build_http_app(
    service: HttpService | Callable[[], HttpService],
    *,
    title: str = "rankserve",
    description: str = "Learning-to-rank serving: POST /rank returns documents best first.",
) -> FastAPI:
    """The FastAPI app over `service`, or over a zero-argument function that returns it (called at
    the first request that needs it, then kept: a Ray replica's service exists only once the replica
    is up)."""
    if isinstance(service, HttpService):
        resolved: list[HttpService] = [service]
    else:
        resolved = []

    def current() -> HttpService:
        if not resolved:
            resolved.append(service())  # type: ignore[operator]
        return resolved[0]

    app = FastAPI(title=title, version="0.1.0", description=description)
    install_openapi(app)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's own validation (the admin body) in the project's error shape, without echoing
        the input (a lone surrogate in it could not be encoded: a 500)."""
        error = exc.errors()[0]
        if error["type"] == "json_invalid":
            return JSONResponse(RequestError(400, "body", "malformed JSON").to_dict(), status_code=400)
        field = ".".join(str(part) for part in error["loc"] if part != "body") or "body"
        field = field.encode("utf-8", "backslashreplace").decode()
        return JSONResponse(RequestError(422, field, error["msg"]).to_dict(), status_code=422)

    @app.post("/rank", response_model=RankResponse, openapi_extra=rank_openapi_extra(),
              responses={400: {}, 413: {}, 415: {}, 422: {}, 503: {"description": "overloaded (admission "
                         "control) or no model loaded yet; see Retry-After"}})
    async def rank(request: Request) -> Response:
        status, payload = await current().core.handle_request(request)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return Response(dumps(payload), status_code=status, media_type="application/json", headers=headers)

    @app.post("/search", openapi_extra=search_openapi_extra(),
              responses={400: {}, 404: {"description": "search is not served here (started without --search)"},
                         413: {}, 415: {}, 422: {}, 503: {"description": "overloaded (admission control), or "
                                                              "the search pipeline failed to load"}})
    async def search(request: Request) -> Response:
        """Two-stage search: the query tower, ANN top-K from the vector index, one feature-store read,
        the ranker, top k (serve/search.py). Degraded (200, `degraded: true`) when a stage cannot answer."""
        status, payload = await current().search_request(request)
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 503 else None
        return Response(dumps(payload), status_code=status, media_type="application/json", headers=headers)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {}})
    async def readyz() -> JSONResponse:
        status, body = await current().readiness()
        return JSONResponse(body, status_code=status)

    @app.get("/drift", responses={404: {"description": "not monitored here (no --drift)"}})
    async def drift() -> JSONResponse:
        """Feature drift against the training split: PSI, KS and the out-of-range share per feature over a
        bounded sample of the rows scored here, and the flagged features (serve/drift.py)."""
        status, body = await current().drift_report()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        if current().core.drift is not None:
            await current().drift_report()  # the drift gauges, fresh at each scrape
        if current().cache is not None:
            stats = current().cache.stats()
            current().metrics.observe_breaker(stats["breaker_opens"], bool(stats["breaker_open"]))
        body, content_type = current().metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/admin/model", responses={**ADMIN_RESPONSES, 409: {}, 422: {}}, dependencies=[admin_auth(app)])
    async def swap_model(swap: ModelSwap) -> JSONResponse:
        """Serve another variant (or model) without stopping traffic; the answer names the model now serving.
        Needs `Authorization: Bearer <token>`, the token in the server's $RANKSERVE_ADMIN_TOKEN (serve/security.py)."""
        status, body = await current().swap_model(swap)
        return JSONResponse(body, status_code=status)

    @app.put("/admin/experiment", responses={**ADMIN_RESPONSES, 409: {}, 422: {}}, dependencies=[admin_auth(app)])
    async def put_experiment(experiment: ExperimentConfig) -> JSONResponse:
        """Start (or replace) an online experiment without stopping traffic: an A/B split of /rank between
        arms by a hash of the `X-Rankserve-User` header (or of the query id), or team-draft interleaving
        of two arms (serve/experiment.py). Every answer then names its arm. Needs the admin token."""
        status, body = await current().set_experiment(experiment)
        return JSONResponse(body, status_code=status)

    @app.delete("/admin/experiment", responses={**ADMIN_RESPONSES}, dependencies=[admin_auth(app)])
    async def end_experiment() -> JSONResponse:
        """End the experiment: /rank is answered by the server's own model again. Needs the admin token."""
        status, body = await current().set_experiment(None)
        return JSONResponse(body, status_code=status)

    @app.get("/admin/experiment", responses={**ADMIN_RESPONSES}, dependencies=[admin_auth(app)])
    async def get_experiment() -> JSONResponse:
        """The experiment in force, or null. Needs the admin token."""
        running = current().core.experiment
        return JSONResponse({"experiment": running.config.model_dump() if running else None})

    def admission_limits() -> AdmissionLimits:
        config = current().config
        if not config.admission:
            return AdmissionLimits()
        return AdmissionLimits(config.admission_queue_ms, config.admission_interval_ms, config.inflight_bound,
                               config.admission_standing_ms)

    app.add_middleware(AdmissionControl, limits=admission_limits,
                       on_reject=lambda reason: current().metrics.observe_rejected(reason),
                       publish=lambda gate: setattr(app.state, "admission", gate))

    if resolved:
        app.state.service = resolved[0]
        app.state.core = resolved[0].core
    return app
