"""The fault suite's verdicts and results files: results/reliability/<cpu>-<isa>[-<profile>].md/.csv/.json.

Why a writer of its own: a fault row is not a sweep row. It has phases (before, during, after the
fault), a recovery time, a data-loss verdict and PASS/FAIL checks against the scenario's acceptance
thresholds, and each check must show its threshold beside the measured value. One row per scenario
in the CSV (every figure); the Markdown has a summary table, each scenario's checks, the
definitions, and the environment of the run (models/environment.py). A run with `--only` replaces its
scenarios' rows and keeps the others (each row carries its own commit and time).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from export.report import cpu_slug, isa_slug  # noqa: F401 - isa_slug: the tests import it from here
from loadtest.faults_config import Acceptance, Scenario
from loadtest.records import MIN_SAMPLES
from models.environment import environment_markdown

PASS, FAIL, RECORDED, ERROR = "PASS", "FAIL", "RECORDED", "ERROR"


def results_stem(environment: dict, profile: str) -> str:
    """`<cpu>-<isa>` for the full profile (the committed run), `<cpu>-<isa>-<profile>` otherwise."""
    stem = f"{cpu_slug(environment)}-{isa_slug(environment)}"
    return stem if profile == "full" else f"{stem}-{profile}"


# ----------------------------------------------------------------------------------------------
# Verdicts.
# ----------------------------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    threshold: str
    value: str
    passed: bool

    def line(self) -> str:
        return f"{self.name}: {self.value} (threshold {self.threshold}) {PASS if self.passed else FAIL}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.2f} ms"


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f} s"


def judge(result: dict[str, Any], acceptance: Acceptance) -> list[Check]:
    """One check per threshold the scenario sets (plus the fault's own: the swap answered 200)."""
    a, total = acceptance, result["total"]
    before, during = result["phases"]["before"], result["phases"]["during"]
    checks: list[Check] = []

    def add(name: str, threshold: str, value: str, passed: bool) -> None:
        checks.append(Check(name, threshold, value, bool(passed)))

    failed = total["failed"]
    if a.max_failed is not None:
        add("failed", f"<= {a.max_failed}", f"{failed} of {total['requests']:,} (errors {total['errors']}, "
            f"degraded {total['degraded']}, rejected {total['rejected']})", failed <= a.max_failed)
    if a.max_failed_fraction is not None:
        fraction = failed / total["requests"] if total["requests"] else math.inf
        add("failed fraction", f"<= {a.max_failed_fraction:.2%}", f"{fraction:.3%} ({failed} of {total['requests']:,})",
            fraction <= a.max_failed_fraction)
    if a.max_errors is not None:
        add("errors", f"<= {a.max_errors}", str(total["errors"]), total["errors"] <= a.max_errors)
    if a.max_during_p99_ratio is not None:
        ratio = (during["p99_ms"] / before["p99_ms"]) if during["p99_ms"] and before["p99_ms"] else None
        add("p99 during / before", f"<= {a.max_during_p99_ratio:g}x",
            "-" if ratio is None else f"{ratio:.2f}x ({_ms(during['p99_ms'])} / {_ms(before['p99_ms'])})",
            ratio is not None and ratio <= a.max_during_p99_ratio)
    if a.max_recovery_s is not None:
        add("recovery", f"<= {a.max_recovery_s:g} s", _s(result["recovery_s"]),
            result["recovery_s"] is not None and result["recovery_s"] <= a.max_recovery_s)
    if a.cache_hits_back_s is not None:
        back = result.get("cache_hits_back_s")
        add("cache hits back after the restart", f"<= {a.cache_hits_back_s:g} s", _s(back),
            back is not None and back <= a.cache_hits_back_s)
    if a.max_rejected_p99_ms is not None:
        value = during["rejected_p99_ms"]
        add("503 p99 during", f"< {a.max_rejected_p99_ms:g} ms",
            f"{_ms(value)} ({during['rejected']:,} rejected)" if value is not None else "no 503 answers",
            value is not None and value < a.max_rejected_p99_ms)
    if a.max_admitted_p99_ms is not None:
        add("admitted p99 during", f"<= {a.max_admitted_p99_ms:g} ms", _ms(during["p99_ms"]),
            during["p99_ms"] is not None and during["p99_ms"] <= a.max_admitted_p99_ms)
    if a.max_latency_ms is not None:
        add("slowest answer (no hang)", f"<= {a.max_latency_ms:g} ms", _ms(total["max_ms"]),
            total["max_ms"] is not None and total["max_ms"] <= a.max_latency_ms)
    if a.degraded_during:
        add("answers during the fault are degraded", "all failed answers degraded, some",
            f"degraded {during['degraded']}, errors {during['errors']}, rejected {during['rejected']}",
            during["degraded"] > 0 and during["errors"] == 0 and during["rejected"] == 0)
    if a.max_rss_growth is not None:
        worst = result.get("rss_growth_max")
        add("RSS growth after warm-up (worst process)", f"< {a.max_rss_growth:.0%}",
            "-" if worst is None else f"{worst:.1%} ({result.get('rss_growth_worst')})",
            worst is not None and worst < a.max_rss_growth)
    if a.data_kept:
        data = result.get("data") or {}
        add("feature store keys after the restart", f"= {data.get('keys_before')}", str(data.get("keys_after")),
            data.get("keys_before") is not None and data.get("keys_after") == data.get("keys_before"))
    if a.alive_after:
        add("alive after (process, /readyz)", "running, 200",
            f"{'running' if result['alive_after'] else 'exited'}, {result['readyz_after']}",
            result["alive_after"] and result["readyz_after"] == 200)
    swap = result.get("swap")
    if swap is not None:
        add("swap answered", "200, then /readyz names the new variant",
            f"{swap['status']}, serving {swap.get('serving_after')}",
            swap["status"] == 200 and swap.get("serving_after") == swap["variant"])
    return checks


def explain(scenario: Scenario, result: dict[str, Any]) -> list[str]:
    """Plain-words notes on what the figures cannot show by themselves."""
    notes, gen, total = [], result["generator"], result["total"]
    if gen.get("generator_bound"):
        notes.append(f"the generator did not keep its schedule: {gen.get('late_sends')} of {gen.get('sent'):,} sends "
                     f"late by its own doing ({(gen.get('late_fraction') or 0):.1%}, at most "
                     f"{gen.get('max_send_lag_ms') or 0:.1f} ms): its core was busy; latencies count from the "
                     "schedule, so the service is charged for it")
    if total["rejected"] and scenario.fault.kind != "overload":
        rejected_by = {k: v for k, v in result.get("service_counters", {}).items() if "rejected" in k}
        notes.append(f"{total['rejected']} answers were 503 (admission control) below the capacity"
                     + (f"; the service's refusals since its start, by reason: {rejected_by}" if rejected_by else ""))
    during, capacity = result["phases"]["during"], (result.get("capacity") or {}).get("ok_rps")
    if scenario.fault.kind == "overload" and capacity and during["end_s"] > during["start_s"]:
        span = during["end_s"] - during["start_s"]
        notes.append(f"during the overload: {during['ok'] / span:,.1f} ok answers/s (at any latency), "
                     f"{during['ok'] / span / capacity:.0%} of the capacity, beside {during['rejected'] / span:,.1f} "
                     "refusals/s" + (": every refusal still costs the service's core its request (read, parsed, "
                                     "answered)" if during["rejected"] else ""))
    fraction = scenario.acceptance.max_failed_fraction
    if fraction and total["requests"] and 1 / total["requests"] > fraction:
        notes.append(f"{total['requests']:,} requests: a single failure is {1 / total['requests']:.2%}, above the "
                     f"{fraction:.1%} threshold; too few to judge it (the full profile sends more)")
    degraded_by = {k: v for k, v in result.get("service_counters", {}).items() if "degraded" in k}
    if total["degraded"] and degraded_by:
        notes.append(f"degraded answers since the service's start, by reason (its /metrics): {degraded_by}")
    return notes


def verdict(checks: list[Check]) -> str:
    if not checks:
        return RECORDED
    return PASS if all(c.passed for c in checks) else FAIL


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------
def _star(p99: float | None, n: int) -> str:
    if p99 is None:
        return "-"
    return f"{p99:,.2f}" + ("*" if n < MIN_SAMPLES["p99"] else "")


def flat_row(result: dict[str, Any]) -> dict[str, Any]:
    """Every figure of one scenario as one CSV row."""
    row: dict[str, Any] = {k: result.get(k) for k in (
        "scenario", "verdict", "kind", "server", "ingress", "replicas", "variant", "encoding", "n_docs", "cache",
        "rate_per_s", "capacity_rps", "overload_rate_per_s", "duration_s", "fault_start_s", "fault_end_s",
        "recovery_s", "cache_hits_back_s", "swap_s", "data_lost", "alive_after", "readyz_after",
        "rss_growth_max", "rss_growth_worst", "commit", "dirty", "measured_at", "error")}
    for key, value in result.get("total", {}).items():
        row[f"total_{key}"] = value
    for phase, stats in result.get("phases", {}).items():
        for key in ("requests", "ok", "errors", "degraded", "rejected", "p50_ms", "p99_ms", "max_ms",
                    "rejected_p99_ms", "cache_hits"):
            row[f"{phase}_{key}"] = stats.get(key)
    for key, value in result.get("generator", {}).items():
        row[f"generator_{key}"] = value
    row["checks"] = "; ".join(Check(**c).line() for c in result.get("checks", []))
    row["notes"] = " | ".join(result.get("notes", []))
    return row


def summary_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        ph = r.get("phases") or {}
        b, d, a = (ph.get(k) or {} for k in ("before", "during", "after"))
        t = r.get("total") or {}
        gen = r.get("generator") or {}
        rows.append({
            "scenario": r["scenario"],
            "service": f"{r.get('server')} {r.get('ingress') or ''} x{r.get('replicas')}".replace("  ", " "),
            "load": f"{r.get('rate_per_s') or 0:,.0f}/s x {r.get('duration_s') or 0:g} s",
            "requests": f"{t.get('requests', 0):,}",
            "failed (err/deg/rej)": f"{t.get('failed', 0)} ({t.get('errors', 0)}/{t.get('degraded', 0)}/{t.get('rejected', 0)})",
            "p50 / p99 before": f"{b.get('p50_ms') or 0:,.2f} / {_star(b.get('p99_ms'), b.get('ok', 0))}",
            "p99 during": _star(d.get("p99_ms"), d.get("ok", 0)),
            "503 p99 during": _star(d.get("rejected_p99_ms"), d.get("rejected", 0)),
            "p99 after": _star(a.get("p99_ms"), a.get("ok", 0)),
            "recovery": "-" if r.get("kind") == "none" else _s(r.get("recovery_s")),
            "data lost": r.get("data_lost") or "-",
            "generator": ("GENERATOR-BOUND" if gen.get("generator_bound") else "kept schedule")
                         + f" ({gen.get('late_sends', 0)} late)",
            "verdict": r.get("verdict", ERROR),
        })
    return pd.DataFrame(rows).to_markdown(index=False) if rows else "(no scenarios)"


DEFINITIONS = """\
Definitions (docs/reliability.md):
- **failed** = errors (HTTP status other than 503, transport, timeout) + degraded answers (HTTP 200 with
  `degraded: true`) + rejections (HTTP 503, e.g. admission control's fast refusal); counted apart.
- **p50 / p99**: nearest-rank percentiles of the *ok* answers' latency, measured from each arrival's
  scheduled send time (open loop: a backlog is charged to the service), over arrivals *scheduled* in the
  phase: before = [0, fault start), during = [fault start, fault end) (for an instant fault: the kill or
  the swap's answer, plus the scenario's `observe_s`), after = [fault end + `after_skip_s`, end of load).
  `*`: fewer than 100 samples behind a p99 (read it as nearly the maximum).
- **recovery**: from the fault's end (Redis restarted and answering PING, SIGCONT sent, the replica
  killed, the swap answered, the overload's end) to the first healthy stretch: sliding windows (1 s, or
  the scenario's `recovery.window_s`; step 0.1 s), each with >= 10 arrivals, a failed fraction at most
  2x the 'before' phase's (none if none failed before) and p99 <= max(2 x the 'before' p99, 'before'
  p99 + 2 ms), healthy for 1 s more of window starts. "never": none before the load ended.
- **data lost**: the result cache is a cache (an emptied cache is not a loss; the check is that hits
  come back); the feature store's keys are counted before the fault and after the restart.
- **generator**: whether the open-loop generator kept its schedule (`generator_bound`, late sends:
  loadtest/openloop.py); a GENERATOR-BOUND row measured the generator as much as the service."""


def _phase_rows(result: dict[str, Any]) -> str:
    rows = []
    for name, ph in (result.get("phases") or {}).items():
        rows.append({"phase": name, "scheduled s": f"{ph['start_s']:.2f} - {ph['end_s']:.2f}",
                     "requests": ph["requests"], "ok": ph["ok"], "errors": ph["errors"], "degraded": ph["degraded"],
                     "rejected": ph["rejected"], "p50 ms": "-" if ph["p50_ms"] is None else f"{ph['p50_ms']:,.2f}",
                     "p99 ms": _star(ph["p99_ms"], ph["ok"]), "max ms": "-" if ph["max_ms"] is None else f"{ph['max_ms']:,.1f}",
                     "503 p99 ms": _star(ph["rejected_p99_ms"], ph["rejected"]), "cache hits": ph["cache_hits"]})
    return pd.DataFrame(rows).to_markdown(index=False) if rows else ""


def _load_line(result: dict[str, Any]) -> str:
    gen, cap = result.get("generator") or {}, result.get("capacity")
    line = f"Load: {result.get('rate_per_s') or 0:,.1f} requests/s for {result.get('duration_s')} s"
    ok_rps = (cap or {}).get("ok_rps") or (cap or {}).get("rps")
    if ok_rps:
        line += (f" ({result.get('rate_per_s', 0) / ok_rps:.0%} of the capacity: {ok_rps:,.1f} ok answers/s at "
                 f"{cap['users']} closed-loop users of {cap.get('generator', 'locust')}, p99 {cap['p99_ms']:,.1f} ms"
                 f"{', admission control off' if cap.get('admission') is False else ''})")
    if result.get("overload_rate_per_s"):
        line += f"; {result['overload_rate_per_s']:,.1f}/s during the overload"
    return line + (f". Generator: {gen.get('sent', 0):,} sent of {gen.get('scheduled', 0):,} scheduled, "
                   f"{gen.get('late_sends', 0)} late by its own doing ({(gen.get('late_fraction') or 0):.1%}), "
                   f"{gen.get('late_wakeups', 0)} late wake-ups, at most {gen.get('max_send_lag_ms') or 0:.1f} ms "
                   f"late, {'GENERATOR-BOUND' if gen.get('generator_bound') else 'kept its schedule'}.")


def _fault_line(result: dict[str, Any]) -> str:
    fault = result.get("fault") or {}
    if result.get("kind") == "none":
        return (f"No fault (a soak): warm-up until {fault.get('start_s', 0):.0f} s, measured until "
                f"{fault.get('end_s', 0):.0f} s.")
    extra = {k: v for k, v in fault.items() if k not in ("start_s", "end_s", "swap")}
    line = f"Fault `{result.get('kind')}`: from {fault.get('start_s', 0):.2f} s to {fault.get('end_s', 0):.2f} s"
    if extra:
        line += " (" + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in extra.items()) + ")"
    swap = result.get("swap")
    if swap:
        line += f"; the swap to {swap['variant']} took {swap['duration_s']:.2f} s (HTTP {swap['status']})"
    return line + f". Recovery: {_s(result.get('recovery_s'))}; data lost: {result.get('data_lost') or '-'}."


def _rss_rows(result: dict[str, Any]) -> str:
    rows = [{"process": g["role"], "pid": g["pid"],
             "RSS after warm-up MB": "-" if g["rss_start_mb"] is None else f"{g['rss_start_mb']:,.1f}",
             "RSS at the end MB": "-" if g["rss_end_mb"] is None else f"{g['rss_end_mb']:,.1f}",
             "growth": "-" if g["growth"] is None else f"{g['growth']:+.1%}"} for g in result.get("rss") or []]
    return pd.DataFrame(rows).to_markdown(index=False) if rows else ""


def detail_sections(results: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for r in results:
        lines += ["", f"### {r['scenario']}: {r.get('verdict', ERROR)}", "", (r.get("description") or "").strip()]
        if r.get("error"):
            lines += ["", f"**The scenario did not complete:** `{r['error']}`"]
        else:
            lines += ["", _load_line(r), "", _fault_line(r), "", _phase_rows(r)]
        lines += [""] + [f"- {Check(**c).line()}" for c in r.get("checks", [])]
        lines += [f"- note: {n}" for n in r.get("notes", [])]
        lines += [f"- commit {str(r.get('commit') or 'unknown')[:12]}{' (dirty)' if r.get('dirty') else ''}, "
                  f"measured at {r.get('measured_at')}"]
        if r.get("kind") == "none" and r.get("rss"):
            window = r.get("rss_window_s") or 0
            lines += ["", f"RSS of every process: the mean over the first {window:g} s after the warm-up and over the "
                      f"last {window:g} s (sampled every {r.get('rss_every_s')} s):",
                      "", _rss_rows(r)]
    return lines


def write_results(out_dir: Path, profile: str, environment: dict, results: list[dict[str, Any]]) -> dict[str, Path]:
    """Write (or update, scenario by scenario) the run's .json, .csv and .md; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_stem(environment, profile)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("json", "csv", "md")}
    kept: list[dict[str, Any]] = []
    if paths["json"].exists():
        previous = json.loads(paths["json"].read_text())
        mine = {r["scenario"] for r in results}
        kept = [r for r in previous.get("results", []) if r["scenario"] not in mine]
    merged = kept + results
    paths["json"].write_text(json.dumps({"profile": profile, "environment": environment, "results": merged},
                                        indent=1, default=str))
    pd.DataFrame([flat_row(r) for r in merged]).to_csv(paths["csv"], index=False)
    commits = {(str(r.get("commit") or "unknown")[:12], bool(r.get("dirty"))) for r in merged}
    text = [
        f"# Reliability: the fault suite, profile `{profile}`",
        "",
        f"Written by `python loadtest/faults.py --profile {profile}` (loadtest/faults.py; scenarios in "
        f"`loadtest/faults/{profile}.yaml`). Each scenario starts the real service and a real Redis, drives "
        "open-loop Poisson load from the other core, injects one fault at a known time and judges the "
        "figures against the scenario's thresholds.",
        "",
        summary_table(merged),
        "",
        DEFINITIONS,
        "",
        "## Scenarios",
        *detail_sections(merged),
        "",
        "## Environment",
        "",
    ]
    if len(commits) > 1:
        text += ["Rows come from more than one commit (see each scenario's line above).", ""]
    text.append(environment_markdown(environment))
    paths["md"].write_text("\n".join(text) + "\n")
    return paths


def check_dicts(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(c) for c in checks]
