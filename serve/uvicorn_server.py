"""The plain-uvicorn ranking server: the Ray app's own FastAPI app (serve/http_app.py) in one process, no Ray.

The reference that isolates Ray Serve's cost: the same routes, the same ranking core, the same fast
parser (orjson straight into numpy) and, with `--cache`, the same Redis result cache as the Ray Serve
deployment, over an ONNX Runtime variant scored in-process (short lists on the event loop, long ones in Starlette's
thread pool: `--inline-max-docs`; no batching).
Whatever a Ray Serve row costs over this one is Ray.

    python serve/uvicorn_server.py [--variant onnx-int8-dynamic] [--port 8002] [--cache] [--threads 1]

serve/baseline.py is the other plain-uvicorn server: the naive first version (torch eager, naive JSON).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python serve/uvicorn_server.py` puts serve/ first on sys.path; drop it so `import serve` is our package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

from fastapi import FastAPI  # noqa: E402

from serve.admission import add_admission_options  # noqa: E402
from serve.config import DEFAULT_VARIANT, ServiceConfig  # noqa: E402
from serve.drift import drift_arg  # noqa: E402
from serve.encoding import ParseMode  # noqa: E402
from serve.experiment import ExperimentConfig, RunningExperiment, load_arms  # noqa: E402
from serve.http_app import HttpService, build_http_app, freeze_startup_objects  # noqa: E402
from serve.metrics import ServiceMetrics  # noqa: E402
from serve.scoring import LocalBackend  # noqa: E402
from serve.search import add_search_options  # noqa: E402

DEFAULT_PORT = 8002


class LocalHttpService(HttpService):
    """The service of one uvicorn process: a swap loads the new variant here, then switches to it."""

    backend: LocalBackend

    async def apply_swap(self, new_config: ServiceConfig) -> dict[str, Any]:
        from export.runtime import load_scorer

        scorer = await asyncio.to_thread(load_scorer, new_config.variant, new_config.model,
                                         threads=new_config.threads, manifest_path=new_config.manifest_path)
        self.backend.scorer = scorer  # one assignment: a call already running keeps the old scorer
        freeze_startup_objects(collect=False)  # the new model's objects too
        return await self.backend.probe()

    async def load_experiment(self, experiment: ExperimentConfig | None) -> RunningExperiment | None:
        if experiment is None:
            return None
        running = await asyncio.to_thread(arms_of, self.config, experiment)
        freeze_startup_objects(collect=False)
        return running


def arms_of(config: ServiceConfig, experiment: ExperimentConfig) -> RunningExperiment:
    return load_arms(experiment, model=config.model, manifest_path=config.manifest_path, threads=config.threads,
                     inline_max_docs=config.inline_max_docs)


def create_app(config: ServiceConfig, scorer: Any = None, parse_mode: ParseMode = "fast", *,
               title: str = "rankserve (plain uvicorn)",
               description: str = "Learning-to-rank serving on plain uvicorn: POST /rank returns documents best first.",
               ) -> FastAPI:
    """The app on plain uvicorn; `scorer` defaults to `load_scorer(config.variant, ...)` (tests pass one).
    The cache needs `config.redis_url` (ValueError without it); with a redis_url, feature-store
    bodies (ids only) read their features from Redis."""
    if scorer is None:
        from export.runtime import load_scorer

        scorer = load_scorer(config.variant, config.model, threads=config.threads, manifest_path=config.manifest_path)
    service = LocalHttpService(config, LocalBackend(scorer, config.inline_max_docs), metrics=ServiceMetrics(use_ray=False),
                               parse_mode=parse_mode, redis_url=config.redis_url, cache_needs_redis=True)
    if config.experiment is not None:  # --experiment FILE: in force from the first request
        service.core.experiment = arms_of(config, config.experiment)
    return build_http_app(service, title=title, description=description)


def add_server_options(p: argparse.ArgumentParser, *, variant: str, port: int) -> None:
    """The options both plain-uvicorn servers take (ServiceConfig fields, same names as serve/run.py's)."""
    p.add_argument("--variant", default=variant)
    p.add_argument("--model", default=None)
    p.add_argument("--manifest-path", default=None)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL"),
                   help="Redis for feature-store mode and --cache (default $REDIS_URL)")
    p.add_argument("--feature-dataset", default="synthetic")
    p.add_argument("--deadline-ms", type=float, default=1000.0)
    p.add_argument("--max-docs", type=int, default=5000)
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)


def parse_args(argv: Sequence[str] | None = None) -> tuple[ServiceConfig, ParseMode]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_server_options(p, variant=DEFAULT_VARIANT, port=DEFAULT_PORT)
    p.add_argument("--parse", choices=["fast", "naive"], default="fast",
                   help="fast: the Ray app's parser; naive: json module + pydantic (the baseline's)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=False,
                   help="the Redis result cache (needs --redis-url or $REDIS_URL)")
    p.add_argument("--cache-ttl-s", type=float, default=300.0)
    p.add_argument("--inline-max-docs", type=int, default=ServiceConfig().inline_max_docs,
                   help="lists of at most this many documents are scored on the event loop, longer ones in "
                        "the thread pool (0: always the thread pool)")
    p.add_argument("--experiment", type=Path, default=None,
                   help="a JSON ExperimentConfig (serve/experiment.py): an A/B split or interleaving from the start; "
                        "PUT /admin/experiment changes it under load")
    p.add_argument("--drift", type=drift_arg, default=None,
                   help="monitor feature drift: 'on', or DriftSettings fields as key=value,... (serve/drift.py); "
                        "GET /drift reports it")
    add_admission_options(p)
    add_search_options(p)
    options = vars(p.parse_args(argv))
    parse_mode = options.pop("parse")
    if options["experiment"] is not None:
        options["experiment"] = ExperimentConfig.model_validate_json(options["experiment"].read_text())
    return ServiceConfig(**options, batching=False), parse_mode


def serve_forever(app: FastAPI, config: ServiceConfig, *, freeze_heap: bool = True) -> int:
    """Run `app` on uvicorn; print `READY <url>` once the socket is bound (like serve/run.py); exit 0
    after a graceful stop on SIGINT or SIGTERM. `freeze_heap`: keep the start-up objects out of the
    garbage collector's full passes (`freeze_startup_objects`)."""
    import uvicorn

    if freeze_heap:
        freeze_startup_objects()

    from serve.http_protocol import http_protocol

    # Build Starlette's middleware stack now, so admission's gate is published before the first
    # request and the protocol can refuse from the start (serve/http_protocol.py).
    app.middleware_stack = app.build_middleware_stack()
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                           http=http_protocol(app)))

    def announce() -> None:
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


def main(argv: Sequence[str] | None = None) -> int:
    config, parse_mode = parse_args(argv)
    return serve_forever(create_app(config, parse_mode=parse_mode), config)


if __name__ == "__main__":
    raise SystemExit(main())
