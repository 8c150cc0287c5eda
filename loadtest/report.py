"""Turn one sweep run folder into tables (Markdown, CSV) and plots (PNG).

Why: the raw per-entry files (`raw/<entry>.json`, EntryRecords written by loadtest/sweep.py) hold
every trial; a reader needs one row per optimization whose latency percentiles rest on all its
trials' samples (their HDR histograms merged, with the sample count beside them), the trials'
requests/s spread, goodput, errors and degraded answers apart, the generator that made the figure
and whether it kept up, the maximum throughput under the objective with its status, the accuracy the
optimization cost (from the variant manifest snapshotted into the run), the speedup over the
baseline server, and where a request's time went. Everything here reads only the run folder through
the typed records (loadtest/records.py), so a committed run can be re-reported.

Split along its seams: loadtest/report_frames.py loads the run and builds the frames,
loadtest/report_tables.py turns them into display tables and footnotes, loadtest/report_plots.py
draws the PNGs; this module writes the files and README's headline block.

    python loadtest/report.py results/runs/<run>                       # summary.md, CSVs and plots
    python loadtest/report.py results/runs/<run> --readme README.md    # README's headline block
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from loadtest.records import LOWER_BOUND
from loadtest.report_frames import (
    Run,
    best_under_slo,
    breakdown_frame,
    load_run,
    row_frame,
    slo_frame,
    slo_steps_frame,
    summary_frame,
    trials_frame,
)
from loadtest.report_tables import (
    SLO_STATUS_TEXT,
    breakdown_table,
    headline_block,
    markdown,
    results_table,
    slo_table,
    table_notes,
)

__all__ = ["Run", "best_under_slo", "breakdown_frame", "headline_table", "load_run", "row_frame", "slo_frame",
           "slo_steps_frame", "summary_frame", "trials_frame", "update_readme", "write_report"]


# ----------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------
def _intro(run: Run) -> list[str]:
    slo = run.sweep.get("slo", {})
    return [
        f"Closed loop (Locust), {run.sweep.get('users', '?')} users, {run.sweep.get('trials', '?')} trials of "
        f"{run.sweep.get('trial_duration_s', '?')} s per entry and list size. A row's latency percentiles are exact "
        "over all its trials' samples (their HDR histograms merged; `samples` is how many they rest on); req/s is "
        "the median of the trials with their min-max; goodput/s counts the answers that are neither errors nor "
        "degraded and within the objective. Errors and degraded answers (the service's fallback, HTTP 200 with "
        "`degraded: true`) are both failures, counted apart. Maximum throughput under the objective: open-loop "
        f"search for p99 <= {slo.get('p99_ms', '?')} ms (profile `{slo.get('profile', '?')}`), shown with its "
        "status (below). Requests are distinct queries, except for a cache entry, searched under "
        f"Zipf(s={run.sweep.get('zipf_s', '?')}) repeat traffic as in its cache-mix scenario. Speedup: requests/s "
        f"over the baseline (`{run.baseline or 'none'}`) at the same list size. p50 @1 conn: the p50 of "
        f"{run.sweep.get('probe_trials', 1)} more closed-loop trial(s) at {run.sweep.get('probe_users', 1)} user (one "
        "request at a time: the per-request cost, Locust's own overhead included). Ray cost: a Ray Serve row's "
        "p50 @1 conn over plain uvicorn's (the `uvicorn` server with the same variant, encoding and cache); req/s "
        "vs uvicorn: its req/s over uvicorn's.", ""]


def summary_markdown(run: Run, summary: pd.DataFrame, breakdown: pd.DataFrame, slo: pd.DataFrame,
                     plots: list[Path]) -> str:
    from models.environment import environment_markdown

    lines = [f"# Sweep `{run.sweep.get('name', run.path.name)}`: {run.path.name}", ""]
    if run.environment.get("cpu"):
        from export.report import isa_slug

        cpu = run.environment["cpu"]
        lines += [f"Machine: {cpu.get('model', 'unknown CPU')}, instruction set **{isa_slug(run.environment)}** "
                  "(it decides which int8 kernels ONNX Runtime can use; results/models/<cpu>-<isa>-<arch>.md has "
                  "this machine's measured int8 and fp32 roofs).", ""]
    if run.sweep.get("description"):
        lines += [str(run.sweep["description"]).strip(), ""]
    lines += _intro(run)
    if summary.empty:
        lines += ["No entry has finished yet.", ""]
    for best in best_under_slo(summary):
        ratio = "" if best["vs_baseline"] is None else f", {best['vs_baseline']:.1f} times the baseline's"
        least = "at least " if best["status"] == LOWER_BOUND else ""
        lines += [f"**Best maximum throughput under the objective ({best['device'].upper()}, "
                  f"{best['list_size']} documents): `{best['entry']}`, {least}{best['max_rps_under_slo']:,.0f} "
                  f"requests/s ({best['status']}){ratio}.**", ""]
    groups = [] if summary.empty else summary.groupby(["device", "list_size"], sort=False)
    for (device, list_size), part in groups:
        lines += [f"## {device.upper()}: {list_size} documents per request", "", markdown(results_table(part)), ""]
        lines += table_notes(part)
        time_part = breakdown[(breakdown["device"] == device) & (breakdown["list_size"] == list_size)]
        lines += [f"### Where the time goes ({device.upper()}, {list_size} documents; mean ms per request)", "",
                  "client+transport+proxy = client mean latency - server total; the server parts come from "
                  "each response's `timings_ms`.", "", markdown(breakdown_table(time_part)), ""]
    if not slo.empty:
        lines += ["## Maximum throughput under the objective", "", SLO_STATUS_TEXT, "", markdown(slo_table(slo)), ""]
        notes = slo[slo["note"].notna() & (slo["note"] != "")].groupby("note", sort=False)["entry"]
        lines += [f"- {note} ({', '.join(f'`{e}`' for e in dict.fromkeys(entries))})" for note, entries in notes]
        lines += [""] if len(notes) else []
    if run.errors:
        lines += ["## Entries that failed", ""]
        lines += [f"- `{e.get('entry')}`: {str(e.get('error', '')).splitlines()[0]}" for e in run.errors] + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots] + [""]
    pinning = run.environment.get("pinning")
    if pinning:
        lines += ["## Environment", "",
                  f"Cores: service on {pinning.get('service_cores')}, load generator on "
                  f"{pinning.get('loadgen_cores')} ({pinning.get('method')}).", ""]
    if run.environment.get("cpu"):
        lines += [environment_markdown(run.environment), ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------
def write_report(run_dir: Path | str, plots: bool = True) -> str:
    """Write trials.csv, summary.csv, breakdown.csv, slo.csv, slo_steps.csv, summary.md and plots."""
    from loadtest.report_plots import write_plots

    run = load_run(run_dir)
    trials, summary, slo, steps = trials_frame(run), summary_frame(run), slo_frame(run), slo_steps_frame(run)
    breakdown = breakdown_frame(run, summary)
    trials.to_csv(run.path / "trials.csv", index=False)
    summary.to_csv(run.path / "summary.csv", index=False)
    breakdown.to_csv(run.path / "breakdown.csv", index=False)
    slo.to_csv(run.path / "slo.csv", index=False)
    steps.to_csv(run.path / "slo_steps.csv", index=False)
    slo_ms = run.sweep.get("slo", {}).get("p99_ms")
    written = write_plots(run.path / "plots", summary, trials, steps, slo_ms) if plots and not summary.empty else []
    text = summary_markdown(run, summary, breakdown, slo, written)
    (run.path / "summary.md").write_text(text)
    return text


def generator_capacity(run: Run, results_dir: Path | None = None) -> dict | None:
    """The open-loop generator's self-test on the run's CPU and ISA (results/loadgen/<cpu>-<isa>-selftest.json)."""
    import json

    from loadtest.selftest import selftest_stem
    from models.paths import RESULTS

    if not run.environment.get("cpu"):
        return None
    path = (results_dir or RESULTS / "loadgen") / f"{selftest_stem(run.environment)}.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    data["path"] = path
    return data


def generators_line(run: Run, relative_to: Path | None = None) -> str:
    """Which generators made the figures, and how fast the open-loop one is on this CPU."""
    slo = run.sweep.get("slo", {})
    line = (f"Generators: closed loop, Locust ({run.sweep.get('users', '?')} users, {run.sweep.get('trials', '?')} "
            f"trials of {run.sweep.get('trial_duration_s', '?')} s per cell; a row's percentiles rest on its "
            "trials' merged histograms); maximum throughput under the objective, open loop (uvloop + httptools, "
            f"Poisson arrivals, count-based steps, p99 by MLPerf's early stopping; profile `{slo.get('profile', '?')}`). "
            "Degraded answers are failures.")
    capacity = generator_capacity(run)
    run_flags = (run.environment.get("cpu") or {}).get("isa_flags")
    test_flags = ((capacity or {}).get("environment", {}).get("cpu") or {}).get("isa_flags")
    if capacity and run_flags and test_flags and sorted(run_flags) != sorted(test_flags):
        # results_stem names the CPU model and ISA level; a self-test from a machine with other ISA flags is not this one's.
        return line + (" The generator's self-test on file was measured on a CPU with other ISA flags, so it is "
                       "not quoted here (`python loadtest/openloop.py --self-test` measures this one).")
    if capacity and capacity.get("max_rate_on_time_per_s"):
        where = capacity["path"]
        if relative_to is not None:
            try:
                where = Path(where).resolve().relative_to(relative_to.resolve())
            except ValueError:
                pass
        line += (f" The open-loop generator's self-test on this CPU kept its schedule up to "
                 f"**{capacity['max_rate_on_time_per_s']:,} requests/s** of 100-document msgpack bodies on one "
                 f"core, adding {max(capacity['added_p50_at_max_ms'], 0.0):.2f} ms to p50 "
                 f"([`{Path(where).name}`]({where}); `python loadtest/openloop.py --self-test`).")
    return line


def headline_table(run_dir: Path | str, relative_to: Path | None = None) -> str:
    """README's headline: which generators, then per device and list size each optimization's figures."""
    run = load_run(run_dir)
    summary = summary_frame(run)
    if summary.empty:
        return "_No results in this run._\n"
    blocks = [generators_line(run, relative_to) + "\n"]
    for (device, list_size), part in summary.groupby(["device", "list_size"], sort=False):
        blocks.append(headline_block(part, f"**{device.upper()}, {list_size} documents per request**"))
    return "\n".join(blocks)


README_START, README_END = "<!-- headline:start -->", "<!-- headline:end -->"


def update_readme(run_dir: Path | str, readme: Path | str) -> None:
    """Replace README's headline block with this run's table, so README's figures come from a run."""
    readme = Path(readme)
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme}: no {README_START} ... {README_END} block to replace")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    run_dir = Path(run_dir)
    try:
        link = run_dir.resolve().relative_to(readme.resolve().parent)
    except ValueError:
        link = run_dir
    block = (f"{README_START}\nFrom the run [`{link}`]({link}/summary.md) "
             f"(`python loadtest/report.py {link} --readme README.md`):\n\n"
             f"{headline_table(run_dir, readme.resolve().parent)}{README_END}")
    readme.write_text(head + block + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write summary.md, CSVs and plots for a sweep run folder.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--headline", action="store_true", help="print README's headline table only")
    parser.add_argument("--readme", type=Path, help="replace this README's headline block with the run's table")
    args = parser.parse_args(argv)
    if args.readme:
        update_readme(args.run_dir, args.readme)
        return 0
    print(headline_table(args.run_dir) if args.headline else write_report(args.run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
