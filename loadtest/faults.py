"""The fault suite: does the service keep answering, lose nothing and recover when things break?

Each scenario of a profile (loadtest/faults/<profile>.yaml) starts the real service (plain uvicorn or
Ray Serve, through loadtest/services.py, as the sweep does) and a real redis-server, drives open-loop
Poisson load with the project's generator from the other core, injects one fault at a known time,
and records errors, degraded answers and 503 rejections (apart), p50/p99 before, during and after the
fault, the recovery time and whether any data was lost; then judges them against the scenario's
thresholds (loadtest/faults_report.py). Faults: Redis SIGKILL and restart, Redis SIGSTOP/SIGCONT,
a Ray Serve replica SIGKILL, a model swap under load, the feature store's Redis down, overload at
3x the measured capacity, and a soak that watches every service process's RSS.

    python loadtest/faults.py --profile short                       # every scenario, short forms
    python loadtest/faults.py --profile short --only redis_kill     # one scenario
    python loadtest/faults.py --profile full                        # what `make faults` runs
    python loadtest/faults.py --profile full --list                 # the scenarios, run nothing

Results: results/reliability/<cpu>-<isa>.md, .csv and .json for the full profile
(`<cpu>-<isa>-<profile>` for others); scenarios run with `--only` replace their own rows. Logs,
payloads and per-arrival timelines go to a work folder (`--work`, default a temporary one). The
full profile refuses a tree with uncommitted code changes (its figures must come from a commit)
unless `--allow-dirty`; other profiles mark such rows "(dirty)". Definitions: docs/reliability.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from loadtest.faults_config import FAULTS_DIR, FaultFileError, Profile, Scenario, load_profile
from loadtest.faults_report import ERROR, write_results
from loadtest.faults_run import RunContext, pinned_to, run_scenario
from loadtest.services import plan_cores
from models.paths import RESULTS
from serve.security import ADMIN_TOKEN_ENV

RELIABILITY_DIR = RESULTS / "reliability"


@contextlib.contextmanager
def admin_token() -> Iterator[str]:
    """A fresh admin token in this process's environment while the suite runs: each service started
    inherits it (serve/security.py reads it at start), and the swap scenario sends it."""
    old = os.environ.get(ADMIN_TOKEN_ENV)
    token = old or secrets.token_urlsafe(24)
    os.environ[ADMIN_TOKEN_ENV] = token
    try:
        yield token
    finally:
        if old is None:
            os.environ.pop(ADMIN_TOKEN_ENV, None)


def select(profile: Profile, only: Sequence[str] | None) -> list[Scenario]:
    if not only:
        return list(profile.scenarios)
    names = {s.name for s in profile.scenarios}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise FaultFileError(f"--only {', '.join(unknown)}: not in profile {profile.name!r} "
                             f"(has {', '.join(sorted(names))})")
    return [s for s in profile.scenarios if s.name in only]


def run_profile(profile: Profile, scenarios: list[Scenario], out_dir: Path, work_dir: Path,
                environment: dict[str, Any], *, pin: bool = True) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Run `scenarios` one after another, then write the results; one failing scenario keeps the others."""
    cores = plan_cores() if pin else {"pinned": False, "service_cores": [], "loadgen_cores": []}
    results: list[dict[str, Any]] = []
    commit = environment.get("git", {})
    with admin_token() as token, pinned_to(cores["loadgen_cores"] if cores.get("pinned") else []):
        ctx = RunContext(work_dir=work_dir, cores=cores, seed=profile.seed, start_timeout_s=profile.start_timeout_s,
                         stop_timeout_s=profile.stop_timeout_s, admin_token=token)
        for scenario in scenarios:
            print(f"[faults] {scenario.name}: {scenario.fault.kind} on {scenario.service.server} ...", flush=True)
            try:
                result = run_scenario(scenario, ctx)
            except Exception as error:  # noqa: BLE001 - one broken scenario must not lose the others
                result = {"scenario": scenario.name, "description": scenario.description, "kind": scenario.fault.kind,
                          "server": scenario.service.server, "verdict": ERROR, "checks": [], "notes": [],
                          "error": f"{type(error).__name__}: {str(error)[:2000]}"}
            result.update(commit=commit.get("commit"), dirty=commit.get("dirty"), profile=profile.name)
            results.append(result)
            print(f"[faults] {scenario.name}: {result['verdict']}"
                  + "".join(f"\n    {c['name']}: {c['value']} ({c['threshold']})" for c in result["checks"])
                  + (f"\n    error: {result['error']}" if result.get("error") else ""), flush=True)
    paths = write_results(out_dir, profile.name, environment, results)
    return results, paths


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Definitions of failed, recovery and data lost: docs/reliability.md.")
    parser.add_argument("--profile", default="short", help="a file in loadtest/faults/ (short, full)")
    parser.add_argument("--file", type=Path, help="a scenario YAML file (overrides --profile)")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these scenarios")
    parser.add_argument("--out", type=Path, default=RELIABILITY_DIR, help="where the results files go")
    parser.add_argument("--work", type=Path, default=None, help="logs, payloads, timelines (default: a temp folder)")
    parser.add_argument("--allow-dirty", action="store_true", help="let the full profile run on uncommitted code")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    path = args.file or FAULTS_DIR / f"{args.profile}.yaml"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in FAULTS_DIR.glob("*.yaml")))
        parser.error(f"--profile {args.profile}: no {path} (known: {known})")
    try:
        profile = load_profile(path)
        scenarios = select(profile, args.only)
    except FaultFileError as error:
        print(error, file=sys.stderr)
        return 2
    if args.list:
        for s in scenarios:
            print(f"{s.name:<24} {s.fault.kind:<13} {s.service.server:<8} {s.load.duration_s:>6g} s  {s.description.strip()[:80]}")
        return 0
    from models.environment import collect_environment

    environment = collect_environment()
    if environment["git"].get("dirty") and profile.name == "full" and not args.allow_dirty:
        print("refusing: the tree has uncommitted code changes, and the full profile's figures must come from a "
              "commit (commit first, or pass --allow-dirty: rows are then marked dirty)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)  # the same path as Ctrl-C: services and Redis are stopped
    work = args.work or Path(tempfile.mkdtemp(prefix="rankserve-faults-"))
    print(f"[faults] profile {profile.name}: {len(scenarios)} scenario(s); work folder {work}", flush=True)
    try:
        results, paths = run_profile(profile, scenarios, args.out, work, environment)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    print(f"[faults] wrote {paths['md']} and {paths['csv']}")
    return 0 if all(r["verdict"] in ("PASS", "RECORDED") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
