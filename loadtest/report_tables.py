"""The display tables of loadtest/report.py: cells, marks and the footnotes that explain them.

Frames come from report.py (one row per device, list size, entry and scenario; one row per SLO
search); here they become strings: a percentile over too few samples gets a trailing `*`, a figure
from a generator that may have set the pace gets its flag, the maximum under the objective its status.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from loadtest.records import GENERATOR_CPU_LIMIT, MIN_SAMPLES

PERCENTILES = ("p50", "p95", "p99", "p99.9")

LOW_SAMPLES_MARK = "*"
GENERATOR_NOTE = (
    f"Generator flags: `generator CPU N%`: the closed-loop generator (Locust) used {GENERATOR_CPU_LIMIT:.0%} or more "
    "of its core, so it, not the service, may have set the pace; `GENERATOR-BOUND`: an open-loop generator left "
    "more than 1% of its sends late. Such a row measures the generator as much as the service.")
SLO_STATUS_TEXT = (
    "Each search drives the service with the open-loop generator (loadtest/openloop.py: uvloop + httptools, "
    "requests prepared as bytes beforehand) at Poisson arrivals, so a slow answer does not slow the arrivals. "
    "Each step is count-based (max(min_queries, rate x min_duration_s) arrivals) with a seed of its own, and "
    "passes only with no error, no degraded answer (a fallback answer is a failure, not a fast success) and a p99 "
    "within the objective by MLPerf's early-stopping rule at the profile's confidence (few enough of the samples "
    "over the objective). *Asked* is the best passing step's nominal rate, *offered* what it really scheduled "
    "(arrivals / scheduled duration), *achieved* the answers per second; the bracket is [highest passing rate, "
    "lowest rate that failed or outran the generator]. Statuses: **CONVERGED**: a passing and a failing rate "
    "within the tolerance, the service's limit; **LOWER-BOUND**: the highest passing rate, with no failing rate "
    "close above it (every step passed, or the steps or time ran out), so the limit is at least this; "
    "**GENERATOR-BOUND**: the generator could not keep a higher rate's schedule, so the figure is the "
    "generator's limit, not the service's; **INVALID**: no rate met the objective. Only CONVERGED and "
    "LOWER-BOUND figures are taken as a service's limit (the best entry, the speedup over the baseline); a "
    "GENERATOR-BOUND or INVALID figure never is.")


def low_samples_note() -> str:
    return (f"`{LOW_SAMPLES_MARK}` p99 from fewer than {MIN_SAMPLES['p99']:,} samples, or p99.9 from fewer than "
            f"{MIN_SAMPLES['p99.9']:,}: too few for the percentile to differ from the slowest answers; read it "
            "as (nearly) the maximum.")


def table_notes(part: pd.DataFrame, shown: tuple[str, ...] = PERCENTILES) -> list[str]:
    """The footnotes a table's marks need (too few samples, an untrusted generator, no histograms)."""
    samples = part["samples"].dropna()
    needed = max((MIN_SAMPLES[p] for p in shown if p in MIN_SAMPLES), default=0)
    notes = [low_samples_note()] if (samples < needed).any() else []
    if (part["generator_flag"] != "").any():
        notes.append(GENERATOR_NOTE)
    if not part["merged"].all():
        notes.append("Rows without a sample count come from trials that saved no histogram (a run from before "
                     "records.py): their percentiles are the medians of the trials' percentiles.")
    # Markdown: a line break between notes (two trailing spaces), a blank line after them.
    return [*(f"{n}  " for n in notes[:-1]), *notes[-1:], ""] if notes else []


def markdown(frame: pd.DataFrame) -> str:
    try:
        return frame.to_markdown(index=False)
    except ImportError:  # DataFrame.to_markdown needs the optional `tabulate`
        header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
        rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
        rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
        return "\n".join([header, rule, *rows])


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and pd.isna(value))


def fmt(value: Any, digits: int = 1) -> str:
    if _missing(value):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _rate(value: Any) -> str:
    return "-" if _missing(value) else fmt(value, 0 if abs(value) >= 100 else 1)


def _percent(value: Any, digits: int) -> str:
    return "-" if _missing(value) else f"{100 * value:.{digits}f}%"


def label(row: pd.Series, scenarios_per_entry: dict[str, int]) -> str:
    if scenarios_per_entry.get(row["entry"], 1) > 1 or row["scenario"] != "steady":
        return f"{row['entry']} ({row['scenario']})"
    return str(row["entry"])


def labels(part: pd.DataFrame) -> list[str]:
    counts = part.groupby("entry")["scenario"].nunique().to_dict()
    return [label(r, counts) for _, r in part.iterrows()]


def percentile_cell(row: pd.Series, name: str) -> str:
    """The percentile, with `*` when it rests on fewer samples than it needs to mean anything."""
    low = name in MIN_SAMPLES and not _missing(row["samples"]) and row["samples"] < MIN_SAMPLES[name]
    return fmt(row[name], 2) + (LOW_SAMPLES_MARK if low else "")


def _samples(value: Any) -> str:
    return "-" if _missing(value) else f"{int(value):,}"


def _failures(count: Any, rate: Any) -> str:
    """Failures of one kind: the count, and its share of the requests."""
    if _missing(count):
        return "-"
    return "0" if not count else f"{int(count):,} ({_percent(rate, 2)})"


def slo_cell(row: pd.Series) -> str:
    """The maximum rate under the objective with its status (and the ratio to the baseline's, if usable)."""
    status = row.get("slo_status")
    if _missing(status):
        return "-"
    if _missing(row["max_rps_under_slo"]):
        return str(status)
    ratio = "" if _missing(row["slo_speedup"]) else f" ({row['slo_speedup']:.1f}x)"
    return f"{_rate(row['max_rps_under_slo'])}{ratio} {status}"


def _speedup(value: Any, digits: int) -> str:
    return "-" if _missing(value) else f"{value:.{digits}f}x"


def results_table(part: pd.DataFrame) -> pd.DataFrame:
    """summary.md's main table for one device and list size."""
    rows = list(part.iterrows())
    return pd.DataFrame({
        "optimization": labels(part),
        "samples": [_samples(r["samples"]) for _, r in rows],
        **{f"{p} ms": [percentile_cell(r, p) for _, r in rows] for p in PERCENTILES},
        "req/s (min-max)": [f"{fmt(r['rps'])} ({fmt(r['rps_min'])}-{fmt(r['rps_max'])})" for _, r in rows],
        "p50 @1 conn": [fmt(r.get("probe_p50"), 2) for _, r in rows],
        "Ray cost": [_speedup(r.get("ray_cost"), 2) for _, r in rows],
        "req/s vs uvicorn": [_speedup(r.get("rps_vs_uvicorn"), 2) for _, r in rows],
        "goodput/s": [fmt(r["goodput_per_s"]) for _, r in rows],
        "docs/s": [fmt(r["docs_per_s"], 0) for _, r in rows],
        "errors": [_failures(r["failures"], r["error_rate"]) for _, r in rows],
        "degraded": [_failures(r["degraded"], r["degraded_rate"]) for _, r in rows],
        "cache hits": [_percent(r["cache_hit_ratio"], 0) for _, r in rows],
        "generator": [r["generator"] + (f" [{r['generator_flag']}]" if r["generator_flag"] else "") for _, r in rows],
        "max req/s under SLO": [slo_cell(r) for _, r in rows],
        "NDCG@10 retention": [_percent(r["ndcg10_retention"], 2) for _, r in rows],
        "model MB": [fmt(r["size_mb"], 2) for _, r in rows],
        "speedup": [_speedup(r["speedup"], 2) for _, r in rows],
    })  # fmt: skip


def headline_block(part: pd.DataFrame, title: str) -> str:
    """README's table for one device and list size, with its footnotes."""
    rows = list(part.iterrows())
    table = pd.DataFrame({
        "optimization": labels(part),
        "samples": [_samples(r["samples"]) for _, r in rows],
        "p50 ms": [percentile_cell(r, "p50") for _, r in rows],
        "p99 ms": [percentile_cell(r, "p99") for _, r in rows],
        "req/s": [fmt(r["rps"], 0) + (f" [{r['generator_flag']}]" if r["generator_flag"] else "") for _, r in rows],
        "goodput/s": [fmt(r["goodput_per_s"], 0) for _, r in rows],
        "p50 @1 conn": [fmt(r.get("probe_p50"), 2) for _, r in rows],
        "Ray cost": [_speedup(r.get("ray_cost"), 1) for _, r in rows],
        "errors": [_failures(r["failures"], r["error_rate"]) for _, r in rows],
        "degraded": [_failures(r["degraded"], r["degraded_rate"]) for _, r in rows],
        "max req/s at SLO": [slo_cell(r) for _, r in rows],
        "NDCG@10 kept": [_percent(r["ndcg10_retention"], 1) for _, r in rows],
        "speedup": [_speedup(r["speedup"], 1) for _, r in rows],
    })  # fmt: skip
    notes = table_notes(part, shown=("p50", "p99"))
    return "\n".join([title, "", markdown(table), "", *notes])


def breakdown_table(breakdown: pd.DataFrame) -> pd.DataFrame:
    columns = {"client mean ms": "client_mean", "client+transport+proxy": "client_transport_proxy",
               "parse": "server_parse", "cache": "server_cache", "queue": "server_queue",
               "inference": "server_inference", "other server": "server_other", "server total": "server_total"}
    return pd.DataFrame({"optimization": labels(breakdown),
                         **{name: [fmt(v, 2) for v in breakdown[col]] for name, col in columns.items()}})


def _bracket(row: pd.Series) -> str:
    return f"[{_rate(row['bracket_pass'])}, {_rate(row['bracket_cap'])}]"


def _confidence(row: pd.Series) -> str:
    if _missing(row["confidence"]):
        return "-"
    target = "" if not row["confidence_target"] else f" (target {_percent(row['confidence_target'], 0)})"
    return f"{_percent(row['confidence'], 1)}{target}"


def _steps(row: pd.Series) -> str:
    parts = [f"{row[k]} {name}" for k, name in (("steps_pass", "pass"), ("steps_fail", "fail"),
                                                  ("steps_generator_bound", "generator-bound")) if row[k]]
    return f"{row['steps']} ({', '.join(parts)})" if parts else str(row["steps"])


def slo_table(slo: pd.DataFrame) -> pd.DataFrame:
    """summary.md's table of SLO searches: the maximum, its status and what it rests on."""
    rows = list(slo.iterrows())
    return pd.DataFrame({
        "device": [str(r["device"]).upper() for _, r in rows],
        "entry": [r["entry"] for _, r in rows],
        "docs": [str(r["list_size"]) for _, r in rows],
        "status": [r["slo_status"] for _, r in rows],
        "max rate asked /s": [_rate(r["max_rps_under_slo"]) for _, r in rows],
        "offered /s": [_rate(r["offered_rate_per_s"]) for _, r in rows],
        "achieved /s": [_rate(r["achieved_rate_per_s"]) for _, r in rows],
        "p99 ms": [fmt(r["p99_ms"], 2) for _, r in rows],
        "samples": [_samples(r["samples"]) for _, r in rows],
        "confidence": [_confidence(r) for _, r in rows],
        "bracket /s": [_bracket(r) for _, r in rows],
        "steps": [_steps(r) for _, r in rows],
        "stopped by": [r["stopped_by"] or "-" for _, r in rows],
        "profile": [r["profile"] or "-" for _, r in rows],
        "reasons": [(r["reasons"] or "-").replace("|", "/") for _, r in rows],
    })  # fmt: skip
