"""Two sweep runs side by side, with ratios, and the changes that are larger than the runs' noise.

Why: a 7% slower p99 between two runs means nothing when the trials of each run already spread by
10%. A change is flagged (as a regression or a gain) only when the two medians differ by more than
either run's own spread (min-max over its trials) and by more than a small relative floor
(`--min-change`, 5% by default, for single-trial runs whose spread is zero).

Both runs are read through the typed records (loadtest/report_frames.py): a latency percentile is
the one over all a row's samples (the trials' histograms merged) and its spread the trials' own
percentiles' min-max; requests/s is the trials' median and min-max. The maximum under the objective
is shown with its status; its spread is its bracket (the search cannot tell rates inside it apart),
and a change is flagged only between two figures that are a service's limit (CONVERGED or
LOWER-BOUND), never a GENERATOR-BOUND or INVALID one.

    python loadtest/compare.py results/runs/<run A> results/runs/<run B> [--fail-on-regression]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from loadtest.report_frames import USABLE_SLO, load_run, row_frame, slo_frame

# metric -> (label, higher is better)
METRICS = {
    "p50": ("p50 ms", False),
    "p99": ("p99 ms", False),
    "rps": ("req/s", True),
    "max_rps_under_slo": ("max req/s under SLO", True),
}
KEYS = ["device", "list_size", "entry", "scenario"]
DEFAULT_MIN_CHANGE = 0.05


def _stats(run_dir: Path | str) -> pd.DataFrame:
    """Per (device, list size, entry, scenario, metric): the row's figure, its spread (min, max) and status."""
    run = load_run(run_dir)
    rows = row_frame(run)
    frames = []
    if not rows.empty:
        for metric in ("p50", "p99", "rps"):
            frames.append(rows[KEYS].assign(metric=metric, median=rows[metric], min=rows[f"{metric}_min"],
                                            max=rows[f"{metric}_max"], status=None))
        slo = slo_frame(run)
        if not slo.empty:
            # One search per entry and list size: set beside the entry's first scenario.
            first_scenario = rows.groupby(["device", "list_size", "entry"], sort=False)["scenario"].first()
            slo = slo.merge(first_scenario.reset_index(), on=["device", "list_size", "entry"], how="left")
            slo["scenario"] = slo["scenario"].fillna("steady")
            value = slo["max_rps_under_slo"].astype(float)
            cap = slo["bracket_cap"].astype(float).where(value.notna())
            frames.append(slo[KEYS].assign(metric="max_rps_under_slo", median=value, min=value,
                                           max=cap.fillna(value), status=slo["slo_status"]))
    if not frames:
        return pd.DataFrame(columns=[*KEYS, "metric", "median", "min", "max", "status"])
    return pd.concat(frames, ignore_index=True)


def verdict(metric: str, a: pd.Series, b: pd.Series, min_change: float = DEFAULT_MIN_CHANGE) -> str:
    """'regression', 'gain' or '' for one metric: flagged only beyond both runs' spread and the floor."""
    if pd.isna(a["median"]) or pd.isna(b["median"]):
        return ""
    if metric == "max_rps_under_slo" and not (a.get("status") in USABLE_SLO and b.get("status") in USABLE_SLO):
        return ""  # a GENERATOR-BOUND or INVALID figure is not the service's limit: no change to flag
    delta = float(b["median"] - a["median"])
    spread = max(float(a["max"] - a["min"]), float(b["max"] - b["min"]))
    floor = abs(float(a["median"])) * min_change
    if abs(delta) <= spread or abs(delta) <= floor:
        return ""
    higher_is_better = METRICS[metric][1]
    better = delta > 0 if higher_is_better else delta < 0
    return "gain" if better else "regression"


def compare_runs(run_a: Path | str, run_b: Path | str, min_change: float = DEFAULT_MIN_CHANGE) -> pd.DataFrame:
    """One row per entry, list size, scenario and metric present in both runs: A, B, B/A, verdict."""
    a, b = _stats(run_a), _stats(run_b)
    merged = a.merge(b, on=[*KEYS, "metric"], suffixes=("_a", "_b"), how="inner")
    rows = []
    for _, row in merged.iterrows():
        sa, sb = (pd.Series({k: row[f"{k}_{x}"] for k in ("median", "min", "max", "status")}) for x in "ab")
        ratio = row["median_b"] / row["median_a"] if row["median_a"] and pd.notna(row["median_a"]) else None
        rows.append({**{k: row[k] for k in KEYS}, "metric": row["metric"],
                     "a_median": row["median_a"], "a_min": row["min_a"], "a_max": row["max_a"],
                     "a_status": row["status_a"], "b_median": row["median_b"], "b_min": row["min_b"],
                     "b_max": row["max_b"], "b_status": row["status_b"],
                     "ratio": ratio, "verdict": verdict(row["metric"], sa, sb, min_change)})
    order = {m: i for i, m in enumerate(METRICS)}
    frame = pd.DataFrame(rows, columns=[*KEYS, "metric", "a_median", "a_min", "a_max", "a_status", "b_median",
                                        "b_min", "b_max", "b_status", "ratio", "verdict"])
    if frame.empty:
        return frame
    frame["_m"] = frame["metric"].map(order)
    entries = [e for e in _entry_order(run_a) + _entry_order(run_b)]
    frame["_e"] = frame["entry"].map({name: i for i, name in reversed(list(enumerate(entries)))})
    return frame.sort_values(["device", "list_size", "_e", "scenario", "_m"]).drop(columns=["_m", "_e"]) \
        .reset_index(drop=True)


def _entry_order(run_dir: Path | str) -> list[str]:
    return load_run(run_dir).entry_order


def _cell(median: float, low: float, high: float, status: str | None = None) -> str:
    """The figure, its spread when it has one, and the SLO search's status beside an SLO figure."""
    status = f" {status}" if isinstance(status, str) and status else ""
    if pd.isna(median):
        return f"-{status}"
    if low == high:
        return f"{median:,.2f}{status}"
    return f"{median:,.2f} [{low:,.2f}-{high:,.2f}]{status}"


def print_comparison(frame: pd.DataFrame, run_a: str, run_b: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"A = {run_a}\nB = {run_b}", show_lines=False)
    for column in ("device", "docs", "optimization", "metric", "A [min-max]", "B [min-max]",
                   "B/A", "change"):
        table.add_column(column, justify="right" if column in ("docs", "B/A") else "left")
    styles = {"regression": "bold red", "gain": "bold green"}
    for _, row in frame.iterrows():
        label = row["entry"] if row["scenario"] == "steady" else f"{row['entry']} ({row['scenario']})"
        table.add_row(
            str(row["device"]), str(row["list_size"]), label, METRICS[row["metric"]][0],
            _cell(row["a_median"], row["a_min"], row["a_max"], row["a_status"]),
            _cell(row["b_median"], row["b_min"], row["b_max"], row["b_status"]),
            "-" if row["ratio"] is None or pd.isna(row["ratio"]) else f"{row['ratio']:.2f}x",
            f"[{styles[row['verdict']]}]{row['verdict']}[/]" if row["verdict"] else "",
        )
    console = Console(width=max(Console().width, 140))
    console.print(table)
    counts = frame["verdict"].value_counts().to_dict() if not frame.empty else {}
    console.print(f"{counts.get('regression', 0)} regression(s), {counts.get('gain', 0)} gain(s) beyond the "
                  "runs' own spread (trial min-max; an SLO maximum's bracket). Latency percentiles are over all a "
                  "row's samples; an SLO maximum is compared only when both are CONVERGED or LOWER-BOUND.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Compare two sweep run folders side by side.")
    parser.add_argument("run_a", type=Path, help="the reference run")
    parser.add_argument("run_b", type=Path, help="the run compared with it")
    parser.add_argument("--min-change", type=float, default=DEFAULT_MIN_CHANGE,
                        help="relative change below which nothing is flagged (default 0.05)")
    parser.add_argument("--fail-on-regression", action="store_true", help="exit 1 when a regression is flagged")
    args = parser.parse_args(argv)
    for run in (args.run_a, args.run_b):
        if not (run / "raw").is_dir():
            parser.error(f"{run}: not a run folder (no raw/ inside)")
    frame = compare_runs(args.run_a, args.run_b, args.min_change)
    if frame.empty:
        print("The two runs have no entry, list size and scenario in common.")
        return 0
    print_comparison(frame, str(args.run_a), str(args.run_b))
    regressed = (frame["verdict"] == "regression").any()
    return 1 if args.fail_on_regression and regressed else 0


if __name__ == "__main__":
    sys.exit(main())
