"""How the fault suite breaks things, and what it watches while it does: the real processes only.

- `FaultRedis`: the project's embedded redis-server (serve/redis_server.py) started on the service's
  cores, with append-only persistence when a scenario asks for it, that we can SIGKILL, SIGSTOP and
  SIGCONT by pid and start again on the same port and data folder.
- `replica_processes`: Ray Serve replica processes of one deployment, found by their process title
  (`ray::ServeReplica:<app>:<deployment>`) among the *descendants of our own service* (psutil), so a
  fault never touches another user's Ray on a shared machine.
- `RssSampler`: the resident memory of every process of the service (the uvicorn process; for Ray:
  the driver, raylet, gcs_server, the Serve controller, the proxy or HAProxy, the replicas) and of
  redis-server, sampled in a thread every few seconds.
- `swap_model`: `POST /admin/model` with the admin token, timed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from serve.redis_server import EmbeddedRedis, RedisStartError


class FaultRedis(EmbeddedRedis):
    """An EmbeddedRedis pinned to `cores` (taskset execs, so the pid is redis-server's) and, with
    `persistence="aof"`, an append-only file fsynced every second in its folder: what a SIGKILL keeps."""

    def __init__(self, *, persistence: str = "none", cores: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.persistence = persistence
        self.cores = cores or []

    def command_line(self) -> list[str]:
        command = super().command_line()
        if self.persistence == "aof":
            command[command.index("--appendonly") + 1] = "yes"
            command += ["--appendfsync", "everysec"]
        if self.cores and shutil.which("taskset"):
            command = ["taskset", "-c", ",".join(map(str, self.cores)), *command]
        return command

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def signal(self, sig: int) -> None:
        """Send `sig` to redis-server (SIGKILL, SIGSTOP, SIGCONT)."""
        if self._proc is None:
            raise RuntimeError("redis-server is not running")
        self._proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self._proc.wait(timeout=10)

    def stop(self) -> None:
        """As EmbeddedRedis.stop, but a stopped (SIGSTOP) server is continued first, so SIGTERM works."""
        pid = self.pid
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        super().stop()


def start_fault_redis(*, persistence: str, maxmemory: str, cores: list[int] | None) -> FaultRedis:
    """A started FaultRedis on a free port; a lost race for the port is retried (as start_embedded_redis)."""
    for attempt in range(3):
        server = FaultRedis(persistence=persistence, cores=cores, maxmemory=maxmemory)
        try:
            return server.start()  # type: ignore[return-value]
        except RedisStartError:
            server.close()
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# The service's processes.
# ----------------------------------------------------------------------------------------------
def service_tree(root_pid: int) -> list[psutil.Process]:
    """The service's process and all its descendants (Ray's raylet, gcs_server and workers)."""
    try:
        root = psutil.Process(root_pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def role_of(proc: psutil.Process) -> str:
    """A short name for a service process: raylet, gcs_server, controller, proxy, replica:<deployment> ..."""
    try:
        cmdline = " ".join(proc.cmdline())
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "gone"
    for marker, role in (("ServeController", "controller"), ("ProxyActor", "proxy"), ("HAProxyManager", "haproxy-manager"),
                         ("raylet", "raylet"), ("gcs_server", "gcs_server"), ("redis-server", "redis-server"),
                         ("haproxy", "haproxy"), ("dashboard", "dashboard"), ("log_monitor", "log_monitor"),
                         ("runtime_env", "runtime_env_agent"), ("uvicorn_server.py", "uvicorn"),
                         ("baseline.py", "baseline"), ("serve/run.py", "ray-driver")):
        if marker in cmdline:
            return role
    if "ServeReplica:" in cmdline:
        return "replica:" + cmdline.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
    if "ray::IDLE" in cmdline:
        return "ray-idle-worker"
    args = cmdline.split()
    if "-m" in args[:-1]:
        return args[args.index("-m") + 1]  # e.g. serve.lifecycle (serve/run.py's reaper)
    script = next((a for a in args[1:] if a.endswith(".py")), None)
    return os.path.basename(script) if script else name or f"pid-{proc.pid}"


def replica_processes(root_pid: int, deployment: str) -> list[psutil.Process]:
    """Replica processes of `deployment` in the service's tree (title `ray::ServeReplica:<app>:<deployment>`)."""
    found = []
    for proc in service_tree(root_pid):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            cmdline = " ".join(proc.cmdline())
            if "ServeReplica:" in cmdline and f":{deployment}" in cmdline:
                found.append(proc)
    return sorted(found, key=lambda p: p.pid)


@dataclass
class RssSampler:
    """RSS (bytes) of every process of the service's tree and of redis-server, every `every_s`."""

    root_pid: int
    every_s: float
    # Processes outside the tree, looked up at each sample (a restarted redis-server has a new pid).
    extra_pids: Callable[[], dict[str, int | None]] = dict
    t0: float = 0.0  # samples are timed in seconds from this CLOCK_MONOTONIC time
    samples: list[dict[str, Any]] = field(default_factory=list)  # {t_s, pid, role, rss}
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample_once(self) -> None:
        now = time.monotonic() - self.t0
        procs = service_tree(self.root_pid)
        extra = {pid: role for role, pid in self.extra_pids().items() if pid}
        for pid in extra:
            with contextlib.suppress(psutil.NoSuchProcess):
                procs.append(psutil.Process(pid))
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                role = extra.get(proc.pid) or role_of(proc)
                self.samples.append({"t_s": now, "pid": proc.pid, "role": role, "rss": proc.memory_info().rss})

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self.every_s)

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.sample_once()


def rss_growth(samples: list[dict[str, Any]], warmup_s: float, window_s: float) -> list[dict[str, Any]]:
    """Per process present through the run: mean RSS over the first `window_s` after the warm-up, over
    the last `window_s`, and the growth between them (a fraction). Processes that started or ended
    inside the measured span are listed with growth None (a restarted replica is a new process)."""
    by_pid: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        by_pid.setdefault(s["pid"], []).append(s)
    if not samples:
        return []
    end = max(s["t_s"] for s in samples)
    rows = []
    for pid, rows_of in sorted(by_pid.items()):
        first = [s["rss"] for s in rows_of if warmup_s <= s["t_s"] < warmup_s + window_s]
        last = [s["rss"] for s in rows_of if s["t_s"] > end - window_s]
        start_rss = sum(first) / len(first) if first else None
        end_rss = sum(last) / len(last) if last else None
        growth = (end_rss - start_rss) / start_rss if start_rss and end_rss is not None else None
        rows.append({"pid": pid, "role": rows_of[-1]["role"], "rss_start_mb": start_rss and start_rss / 2**20,
                     "rss_end_mb": end_rss and end_rss / 2**20, "growth": growth})
    return rows


# ----------------------------------------------------------------------------------------------
# HTTP: the model swap, readiness, the feature store's keys.
# ----------------------------------------------------------------------------------------------
def swap_model(url: str, variant: str, token: str | None, timeout_s: float) -> dict[str, Any]:
    """POST /admin/model; its status, its answer (cut short) and its duration in seconds."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    started = time.monotonic()
    try:
        with httpx.Client(timeout=timeout_s) as client:
            resp = client.post(f"{url}/admin/model", json={"variant": variant}, headers=headers)
        status, text = resp.status_code, resp.text[:300]
    except httpx.HTTPError as error:
        status, text = 0, f"{type(error).__name__}: {error}"
    return {"status": status, "answer": text, "started": started, "ended": time.monotonic()}


def readiness(url: str) -> dict[str, Any]:
    """GET /readyz: its status and body (status 0 when nothing answered)."""
    import httpx

    try:
        with httpx.Client(timeout=10) as client:
            resp = client.get(f"{url}/readyz")
        return {"status": resp.status_code, "body": resp.json() if resp.content else None}
    except (httpx.HTTPError, ValueError) as error:
        return {"status": 0, "body": f"{type(error).__name__}: {error}"}


def service_counters(url: str, prefixes: tuple[str, ...] = ("rankserve_requests", "rankserve_cache",
                                                          "rankserve_degraded", "rankserve_rejected")) -> dict[str, float]:
    """The service's own counters from GET /metrics (Prometheus text), e.g. 'rankserve_degraded_total{reason="deadline"}'.
    On Ray Serve one replica answers: its own counts only."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with httpx.Client(timeout=10) as client:
            text = client.get(f"{url}/metrics").text
    except httpx.HTTPError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(prefixes) and sample.name.endswith("_total"):
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}"] = sample.value
    return out


def count_keys(redis_url: str, pattern: str, limit: int = 10_000_000) -> int | None:
    """How many keys match `pattern` (SCAN, bounded); None when Redis does not answer."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        n = 0
        for _ in client.scan_iter(match=pattern, count=5000):
            n += 1
            if n >= limit:
                break
        return n
    except redis.RedisError:
        return None
    finally:
        client.close()
