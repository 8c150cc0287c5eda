"""What the sweep calls: one load-test trial in, one `TrialRecord` out; and the SLO search.

Both generators run in a subprocess of their own: Locust needs gevent's monkey-patching before any
other import (and must not share a process with torch or ray), the open-loop generator wants an
event loop of its own, and a child process can be pinned to given CPUs (`cpus`, applied with
`os.sched_setaffinity` in the child before exec) so that the load generator and the service do not
fight for the same cores. Each trial leaves its raw JSON (and Locust's CSV and log) in `out_dir`.

    run_closed_loop(host, payloads_path, users, duration_s, scenario, out_dir)   # Locust, headless
    run_open_loop(host, payloads, rate_per_s, duration_s)                        # Poisson arrivals
    max_throughput_under_slo(host, payloads, slo_p99_ms=50)                      # an SloResult

The search's statuses (CONVERGED, LOWER-BOUND, GENERATOR-BOUND, INVALID) are defined in
loadtest/records.py and described in docs/loadtest.md.
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
from pathlib import Path
from typing import Any

from loadtest.openloop import require_loopback
from loadtest.payloads import PayloadSet
from loadtest.records import (
    CONVERGED,
    GENERATOR_BOUND,
    INVALID,
    LATENCY_KEYS,
    LOWER_BOUND,
    SloResult,
    SloStep,
    TrialRecord,
    samples_for,
    tail_confidence,
)

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
REPO_ROOT = LOCUSTFILE.parent.parent
TrialResult = TrialRecord  # the name earlier code and docs/ARCHITECTURE.md use
# MLPerf-like minimums for an SLO step: count-based steps of at least `min_queries` arrivals and
# `min_duration_s`, and a p99 that meets the objective with `confidence` (MLPerf's early stopping).
SLO_PROFILES: dict[str, dict[str, float]] = {
    "full": {"min_duration_s": 10.0, "min_queries": 2000, "confidence": 0.99},
    "quick": {"min_duration_s": 2.0, "min_queries": 500, "confidence": 0.99},
}


def _latency(d: dict[str, Any] | None) -> dict[str, float]:
    return {k: float(d.get(k, 0.0)) for k in LATENCY_KEYS} if d else {}


def _mean_docs(raw: dict[str, Any]) -> int:
    sizes = raw.get("sizes") or []
    if len(sizes) == 1:
        return int(sizes[0])
    ok = raw["requests"] - raw["failures"] - raw.get("degraded", 0)
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


def _trial(raw: dict[str, Any], results: Path, **fields: Any) -> TrialRecord:
    """A TrialRecord from a generator's result JSON; `fields` are what differs between generators."""
    return TrialRecord(
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
        degraded=int(raw.get("degraded", 0)),
        good=raw.get("good"),
        slo_ms=raw.get("slo_ms"),
        goodput_per_s=raw.get("goodput_per_s"),
        generator_cpu=raw.get("generator_cpu") or {},
        latency_hdr=raw.get("latency_hdr"),
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
    slo_ms: float | None = None,
) -> TrialRecord:
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
    if slo_ms is not None:
        child_env["RANKSERVE_SLO_MS"] = repr(float(slo_ms))
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
        generator="Locust (closed loop)",
        extra={"locust": raw.get("locust"), "exit_code": rc, "latency_by_name_ms": raw.get("latency_by_name_ms"),
               "cpu_affinity": raw.get("cpu_affinity")},
    )


def run_open_loop(
    host: str,
    payloads: PayloadSet | str | Path,
    rate_per_s: float,
    duration_s: float | None,
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
    slo_ms: float | None = None,
    expected_latency_ms: float = 5.0,
    processes: int | None = None,
) -> TrialRecord:
    """Poisson arrivals at `rate_per_s` (loadtest/openloop.py in a subprocess, pinned to `cpus`).

    Time-bound (`duration_s`), count-based (`duration_s=None`, exactly `max_requests` arrivals) or
    both. Latency is measured from each request's scheduled send time; `uncorrected_latency_ms` from
    its actual send time; `late_sends` counts sends the generator itself left more than `late_ms`
    late, and `generator_bound` says they were more than 1%. `processes` (default: one per CPU in
    `cpus`) splits the rate over several generator processes.
    """
    require_loopback(host)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="rankserve-openloop-"))
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(payloads, PayloadSet):
        payload_file = payloads.save(out / "payloads.msgpack")
    else:
        payload_file = Path(payloads).resolve()
    processes = processes or max(1, len(cpus or []))
    stem = f"open-{scenario}-{rate_per_s:g}per_s-seed{seed}"
    results, log_path = out / f"{stem}.json", out / f"{stem}.log"
    results.unlink(missing_ok=True)
    request_timeout = 30.0
    cmd = [
        sys.executable, "-m", "loadtest.openloop", "--host", host, "--payloads", str(payload_file),
        "--rate", repr(float(rate_per_s)), "--seed", str(seed),
        "--max-in-flight", str(max_in_flight), "--late-ms", repr(float(late_ms)),
        "--request-timeout", repr(request_timeout), "--expected-latency-ms", repr(float(expected_latency_ms)),
        "--processes", str(processes), "--out", str(results),
    ]  # fmt: skip
    if duration_s is not None:
        cmd += ["--duration", repr(float(duration_s))]
    if max_requests is not None:
        cmd += ["--count", str(max_requests)]
    if cpus:
        cmd += ["--cpus", ",".join(str(c) for c in cpus)]
    if not unique_queries:
        cmd.append("--reuse-queries")
    if zipf_s:
        cmd += ["--zipf-s", repr(float(zipf_s))]
    if slo_ms is not None:
        cmd += ["--slo-ms", repr(float(slo_ms))]
    length = duration_s if duration_s is not None else 1.5 * (max_requests or 0) / rate_per_s
    rc = _run_child(cmd, dict(os.environ), log_path, timeout_s or length + 2 * request_timeout + 60, cpus)
    raw = _read_result(results, log_path, rc)
    return _trial(
        raw,
        results,
        scenario=scenario,
        mode="open-loop",
        uncorrected_latency_ms=_latency(raw["uncorrected_latency_ms"]),
        late_sends=raw["late_sends"],
        target_rate_per_s=float(rate_per_s),
        generator=raw.get("generator", "open loop"),
        offered_rate_per_s=raw.get("offered_rate_per_s"),
        achieved_rate_per_s=raw.get("achieved_rate_per_s"),
        late_fraction=raw.get("late_fraction"),
        generator_bound=bool(raw.get("generator_bound")),
        extra={
            k: raw.get(k)
            for k in ("scheduled", "scheduled_duration_s", "count_based", "sent", "send_rate_per_s",
                      "mean_interarrival_ms", "max_send_lag_ms", "waited_for_slot", "late_after_wait",
                      "late_threshold_ms", "late_wakeups", "late_wakeup_fraction", "max_wakeup_lag_ms", "generator_cpu_wait_fraction",
                      "connections_opened", "processes", "errors", "seed", "spin", "cpu_affinity")  # fmt: skip
        },
    )


# ----------------------------------------------------------------------------------------------
# Maximum throughput under a latency objective
# ----------------------------------------------------------------------------------------------
PASS, FAIL, GEN_BOUND = "pass", "fail", "generator-bound"


def judge_step(trial: TrialRecord, slo_p99_ms: float, confidence: float) -> tuple[str, str, float]:
    """(outcome, why, confidence) of one SLO step.

    A step that the generator could not keep to its schedule measured the generator: it is neither a
    pass nor a fail of the service. Otherwise any error or degraded answer fails the step, and its
    p99 must meet the objective by MLPerf's early-stopping rule at `confidence`: the misses (answers
    over the objective) must be few enough for that many samples.
    """
    if trial.generator_bound:
        late = trial.late_fraction if trial.late_fraction is not None else 0.0
        return GEN_BOUND, f"generator late on {late:.1%} of sends", 0.0
    if trial.requests == 0:
        return FAIL, "no answer", 0.0
    if trial.failures:
        return FAIL, f"{trial.failures} errors", 0.0
    if trial.degraded:
        return FAIL, f"{trial.degraded} degraded answers", 0.0
    if trial.good is None:  # a trial run without the objective: judge its observed p99 only
        ok = trial.latency_ms.get("p99", math.inf) <= slo_p99_ms
        return (PASS if ok else FAIL), f"p99 {trial.latency_ms.get('p99', 0):.2f} ms (no early-stopping count)", 0.0
    over = trial.over_slo
    conf = tail_confidence(trial.samples, over, 99.0)
    why = f"{over} of {trial.samples} over {slo_p99_ms:g} ms: p99 within it with {conf:.1%} confidence"
    return (PASS if conf >= confidence else FAIL), why, conf


def trial_meets_slo(trial: TrialRecord, slo_p99_ms: float, confidence: float = 0.0) -> bool:
    """Whether a trial passes the objective (see judge_step)."""
    return judge_step(trial, slo_p99_ms, confidence)[0] == PASS


Judge = Callable[[TrialRecord], tuple[str, str, float]]


def search_rate(
    trial_at: Callable[[float, int], TrialRecord],
    judge: Judge | float,
    *,
    start_rate_per_s: float = 50.0,
    min_rate_per_s: float = 1.0,
    max_rate_per_s: float = 100_000.0,
    max_steps: int = 12,
    tolerance: float = 0.05,
    deadline: float = math.inf,
    trial_cost_s: Callable[[float], float] = lambda rate: 0.0,
) -> tuple[list[SloStep], str]:
    """Exponential growth (x2) until a rate fails, then bisection; bounded in steps and time.

    `trial_at(rate, step)` runs step number `step` (each step its own seed). A generator-bound step
    caps the search like a failure, without being one. Returns every step and why the search stopped:
    "converged", "generator-bound", "max rate", "min rate", "max steps" or "time budget".
    """
    if not callable(judge):
        slo = float(judge)
        judge = lambda trial: judge_step(trial, slo, 0.0)  # noqa: E731
    steps: list[SloStep] = []
    best: float | None = None
    ceiling: tuple[float, str] | None = None  # (lowest failing or generator-bound rate, its outcome)
    rate = min(max(start_rate_per_s, min_rate_per_s), max_rate_per_s)
    for index in range(max_steps):
        if time.monotonic() + trial_cost_s(rate) > deadline:
            return steps, "time budget"
        trial = trial_at(rate, index)
        outcome, why, conf = judge(trial)
        steps.append(SloStep(rate_per_s=rate, outcome=outcome, why=why, confidence=conf, trial=trial.to_dict()))
        if outcome == PASS:
            best = max(best or rate, rate)
        elif ceiling is None or rate < ceiling[0] or (rate == ceiling[0] and outcome == FAIL):
            ceiling = (rate, outcome)
        if best is not None and ceiling is not None:
            if ceiling[0] / best - 1.0 <= tolerance:
                return steps, "converged" if ceiling[1] == FAIL else "generator-bound"
            rate = (best + ceiling[0]) / 2.0
        elif best is not None:  # still growing
            if rate >= max_rate_per_s:
                return steps, "max rate"
            rate = min(rate * 2.0, max_rate_per_s)
        else:  # even the first rates fail: shrink
            if rate <= min_rate_per_s:
                return steps, "min rate"
            rate = max(rate / 2.0, min_rate_per_s)
    return steps, "max steps"


def conclude(steps: list[SloStep], stopped_by: str, tolerance: float) -> tuple[str, list[str], SloStep | None,
                                                                             SloStep | None]:
    """(status, reasons, best passing step, the step that capped it) of a finished search."""
    passing = [s for s in steps if s.outcome == PASS]
    best = max(passing, key=lambda s: s.rate_per_s) if passing else None
    above = [s for s in steps if s.outcome != PASS and (best is None or s.rate_per_s > best.rate_per_s)]
    cap = min(above, key=lambda s: (s.rate_per_s, s.outcome != FAIL)) if above else None
    if best is None:
        whys = sorted({s.why for s in steps})
        return INVALID, ["no tried rate met the objective", *whys[:5]], None, cap
    if cap is not None and cap.outcome == GEN_BOUND:
        return GENERATOR_BOUND, [
            f"at {cap.rate_per_s:.4g}/s the generator could not keep its schedule ({cap.why}); "
            f"the service's limit is at least {best.rate_per_s:.4g}/s, measure it with a faster generator "
            "(more generator cores: processes)"], best, cap
    if cap is not None and cap.rate_per_s / best.rate_per_s - 1.0 <= tolerance:
        return CONVERGED, [], best, cap
    if cap is None:
        return LOWER_BOUND, [f"every step passed (stopped by {stopped_by}): the limit is higher"], best, cap
    return LOWER_BOUND, [
        f"bracket {best.rate_per_s:.4g}..{cap.rate_per_s:.4g}/s is wider than the tolerance {tolerance:.0%} "
        f"(stopped by {stopped_by})"], best, cap


def step_queries(rate: float, min_queries: int, min_duration_s: float) -> int:
    """Arrivals in one count-based SLO step at `rate`: at least `min_queries` and `min_duration_s` of them."""
    return max(min_queries, math.ceil(rate * min_duration_s))


def step_cost_s(rate: float, min_queries: int, min_duration_s: float) -> float:
    """Seconds one SLO step at `rate` costs: its arrivals' span plus 3 s of subprocess start and drain."""
    return step_queries(rate, min_queries, min_duration_s) / rate + 3.0


def max_throughput_under_slo(
    host: str,
    payloads: PayloadSet | str | Path,
    slo_p99_ms: float = 50.0,
    min_duration_s: float | None = None,
    min_queries: int | None = None,
    *,
    profile: str = "full",
    confidence: float | None = None,
    start_rate_per_s: float = 50.0,
    max_rate_per_s: float = 100_000.0,
    max_steps: int = 12,
    tolerance: float = 0.05,
    time_budget_s: float = 600.0,
    seed: int = 0,
    out_dir: str | Path | None = None,
    cpus: Sequence[int] | None = None,
    zipf_s: float | None = None,
    expected_latency_ms: float = 5.0,
    late_ms: float = 1.0,
) -> SloResult:
    """The highest Poisson arrival rate whose p99 stays within `slo_p99_ms`, with its status.

    Like MLPerf's Server scenario: each step is count-based (exactly max(min_queries, rate x
    min_duration_s) arrivals) with a seed of its own, and passes with no error, no degraded answer,
    and a p99 within the objective at `confidence` (early stopping). Defaults come from
    `SLO_PROFILES[profile]`. The status says what the figure means (loadtest/records.py). `late_ms`:
    how late a send may leave before it counts against the generator (1 ms; tests on a shared,
    unpinned machine relax it).
    """
    if profile not in SLO_PROFILES:
        raise ValueError(f"profile must be one of {sorted(SLO_PROFILES)}, got {profile!r}")
    require_loopback(host)
    defaults = SLO_PROFILES[profile]
    min_duration_s = float(defaults["min_duration_s"] if min_duration_s is None else min_duration_s)
    min_queries = int(defaults["min_queries"] if min_queries is None else min_queries)
    confidence = float(defaults["confidence"] if confidence is None else confidence)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="rankserve-slo-"))
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(payloads, PayloadSet):
        payloads = payloads.save(out / "payloads.msgpack")
    t_start = time.monotonic()

    def count_at(rate: float) -> int:
        return step_queries(rate, min_queries, min_duration_s)

    def trial_at(rate: float, step: int) -> TrialRecord:
        return run_open_loop(
            host, payloads, rate, None, max_requests=count_at(rate), seed=seed * 1000 + step, out_dir=out,
            cpus=cpus, scenario=f"slo-step{step}", zipf_s=zipf_s, slo_ms=slo_p99_ms,
            expected_latency_ms=expected_latency_ms, late_ms=late_ms,
        )

    steps, stopped_by = search_rate(
        trial_at,
        lambda trial: judge_step(trial, slo_p99_ms, confidence),
        start_rate_per_s=start_rate_per_s,
        max_rate_per_s=max_rate_per_s,
        max_steps=max_steps,
        tolerance=tolerance,
        deadline=t_start + time_budget_s,
        trial_cost_s=lambda rate: step_cost_s(rate, min_queries, min_duration_s),
    )
    status, reasons, best, cap = conclude(steps, stopped_by, tolerance)
    trial = best.trial_record if best else None
    needed = samples_for(confidence)
    if min_queries < needed:
        reasons.append(f"min_queries {min_queries} < {needed}: too few for a p99 at {confidence:.0%} confidence "
                       "with no miss, so no step can pass the early-stopping rule")
    return SloResult(
        status=status,
        reasons=reasons,
        slo_p99_ms=slo_p99_ms,
        max_rate_per_s=best.rate_per_s if best else None,
        offered_rate_per_s=trial.offered_rate_per_s if trial else None,
        achieved_rate_per_s=trial.achieved_rate_per_s if trial else None,
        p99_ms=trial.latency_ms.get("p99") if trial else None,
        samples=trial.samples if trial else None,
        confidence=best.confidence if best else None,
        bracket=[best.rate_per_s if best else None, cap.rate_per_s if cap else None],
        tolerance=tolerance,
        profile=profile,
        min_queries=min_queries,
        min_duration_s=min_duration_s,
        confidence_target=confidence,
        stopped_by=stopped_by,
        steps=[s.to_dict() for s in steps],
        elapsed_s=time.monotonic() - t_start,
        zipf_s=zipf_s,
        start_rate_per_s=start_rate_per_s,
    )
