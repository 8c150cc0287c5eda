"""One fault scenario, for real: Redis, the service, open-loop load, one fault at a known time, figures.

Why the load runs in a subprocess started on a shared clock: the fault must happen at a known place
in the load's schedule. The driver picks the schedule's start on CLOCK_MONOTONIC (shared by every
process of the machine), starts `loadtest/openloop.py --start-at T0 --timeline FILE` on the load
generator's core, sleeps until T0 + at_s, and injects the fault from its own thread, which otherwise
sleeps (the generator keeps its core to itself). An overload is a second Poisson process in the same
generator's schedule from T0 + at_s (`--surge`): two Poisson processes superpose to one, and one
generator keeps one schedule where two on one core competed for it. Afterwards the per-arrival
timeline gives the phases and the recovery time (loadtest/faults_timeline.py), and the checks
judge them.

Placement follows the sweep (loadtest/services.plan_cores): the service and Redis on the service's
cores, this driver and the generators on the others.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loadtest import faults_inject as inject
from loadtest.faults_capacity import capacity_without_admission, measure_capacity
from loadtest.faults_config import Scenario
from loadtest.faults_report import check_dicts, explain, judge, verdict
from loadtest.faults_timeline import Timeline, first_cache_hit_after, per_second, phase_stats, recovery_time
from loadtest.services import RunningService, service_for, wait_port_free
from models.paths import REPO_ROOT

START_LEAD_S = 3.0  # the generator subprocess imports, loads payloads and connects within this
STORE_PATTERN = "rankserve:features:{dataset}:*"  # serve/feature_store.py's KEY_PREFIX


@dataclass
class RunContext:
    """What every scenario of one run shares."""

    work_dir: Path  # logs, payloads, timelines (not results)
    cores: dict
    seed: int = 0
    start_timeout_s: float = 240.0
    stop_timeout_s: float = 30.0
    admin_token: str | None = None
    payload_files: dict[tuple[str, int, int], Path] = field(default_factory=dict)

    @property
    def loadgen_cpus(self) -> list[int]:
        return self.cores["loadgen_cores"] if self.cores.get("pinned") else []

    @property
    def service_cpus(self) -> list[int]:
        return self.cores["service_cores"] if self.cores.get("pinned") else []


def payload_file(ctx: RunContext, encoding: str, n_docs: int, n_queries: int) -> Path:
    """Request bodies built once per run (the dataset is read once per encoding and size)."""
    key = (encoding, n_docs, n_queries)
    if key not in ctx.payload_files:
        from loadtest.payloads import build_payloads

        path = ctx.work_dir / "payloads" / f"{encoding}-{n_docs}-{n_queries}.payloads"
        if not path.exists():
            build_payloads(n_docs, encoding, n_queries, ctx.seed).save(path)
        ctx.payload_files[key] = path
    return ctx.payload_files[key]


# ----------------------------------------------------------------------------------------------
# The load generators.
# ----------------------------------------------------------------------------------------------
@dataclass
class Generator:
    """One `loadtest/openloop.py` subprocess with a timeline."""

    name: str
    process: subprocess.Popen
    result: Path
    timeline: Path
    log: Path
    deadline: float

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=15)

    def finish(self) -> dict[str, Any]:
        try:
            self.process.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
            raise TimeoutError(f"generator {self.name} overran; see {self.log}") from None
        if not self.result.exists():
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"generator {self.name} wrote no result (exit {self.process.returncode}):\n{tail}")
        return json.loads(self.result.read_text())


def start_generator(ctx: RunContext, scenario: Scenario, name: str, url: str, payloads: Path, rate: float,
                    duration_s: float, start_at: float, seed: int,
                    surge: tuple[float, float, float] | None = None) -> Generator:
    load = scenario.load
    out = ctx.work_dir / scenario.name
    out.mkdir(parents=True, exist_ok=True)
    result, timeline, log = out / f"{name}.json", out / f"{name}.npz", out / f"{name}.log"
    for stale in (result, timeline):
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "loadtest.openloop", "--host", url, "--payloads", str(payloads),
           "--rate", repr(float(rate)), "--duration", repr(float(duration_s)), "--seed", str(seed),
           "--max-in-flight", str(load.max_in_flight), "--request-timeout", repr(load.request_timeout_s),
           "--expected-latency-ms", repr(load.expected_latency_ms), "--start-at", repr(start_at),
           "--timeline", str(timeline), "--out", str(result)]
    if load.zipf_s:
        cmd += ["--zipf-s", repr(float(load.zipf_s))]
    if surge is not None:
        cmd += ["--surge", *(repr(float(v)) for v in surge)]
    cpus = set(ctx.loadgen_cpus)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True,
                                   preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    deadline = start_at + duration_s + 2 * load.request_timeout_s + 60
    return Generator(name, process, result, timeline, log, deadline)


def generator_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """Whether the generator kept its schedule (loadtest/openloop.py's own fields)."""
    return {k: summary.get(k) for k in ("scheduled", "sent", "late_sends", "late_fraction", "late_wakeups",
                                          "late_after_wait", "waited_for_slot", "max_send_lag_ms",
                                          "generator_bound", "offered_rate_per_s", "achieved_rate_per_s")} | {
        "cpu_utilization": (summary.get("generator_cpu") or {}).get("utilization")}


def merge_generators(figures: list[dict[str, Any]]) -> dict[str, Any]:
    if len(figures) == 1:
        return figures[0]
    out: dict[str, Any] = {}
    for key in figures[0]:
        values = [f.get(key) for f in figures]
        if key == "generator_bound":
            out[key] = any(values)
        elif key in ("late_fraction", "max_send_lag_ms", "cpu_utilization"):
            out[key] = max((v for v in values if v is not None), default=None)
        else:
            out[key] = sum(v or 0 for v in values)
    return out


# ----------------------------------------------------------------------------------------------
# The fault itself (the capacity before it: loadtest/faults_capacity.py).
# ----------------------------------------------------------------------------------------------
def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def inject_fault(scenario: Scenario, t0: float, redis: inject.FaultRedis, service: RunningService, url: str,
                 ctx: RunContext, reload_store: Any) -> dict[str, Any]:
    """Inject the scenario's fault at t0 + at_s and undo it; its start and end in seconds from t0."""
    fault = scenario.fault
    _sleep_until(t0 + fault.at_s)
    started = time.monotonic()
    info: dict[str, Any] = {}
    if fault.kind == "redis_kill":
        redis.signal(signal.SIGKILL)
        _sleep_until(t0 + fault.at_s + fault.restart_after_s)
        redis.start()
        ended = time.monotonic()
        info["restarted_s"] = ended - t0
        if scenario.redis.reload_store:
            info["store_reload_s"] = reload_store()
            ended = time.monotonic()
    elif fault.kind == "redis_pause":
        redis.signal(signal.SIGSTOP)
        _sleep_until(t0 + fault.at_s + fault.resume_after_s)
        redis.signal(signal.SIGCONT)
        ended = time.monotonic()
    elif fault.kind == "replica_kill":
        replicas = inject.replica_processes(service.process.pid, fault.deployment)
        info["replicas_before"] = len(replicas)
        if replicas:
            info["killed_pid"] = replicas[0].pid
            replicas[0].send_signal(signal.SIGKILL)
        else:
            info["killed_pid"] = None
        ended = started = time.monotonic()
    elif fault.kind == "model_swap":
        swap = inject.swap_model(url, fault.variant, ctx.admin_token, fault.timeout_s)
        started, ended = swap.pop("started"), swap.pop("ended")
        info["swap"] = {**swap, "variant": fault.variant, "duration_s": ended - started}
    elif fault.kind == "overload":  # the generator's schedule does it (`--surge`)
        started, ended = t0 + fault.at_s, t0 + fault.at_s + fault.duration_s
    else:  # none: the soak
        ended = t0 + scenario.load.duration_s
    return {"start_s": started - t0, "end_s": ended - t0, **info}


# ----------------------------------------------------------------------------------------------
# One scenario.
# ----------------------------------------------------------------------------------------------
def during_end(scenario: Scenario, fault: dict[str, Any]) -> float:
    observe = getattr(scenario.fault, "observe_s", 0.0)
    return min(fault["end_s"] + observe, scenario.load.duration_s)


def analyse(scenario: Scenario, timeline: Timeline, fault: dict[str, Any]) -> dict[str, Any]:
    """Phases, recovery and cache hits from the timeline."""
    spec, duration = scenario.recovery, scenario.load.duration_s
    start, end = fault["start_s"], fault["end_s"]
    phases = {"before": phase_stats(timeline, 0.0, start),
              "during": phase_stats(timeline, start, during_end(scenario, fault))}
    if scenario.fault.kind != "none":
        phases["after"] = phase_stats(timeline, min(end + spec.after_skip_s, duration), duration)
    out: dict[str, Any] = {"phases": {k: v.to_dict() for k, v in phases.items()},
                           "total": phase_stats(timeline, 0.0, float("inf")).to_dict(), "recovery_s": None}
    if scenario.fault.kind != "none":
        out["recovery_s"] = recovery_time(timeline, end, phases["before"], **spec.model_dump(exclude={"after_skip_s"}))
    if scenario.service.cache and scenario.fault.kind == "redis_kill":
        out["cache_hits_back_s"] = first_cache_hit_after(timeline, fault.get("restarted_s", end))
    out["per_second"] = per_second(timeline)
    return out


def run_scenario(scenario: Scenario, ctx: RunContext) -> dict[str, Any]:
    """Run one scenario end to end and return its result (figures, checks, verdict)."""
    spec = scenario.service
    result: dict[str, Any] = {
        "scenario": scenario.name, "description": scenario.description, "kind": scenario.fault.kind,
        "server": spec.server, "ingress": spec.ingress if spec.server == "ray" else None, "replicas": spec.replicas,
        "variant": spec.variant, "encoding": spec.encoding, "n_docs": scenario.payload.n_docs, "cache": spec.cache,
        "duration_s": scenario.load.duration_s, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "notes": [],
    }
    payloads = payload_file(ctx, spec.encoding, scenario.payload.n_docs, scenario.payload.n_queries)
    logs = ctx.work_dir / scenario.name
    logs.mkdir(parents=True, exist_ok=True)
    redis = inject.start_fault_redis(persistence=scenario.redis.persistence, maxmemory=scenario.redis.maxmemory,
                                     cores=ctx.service_cpus)
    service: RunningService | None = None
    try:
        store = _feature_store(scenario, redis.url, result)
        if scenario.needs_capacity and scenario.capacity.without_admission and spec.admission:
            result["capacity"] = capacity_without_admission(scenario, ctx, redis.url, payloads)
        service = service_for(spec).start(logs / "service.log", cores=ctx.cores, redis_url=redis.url,
                                          timeout_s=ctx.start_timeout_s)
        result["startup_s"] = round(service.start_s, 2)
        _run_load(scenario, ctx, service, redis, payloads, store, result)
    finally:
        if service is not None:
            service.stop(ctx.stop_timeout_s)
            wait_port_free(spec.port, 20)
        redis.close()
    checks = judge(result, scenario.acceptance)
    result["checks"], result["verdict"] = check_dicts(checks), verdict(checks)
    return result


def _feature_store(scenario: Scenario, redis_url: str, result: dict[str, Any]) -> Any:
    """Load the feature store when the scenario sends feature-store bodies; returns its reloader."""
    if scenario.service.encoding != "feature-store":
        return None
    from serve.feature_store import load_features

    dataset = scenario.service.feature_dataset

    def load() -> float:
        started = time.monotonic()
        load_features(redis_url, "synthetic", ("test",), name=dataset)
        return time.monotonic() - started

    result["data"] = {"load_s": load()}
    result["data"]["keys_before"] = inject.count_keys(redis_url, STORE_PATTERN.format(dataset=dataset))
    return load


def _run_load(scenario: Scenario, ctx: RunContext, service: RunningService, redis: inject.FaultRedis,
              payloads: Path, reload_store: Any, result: dict[str, Any]) -> None:
    from loadtest.run_resources import warm_up

    url, load, fault = service.url, scenario.load, scenario.fault
    warm_up(url, payloads, scenario.warmup_s)
    rate = load.rate_per_s
    if scenario.needs_capacity:
        capacity = result.get("capacity") or measure_capacity(ctx, scenario, url, payloads)
        result["capacity"] = capacity
        result["capacity_rps"] = capacity["ok_rps"]
        rate = load.capacity_fraction * capacity["ok_rps"]
    result["rate_per_s"] = rate
    t0 = time.monotonic() + START_LEAD_S
    surge = None
    if fault.kind == "overload":  # the same generator's schedule carries it (`surge`)
        extra = fault.factor * result["capacity_rps"] - rate
        result["overload_rate_per_s"] = rate + extra
        surge = (fault.at_s, fault.duration_s, extra)
    generators = [start_generator(ctx, scenario, "load", url, payloads, rate, load.duration_s, t0, ctx.seed, surge)]
    sampler = inject.RssSampler(service.process.pid, scenario.rss_every_s, lambda: {"redis-server": redis.pid}, t0)
    sampler.start()
    try:
        fault_info = inject_fault(scenario, t0, redis, service, url, ctx, reload_store)
    except BaseException:  # a failed fault or Ctrl-C: the load stops with it
        for g in generators:
            g.kill()
        sampler.stop()
        raise
    summaries = [g.finish() for g in generators]
    sampler.stop()
    timeline = Timeline.concat([Timeline.load(g.timeline, t0) for g in generators])
    result.update(fault_start_s=fault_info["start_s"], fault_end_s=fault_info["end_s"], fault=fault_info)
    result.update(analyse(scenario, timeline, fault_info))
    result["generator"] = merge_generators([generator_figures(s) for s in summaries])
    _after_checks(scenario, service, redis, fault_info, sampler, result)
    result["notes"] += explain(scenario, result)


def _after_checks(scenario: Scenario, service: RunningService, redis: inject.FaultRedis, fault: dict[str, Any],
                  sampler: inject.RssSampler, result: dict[str, Any]) -> None:
    """Alive, ready, data kept, the swap served, replicas back, RSS growth."""
    ready = inject.readiness(service.url)
    result["service_counters"] = inject.service_counters(service.url)
    result["alive_after"] = service.process.poll() is None
    result["readyz_after"] = ready["status"]
    if "swap" in fault:
        body = ready.get("body") if isinstance(ready.get("body"), dict) else {}
        fault["swap"]["serving_after"] = ((body or {}).get("model") or {}).get("variant")
        result["swap"] = fault["swap"]
        result["swap_s"] = fault["swap"]["duration_s"]
    if scenario.fault.kind == "replica_kill":
        fault["replicas_after"] = len(inject.replica_processes(service.process.pid, scenario.fault.deployment))
        if fault.get("killed_pid") is None:
            result["notes"].append("no replica process was found to kill: the fault did not happen")
    if "data" in result:
        data = result["data"]
        data["keys_after"] = inject.count_keys(redis.url, STORE_PATTERN.format(dataset=scenario.service.feature_dataset))
        if scenario.redis.reload_store:
            result["data_lost"] = (f"store emptied by the restart (no persistence); reloaded in "
                                   f"{fault.get('store_reload_s', 0):.1f} s: {data['keys_after']:,} keys")
        else:
            lost = (data["keys_before"] or 0) - (data["keys_after"] or 0)
            result["data_lost"] = "none" if lost == 0 else f"{lost:,} of {data['keys_before']:,} keys"
    elif scenario.fault.kind in ("redis_kill", "redis_pause") and scenario.service.cache:
        result["data_lost"] = ("none: the result cache was emptied (a cache, no persistence)"
                               if scenario.fault.kind == "redis_kill" else "none")
    window = max(3 * scenario.rss_every_s, min(30.0, scenario.load.duration_s / 10))
    growth = inject.rss_growth(sampler.samples, scenario.fault.at_s if scenario.fault.kind == "none" else 0.0,
                               window_s=window)
    result["rss_window_s"], result["rss_every_s"] = window, scenario.rss_every_s
    result["rss"] = growth
    # redis-server is judged apart: its memory is the cache's and the store's data, which grows as the
    # cache fills (bounded by maxmemory and the TTL), not a leak of the service.
    measured = [g for g in growth if g["growth"] is not None and g["role"] != "redis-server"]
    if measured:
        worst = max(measured, key=lambda g: g["growth"])
        result["rss_growth_max"], result["rss_growth_worst"] = worst["growth"], f"{worst['role']} pid {worst['pid']}"
    for g in growth:
        if g["role"] == "redis-server" and g["growth"] is not None and scenario.fault.kind == "none":
            result["notes"].append(f"redis-server RSS {g['rss_start_mb']:.1f} -> {g['rss_end_mb']:.1f} MB "
                                   f"({g['growth']:+.1%}) with {inject.count_keys(redis.url, '*'):,} keys "
                                   "(the cache filling; not judged)")


@contextlib.contextmanager
def pinned_to(cpus: list[int]):
    """This driver (and what it starts) on `cpus` for the block; the old affinity afterwards."""
    if not cpus or not hasattr(os, "sched_setaffinity"):
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)
