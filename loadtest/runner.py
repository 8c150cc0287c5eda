"""What the sweep calls: one load-test trial in, one `TrialResult` out.

Both generators run in a subprocess of their own: Locust needs gevent's monkey-patching before any
other import (and must not share a process with torch or ray), the open-loop generator wants an
event loop of its own, and a child process can be pinned to given CPUs (`cpus`, applied with
`os.sched_setaffinity` in the child before exec) so that the load generator and the service do not
fight for the same cores. Each trial leaves its raw JSON (and Locust's CSV and log) in `out_dir`.

    run_closed_loop(host, payloads_path, users, duration_s, scenario, out_dir)   # Locust, headless
    run_open_loop(host, payloads, rate_per_s, duration_s)                        # Poisson arrivals
    max_throughput_under_slo(host, payloads, slo_p99_ms=50)                      # VALID / INVALID
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.openloop import require_loopback
from loadtest.payloads import PayloadSet

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO_ROOT = LOCUSTFILE.parent.parent
LATENCY_KEYS = ("p50", "p95", "p99", "p99.9", "max", "mean")
# MLPerf-like minimums for a max-throughput result to count; the quick profile is for smoke runs only.
SLO_PROFILES: dict[str, dict[str, float]] = {
    "full": {"min_duration_s": 10.0, "min_queries": 1024},
    "quick": {"min_duration_s": 3.0, "min_queries": 200},
}


@dataclass
class TrialResult:
    """One trial's figures (latencies in ms; open-loop trials also carry the uncorrected ones).

    Fields after `server_timings_ms` extend the contract of docs/ARCHITECTURE.md.
    """

    scenario: str
    n_docs: int  # documents per request (the mean, for a list-size mix; see `sizes`)
    encoding: str
    duration_s: float
    requests: int
    failures: int
    error_rate: float
    rps: float
    docs_per_s: float
    latency_ms: dict[str, float]
    uncorrected_latency_ms: dict[str, float] | None = None
    late_sends: int | None = None
    cache_hit_ratio: float | None = None
    server_timings_ms: dict[str, float] = field(default_factory=dict)
    mode: str = "closed-loop"  # or "open-loop"
    users: int | None = None
    target_rate_per_s: float | None = None
    sizes: list[int] = field(default_factory=list)
    raw_path: str | None = None  # the trial's full JSON (HDR histogram included)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _latency(d: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(d.get(k, 0.0)) for k in LATENCY_KEYS} if d else {}


def _mean_docs(raw: dict[str, Any]) -> int:
    sizes = raw.get("sizes") or []
    if len(sizes) == 1:
        return int(sizes[0])
    ok = raw["requests"] - raw["failures"]
    return int(round(raw["docs"] / ok)) if ok else 0


def _pin(cpus: Sequence[int] | None) -> Callable[[], None] | None:
    if not cpus:
        return None
    cpu_set = set(cpus)
    return lambda: os.sched_setaffinity(0, cpu_set)


def _run_child(cmd: list[str], env: dict[str, str], log_path: Path, timeout_s: float, cpus: Sequence[int] | None) -> int:
    """Run a generator subprocess in its own process group; kill the group if it overruns."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_pin(cpus),
        )  # fmt: skip
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
            raise TimeoutError(f"{cmd[2]} did not finish in {timeout_s:.0f} s; see {log_path}") from None


def _read_result(path: Path, log_path: Path, rc: int) -> dict[str, Any]:
    if not path.exists():
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"the load generator wrote no result (exit code {rc}); log {log_path}:\n{tail}")
    return json.loads(path.read_text())


def _trial(raw: dict[str, Any], results: Path, **fields: Any) -> TrialResult:
    """A TrialResult from a generator's result JSON; `fields` are what differs between generators."""
    return TrialResult(
        n_docs=_mean_docs(raw),
        encoding=raw.get("encoding") or "",
        duration_s=raw["duration_s"],
        requests=raw["requests"],
        failures=raw["failures"],
        error_rate=raw["error_rate"],
        rps=raw["rps"],
        docs_per_s=raw["docs_per_s"],
        latency_ms=_latency(raw["latency_ms"]),
        cache_hit_ratio=raw["cache_hit_ratio"],
        server_timings_ms=raw["server_timings_ms"],
        sizes=raw.get("sizes") or [],
        raw_path=str(results),
        **fields,
    )


def run_closed_loop(
    host: str,
    payloads_path: str | Path,
    users: int,
    duration_s: float,
    scenario: str,
    out_dir: str | Path,
    *,
    spawn_rate: float | None = None,
    cpus: Sequence[int] | None = None,
    zipf_s: float | None = None,
    processes: int | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
) -> TrialResult:
    """Run loadtest/locustfile.py headless for `duration_s` with `users` users; read its exact JSON.

    `processes` > 1 runs Locust distributed on this machine (`--processes N`: a master and N workers;
    the workers' HDR histograms are merged). Ramp and spike shapes set their own user counts.
    """
    require_loopback(host)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, log_path = out / f"closed-{scenario}.json", out / f"closed-{scenario}.log"
    results.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(users), "-r", str(spawn_rate or users), "-t", f"{max(1, math.ceil(duration_s))}s",
        "--host", host, "--csv", str(out / f"locust-{scenario}"), "--only-summary",
        "--stop-timeout", "10", "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    if processes and processes > 1:
        cmd += ["--processes", str(processes)]
    child_env = {
        **os.environ,
        **(env or {}),
        "RANKSERVE_PAYLOADS": str(Path(payloads_path).resolve()),
        "RANKSERVE_SCENARIO": scenario,
        "RANKSERVE_RESULTS": str(results),
    }
    if zipf_s is not None:
        child_env["RANKSERVE_ZIPF_S"] = str(zipf_s)
    if processes and processes > 1 and "RANKSERVE_RUN_SALT" not in child_env:
        child_env["RANKSERVE_RUN_SALT"] = str(int(time.time()) % 10**5)  # workers share cache-mix ids
    rc = _run_child(cmd, child_env, log_path, timeout_s or duration_s + 120, cpus)
    raw = _read_result(results, log_path, rc)
    return _trial(
        raw,
        results,
        scenario=scenario,
        mode="closed-loop",
        users=raw.get("peak_users") or users,
        extra={"locust": raw.get("locust"), "exit_code": rc, "latency_by_name_ms": raw.get("latency_by_name_ms"),
               "cpu_affinity": raw.get("cpu_affinity")},
    )


def run_open_loop(
    host: str,
    payloads: PayloadSet | str | Path,
    rate_per_s: float,
    duration_s: float,
    *,
    seed: int = 0,
    out_dir: str | Path | None = None,
    cpus: Sequence[int] | None = None,
    max_in_flight: int = 256,
    late_ms: float = 1.0,
    unique_queries: bool = True,
    max_requests: int | None = None,
    scenario: str = "open-loop",
    timeout_s: float | None = None,
    zipf_s: float | None = None,
) -> TrialResult:
    """Poisson arrivals at `rate_per_s` for `duration_s` (loadtest/openloop.py in a subprocess).

    Latency is measured from each request's scheduled send time; `uncorrected_latency_ms` from its
    actual send time; `late_sends` counts sends more than `late_ms` behind schedule.
    """
    require_loopback(host)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="rankserve-openloop-"))
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(payloads, PayloadSet):
        payload_file = payloads.save(out / "payloads.msgpack")
    else:
        payload_file = Path(payloads).resolve()
    stem = f"open-{scenario}-{rate_per_s:g}per_s-seed{seed}"
    results, log_path = out / f"{stem}.json", out / f"{stem}.log"
    results.unlink(missing_ok=True)
    request_timeout = 30.0
    cmd = [
        sys.executable, "-m", "loadtest.openloop", "--host", host, "--payloads", str(payload_file),
        "--rate", repr(float(rate_per_s)), "--duration", repr(float(duration_s)), "--seed", str(seed),
        "--max-in-flight", str(max_in_flight), "--late-ms", repr(float(late_ms)),
        "--request-timeout", repr(request_timeout), "--out", str(results),
    ]  # fmt: skip
    if max_requests is not None:
        cmd += ["--max-requests", str(max_requests)]
    if not unique_queries:
        cmd.append("--reuse-queries")
    if zipf_s:
        cmd += ["--zipf-s", repr(float(zipf_s))]
    rc = _run_child(cmd, dict(os.environ), log_path, timeout_s or duration_s + 2 * request_timeout + 60, cpus)
    raw = _read_result(results, log_path, rc)
    return _trial(
        raw,
        results,
        scenario=scenario,
        mode="open-loop",
        uncorrected_latency_ms=_latency(raw["uncorrected_latency_ms"]),
        late_sends=raw["late_sends"],
        target_rate_per_s=float(rate_per_s),
        extra={
            k: raw[k]
            for k in ("scheduled", "scheduled_duration_s", "sent", "send_rate_per_s", "mean_interarrival_ms", "max_send_lag_ms",
                      "waited_for_slot", "late_threshold_ms", "errors", "seed", "cpu_affinity")  # fmt: skip
        },
    )


# ----------------------------------------------------------------------------------------------
# Maximum throughput under a latency objective
# ----------------------------------------------------------------------------------------------


def trial_meets_slo(trial: TrialResult, slo_p99_ms: float) -> bool:
    """The objective: corrected p99 within the SLO and not one error."""
    return trial.failures == 0 and trial.requests > 0 and trial.latency_ms.get("p99", math.inf) <= slo_p99_ms


def search_rate(
    trial_at: Callable[[float], TrialResult],
    slo_p99_ms: float,
    *,
    start_rate_per_s: float = 50.0,
    min_rate_per_s: float = 1.0,
    max_rate_per_s: float = 100_000.0,
    max_steps: int = 12,
    tolerance: float = 0.05,
    deadline: float = math.inf,
    trial_cost_s: Callable[[float], float] = lambda rate: 0.0,
) -> tuple[tuple[float, TrialResult] | None, list[tuple[float, TrialResult, bool]], str]:
    """Exponential growth (x2) until a rate fails, then bisection; bounded in steps and time.

    Returns (best passing (rate, trial) or None, every (rate, trial, passed), why it stopped).
    """
    best: tuple[float, TrialResult] | None = None
    fail_rate: float | None = None
    history: list[tuple[float, TrialResult, bool]] = []
    rate = min(max(start_rate_per_s, min_rate_per_s), max_rate_per_s)
    for _ in range(max_steps):
        if time.monotonic() + trial_cost_s(rate) > deadline:
            return best, history, "time budget"
        trial = trial_at(rate)
        ok = trial_meets_slo(trial, slo_p99_ms)
        history.append((rate, trial, ok))
        if ok:
            best = (rate, trial)
        else:
            fail_rate = rate
        if best is not None and fail_rate is not None:
            if fail_rate / best[0] - 1.0 <= tolerance:
                return best, history, "converged"
            rate = (best[0] + fail_rate) / 2.0
        elif best is not None:  # still growing
            if rate >= max_rate_per_s:
                return best, history, "max rate"
            rate = min(rate * 2.0, max_rate_per_s)
        else:  # even the first rates fail: shrink
            if rate <= min_rate_per_s:
                return best, history, "min rate"
            rate = max(rate / 2.0, min_rate_per_s)
    return best, history, "max steps"


def max_throughput_under_slo(
    host: str,
    payloads: PayloadSet | str | Path,
    slo_p99_ms: float = 50.0,
    min_duration_s: float | None = None,
    min_queries: int | None = None,
    *,
    profile: str = "full",
    start_rate_per_s: float = 50.0,
    max_rate_per_s: float = 100_000.0,
    max_steps: int = 12,
    tolerance: float = 0.05,
    time_budget_s: float = 600.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    cpus: Sequence[int] | None = None,
    zipf_s: float | None = None,
) -> dict[str, Any]:
    """The highest Poisson arrival rate whose corrected p99 stays within `slo_p99_ms`.

    Like MLPerf's Server scenario, a result counts (VALID) only if its trial had no errors and ran at
    least `min_duration_s` and `min_queries`; each trial runs max(min_duration_s, min_queries / rate)
    seconds. Defaults come from `SLO_PROFILES[profile]` ("quick" is for smoke runs and says so).
    """
    if profile not in SLO_PROFILES:
        raise ValueError(f"profile must be one of {sorted(SLO_PROFILES)}, got {profile!r}")
    require_loopback(host)
    min_duration_s = float(SLO_PROFILES[profile]["min_duration_s"] if min_duration_s is None else min_duration_s)
    min_queries = int(SLO_PROFILES[profile]["min_queries"] if min_queries is None else min_queries)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="rankserve-slo-"))
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(payloads, PayloadSet):
        payloads = payloads.save(out / "payloads.msgpack")
    t_start = time.monotonic()

    def duration_at(rate: float) -> float:
        # arrivals are Poisson, so ask for 10% more time than min_queries/rate needs on average
        return max(min_duration_s, 1.1 * min_queries / rate)

    def trial_at(rate: float) -> TrialResult:
        return run_open_loop(
            host, payloads, rate, duration_at(rate), seed=seed, out_dir=out, cpus=cpus, scenario="slo-search", zipf_s=zipf_s
        )

    best, history, stopped_by = search_rate(
        trial_at,
        slo_p99_ms,
        start_rate_per_s=start_rate_per_s,
        max_rate_per_s=max_rate_per_s,
        max_steps=max_steps,
        tolerance=tolerance,
        deadline=t_start + time_budget_s,
        trial_cost_s=lambda rate: duration_at(rate) + 5.0,  # plus the subprocess start and drain
    )
    reasons: list[str] = []
    if best is None:
        reasons.append(f"no tried rate kept p99 <= {slo_p99_ms} ms with zero errors")
    else:
        trial = best[1]
        if trial.error_rate > 0:
            reasons.append(f"error rate {trial.error_rate:.4f} > 0")
        if trial.requests < min_queries:
            reasons.append(f"{trial.requests} queries < min_queries {min_queries}")
        if trial.duration_s < min_duration_s:
            reasons.append(f"ran {trial.duration_s:.1f} s < min_duration_s {min_duration_s}")
    result: dict[str, Any] = {
        "status": "INVALID" if reasons else "VALID",
        "reasons": reasons,
        "slo_p99_ms": slo_p99_ms,
        "max_rate_per_s": best[0] if best else None,
        "achieved_rps": best[1].rps if best else None,
        "p99_ms": best[1].latency_ms.get("p99") if best else None,
        "best_trial": best[1].to_dict() if best else None,
        "profile": profile,
        "min_duration_s": min_duration_s,
        "min_queries": min_queries,
        "zipf_s": zipf_s,
        "search": "exponential growth x2 from start_rate, then bisection to within tolerance",
        "stopped_by": stopped_by,
        "steps": len(history),
        "elapsed_s": time.monotonic() - t_start,
        "trials": [{"rate_per_s": r, "meets_slo": ok, **t.to_dict()} for r, t, ok in history],
    }
    if profile == "quick":
        result["note"] = (
            f"quick profile: minimums ({min_duration_s:g} s, {min_queries} queries) are far below a full run's; "
            "a smoke figure, not a result to publish"
        )
    return result
