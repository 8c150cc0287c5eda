"""How serve/run.py starts Ray on a small CPU budget: the lab's 2 cores, or a 1-core taskset.

- **A local start says `address="local"`.** Without it, `ray.init()` joins whatever cluster Ray
  recorded on the machine (`/tmp/ray/ray_current_cluster`, written by `ray start --head`), even a
  dead one, and hangs for minutes.
- **`num_cpus` is the cores this process may run on** (its affinity, which `taskset` sets), not
  `os.cpu_count()`. Our deployments reserve no CPUs (`num_cpus: 0`), so this only tells Ray's
  scheduler, and any task a user starts, the truth.
- **The fast mode** (`--ingress haproxy`): HAProxy in front of the replicas with Serve's
  throughput-optimized settings. It implies direct ingress: HAProxy forwards straight to each
  ingress replica's own HTTP port, with no Python proxy in between.
- **A short drain.** In direct-ingress mode a replica that stops first stays in HAProxy's pool for
  `RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S` (30 s by default), so a stop took 33 s. We set
  1 s: requests already in flight still finish, because a stopping replica waits for its ongoing
  requests (up to the deployment's `graceful_shutdown_timeout_s`) after the drain.
- **Ray's own background work**, measured one knob at a time on one core (docs/serving.md, "Speed");
  kept only where it helped:
  - Ray starts its workers at nice 15, so that the GCS and raylet win the CPU from busy workers. On
    one core the replica (and the HAProxy it starts) then lost it to every burst of Ray's own
    processes: p99 was 50 to 300 ms. `RAY_worker_niceness=0` (Ray's `worker_niceness`).
  - Ray's metrics collection (`RAY_enable_metrics_collection=0`) is off unless
    `--metrics-export-port` asks for Ray's metrics: the periodic export was the other source of
    those bursts. The service's own `/metrics` is unaffected.
  - HAProxy gets as many threads as we have cores (`RAY_SERVE_HAPROXY_NBTHREAD`, default 4),
    at most 4: four threads on one core cost a fifth of the throughput.
  - Serve's access log off and its log level WARNING (`SERVE_LOGGING_CONFIG`, passed to
    `serve.run`): a log record per request.
  - Not kept: task events (`RAY_enable_task_events=0`) measured no gain; usage stats are already
    off for `ray.init()` (Ray sets `RAY_USAGE_STATS_ENABLED=0` itself).

Every variable is set with `setdefault`: a value already in the environment wins. They must be set
before Ray is imported (Serve reads its constants at import) and before `ray.init` (the raylet and
workers inherit the environment). A cluster joined with `--address` keeps its own settings: set
them before `ray start` there.

The admin token (`RANKSERVE_ADMIN_TOKEN`, serve/security.py) reaches the replicas the same way, and
only that way: a local Ray's workers inherit it from this process's environment (checked on Ray
2.60: an actor reads the driver's value), while no config carries it (`user_config` and init args
are shown in Ray's dashboard). On a joined cluster it must be in the environment of `ray start` on
every node that may host a replica.

The replicas' own HTTP ports (direct ingress, HAProxy mode) bind Serve's HTTP host (`--host`,
127.0.0.1 by default): Ray 2.60 has no separate setting for them. HAProxy's stats and metrics
ports bind all interfaces, with no setting either (docs/serving.md, "Ports and interfaces").
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from serve.config import ServiceConfig

# The fast mode: HAProxy ingress + Serve's throughput-optimized constants (direct ingress, no
# separate user-code thread, buffered request logs, gRPC between replicas, GC frozen after start-up).
FAST_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
# A stop in seconds, not 30+: the least time a stopping direct-ingress replica stays in the pool.
DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}
# Ray's background work, measured one knob at a time (docs/serving.md, "Speed"); only gains are kept.
# Workers (our replicas, and the HAProxy they start) at the raylet's priority, not nice 15.
NICE_ENV = {"RAY_worker_niceness": "0"}
# Ray's metrics collection and export, unless Ray's metrics are asked for (--metrics-export-port).
# In HAProxy mode that includes Serve's per-request HTTP metrics: HAProxy logs every request to a
# socket that the HAProxyManager actor reads and parses (0.12 ms of its CPU per request, measured).
NO_RAY_METRICS_ENV = {"RAY_enable_metrics_collection": "0", "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0"}
HAPROXY_MAX_THREADS = 4  # Ray's own default for RAY_SERVE_HAPROXY_NBTHREAD
# Serve's logging for our deployments (serve.run's logging_config): no access-log record per request.
SERVE_LOGGING_CONFIG = {"enable_access_log": False, "log_level": "WARNING"}
# Options for every deployment (serve/app.py), for a stop in seconds. A stopping replica sleeps
# graceful_shutdown_wait_loop_s (Serve's default 2 s) before each look at its ongoing requests,
# once per tier (split: ingress, then ranker). Under load with the default proxy, a request
# whose body the replica was still reading from the killed proxy counted as ongoing for up to 5 s
# more: graceful_shutdown_timeout_s (default 20 s) caps that wait. Requests take milliseconds and
# give up at --deadline-ms (1 s), so 3 s still lets every request in flight finish.
DEPLOYMENT_SHUTDOWN_OPTIONS = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 3.0}


def usable_cpus() -> int:
    """The cores this process may run on (a taskset narrows it); os.cpu_count() where unknown."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ray_environment(config: ServiceConfig) -> dict[str, str]:
    """The variables serve/run.py sets before Ray starts, for this config."""
    env = {**DRAIN_ENV, **NICE_ENV}
    if config.metrics_export_port is None:
        env.update(NO_RAY_METRICS_ENV)
    if config.ingress == "haproxy":
        env.update(FAST_INGRESS_ENV)
        env["RAY_SERVE_HAPROXY_NBTHREAD"] = str(min(HAPROXY_MAX_THREADS, config.num_cpus or usable_cpus()))
    return env


def ray_metrics_enabled() -> bool:
    """Whether Ray collects and exports metrics in this process's Ray (the app need not mirror to them)."""
    return os.environ.get("RAY_enable_metrics_collection", "1").lower() not in ("0", "false")


def prepare_environment(config: ServiceConfig) -> dict[str, str]:
    """Set `ray_environment(config)` in os.environ (values already there win); return what is in effect."""
    for name, value in ray_environment(config).items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in ray_environment(config)}


def init_kwargs(config: ServiceConfig) -> dict[str, Any]:
    """ray.init's arguments: join `config.address`, or start a local Ray sized to our cores."""
    if config.address:
        return {"address": config.address, "log_to_driver": False}
    return {
        "address": "local",
        "num_cpus": config.num_cpus or usable_cpus(),
        "include_dashboard": False,
        "log_to_driver": False,
        "_metrics_export_port": config.metrics_export_port,
    }


def start_ray(config: ServiceConfig) -> None:
    import ray

    ray.init(**init_kwargs(config))


def session_dir() -> str | None:
    """This Ray session's folder (its logs), when we started Ray."""
    try:
        import ray

        return ray._private.worker.global_worker.node.get_session_dir_path()
    except Exception:  # noqa: BLE001 - joined clusters have no local node
        return None


def shutdown_steps(config: ServiceConfig, embedded: Any = None) -> list[tuple[str, Callable[[], object]]]:
    """The graceful stop, in order, for lifecycle.Run.stop: our app or Serve, then Ray, then our Redis.

    A joined cluster (`--address`) loses our application only; Serve and Ray keep running there.
    Nothing touches Serve unless Ray is up: Serve's client would otherwise start a Ray of its own.
    Ray is imported inside the steps, so a stop that interrupted its import still runs the rest.
    """

    def stop_serve() -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        if config.address:
            serve.delete(config.app_name)
        else:
            serve.shutdown()

    def stop_ray() -> None:
        import ray

        ray.shutdown()

    steps: list[tuple[str, Callable[[], object]]] = [
        ("serve.delete" if config.address else "serve.shutdown", stop_serve),
        ("ray.shutdown", stop_ray),
    ]
    if embedded is not None:
        steps.append(("redis", embedded.close))  # stops it and removes its folder
    return steps
