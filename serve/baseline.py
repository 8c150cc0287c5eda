"""The baseline server: what a team writes first, to measure every optimization against.

FastAPI on uvicorn, the PyTorch model in eager mode (fp32), no batching, no cache, one process,
JSON parsed the naive way (the `json` module, then pydantic over the Python objects: exactly
FastAPI's default body parsing). Same API and same response shapes as the Ray Serve app, because
it runs the same core (serve/ranking.py); compact JSON and msgpack bodies are accepted too.

`--variant onnx-int8-dynamic` (any manifest variant) serves an ONNX Runtime variant on plain
uvicorn instead, so that Ray Serve's own overhead can be measured against the same model; with
`--parse fast` and `--cache` it gets the same request parsing and Redis result cache as the Ray app,
so the only difference left is Ray Serve itself.

    python serve/baseline.py [--port 8001] [--variant torch-eager] [--model NAME] [--threads 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python serve/baseline.py` puts serve/ first on sys.path; drop it so `import serve` is our package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from starlette.concurrency import run_in_threadpool  # noqa: E402

from serve.config import ServiceConfig  # noqa: E402
from serve.metrics import ServiceMetrics  # noqa: E402
from serve.ranking import RankingCore, ScoreOutcome, dumps, score_lists  # noqa: E402
from serve.schemas import RankResponse, Readiness, install_openapi, rank_openapi_extra  # noqa: E402

BASELINE_VARIANT = "torch-eager"


class LocalBackend:
    """The scorer in this process, called once per request (no batching)."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    async def model_info(self) -> dict[str, Any]:
        s = self.scorer
        return {"name": s.model, "variant": s.variant, "version": s.version, "n_features": s.n_features}

    async def score(self, features: np.ndarray) -> ScoreOutcome:
        arrival = time.perf_counter()
        scorer = self.scorer

        def run() -> tuple[float, float, np.ndarray]:
            start = time.perf_counter()
            scores = score_lists(scorer, [features])[0]
            return start, time.perf_counter(), scores

        # What a FastAPI `def` endpoint does: the call runs in Starlette's thread pool.
        start, end, scores = await run_in_threadpool(run)
        model = {"name": scorer.model, "variant": scorer.variant, "version": scorer.version}
        return ScoreOutcome(
            scores=scores,
            model=model,
            queue_ms=(start - arrival) * 1000,
            inference_ms=(end - start) * 1000,
            batch_docs=len(features),
            batch_requests=1,
            batch_first=True,
        )


def create_app(config: ServiceConfig, scorer: Any = None, parse_mode: str = "naive") -> FastAPI:
    """The baseline app; `scorer` defaults to `load_scorer(config.variant, ...)` (tests pass one)."""
    if scorer is None:
        from export.runtime import load_scorer

        scorer = load_scorer(config.variant, config.model, threads=config.threads, manifest_path=config.manifest_path)
    feature_store = cache = None
    if config.redis_url:
        from serve.feature_store import AsyncFeatureStore

        feature_store = AsyncFeatureStore(config.redis_url)
    if config.cache:
        if not config.redis_url:
            raise ValueError("cache: needs --redis-url or $REDIS_URL")
        from serve.cache import AsyncResultCache

        cache = AsyncResultCache(config.redis_url, ttl_s=config.cache_ttl_s, timeout_s=config.redis_timeout_s)
    metrics = ServiceMetrics(use_ray=False)
    core = RankingCore(
        backend=LocalBackend(scorer),
        metrics=metrics,
        cache=cache,
        feature_store=feature_store,
        feature_dataset=config.feature_dataset,
        max_docs=config.max_docs,
        max_body_bytes=config.max_body_bytes,
        deadline_ms=config.deadline_ms,
        parse_mode=parse_mode,
    )
    app = FastAPI(title="rankserve baseline", version="0.1.0", description="Naive FastAPI + uvicorn ranking server.")
    install_openapi(app)

    @app.post("/rank", response_model=RankResponse, openapi_extra=rank_openapi_extra(),
              responses={400: {}, 413: {}, 415: {}, 422: {}})
    async def rank(request: Request) -> Response:
        status, payload = await core.handle_request(request)
        return Response(dumps(payload), status_code=status, media_type="application/json")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness)
    async def readyz() -> JSONResponse:
        info = await core.backend.model_info()
        redis_state = "disabled"
        if feature_store is not None:
            try:
                redis_state = "up" if await feature_store.client.ping() else "down"
            except Exception:
                redis_state = "down"
        return JSONResponse({"model_loaded": True, "redis": redis_state, "model": info})

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.state.core = core
    return app


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServiceConfig, str]:
    p = argparse.ArgumentParser(description="The baseline ranking server (FastAPI + uvicorn, no Ray).")
    p.add_argument("--variant", default=BASELINE_VARIANT, help="torch-eager, or an ONNX variant to measure Ray's overhead")
    p.add_argument("--model", default=None)
    p.add_argument("--manifest-path", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="Redis for feature-store mode and --cache (default $REDIS_URL)")
    p.add_argument("--parse", choices=["naive", "fast"], default="naive",
                   help="naive: json module + pydantic (the baseline); fast: the Ray app's parser")
    p.add_argument("--cache", action="store_true", help="the Redis result cache (off in the baseline)")
    p.add_argument("--cache-ttl-s", type=float, default=300.0)
    p.add_argument("--feature-dataset", default="synthetic")
    p.add_argument("--deadline-ms", type=float, default=1000.0)
    p.add_argument("--max-docs", type=int, default=5000)
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    args = p.parse_args(argv)
    options = vars(args)
    parse_mode = options.pop("parse")
    return ServiceConfig(**options, batching=False), parse_mode


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    config, parse_mode = parse_args(argv)
    app = create_app(config, parse_mode=parse_mode)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning"))

    def announce() -> None:  # READY once the socket is bound, like serve/run.py
        for _ in range(600):
            if server.started:
                print(f"READY http://{config.host}:{config.port}", flush=True)
                return
            time.sleep(0.1)

    threading.Thread(target=announce, daemon=True).start()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to the handler it
    # found: make that one a no-op so a requested stop exits with status 0.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
