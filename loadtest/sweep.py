"""The sweep: run every optimization of a YAML ladder against a real service and record it.

Why a runner of its own: a latency figure is only worth comparing when every optimization was
measured the same way, on the same payloads, with the load generator kept off the service's cores,
several times, and with the machine recorded. This module orchestrates a run: for each entry of the
sweep file (loadtest.sweep_config) it starts the service (loadtest.services: `serve/run.py` or
`serve/baseline.py` or `serve/uvicorn_server.py`), warms it up on the run's payloads (loadtest.run_resources), runs the scenarios
through `loadtest.runner`, stops it, and writes one raw JSON file per entry into
`results/runs/<UTC timestamp>-<profile>/raw/`; `loadtest/report.py` turns the folder into tables
and plots. A run resumes after an interruption (`--resume RUN_DIR`): entries whose raw file exists
are skipped.

    python loadtest/sweep.py --profile quick            # the lab's sweep (README: make lab)
    python loadtest/sweep.py --sweep my.yaml --out /tmp/runs
    python loadtest/sweep.py --resume results/runs/20250101T000000Z-quick
    python loadtest/sweep.py --profile full --plan      # what would run, and a time estimate
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from loadtest.records import EntryRecord, SloResult, TrialRecord
from loadtest.run_resources import (
    build_payload_files,
    clear_result_cache,
    load_feature_store,
    redis_for,
    warm_up,
)
from loadtest.services import plan_cores, service_command, service_for, wait_port_free
from loadtest.sweep_config import SWEEPS_DIR, Entry, Sweep, SweepFileError, load_sweep
from models.paths import ARTIFACTS, RESULTS

RUNS_DIR = RESULTS / "runs"


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
    progress: Any = None  # a tqdm bar, or None

    def advance(self, label: str, steps: int = 1) -> None:
        if self.progress is not None and steps > 0:
            self.progress.set_postfix_str(label[:60])
            self.progress.update(steps)


def entry_steps(sweep: Sweep, entry: Entry) -> int:
    """Units of progress for one entry: trials x scenarios x sizes, plus SLO searches."""
    sizes = sweep.sizes_of(entry)
    steps = (sweep.trials * len(entry.scenarios) + sweep.probe_trials) * len(sizes)
    if entry.slo_search:
        steps += len([n for n in sweep.slo.list_sizes if n in sizes])
    return steps


def run_entry(entry: Entry, ctx: RunContext) -> EntryRecord:
    """Start the entry's service, warm up, run its trials and SLO searches, stop it; the raw record."""
    from loadtest import runner

    sweep, spec = ctx.sweep, entry.service
    record = EntryRecord(entry=entry.name, description=entry.description, base=entry.base, group=entry.group,
                         service=spec.model_dump(), started_at=_utc_now())
    if ctx.redis_url and spec.cache:
        record.cache_keys_cleared = clear_result_cache(ctx.redis_url)
    service = service_for(spec).start(ctx.run_dir / "logs" / f"{entry.name}.log", cores=ctx.cores,
                                      redis_url=ctx.redis_url, timeout_s=sweep.start_timeout_s)
    record.command, record.startup_s = service.command, round(service.start_s, 2)
    trial_dir = ctx.run_dir / "locust" / entry.name
    loadgen_cpus = ctx.cores["loadgen_cores"] if ctx.cores.get("pinned") else None
    try:
        for n_docs in sweep.sizes_of(entry):
            payload_file = ctx.payloads[(spec.encoding, n_docs)]
            record.warmup_requests[str(n_docs)] = warm_up(service.url, payload_file, sweep.warmup_s)
            for trial in range(sweep.trials):
                for scenario in entry.scenarios:
                    out_dir = trial_dir / f"{n_docs}-{scenario}-{trial}"
                    result = runner.run_closed_loop(service.url, str(payload_file), sweep.users,
                                                    sweep.trial_duration_s, scenario, str(out_dir),
                                                    zipf_s=sweep.zipf_s, cpus=loadgen_cpus, slo_ms=sweep.slo.p99_ms,
                                                    processes=len(loadgen_cpus or []) or None)
                    result.trial, result.list_size, result.users = trial, n_docs, sweep.users
                    record.trials.append(result.to_dict())
                    ctx.advance(f"{entry.name} {n_docs} docs {scenario} #{trial + 1}")
            for probe in range(sweep.probe_trials):  # the per-request cost: one request at a time
                scenario = entry.scenarios[0]
                result = runner.run_closed_loop(service.url, str(payload_file), sweep.probe_users,
                                                sweep.trial_duration_s, scenario,
                                                str(trial_dir / f"{n_docs}-{scenario}-probe{probe}"),
                                                zipf_s=sweep.zipf_s, cpus=loadgen_cpus, slo_ms=sweep.slo.p99_ms)
                result.trial, result.list_size, result.users, result.role = probe, n_docs, sweep.probe_users, "probe"
                record.trials.append(result.to_dict())
                ctx.advance(f"{entry.name} {n_docs} docs at {sweep.probe_users} user(s) #{probe + 1}")
            if entry.slo_search and n_docs in sweep.slo.list_sizes:
                trials = [t for t in record.trial_records() if t.list_size == n_docs]
                record.slo.append(search_slo(entry, ctx, service.url, n_docs, payload_file, trials).to_dict())
                ctx.advance(f"{entry.name} {n_docs} docs SLO search")
    finally:
        record.exit_code = service.stop(sweep.stop_timeout_s)
        wait_port_free(spec.port, 20)
    record.finished_at = _utc_now()
    return record


def search_slo(entry: Entry, ctx: RunContext, url: str, n_docs: int, payload_file: Path,
               trials: list[TrialRecord]) -> SloResult:
    """Maximum throughput under the objective at one list size, started near the closed-loop rate."""
    from loadtest import runner

    slo = ctx.sweep.slo
    closed = sorted(t.rps for t in trials if t.rps)
    start = max(1.0, slo.start_fraction * closed[len(closed) // 2]) if closed else 50.0
    p50s = sorted(t.latency_ms.get("p50", 0.0) for t in trials)
    loadgen_cpus = ctx.cores["loadgen_cores"] if ctx.cores.get("pinned") else None
    result = runner.max_throughput_under_slo(
        url, str(payload_file), slo_p99_ms=slo.p99_ms, profile=slo.profile, **slo.resolved(),
        start_rate_per_s=round(start, 1), max_steps=slo.max_steps, tolerance=slo.tolerance,
        time_budget_s=slo.time_budget_s, seed=ctx.sweep.seed, out_dir=ctx.run_dir / "slo" / f"{entry.name}-{n_docs}",
        cpus=loadgen_cpus, expected_latency_ms=p50s[len(p50s) // 2] if p50s else 5.0,
        # a cache entry is searched under the same Zipf repeat traffic as its cache-mix scenario
        zipf_s=ctx.sweep.zipf_s if entry.service.cache else None)
    result.entry, result.list_size = entry.name, n_docs
    if slo.profile == "quick":
        result.note = ("quick profile: short steps for the lab's time budget; each step still has enough "
                       f"arrivals for a p99 at {result.confidence_target:.0%} confidence")
    return result


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


EntryRunner = Callable[[Entry, RunContext], "EntryRecord | dict"]


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
        _write_json(done_file, record.to_dict() if isinstance(record, EntryRecord) else record)
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
    env["device"] = "cpu"  # what every entry serves on: sweep_config refuses `device: gpu`
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
    if not (run_dir / "environment.json").exists():
        write_environment(run_dir, sweep, cores)
    snapshot_manifests(sweep, run_dir)
    payload_files = build_payload_files(sweep, run_dir) if build_payloads else {}
    total = sum(entry_steps(sweep, e) for e in sweep.entries)
    original_affinity = os.sched_getaffinity(0) if cores["pinned"] else None
    try:
        return _run_pinned(sweep, run_dir, cores, payload_files, total, entry_runner, show_progress)
    finally:
        if original_affinity is not None:
            os.sched_setaffinity(0, original_affinity)


def _run_pinned(sweep: Sweep, run_dir: Path, cores: dict, payload_files: dict, total: int,
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
        ctx = RunContext(sweep, run_dir, payload_files, cores, redis_url, progress=bar)
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
        trials = (sweep.trials * len(entry.scenarios) + sweep.probe_trials) * len(sizes)
        seconds = start + len(sizes) * sweep.warmup_s + trials * (sweep.trial_duration_s + costs["trial_overhead"])
        searches = len([n for n in sweep.slo.list_sizes if n in sizes]) if entry.slo_search else 0
        slo_step = sweep.slo.resolved()["min_duration_s"] + costs["slo_step_overhead"]
        seconds += searches * min(sweep.slo.time_budget_s + slo_step, sweep.slo.max_steps * slo_step)
        total += seconds
        lines.append(f"  {entry.name:<18} {trials:>3} trials, {searches} SLO search(es), ~{seconds:,.0f} s: "
                     f"{' '.join(service_command(entry.service)[1:])}")
    return "\n".join([f"sweep {sweep.name}: {len(sweep.entries)} entries, list sizes {sweep.list_sizes}",
                      *lines, f"estimated at most ~{total / 60:.1f} min (rough, 2-core machine)"])


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


HELP_EPILOG = """\
What a run measures, per entry and list size:
  closed loop   Locust, `users` users, `trials` trials; each table row is built from the trials'
                merged HDR histograms, with the samples its percentiles rest on (a p99 from fewer
                than 100 samples and a p99.9 from fewer than 1,000 are marked). A trial whose Locust
                process used >= 90% of its core is flagged: the generator may have set the pace.
  failures      errors and degraded answers (HTTP 200, degraded: true) are counted apart; both are
                failures. Goodput (good answers within slo.p99_ms, per second) stands beside req/s.
  SLO search    open loop (uvloop + httptools generator, Poisson arrivals, latency from the scheduled
                send time): the highest rate whose p99 <= slo.p99_ms, in count-based steps with a seed
                each, judged by MLPerf's early-stopping rule at the profile's confidence. Statuses:
    CONVERGED        a passing and a failing rate within slo.tolerance: the service's limit
    LOWER-BOUND      every step passed, or the budget ran out first: the limit is at least this
    GENERATOR-BOUND  a step with > 1% of sends late by the generator's fault capped the search: the
                     limit is at least this, set by the generator (see --self-test below)
    INVALID          no rate met the objective (errors, degraded answers or latency)
  The result shows the rate asked, the rate offered (arrivals / scheduled duration) and achieved.
The generator's own capacity: python loadtest/openloop.py --self-test (results/loadgen/).
Details: docs/loadtest.md."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=HELP_EPILOG,
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
