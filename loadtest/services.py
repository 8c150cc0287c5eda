"""The services a sweep starts: one class per kind of server, behind one interface.

Why a class per kind: the baseline server, the plain uvicorn server and Ray Serve take different
command lines, ports and environments, and a sweep entry must never be able to ask one of them for
an option it does not have. Each class knows which `serve.config.ServiceConfig` fields its server's
CLI takes (a field `max_batch_docs` is the flag `--max-batch-docs`), the values it runs with where
they differ from ServiceConfig's defaults, its command line and its environment; `SERVICES` maps the
sweep file's `server:` name to the class. Starting waits, bounded, for READY or /readyz; stopping
sends SIGINT (a clean Ray shutdown), then SIGTERM, then SIGKILL to the process group, all bounded.
`plan_cores` keeps the service and the load generator on different cores.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from models.paths import REPO_ROOT
from serve.config import ServiceConfig
from serve.drift import DriftSettings, drift_flag
from serve.index_config import IndexConfig

if TYPE_CHECKING:
    from loadtest.sweep_config import ServiceSpec

ServerKind = Literal["baseline", "uvicorn", "ray"]


# ----------------------------------------------------------------------------------------------
# Cores: the service and the load generator never share one when the machine allows it.
# ----------------------------------------------------------------------------------------------
def plan_cores(available: list[int] | None = None) -> dict:
    """Split the usable cores: the first half to the service, the rest to the load generator."""
    if available is None:
        available = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(available) < 2:
        return {"pinned": False, "service_cores": available, "loadgen_cores": available,
                "method": "none (fewer than 2 usable cores)"}
    half = len(available) // 2
    return {"pinned": True, "service_cores": available[:half], "loadgen_cores": available[half:],
            "method": "taskset -c for the service; sched_setaffinity for the sweep and its load generators"}


def _cpu_list(cores: list[int]) -> str:
    return ",".join(str(c) for c in cores)


# ----------------------------------------------------------------------------------------------
# The kinds of service.
# ----------------------------------------------------------------------------------------------
class Service:
    """One kind of server: what it accepts, how it is started, and where it listens."""

    script: ClassVar[str]  # under serve/
    # The ServiceConfig fields its CLI takes; every other field must keep the kind's value.
    options: ClassVar[tuple[str, ...]]
    # Options always written on the command line (the others only when not the kind's default).
    always: ClassVar[tuple[str, ...]]
    # Where this kind's values differ from ServiceConfig's defaults.
    defaults: ClassVar[dict[str, Any]] = {}
    extra_args: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: ServiceSpec) -> None:
        self.spec = spec

    @classmethod
    def default_of(cls, name: str) -> Any:
        """The value this kind runs with when the sweep file does not set `name`."""
        if name in cls.defaults:
            return cls.defaults[name]
        return ServiceConfig.model_fields[name].get_default(call_default_factory=True)

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self, cores: dict | None = None) -> list[str]:
        """The command line that starts the service (pinned to the service's cores when planned)."""
        command = [sys.executable, str(REPO_ROOT / "serve" / self.script)]
        command += [arg for name in self.always for arg in _flag(name, getattr(self.spec, name))]
        command += self.extra_args
        for name in self.options:
            value = getattr(self.spec, name)
            if name not in self.always and value != self.default_of(name):
                command += _flag(name, value)
        if cores and cores.get("pinned") and shutil.which("taskset"):
            command = ["taskset", "-c", _cpu_list(cores["service_cores"]), *command]
        return command

    def environment(self, redis_url: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if redis_url:
            env["REDIS_URL"] = redis_url
        return env

    def start(self, log_path: Path, *, cores: dict | None, redis_url: str | None,
              timeout_s: float) -> RunningService:
        """Start the service and wait, bounded, until it prints READY or /readyz answers 200."""
        import httpx

        if not wait_port_free(self.port, 20):
            raise ServiceStartError(f"port {self.port} is still in use by another process")
        command = self.command(cores)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=self.environment(redis_url),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   start_new_session=True)
        ready = threading.Event()

        def read_output() -> None:
            with log_path.open("w") as log:
                for line in process.stdout:  # type: ignore[union-attr]
                    log.write(line)
                    log.flush()
                    if line.startswith("READY"):
                        ready.set()

        reader = threading.Thread(target=read_output, daemon=True)
        reader.start()
        service = RunningService(process, self.url, log_path, command, 0.0, reader)
        deadline = started + timeout_s
        try:
            with httpx.Client(timeout=2.0) as client:
                while time.monotonic() < deadline:
                    if process.poll() is not None:
                        raise ServiceStartError(f"{' '.join(command)} exited with {process.returncode}:\n"
                                                f"{_tail(log_path)}")
                    if ready.is_set() or _readyz(client, self.url):
                        service.start_s = time.monotonic() - started
                        return service
                    time.sleep(0.5)
            raise ServiceStartError(f"{' '.join(command)} not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")
        except BaseException:  # not ready, or interrupted: never leave the service behind
            service.stop(timeout_s=15)
            raise


# ServiceConfig fields the sweep leaves to itself: it reaches every service at http://127.0.0.1:<port>/
# (host, route_prefix), starts its own Ray (address) and gives its own Redis as $REDIS_URL (redis_url).
_BASELINE_OPTIONS = ("variant", "model", "manifest_path", "threads", "port", "feature_dataset", "deadline_ms",
                     "max_docs", "max_body_bytes")
# POST /search (serve/search.py): the uvicorn server and Ray Serve take it; the baseline does not.
_SEARCH_OPTIONS = ("search", "search_index", "search_model", "search_variant", "search_dataset",
                   "search_max_candidates")


class BaselineServer(Service):
    """serve/baseline.py as a team writes it first: naive JSON parsing, no batching, no cache."""

    script = "baseline.py"
    options = _BASELINE_OPTIONS
    always = ("port", "variant", "threads")
    defaults = {"batching": False, "cache": False, "port": 8001}


class UvicornServer(Service):
    """serve/uvicorn_server.py: the Ray app's own FastAPI app on plain uvicorn (fast parser, optional
    cache), an ONNX variant scored in-process: isolates Ray's cost."""

    script = "uvicorn_server.py"
    options = (*_BASELINE_OPTIONS, "cache", "cache_ttl_s", "inline_max_docs", "admission", "admission_queue_ms",
               "admission_standing_ms", "admission_interval_ms", "max_inflight", *_SEARCH_OPTIONS, "drift")
    always = ("port", "variant", "threads")
    defaults = {"batching": False, "cache": False, "port": 8002}
    extra_args = ("--parse", "fast")


class RayServe(Service):
    """serve/run.py: the ranking app on Ray Serve (topology, batching, cache, replicas, HAProxy ingress)."""

    script = "run.py"
    options = ("variant", "model", "manifest_path", "topology", "max_batch_docs", "batch_wait_ms",
               "inference_workers", "inline_max_docs", "max_ongoing_requests", "batching", "cache", "cache_ttl_s", "feature_dataset",
               "replicas", "max_replicas_per_node", "autoscaling_max_replicas", "ingress_replicas", "threads", "ingress",
               "port", "num_cpus", "admission", "admission_queue_ms", "admission_standing_ms", "admission_interval_ms", "max_inflight",
               "max_queued_requests",
               "deadline_ms", "max_docs", "max_body_bytes", *_SEARCH_OPTIONS)
    always = ("variant", "topology", "port", "batching", "cache", "replicas", "threads", "ingress")

    def environment(self, redis_url: str | None) -> dict[str, str]:
        env = super().environment(redis_url)
        if self.spec.ingress == "haproxy":
            # Must be set before Ray starts (docs/DEVELOPERS.md); serve/run.py sets them too.
            env.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
            env.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
        return env


SERVICES: dict[str, type[Service]] = {"baseline": BaselineServer, "uvicorn": UvicornServer, "ray": RayServe}


def service_for(spec: ServiceSpec) -> Service:
    return SERVICES[spec.server](spec)


def service_command(spec: ServiceSpec, cores: dict | None = None) -> list[str]:
    """The command line that starts `spec` (pinned to the service's cores when planned)."""
    return service_for(spec).command(cores)


def service_environment(spec: ServiceSpec, redis_url: str | None) -> dict[str, str]:
    return service_for(spec).environment(redis_url)


def _flag(name: str, value: Any) -> list[str]:
    """A ServiceConfig field as its CLI flag: `--max-batch-docs 512`, `--batching` / `--no-batching`."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, IndexConfig):  # serve/search.py's `--search-index key=value,...`
        return [flag, ",".join(f"{k}={v}" for k, v in value.model_dump(exclude_defaults=True).items())]
    if isinstance(value, DriftSettings):  # serve/drift.py's `--drift key=value,...`
        return [flag, drift_flag(value)]
    if isinstance(value, bool):
        return [flag if value else "--no-" + flag[2:]]
    return [flag, str(value)]


# ----------------------------------------------------------------------------------------------
# A started service, and stopping it.
# ----------------------------------------------------------------------------------------------
class ServiceStartError(RuntimeError):
    """The service exited or did not become ready in time; the message holds its log's tail."""


@dataclass
class RunningService:
    """A started service: its process, base URL and log file."""

    process: subprocess.Popen
    url: str
    log_path: Path
    command: list[str]
    start_s: float
    _reader: threading.Thread | None = field(default=None, repr=False)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (a clean Ray shutdown), then SIGTERM, then SIGKILL to its process group; all bounded."""
        process = self.process
        steps = [(signal.SIGINT, False, timeout_s), (signal.SIGTERM, True, 10.0), (signal.SIGKILL, True, 5.0)]
        for sig, whole_group, wait_s in steps:
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if whole_group:
                    os.killpg(process.pid, sig)
                else:
                    process.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=wait_s)
        # Children left behind in the service's session (Ray workers) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return process.poll()


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_port_free(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not port_open(port):
            return True
        time.sleep(0.5)
    return not port_open(port)


def _readyz(client: Any, url: str) -> bool:
    try:
        return client.get(f"{url}/readyz").status_code == 200
    except Exception:  # noqa: BLE001 - any connection error means "not yet"
        return False


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
