"""Start the Ray Serve ranking service: `python serve/run.py --variant onnx-int8-dynamic [options]`.

Starts (or joins, with --address) Ray, an embedded Redis when no REDIS_URL is given, deploys
serve/app.py's application, prints `READY <url>` once /readyz answers 200, and on Ctrl-C or
SIGTERM stops cleanly: serve.shutdown, ray.shutdown, then the embedded Redis.

`--ingress haproxy` sets RAY_SERVE_ENABLE_HA_PROXY=1 and RAY_SERVE_THROUGHPUT_OPTIMIZED=1 before Ray
is imported (they are read when Ray starts). Note: in that mode Ray binds the replicas' HTTP ports
on all interfaces, not only loopback.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python serve/run.py` puts serve/ first on sys.path; drop it so `import serve` is our package.
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != _HERE]

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from serve.config import APP_NAME, DEFAULT_VARIANT, ServiceConfig  # noqa: E402

READY_TIMEOUT_S = 300.0
HAPROXY_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def parse_args(argv: Sequence[str] | None = None) -> ServiceConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--variant", default=DEFAULT_VARIANT)
    p.add_argument("--model", default=None, help="model name in artifacts/variants (default: export.runtime.DEFAULT_MODEL)")
    p.add_argument("--manifest-path", default=None)
    p.add_argument("--batching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-batch-docs", type=int, default=4096)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--max-ongoing-requests", type=int, default=None, help="per ranker replica (default: from batch size)")
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--cache-ttl-s", type=float, default=300.0)
    p.add_argument("--redis-url", default=None, help="default: $REDIS_URL, else an embedded redis-server")
    p.add_argument("--feature-dataset", default="synthetic")
    p.add_argument("--replicas", type=int, default=1, help="ranker replicas")
    p.add_argument("--ingress-replicas", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads per ranker replica")
    p.add_argument("--inference-workers", type=int, default=1, help="inference threads per ranker replica")
    p.add_argument("--ingress", choices=["default", "haproxy"], default="default")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto or ray://host:10001)")
    p.add_argument("--app-name", default=APP_NAME, help="Serve application name")
    p.add_argument("--route-prefix", default="/", help="HTTP prefix of the app (/rank is under it)")
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--metrics-export-port", type=int, default=None, help="Ray's Prometheus port (default: Ray picks)")
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
    import ray

    if config.address:
        ray.init(address=config.address, log_to_driver=False)
        return
    ray.init(
        num_cpus=config.num_cpus or os.cpu_count(),
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=config.metrics_export_port,
    )


def ray_metrics_port() -> int | None:
    """Where Ray's own Prometheus metrics are (the node's metrics export port)."""
    try:
        import ray

        return ray._private.worker.global_worker.node.metrics_export_port
    except Exception:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if config.ingress == "haproxy":
        os.environ.update(HAPROXY_ENV)  # before Ray is imported: its constants read them at import

    embedded = None
    if config.redis_url is None:
        from serve.redis_server import redis_url_or_embedded

        url, embedded = redis_url_or_embedded()
        config = config.model_copy(update={"redis_url": url})

    stop = threading.Event()

    import ray
    from ray import serve

    from serve.app import build_app

    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    try:
        start_ray(config)
        # After ray.init: Ray's core worker installs its own SIGTERM handler, which would kill us
        # before serve.shutdown and the Redis stop run.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": config.host, "port": config.port})
        serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix, blocking=False)
        if not wait_ready(url, stop=stop):
            print(f"FAILED: {url}/readyz did not answer 200 within {READY_TIMEOUT_S:.0f} s", flush=True)
            return 1
        print(f"Redis: {config.redis_url}; Ray metrics: http://127.0.0.1:{ray_metrics_port()}/metrics", flush=True)
        print(f"READY {url}", flush=True)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        print("stopping: serve.shutdown, ray.shutdown, redis", flush=True)
        try:
            if config.address:  # a cluster we joined: remove our app only, leave Serve running
                serve.delete(config.app_name)
            else:
                serve.shutdown()
        finally:
            ray.shutdown()
            if embedded is not None:
                embedded.stop()


if __name__ == "__main__":
    raise SystemExit(main())
