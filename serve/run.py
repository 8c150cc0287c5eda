"""Start the Ray Serve ranking service: `python serve/run.py --variant onnx-int8-dynamic [options]`.

Starts (or joins, with --address) Ray, an embedded Redis when no REDIS_URL is given, deploys
serve/app.py's application (`--topology colocated`, the default, or `split`), prints `READY <url>`
once /readyz answers 200, and on Ctrl-C or SIGTERM stops cleanly within 10 s: serve.shutdown,
ray.shutdown, the embedded Redis, then whatever of the run is left (serve/lifecycle.py, which also
cleans what a killed earlier run left).

How Ray is started for a small CPU budget, and the fast mode (`--ingress haproxy`: HAProxy with
Serve's throughput-optimized settings, set before Ray is imported): serve/ray_setup.py. Which ports
listen on which interfaces: docs/serving.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python serve/run.py` puts serve/ first on sys.path; drop it so `import serve` is our package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import argparse  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from serve import ray_setup  # noqa: E402
from serve.admission import add_admission_options  # noqa: E402
from serve.config import APP_NAME, DEFAULT_VARIANT, ServiceConfig  # noqa: E402
from serve.lifecycle import Run, StopRequested  # noqa: E402
from serve.search import add_search_options  # noqa: E402

READY_TIMEOUT_S = 300.0


def parse_args(argv: Sequence[str] | None = None) -> ServiceConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default=DEFAULT_VARIANT)
    p.add_argument("--model", default=None, help="model name in artifacts/variants (default: export.runtime.DEFAULT_MODEL)")
    p.add_argument("--manifest-path", default=None)
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=None,
                   help="@serve.batch in each scoring replica (default: off colocated, on split)")
    p.add_argument("--max-batch-docs", type=int, default=4096)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="per scoring replica (default: colocated max(256, a full batch); split's ranker: from batch size)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cache-ttl-s", type=float, default=300.0)
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else an embedded redis-server")
    p.add_argument("--feature-dataset", default="synthetic")
    p.add_argument("--topology", choices=["colocated", "split"], default="colocated",
                   help="colocated: one deployment parses, caches and scores in-process; "
                        "split: ingress deployment + batched ranker deployment")
    p.add_argument("--replicas", type=int, default=1,
                   help="replicas of the scoring deployment (colocated: the one deployment; split: the ranker)")
    p.add_argument("--max-replicas-per-node", type=int, default=None,
                   help="at most this many scoring replicas per Ray node (spreads them over a cluster)")
    p.add_argument("--autoscaling-max-replicas", type=int, default=None,
                   help="autoscale the scoring deployment from --replicas up to this many")
    p.add_argument("--ingress-replicas", type=int, default=1, help="split only: ingress replicas")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per scoring replica")
    p.add_argument("--inference-workers", type=int, default=1, help="inference threads per scoring replica")
    p.add_argument("--inline-max-docs", type=int, default=ServiceConfig().inline_max_docs,
                   help="lists of at most this many documents are scored on the replica's event loop, longer "
                        "ones in its inference threads (0: always the threads)")
    p.add_argument("--ingress", choices=["default", "haproxy"], default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto or ray://host:10001)")
    p.add_argument("--app-name", default=APP_NAME, help="Serve application name")
    p.add_argument("--route-prefix", default="/", help="HTTP prefix of the app (/rank is under it)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--metrics-export-port", type=int, default=None, help="Ray's Prometheus port (default: Ray picks)")
    add_admission_options(p, ray=True)
    add_search_options(p)
    p.add_argument("--deadline-ms", type=float, default=1000.0)
    p.add_argument("--max-docs", type=int, default=5000)
    p.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    args = p.parse_args(argv)
    return ServiceConfig(**vars(args))


def wait_ready(url: str, timeout_s: float = READY_TIMEOUT_S, stop: threading.Event | None = None) -> bool:
    """Poll GET /readyz until 200 (bounded; gives up early once `stop` is set)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def start_ray(config: ServiceConfig) -> None:
    """Join `config.address`, or start a local Ray sized to our cores (serve/ray_setup.py says why)."""
    ray_setup.start_ray(config)


def ray_metrics_port() -> int | None:
    """Where Ray's own Prometheus metrics are (the node's metrics export port)."""
    try:
        import ray

        return ray._private.worker.global_worker.node.metrics_export_port
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    # Marks every process we start, cleans what an earlier run left, starts the reaper (lifecycle.py).
    run = Run().claim()
    run.install_signal_handlers()
    ray_setup.prepare_environment(config)  # before Ray is imported: Serve reads its constants at import
    stop = run.stop_requested
    embedded = None
    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    try:
        from ray import serve

        from serve.app import build_app

        if config.redis_url is None:
            from serve.redis_server import redis_url_or_embedded

            redis_url, embedded = redis_url_or_embedded()  # $REDIS_URL wins: then nothing is embedded
            if embedded is not None:
                run.record(redis_dir=embedded.folder)
            config = config.model_copy(update={"redis_url": redis_url})
        start_ray(config)
        # Again after ray.init: Ray's core worker installs its own SIGTERM handler.
        run.install_signal_handlers()
        run.record(session_dir=ray_setup.session_dir())
        serve.start(http_options={"host": config.host, "port": config.port},
                    logging_config=ray_setup.SERVE_LOGGING_CONFIG)
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False,
                  logging_config=ray_setup.SERVE_LOGGING_CONFIG)
        if not wait_ready(url, stop=stop):
            print(f"FAILED: {url}/readyz did not answer 200 within {READY_TIMEOUT_S:.0f} s", flush=True)
            return 1
        ray_metrics = (f"http://127.0.0.1:{ray_metrics_port()}/metrics" if ray_setup.ray_metrics_enabled()
                       else "off (--metrics-export-port turns them on)")
        print(f"Redis: {config.redis_url}; Ray metrics: {ray_metrics}", flush=True)
        print(f"READY {url}", flush=True)
        run.started()
        while not stop.wait(0.5):
            pass
        return 0
    except StopRequested:
        print("stopped before READY", flush=True)
        return 0
    finally:
        # Bounded: every process of the run is gone within lifecycle.STOP_BUDGET_S of the signal.
        run.stop(ray_setup.shutdown_steps(config, embedded))


if __name__ == "__main__":
    raise SystemExit(main())
