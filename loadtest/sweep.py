"""The sweep: run every optimization of a YAML ladder against a real service and record it.

Why a runner of its own: a latency figure is only worth comparing when every optimization was
measured the same way, on the same payloads, with the load generator kept off the service's cores,
several times, and with the machine recorded. This module starts each service configuration as a
subprocess (`serve/run.py` or `serve/baseline.py`), warms it up, runs the scenarios through
`loadtest.runner`, stops it, and writes one raw JSON file per entry into
`results/runs/<UTC timestamp>-<profile>/raw/`; `loadtest/report.py` turns the folder into tables
and plots. A run resumes after an interruption (`--resume RUN_DIR`): entries whose raw file exists
are skipped.

    python loadtest/sweep.py --profile quick            # the lab's sweep (README: make lab)
    python loadtest/sweep.py --sweep my.yaml --out /tmp/runs
    python loadtest/sweep.py --resume results/runs/20250101T000000Z-quick
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.paths import ARTIFACTS, REPO_ROOT, RESULTS

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"
RUNS_DIR = RESULTS / "runs"

Variant = Literal["torch-eager", "onnx-fp32", "onnx-fp32-opt", "onnx-int8-dynamic", "onnx-int8-static",
                  "onnx-fp16"]
Encoding = Literal["json", "compact", "msgpack", "feature-store"]
Scenario = Literal["steady", "ramp", "spike", "cache-mix", "list-mix"]
DEFAULT_PORTS = {"ray": 8000, "baseline": 8001, "uvicorn": 8002}


# ----------------------------------------------------------------------------------------------
# The sweep file: pydantic models, so that a typo in the YAML is an error naming the field.
# ----------------------------------------------------------------------------------------------
class ServiceSpec(BaseModel):
    """One service configuration: every field maps to one option of serve/run.py or serve/baseline.py."""

    model_config = ConfigDict(extra="forbid")

    # baseline: serve/baseline.py as a team writes it first (naive JSON parsing, no cache);
    # uvicorn: the same plain uvicorn server with the Ray app's parser and optional cache, to isolate Ray's cost.
    server: Literal["baseline", "uvicorn", "ray"] = "ray"
    variant: Variant = "onnx-int8-dynamic"
    model: str | None = None
    batching: bool = False
    max_batch_docs: int | None = Field(None, ge=1)
    batch_wait_ms: float | None = Field(None, ge=0)
    cache: bool = False
    ingress: Literal["default", "haproxy"] = "default"
    replicas: int = Field(1, ge=1)
    threads: int = Field(1, ge=1)
    inference_workers: int | None = Field(None, ge=1)
    max_ongoing_requests: int | None = Field(None, ge=1)
    encoding: Encoding = "json"
    device: Literal["cpu", "gpu"] = "cpu"
    port: int | None = Field(None, ge=1024, le=65535)

    @model_validator(mode="after")
    def _baseline_has_no_ray_options(self) -> ServiceSpec:
        if self.server in ("baseline", "uvicorn"):
            ray_only = {"batching": self.batching, "cache": self.cache and self.server == "baseline",
                        "ingress": self.ingress != "default",
                        "replicas": self.replicas != 1, "max_batch_docs": self.max_batch_docs is not None,
                        "batch_wait_ms": self.batch_wait_ms is not None,
                        "inference_workers": self.inference_workers is not None,
                        "max_ongoing_requests": self.max_ongoing_requests is not None}
            wrong = sorted(name for name, is_set in ray_only.items() if is_set)
            if wrong:
                raise ValueError(f"{', '.join(wrong)}: not for server {self.server!r}")
        return self

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.server]


class Entry(BaseModel):
    """One optimization: a service configuration and the scenarios to run against it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    description: str = ""
    base: str | None = None  # the earlier entry this one adds an optimization to (the ladder)
    group: Literal["ladder", "isolated"] = "ladder"
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    scenarios: list[Scenario] = Field(default_factory=lambda: ["steady"], min_length=1)
    list_sizes: list[int] | None = None  # default: the sweep's
    slo_search: bool = False  # run max_throughput_under_slo at the sweep's slo.list_sizes


class SloSpec(BaseModel):
    """The objective for the maximum-throughput search (loadtest.runner.max_throughput_under_slo)."""

    model_config = ConfigDict(extra="forbid")

    p99_ms: float = Field(50.0, gt=0)
    list_sizes: list[int] = Field(default_factory=lambda: [100], min_length=1)
    profile: Literal["quick", "full"] = "full"  # runner.SLO_PROFILES: "quick" marks a smoke figure
    min_duration_s: float = Field(3.0, gt=0)
    min_queries: int = Field(100, ge=1)
    # The search starts at this fraction of the entry's closed-loop requests/s at that list size
    # (a good first guess, so few steps are needed), doubles until the objective fails, then bisects.
    start_fraction: float = Field(0.5, gt=0)
    tolerance: float = Field(0.05, gt=0, lt=1)
    max_steps: int = Field(12, ge=1)
    time_budget_s: float = Field(600.0, gt=0)


class Sweep(BaseModel):
    """A whole sweep file (loadtest/sweeps/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    trials: int = Field(3, ge=1)
    trial_duration_s: float = Field(4.0, gt=0)
    warmup_s: float = Field(2.0, ge=0)
    users: int = Field(8, ge=1)
    zipf_s: float = Field(1.1, gt=0)
    list_sizes: list[int] = Field(default_factory=lambda: [100, 1000], min_length=1)
    n_queries: int = Field(64, ge=1)
    seed: int = 0
    start_timeout_s: float = Field(180.0, gt=0)
    stop_timeout_s: float = Field(30.0, gt=0)
    baseline: str | None = None  # the entry speedups are relative to; default: the first baseline server
    slo: SloSpec = Field(default_factory=SloSpec)
    entries: list[Entry] = Field(min_length=1)

    @field_validator("list_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        if any(n < 1 for n in sizes):
            raise ValueError("list sizes must be >= 1")
        return sizes

    @model_validator(mode="before")
    @classmethod
    def _resolve_bases(cls, data: Any) -> Any:
        """An entry with `base: NAME` starts from that earlier entry's service and overrides fields."""
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            return data
        services: dict[str, dict] = {}
        resolved = []
        for index, raw in enumerate(data["entries"]):
            if not isinstance(raw, dict):
                resolved.append(raw)
                continue
            raw = dict(raw)
            own = raw.get("service") or {}
            if not isinstance(own, dict):
                resolved.append(raw)
                continue
            base = raw.get("base")
            if base is not None:
                if base not in services:
                    raise ValueError(f"entries[{index}].base: {base!r} is not an earlier entry's name")
                own = {**services[base], **own}
            raw["service"] = own
            services[str(raw.get("name"))] = own
            resolved.append(raw)
        return {**data, "entries": resolved}

    @model_validator(mode="after")
    def _check_names(self) -> Sweep:
        names = [e.name for e in self.entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"entries: duplicate names {duplicates}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not an entry name")
        return self

    def baseline_entry(self) -> str | None:
        if self.baseline:
            return self.baseline
        return next((e.name for e in self.entries if e.service.server == "baseline"), None)

    def sizes_of(self, entry: Entry) -> list[int]:
        return entry.list_sizes or self.list_sizes


class SweepFileError(ValueError):
    """A sweep file that cannot be used; the message names the file and the field."""


def load_sweep(path: Path | str) -> Sweep:
    """Read and validate a sweep YAML file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepFileError(f"{path}: not valid YAML: {error}") from error
    try:
        return Sweep.model_validate(data)
    except ValidationError as error:
        lines = []
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"  {where}: {problem['msg']}")
        raise SweepFileError(f"{path}: invalid sweep file\n" + "\n".join(lines)) from error


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
# Starting and stopping one service.
# ----------------------------------------------------------------------------------------------
def service_command(spec: ServiceSpec, cores: dict | None = None) -> list[str]:
    """The command line that starts `spec` (pinned to the service's cores when planned)."""
    if spec.server in ("baseline", "uvicorn"):
        command = [sys.executable, str(REPO_ROOT / "serve" / "baseline.py"), "--port", str(spec.effective_port),
                   "--variant", spec.variant, "--threads", str(spec.threads)]
        if spec.server == "uvicorn":
            command += ["--parse", "fast", *(["--cache"] if spec.cache else [])]
        if spec.model:
            command += ["--model", spec.model]
    else:
        command = [sys.executable, str(REPO_ROOT / "serve" / "run.py"), "--variant", spec.variant,
                   "--port", str(spec.effective_port),
                   "--batching" if spec.batching else "--no-batching",
                   "--cache" if spec.cache else "--no-cache",
                   "--replicas", str(spec.replicas), "--threads", str(spec.threads),
                   "--ingress", spec.ingress]
        if spec.model:
            command += ["--model", spec.model]
        if spec.max_batch_docs is not None:
            command += ["--max-batch-docs", str(spec.max_batch_docs)]
        if spec.batch_wait_ms is not None:
            command += ["--batch-wait-ms", str(spec.batch_wait_ms)]
        if spec.inference_workers is not None:
            command += ["--inference-workers", str(spec.inference_workers)]
        if spec.max_ongoing_requests is not None:
            command += ["--max-ongoing-requests", str(spec.max_ongoing_requests)]
    if spec.device == "gpu":
        # ONNX Runtime's CUDA provider first (export.runtime.resolve_providers("auto")). serve/run.py has no
        # such option yet: a GPU entry then fails loudly instead of measuring the CPU under a GPU label.
        command += ["--providers", "auto"]
    if cores and cores.get("pinned") and shutil.which("taskset"):
        command = ["taskset", "-c", _cpu_list(cores["service_cores"]), *command]
    return command


def service_environment(spec: ServiceSpec, redis_url: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if redis_url:
        env["REDIS_URL"] = redis_url
    if spec.server == "ray" and spec.ingress == "haproxy":
        # Must be set before Ray starts (docs/DEVELOPERS.md); serve/run.py sets them too.
        env.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
        env.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    return env


class ServiceStartError(RuntimeError):
    """The service exited or did not become ready in time; the message holds its log's tail."""


def _port_open(port: int) -> bool:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _wait_port_free(port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _port_open(port):
            return True
        time.sleep(0.5)
    return not _port_open(port)


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@dataclass
class RunningService:
    """A started service: its process, base URL and log file."""

    process: subprocess.Popen
    url: str
    log_path: Path
    command: list[str]
    start_s: float
    _reader: threading.Thread | None = field(default=None, repr=False)


def start_service(spec: ServiceSpec, log_path: Path, *, cores: dict | None, redis_url: str | None,
                  timeout_s: float) -> RunningService:
    """Start the service and wait, bounded, until it prints READY or /readyz answers 200."""
    import httpx

    port = spec.effective_port
    if not _wait_port_free(port, 20):
        raise ServiceStartError(f"port {port} is still in use by another process")
    command = service_command(spec, cores)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=service_environment(spec, redis_url),
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
    url = f"http://127.0.0.1:{port}"
    service = RunningService(process, url, log_path, command, 0.0, reader)
    deadline = started + timeout_s
    try:
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    raise ServiceStartError(f"{' '.join(command)} exited with {process.returncode}:\n"
                                            f"{_tail(log_path)}")
                if ready.is_set() or _readyz(client, url):
                    service.start_s = time.monotonic() - started
                    return service
                time.sleep(0.5)
        raise ServiceStartError(f"{' '.join(command)} not ready after {timeout_s:.0f} s:\n{_tail(log_path)}")
    except BaseException:  # not ready, or interrupted: never leave the service behind
        stop_service(service, timeout_s=15)
        raise


def _readyz(client: Any, url: str) -> bool:
    try:
        return client.get(f"{url}/readyz").status_code == 200
    except Exception:  # noqa: BLE001 - any connection error means "not yet"
        return False


def stop_service(service: RunningService, timeout_s: float = 30.0) -> int | None:
    """SIGINT (a clean Ray shutdown), then SIGTERM, then SIGKILL to its process group; all bounded."""
    process = service.process
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
    if service._reader is not None:
        service._reader.join(timeout=5)
    return process.poll()


# ----------------------------------------------------------------------------------------------
# Payloads, Redis, warm-up.
# ----------------------------------------------------------------------------------------------
def payload_path(run_dir: Path, encoding: str, n_docs: int) -> Path:
    return run_dir / "payloads" / f"{encoding}-{n_docs}.payloads"


def build_payload_files(sweep: Sweep, run_dir: Path) -> dict[tuple[str, int], Path]:
    """One payload file per (encoding, list size) the sweep uses, built before any service starts.

    One `build_payloads` call per encoding covers every list size (the dataset is read once per
    call); its payloads are then split into one file per list size.
    """
    from loadtest.payloads import PayloadSet, build_payloads

    wanted: dict[str, set[int]] = {}
    for entry in sweep.entries:
        wanted.setdefault(entry.service.encoding, set()).update(sweep.sizes_of(entry))
    files: dict[tuple[str, int], Path] = {}
    for encoding, sizes in wanted.items():
        missing = sorted(n for n in sizes if not payload_path(run_dir, encoding, n).exists())
        if missing:
            built = build_payloads(missing, encoding, sweep.n_queries, sweep.seed)
            for n_docs, items in built.by_size().items():
                PayloadSet(payloads=items, encoding=encoding, meta={**built.meta, "sizes": [n_docs]}) \
                    .save(payload_path(run_dir, encoding, n_docs))
        files.update({(encoding, n): payload_path(run_dir, encoding, n) for n in sizes})
    return files


@contextlib.contextmanager
def redis_for(sweep: Sweep) -> Iterator[str | None]:
    """One Redis for the whole run when an entry needs it (cache or feature store); REDIS_URL wins."""
    needed = any(e.service.cache or e.service.encoding == "feature-store" for e in sweep.entries)
    if not needed:
        yield None
        return
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from serve.redis_server import start_embedded_redis

    with start_embedded_redis() as redis:
        yield redis.url


def load_feature_store(redis_url: str, log_path: Path, timeout_s: float = 300) -> None:
    """Load the dataset's features into Redis for the feature-store encoding (serve/feature_store.py)."""
    command = [sys.executable, str(REPO_ROOT / "serve" / "feature_store.py"), "load", "--data", "synthetic"]
    env = {**os.environ, "REDIS_URL": redis_url}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=timeout_s, check=True)


RESULT_CACHE_PATTERN = "rankserve:result:*"  # serve/cache.py's KEY_PREFIX


def clear_result_cache(redis_url: str, max_keys: int = 1_000_000) -> int:
    """Forget cached results, so every cache entry starts cold and warms up on its own traffic."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    deleted, batch = 0, []
    for key in client.scan_iter(match=RESULT_CACHE_PATTERN, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.delete(*batch)
            batch = []
        if deleted + len(batch) >= max_keys:
            break
    if batch:
        deleted += client.delete(*batch)
    client.close()
    return deleted


def warm_up(url: str, payload_file: Path, duration_s: float, max_requests: int = 500) -> int:
    """Send requests one at a time for `duration_s` (bounded in count) so that lazy paths are paid for."""
    if duration_s <= 0:
        return 0
    import httpx

    from loadtest.payloads import PayloadSet

    payload_set = PayloadSet.load(payload_file)
    items = list(payload_set.payloads)
    sent, deadline = 0, time.monotonic() + duration_s
    with httpx.Client(timeout=30.0) as client:
        while sent < max_requests and time.monotonic() < deadline:
            payload = items[sent % len(items)]
            with contextlib.suppress(httpx.HTTPError):
                client.post(f"{url}/rank", content=payload.body, headers={"Content-Type": payload.content_type})
            sent += 1
    return sent


# ----------------------------------------------------------------------------------------------
# One entry, and the whole run.
# ----------------------------------------------------------------------------------------------
@dataclass
class RunContext:
    """What every entry of one run shares."""

    sweep: Sweep
    run_dir: Path
    payloads: dict[tuple[str, int], Path]
    cores: dict
    redis_url: str | None = None
    gpu: bool = False
    progress: Any = None  # a tqdm bar, or None

    def advance(self, label: str, steps: int = 1) -> None:
        if self.progress is not None and steps > 0:
            self.progress.set_postfix_str(label[:60])
            self.progress.update(steps)


def entry_steps(sweep: Sweep, entry: Entry) -> int:
    """Units of progress for one entry: trials x scenarios x sizes, plus SLO searches."""
    sizes = sweep.sizes_of(entry)
    steps = sweep.trials * len(entry.scenarios) * len(sizes)
    if entry.slo_search:
        steps += len([n for n in sweep.slo.list_sizes if n in sizes])
    return steps


def run_entry(entry: Entry, ctx: RunContext) -> dict:
    """Start the entry's service, warm up, run its trials and SLO searches, stop it; the raw record."""
    from loadtest import runner

    sweep, spec = ctx.sweep, entry.service
    record: dict[str, Any] = {"entry": entry.name, "description": entry.description, "base": entry.base,
                              "group": entry.group, "service": spec.model_dump(), "trials": [], "slo": [],
                              "started_at": _utc_now()}
    if ctx.redis_url and spec.cache:
        record["cache_keys_cleared"] = clear_result_cache(ctx.redis_url)
    service = start_service(spec, ctx.run_dir / "logs" / f"{entry.name}.log", cores=ctx.cores,
                            redis_url=ctx.redis_url, timeout_s=sweep.start_timeout_s)
    record.update(command=service.command, startup_s=round(service.start_s, 2))
    trial_dir = ctx.run_dir / "locust" / entry.name
    loadgen_cpus = ctx.cores["loadgen_cores"] if ctx.cores.get("pinned") else None
    try:
        for n_docs in sweep.sizes_of(entry):
            payload_file = ctx.payloads[(spec.encoding, n_docs)]
            warm_up(service.url, payload_file, sweep.warmup_s)
            for trial in range(sweep.trials):
                for scenario in entry.scenarios:
                    out_dir = trial_dir / f"{n_docs}-{scenario}-{trial}"
                    result = runner.run_closed_loop(service.url, str(payload_file), sweep.users,
                                                    sweep.trial_duration_s, scenario, str(out_dir),
                                                    zipf_s=sweep.zipf_s, cpus=loadgen_cpus)
                    row = _as_dict(result)
                    row.update(entry=entry.name, trial=trial, list_size=n_docs, scenario=scenario,
                               users=sweep.users)
                    record["trials"].append(row)
                    ctx.advance(f"{entry.name} {n_docs} docs {scenario} #{trial + 1}")
            if entry.slo_search and n_docs in sweep.slo.list_sizes:
                record["slo"].append(search_slo(entry, ctx, service.url, n_docs, payload_file, record["trials"]))
                ctx.advance(f"{entry.name} {n_docs} docs SLO search")
    finally:
        record["exit_code"] = stop_service(service, sweep.stop_timeout_s)
        _wait_port_free(spec.effective_port, 20)
    record["finished_at"] = _utc_now()
    return record


def search_slo(entry: Entry, ctx: RunContext, url: str, n_docs: int, payload_file: Path,
               trials: list[dict]) -> dict:
    """Maximum throughput under the objective at one list size, started near the closed-loop rate."""
    from loadtest import runner

    slo = ctx.sweep.slo
    closed = sorted(t["rps"] for t in trials if t["list_size"] == n_docs and t.get("rps"))
    start = max(1.0, slo.start_fraction * closed[len(closed) // 2]) if closed else 50.0
    search = runner.max_throughput_under_slo(
        url, str(payload_file), slo_p99_ms=slo.p99_ms, min_duration_s=slo.min_duration_s,
        min_queries=slo.min_queries, profile=slo.profile, start_rate_per_s=round(start, 1),
        max_steps=slo.max_steps, tolerance=slo.tolerance, time_budget_s=slo.time_budget_s,
        seed=ctx.sweep.seed, out_dir=ctx.run_dir / "slo" / f"{entry.name}-{n_docs}",
        cpus=ctx.cores["loadgen_cores"] if ctx.cores.get("pinned") else None,
        # a cache entry is searched under the same Zipf repeat traffic as its cache-mix scenario
        zipf_s=ctx.sweep.zipf_s if entry.service.cache else None)
    return {"entry": entry.name, "list_size": n_docs, "start_rate_per_s": round(start, 1), **_as_dict(search)}


def _as_dict(result: Any) -> dict:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    if isinstance(result, dict):
        return dict(result)
    raise TypeError(f"unexpected result type {type(result).__name__}")


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def raw_path(run_dir: Path, entry_name: str) -> Path:
    return run_dir / "raw" / f"{entry_name}.json"


def _write_json(path: Path, data: Any) -> None:
    """Write through a temporary file so that an interruption never leaves half a raw file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


EntryRunner = Callable[[Entry, RunContext], dict]


def run_entries(ctx: RunContext, entry_runner: EntryRunner = run_entry) -> dict[str, str]:
    """Run every entry not yet recorded; returns each entry's status (done, skipped, failed, ...)."""
    status: dict[str, str] = {}
    for entry in ctx.sweep.entries:
        done_file = raw_path(ctx.run_dir, entry.name)
        error_file = done_file.with_suffix(".error.json")
        if done_file.exists():
            status[entry.name] = "skipped (already recorded)"
            ctx.advance(f"{entry.name}: recorded", entry_steps(ctx.sweep, entry))
            continue
        if entry.service.device == "gpu" and not ctx.gpu:
            status[entry.name] = "skipped (no GPU)"
            ctx.advance(f"{entry.name}: no GPU", entry_steps(ctx.sweep, entry))
            continue
        before = ctx.progress.n if ctx.progress is not None else 0
        try:
            record = entry_runner(entry, ctx)
        except Exception as error:  # noqa: BLE001 - one failed entry must not lose the others
            if ctx.progress is not None:
                ctx.advance(f"{entry.name}: failed", before + entry_steps(ctx.sweep, entry) - ctx.progress.n)
            _write_json(error_file, {"entry": entry.name, "error": f"{type(error).__name__}: {error}",
                                     "at": _utc_now()})
            status[entry.name] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            continue
        error_file.unlink(missing_ok=True)
        _write_json(done_file, record)
        status[entry.name] = "done"
    return status


def new_run_dir(out: Path, profile: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = out / f"{stamp}-{profile}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = out / f"{stamp}-{profile}-{suffix}"
    return run_dir


def write_environment(run_dir: Path, sweep: Sweep, cores: dict) -> dict:
    """environment.json: the machine and libraries (models.environment) plus how cores were split."""
    from models.environment import collect_environment

    threads = sorted({e.service.threads for e in sweep.entries})
    env = collect_environment(extra_threads={"service_threads": ",".join(map(str, threads))})
    env["pinning"] = cores
    env["device"] = "gpu" if env.get("gpu") else "cpu"
    env["sweep"] = sweep.name
    _write_json(run_dir / "environment.json", env)
    return env


def snapshot_manifests(sweep: Sweep, run_dir: Path) -> None:
    """Copy the variant manifests (accuracy, file sizes) into the run, so the report needs nothing else."""
    models = {e.service.model for e in sweep.entries}
    for model in models:
        if model is None:
            from export.runtime import DEFAULT_MODEL
            model = DEFAULT_MODEL
        source = ARTIFACTS / "variants" / model / "manifest.json"
        if source.exists():
            target = run_dir / "manifests" / f"{model}.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)


def run_sweep(sweep: Sweep, run_dir: Path, *, entry_runner: EntryRunner = run_entry, show_progress: bool = True,
              build_payloads: bool = True, pin: bool = True) -> dict[str, str]:
    """The whole run in `run_dir` (new or resumed): environment, payloads, entries, then raw files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    cores = plan_cores() if pin else {"pinned": False, "service_cores": [], "loadgen_cores": [],
                                      "method": "none (pinning turned off)"}
    env_file = run_dir / "environment.json"
    env = json.loads(env_file.read_text()) if env_file.exists() else write_environment(run_dir, sweep, cores)
    snapshot_manifests(sweep, run_dir)
    payload_files = build_payload_files(sweep, run_dir) if build_payloads else {}
    total = sum(entry_steps(sweep, e) for e in sweep.entries)
    original_affinity = os.sched_getaffinity(0) if cores["pinned"] else None
    try:
        return _run_pinned(sweep, run_dir, env, cores, payload_files, total, entry_runner, show_progress)
    finally:
        if original_affinity is not None:
            os.sched_setaffinity(0, original_affinity)


def _run_pinned(sweep: Sweep, run_dir: Path, env: dict, cores: dict, payload_files: dict, total: int,
                entry_runner: EntryRunner, show_progress: bool) -> dict[str, str]:
    from tqdm import tqdm

    if cores["pinned"]:
        # Redis is part of the service: started from here, it inherits the service's cores.
        os.sched_setaffinity(0, set(cores["service_cores"]))
    with redis_for(sweep) as redis_url:
        if cores["pinned"]:
            # The sweep and every load generator it starts (Locust subprocesses) stay on their own cores.
            os.sched_setaffinity(0, set(cores["loadgen_cores"]))
        if redis_url and any(e.service.encoding == "feature-store" for e in sweep.entries):
            load_feature_store(redis_url, run_dir / "logs" / "feature_store_load.log")
        bar = tqdm(total=total, desc=f"sweep {sweep.name}", unit="trial", disable=not show_progress)
        ctx = RunContext(sweep, run_dir, payload_files, cores, redis_url, gpu=bool(env.get("gpu")), progress=bar)
        try:
            # Resumed entries advance the bar by their share, not by one.
            status = run_entries(ctx, entry_runner)
        finally:
            bar.close()
    return status


# Rough per-step costs on a 2-core machine, for `--plan` only (measured: Ray Serve start 15-30 s,
# a Locust subprocess about 2 s to start and stop, an open-loop step about 5 s of overhead).
PLAN_COSTS_S = {"ray_start": 30.0, "baseline_start": 8.0, "stop": 3.0, "trial_overhead": 2.5,
                "slo_step_overhead": 5.0}


def plan_text(sweep: Sweep) -> str:
    """What a sweep will run, and a rough estimate of how long (`--plan`)."""
    costs, lines, total = PLAN_COSTS_S, [], 0.0
    for entry in sweep.entries:
        sizes = sweep.sizes_of(entry)
        start = costs["ray_start" if entry.service.server == "ray" else "baseline_start"] + costs["stop"]
        trials = sweep.trials * len(entry.scenarios) * len(sizes)
        seconds = start + len(sizes) * sweep.warmup_s + trials * (sweep.trial_duration_s + costs["trial_overhead"])
        searches = len([n for n in sweep.slo.list_sizes if n in sizes]) if entry.slo_search else 0
        slo_step = sweep.slo.min_duration_s + costs["slo_step_overhead"]
        seconds += searches * min(sweep.slo.time_budget_s + slo_step, sweep.slo.max_steps * slo_step)
        total += seconds
        lines.append(f"  {entry.name:<18} {trials:>3} trials, {searches} SLO search(es), ~{seconds:,.0f} s: "
                     f"{' '.join(service_command(entry.service)[1:])}")
    return "\n".join([f"sweep {sweep.name}: {len(sweep.entries)} entries, list sizes {sweep.list_sizes}",
                      *lines, f"estimated at most ~{total / 60:.1f} min (rough, 2-core machine)"])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", help="a sweep in loadtest/sweeps/ (quick, full)")
    parser.add_argument("--sweep", type=Path, help="a sweep YAML file (overrides --profile)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR", help="finish an interrupted run")
    parser.add_argument("--out", type=Path, default=RUNS_DIR, help="where run folders go (default results/runs)")
    parser.add_argument("--keep-payloads", action="store_true", help="keep the payload files after the run")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--plan", action="store_true", help="print what would run and a time estimate; run nothing")
    args = parser.parse_args(argv)

    try:
        if args.resume:
            run_dir = args.resume
            sweep_file = args.sweep or run_dir / "sweep.yaml"
            if not sweep_file.exists():
                parser.error(f"--resume: {sweep_file} not found (is {run_dir} a run folder?)")
        else:
            sweep_file = args.sweep or SWEEPS_DIR / f"{args.profile}.yaml"
            if not sweep_file.exists():
                known = ", ".join(sorted(p.stem for p in SWEEPS_DIR.glob("*.yaml")))
                parser.error(f"--profile {args.profile}: no {sweep_file} (known: {known})")
        sweep = load_sweep(sweep_file)
    except SweepFileError as error:
        print(error, file=sys.stderr)
        return 2
    if args.plan:
        print(plan_text(sweep))
        return 0
    if not args.resume:
        run_dir = new_run_dir(args.out, sweep.name if args.sweep else args.profile)
    print(f"run folder: {run_dir}", flush=True)
    # SIGTERM takes the same path as Ctrl-C, so the running service is stopped before the sweep exits.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status = run_sweep(sweep, run_dir, show_progress=not args.no_progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finish the run with: python loadtest/sweep.py --resume {run_dir}", file=sys.stderr)
        return 130
    for name, state in status.items():
        print(f"  {name}: {state}")
    from loadtest import report

    summary = report.write_report(run_dir)
    print(summary)
    complete = all(not state.startswith("failed") for state in status.values())
    if complete and not args.keep_payloads:
        shutil.rmtree(run_dir / "payloads", ignore_errors=True)
    print(f"\nwrote {run_dir / 'summary.md'}")
    return 0 if complete else 1


if __name__ == "__main__":
    sys.exit(main())
