"""The capacity a fault scenario's load is a fraction of: ok answers per second under a closed loop.

Which closed loop (Locust, or the project's generator) and on which start of the service (by default
a separate one with admission control off) is the scenario's `capacity:` (faults_config.CapacitySpec).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loadtest.faults_config import Scenario
from loadtest.services import service_for, wait_port_free
from models.paths import REPO_ROOT

if TYPE_CHECKING:
    from loadtest.faults_run import RunContext


def measure_capacity(ctx: RunContext, scenario: Scenario, url: str, payloads: Path) -> dict[str, Any]:
    """Ok answers/s of the service under a closed loop of `capacity.users` (CapacitySpec: which generator)."""
    spec = scenario.capacity
    out = ctx.work_dir / scenario.name / "capacity"
    if spec.generator == "openloop":
        return _openloop_capacity(ctx, spec, url, payloads, out)
    from loadtest.runner import run_closed_loop

    trial = run_closed_loop(url, payloads, spec.users, spec.duration_s, "steady", out, cpus=ctx.loadgen_cpus or None)
    ok = trial.requests - trial.failures - trial.degraded
    # Ok answers per second: with admission control a closed loop also gets fast 503s, which are not capacity.
    return {"ok_rps": ok / trial.duration_s if trial.duration_s else 0.0, "rps": trial.rps,
            "p50_ms": trial.latency_ms.get("p50"), "p99_ms": trial.latency_ms.get("p99"), "failures": trial.failures,
            "degraded": trial.degraded, "users": spec.users, "duration_s": spec.duration_s, "generator": "locust"}


# A count-based trial whose arrivals all come at once is a closed loop: each of its connections
# sends its next request as soon as its last one is answered (`waited_for_slot`).
CLOSED_LOOP_RATE = 1e6
PROBE_REQUESTS = 200


def _openloop_capacity(ctx: RunContext, spec: Any, url: str, payloads: Path, out: Path) -> dict[str, Any]:
    """The best ok answers/s of the project's generator over closed loops of 1 to `users` connections
    (`duration_s` shared among them; a short probe sizes each count-based run), and that run's
    latency from send to answer.

    Why the best over several loops rather than one at `users`: with admission control on, a closed
    loop deep enough to keep a queue standing gets 503s and, ignoring Retry-After, sends again at
    once, so its ok rate measures the refusals (on plain uvicorn, 8 connections got 311 ok/s where
    3 got 1,107: AVX2 machine, 2026-11-30). The capacity is what the service can serve."""
    out.mkdir(parents=True, exist_ok=True)
    timeout_s = 4 * spec.duration_s + 30  # a request's age counts from the (instant) schedule
    cpus = set(ctx.loadgen_cpus)

    def closed_loop(connections: int, count: int, name: str) -> dict[str, Any]:
        result = out / f"{name}.json"
        cmd = [sys.executable, "-m", "loadtest.openloop", "--host", url, "--payloads", str(payloads),
               "--rate", repr(CLOSED_LOOP_RATE), "--count", str(count), "--max-in-flight", str(connections),
               "--expected-latency-ms", "0", "--request-timeout", repr(timeout_s), "--out", str(result)]
        with open(out / f"{name}.log", "wb") as log:
            subprocess.run(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, check=True,
                           timeout=2 * timeout_s + 60,
                           preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
        trial = json.loads(result.read_text())
        ok = trial["requests"] - trial["failures"] - trial["degraded"]
        trial["ok_rps"] = ok / trial["duration_s"] if trial["duration_s"] else 0.0
        trial["connections"] = connections
        return trial

    best = closed_loop(1, PROBE_REQUESTS, "probe")
    level_s = spec.duration_s / spec.users
    levels = []
    for connections in range(1, spec.users + 1):
        trial = closed_loop(connections, max(PROBE_REQUESTS, round(best["ok_rps"] * level_s)), f"closed-{connections}")
        levels.append({"connections": connections, "ok_rps": trial["ok_rps"], "requests": trial["requests"],
                       "rejected": trial["errors"].get("HTTP 503", 0)})
        if trial["ok_rps"] > best["ok_rps"]:
            best = trial
    latency = best.get("uncorrected_latency_ms") or {}
    return {"ok_rps": best["ok_rps"], "rps": best["rps"], "p50_ms": latency.get("p50"), "p99_ms": latency.get("p99"),
            "failures": best["failures"], "degraded": best["degraded"], "users": best["connections"],
            "duration_s": best["duration_s"], "requests": best["requests"], "levels": levels,
            "generator": best["generator"] + ", closed loop"}


def capacity_without_admission(scenario: Scenario, ctx: RunContext, redis_url: str, payloads: Path) -> dict[str, Any]:
    """The capacity on a separate start of the service with admission control off (CapacitySpec)."""
    from loadtest.run_resources import warm_up

    spec = scenario.service.model_copy(update={"admission": False})
    service = service_for(spec).start(ctx.work_dir / scenario.name / "capacity-service.log", cores=ctx.cores,
                                      redis_url=redis_url, timeout_s=ctx.start_timeout_s)
    try:
        warm_up(service.url, payloads, scenario.warmup_s)
        return {**measure_capacity(ctx, scenario, service.url, payloads), "admission": False}
    finally:
        service.stop(ctx.stop_timeout_s)
        wait_port_free(spec.port, 20)
