"""Turn one sweep run folder into tables (Markdown, CSV) and plots (PNG).

Why: the raw per-entry files (`raw/<entry>.json`, written by loadtest/sweep.py) hold every trial;
a reader needs one row per optimization with the median of the trials and their spread, the
maximum throughput under the objective, the accuracy the optimization cost (from the variant
manifest snapshotted into the run), the speedup over the baseline server, and where a request's
time went. Everything here reads only the run folder, so a committed run can be re-reported.

    python loadtest/report.py results/runs/<run>        # rewrites summary.md, CSVs and plots
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

PERCENTILES = ("p50", "p95", "p99", "p99.9")
SERVER_PARTS = ("parse", "cache", "queue", "inference", "total")
# Keys a max_throughput_under_slo result may name its answer by (loadtest/runner.py).
SLO_RATE_KEYS = ("max_rate_per_s", "max_rps")


@dataclass
class Run:
    """One run folder, loaded: its environment, sweep, raw entry records and variant manifests."""

    path: Path
    environment: dict
    sweep: dict
    records: list[dict]
    errors: list[dict]
    manifests: dict[str, dict] = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.environment.get("device") or ("gpu" if self.environment.get("gpu") else "cpu")

    @property
    def entry_order(self) -> list[str]:
        names = [e["name"] for e in self.sweep.get("entries", [])]
        recorded = [r["entry"] for r in self.records]
        return names + [n for n in recorded if n not in names]

    @property
    def baseline(self) -> str | None:
        if self.sweep.get("baseline"):
            return self.sweep["baseline"]
        for entry in self.sweep.get("entries", []):
            if entry.get("service", {}).get("server") == "baseline":
                return entry["name"]
        for record in self.records:
            if record.get("service", {}).get("server") == "baseline":
                return record["entry"]
        return None


def load_run(run_dir: Path | str) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: not a run folder")
    env_file, sweep_file = run_dir / "environment.json", run_dir / "sweep.yaml"
    environment = json.loads(env_file.read_text()) if env_file.exists() else {}
    sweep = (yaml.safe_load(sweep_file.read_text()) or {}) if sweep_file.exists() else {}
    records, errors = [], []
    for path in sorted((run_dir / "raw").glob("*.json")):
        data = json.loads(path.read_text())
        (errors if path.name.endswith(".error.json") else records).append(data)
    manifests = {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "manifests").glob("*.json"))}
    return Run(run_dir, environment, sweep, records, errors, manifests)


# ----------------------------------------------------------------------------------------------
# Frames.
# ----------------------------------------------------------------------------------------------
def trials_frame(run: Run) -> pd.DataFrame:
    """One row per trial, nested TrialResult fields flattened (latency_ms.p99 -> p99, ...)."""
    rows = []
    for record in run.records:
        service = record.get("service", {})
        for trial in record.get("trials", []):
            latency = trial.get("latency_ms") or {}
            server = trial.get("server_timings_ms") or {}
            rows.append({
                "entry": record["entry"],
                "device": service.get("device", "cpu"),
                "variant": service.get("variant"),
                "encoding": service.get("encoding", trial.get("encoding")),
                "list_size": int(trial.get("list_size", trial.get("n_docs", 0))),
                "scenario": trial.get("scenario", "steady"),
                "trial": trial.get("trial", 0),
                "requests": trial.get("requests"),
                "failures": trial.get("failures"),
                "error_rate": trial.get("error_rate"),
                "rps": trial.get("rps"),
                "docs_per_s": trial.get("docs_per_s"),
                "cache_hit_ratio": trial.get("cache_hit_ratio"),
                **{p: latency.get(p) for p in (*PERCENTILES, "max", "mean")},
                **{f"server_{part}": server.get(part) for part in SERVER_PARTS},
            })
    columns = ["entry", "device", "variant", "encoding", "list_size", "scenario", "trial", "requests", "failures",
               "error_rate", "rps", "docs_per_s", "cache_hit_ratio", *PERCENTILES, "max", "mean",
               *(f"server_{part}" for part in SERVER_PARTS)]
    return pd.DataFrame(rows, columns=columns)


def slo_rate(result: dict) -> float | None:
    """The maximum throughput a max_throughput_under_slo result found (None when none met the SLO)."""
    for key in SLO_RATE_KEYS:
        value = result.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def slo_frame(run: Run) -> pd.DataFrame:
    rows = []
    for record in run.records:
        for result in record.get("slo", []):
            rows.append({"entry": record["entry"], "device": record.get("service", {}).get("device", "cpu"),
                         "list_size": int(result.get("list_size", result.get("n_docs", 0))),
                         "max_rps_under_slo": slo_rate(result),
                         "slo_status": result.get("status", result.get("verdict")),
                         "slo_p99_ms": result.get("slo_p99_ms")})
    return pd.DataFrame(rows, columns=["entry", "device", "list_size", "max_rps_under_slo", "slo_status",
                                       "slo_p99_ms"])


def slo_curve_frame(run: Run) -> pd.DataFrame:
    """Every rate an SLO search tried: offered rate, achieved requests/s, p50/p99 (a latency-load curve)."""
    rows = []
    for record in run.records:
        for result in record.get("slo", []):
            for step in result.get("trials", []) or []:
                latency = step.get("latency_ms") or {}
                rows.append({"entry": record["entry"], "device": record.get("service", {}).get("device", "cpu"),
                             "list_size": int(result.get("list_size", 0)), "rate_per_s": step.get("rate_per_s"),
                             "rps": step.get("rps"), "p50": latency.get("p50"), "p99": latency.get("p99"),
                             "meets_slo": step.get("meets_slo")})
    return pd.DataFrame(rows, columns=["entry", "device", "list_size", "rate_per_s", "rps", "p50", "p99",
                                       "meets_slo"])


def _variant_info(manifest: dict, variant: str) -> dict:
    """The manifest's record of one variant, whichever of the usual shapes the manifest has."""
    variants = manifest.get("variants", manifest)
    if isinstance(variants, list):
        variants = {v.get("name"): v for v in variants if isinstance(v, dict)}
    info = variants.get(variant) if isinstance(variants, dict) else None
    return info if isinstance(info, dict) else {}


def _first_number(info: dict, keys: tuple[str, ...]) -> float | None:
    for key in keys:
        node: Any = info
        for part in key.split("/"):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, (int, float)) and not isinstance(node, bool):
            return float(node)
    return None


def accuracy_of(run: Run, model: str | None, variant: str | None) -> dict:
    """NDCG@10 retention and file size of a variant, from the manifest snapshotted into the run."""
    if not variant or not run.manifests:
        return {"ndcg10_retention": None, "size_mb": None}
    manifest = run.manifests.get(model) if model else None
    manifest = manifest or next(iter(run.manifests.values()))
    info = _variant_info(manifest, variant)
    retention = _first_number(info, ("ndcg10_retention", "ndcg@10_retention", "retention/ndcg@10",
                                     "accuracy/ndcg10_retention", "accuracy/ndcg@10_retention",
                                     "accuracy/retention"))
    size = _first_number(info, ("size_bytes", "file_size_bytes", "file_size", "bytes"))
    size_mb = _first_number(info, ("size_mb", "file_size_mb"))
    if size_mb is None and size is not None:
        size_mb = size / 2**20
    return {"ndcg10_retention": retention, "size_mb": size_mb}


def summary_frame(run: Run) -> pd.DataFrame:
    """One row per (device, list size, optimization, scenario): trial medians, spread, SLO, accuracy."""
    trials = trials_frame(run)
    if trials.empty:
        return pd.DataFrame()
    keys = ["device", "list_size", "entry", "scenario"]
    metrics = ["rps", "docs_per_s", "error_rate", "cache_hit_ratio", *PERCENTILES]
    grouped = trials.groupby(keys, sort=False)
    summary = grouped[metrics].median()
    summary["trials"] = grouped.size()
    for metric in ("p99", "rps"):
        summary[f"{metric}_min"] = grouped[metric].min()
        summary[f"{metric}_max"] = grouped[metric].max()
    summary = summary.reset_index()
    slo = slo_frame(run)
    if not slo.empty:
        summary = summary.merge(slo[["entry", "device", "list_size", "max_rps_under_slo", "slo_status"]],
                                on=["entry", "device", "list_size"], how="left")
    else:
        summary["max_rps_under_slo"] = None
        summary["slo_status"] = None
    services = {r["entry"]: r.get("service", {}) for r in run.records}
    accuracy = [accuracy_of(run, services[e].get("model"), services[e].get("variant")) for e in summary["entry"]]
    summary["ndcg10_retention"] = [a["ndcg10_retention"] for a in accuracy]
    summary["size_mb"] = [a["size_mb"] for a in accuracy]
    summary["speedup"] = _speedups(summary, run.baseline, "rps")
    summary["slo_speedup"] = _speedups(summary, run.baseline, "max_rps_under_slo")
    order = {name: i for i, name in enumerate(run.entry_order)}
    summary["_order"] = summary["entry"].map(order)
    return summary.sort_values(["device", "list_size", "_order", "scenario"]).drop(columns="_order") \
        .reset_index(drop=True)


def _speedups(summary: pd.DataFrame, baseline: str | None, column: str) -> list[float | None]:
    """`column` over the baseline's, at the same device and list size (the baseline's first scenario)."""
    if baseline is None:
        return [None] * len(summary)
    base_rows = summary[summary["entry"] == baseline].groupby(["device", "list_size"])[column].first()
    speedups = []
    for _, row in summary.iterrows():
        base = base_rows.get((row["device"], row["list_size"]))
        value = row[column]
        ok = base is not None and pd.notna(base) and base > 0 and value is not None and pd.notna(value)
        speedups.append(float(value / base) if ok else None)
    return speedups


def best_under_slo(summary: pd.DataFrame) -> list[dict]:
    """Per device and list size with an SLO search: the best entry and its ratio to the baseline's."""
    best = []
    if summary.empty or summary["max_rps_under_slo"].isna().all():
        return best
    searched = summary[summary["max_rps_under_slo"].notna()]
    for (device, list_size), part in searched.groupby(["device", "list_size"], sort=False):
        row = part.loc[part["max_rps_under_slo"].astype(float).idxmax()]
        best.append({"device": device, "list_size": int(list_size), "entry": row["entry"],
                     "max_rps_under_slo": float(row["max_rps_under_slo"]),
                     "vs_baseline": None if pd.isna(row["slo_speedup"]) else float(row["slo_speedup"])})
    return best


def breakdown_frame(run: Run) -> pd.DataFrame:
    """Where a request's mean time went: client+transport+proxy = client mean - server total."""
    trials = trials_frame(run)
    if trials.empty:
        return pd.DataFrame()
    parts = ["mean", *(f"server_{p}" for p in SERVER_PARTS)]
    keys = ["device", "list_size", "entry", "scenario"]
    means = trials.groupby(keys, sort=False)[parts].median().reset_index()
    known = means[[f"server_{p}" for p in ("parse", "cache", "queue", "inference")]].fillna(0).sum(axis=1)
    means["client_transport_proxy"] = (means["mean"] - means["server_total"]).clip(lower=0)
    means["server_other"] = (means["server_total"] - known).clip(lower=0)
    means = means.rename(columns={"mean": "client_mean"})
    order = {name: i for i, name in enumerate(run.entry_order)}
    means["_order"] = means["entry"].map(order)
    return means.sort_values(["device", "list_size", "_order", "scenario"]).drop(columns="_order") \
        .reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def _label(row: pd.Series, scenarios_per_entry: dict[str, int]) -> str:
    if scenarios_per_entry.get(row["entry"], 1) > 1 or row["scenario"] != "steady":
        return f"{row['entry']} ({row['scenario']})"
    return str(row["entry"])


def _markdown(frame: pd.DataFrame) -> str:
    return frame.to_markdown(index=False) if _has_tabulate() else _plain_markdown(frame)


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


def _plain_markdown(frame: pd.DataFrame) -> str:
    """Markdown without the optional `tabulate` dependency that DataFrame.to_markdown needs."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def results_table(summary: pd.DataFrame) -> pd.DataFrame:
    """The main table's display columns (strings), for one device and list size."""
    counts = summary.groupby("entry")["scenario"].nunique().to_dict()
    table = pd.DataFrame({
        "optimization": [_label(r, counts) for _, r in summary.iterrows()],
        **{f"{p} ms": summary[p].map(lambda v: _fmt(v, 2)) for p in PERCENTILES},
        "req/s": [f"{_fmt(r['rps'])} ({_fmt(r['rps_min'])}-{_fmt(r['rps_max'])})" for _, r in summary.iterrows()],
        "docs/s": summary["docs_per_s"].map(lambda v: _fmt(v, 0)),
        "errors": summary["error_rate"].map(lambda v: "-" if pd.isna(v) else f"{100 * v:.2f}%"),
        "cache hits": summary["cache_hit_ratio"].map(lambda v: "-" if pd.isna(v) else f"{100 * v:.0f}%"),
        "max req/s under SLO": [_slo_cell(r) for _, r in summary.iterrows()],
        "NDCG@10 retention": summary["ndcg10_retention"].map(lambda v: "-" if pd.isna(v) else f"{100 * v:.2f}%"),
        "model MB": summary["size_mb"].map(lambda v: _fmt(v, 2)),
        "speedup": summary["speedup"].map(lambda v: "-" if pd.isna(v) else f"{v:.2f}x"),
    })
    return table


def _slo_cell(row: pd.Series) -> str:
    if pd.isna(row["max_rps_under_slo"]):
        return "none met" if row.get("slo_status") == "INVALID" else "-"
    ratio = "" if pd.isna(row["slo_speedup"]) else f" ({row['slo_speedup']:.1f}x)"
    invalid = " INVALID" if row.get("slo_status") == "INVALID" else ""
    return f"{_fmt(row['max_rps_under_slo'], 0)}{ratio}{invalid}"


def breakdown_table(breakdown: pd.DataFrame) -> pd.DataFrame:
    counts = breakdown.groupby("entry")["scenario"].nunique().to_dict()
    return pd.DataFrame({
        "optimization": [_label(r, counts) for _, r in breakdown.iterrows()],
        "client mean ms": breakdown["client_mean"].map(lambda v: _fmt(v, 2)),
        "client+transport+proxy": breakdown["client_transport_proxy"].map(lambda v: _fmt(v, 2)),
        "parse": breakdown["server_parse"].map(lambda v: _fmt(v, 2)),
        "cache": breakdown["server_cache"].map(lambda v: _fmt(v, 2)),
        "queue": breakdown["server_queue"].map(lambda v: _fmt(v, 2)),
        "inference": breakdown["server_inference"].map(lambda v: _fmt(v, 2)),
        "other server": breakdown["server_other"].map(lambda v: _fmt(v, 2)),
        "server total": breakdown["server_total"].map(lambda v: _fmt(v, 2)),
    })


def summary_markdown(run: Run, summary: pd.DataFrame, breakdown: pd.DataFrame, plots: list[Path]) -> str:
    from models.environment import environment_markdown

    slo = run.sweep.get("slo", {})
    lines = [f"# Sweep `{run.sweep.get('name', run.path.name)}`: {run.path.name}", ""]
    if run.sweep.get("description"):
        lines += [str(run.sweep["description"]).strip(), ""]
    lines += [
        f"Closed loop, {run.sweep.get('users', '?')} users, {run.sweep.get('trials', '?')} trials of "
        f"{run.sweep.get('trial_duration_s', '?')} s per entry and list size: each cell is the median of the "
        "trials, requests/s shows the trials' min-max. Maximum throughput under the objective: open-loop "
        f"search for p99 <= {slo.get('p99_ms', '?')} ms with zero errors (requests are distinct queries, except for a "
        f"cache entry, searched under Zipf(s={run.sweep.get('zipf_s', '?')}) repeat traffic as in its cache-mix scenario). Speedup: requests/s over the baseline "
        f"(`{run.baseline or 'none'}`) at the same list size.",
        "",
    ]
    if summary.empty:
        lines += ["No entry has finished yet.", ""]
    for best in best_under_slo(summary):
        ratio = "" if best["vs_baseline"] is None else f", {best['vs_baseline']:.1f} times the baseline's"
        lines += [f"**Best maximum throughput under the objective ({best['device'].upper()}, "
                  f"{best['list_size']} documents): `{best['entry']}`, {best['max_rps_under_slo']:,.0f} "
                  f"requests/s{ratio}.**", ""]
    groups = [] if summary.empty else summary.groupby(["device", "list_size"], sort=False)
    for (device, list_size), part in groups:
        lines += [f"## {device.upper()}: {list_size} documents per request", "",
                  _markdown(results_table(part)), ""]
        time_part = breakdown[(breakdown["device"] == device) & (breakdown["list_size"] == list_size)]
        lines += [f"### Where the time goes ({device.upper()}, {list_size} documents; mean ms per request)", "",
                  "client+transport+proxy = client mean latency - server total; the server parts come from "
                  "each response's `timings_ms`.", "", _markdown(breakdown_table(time_part)), ""]
    if run.errors:
        lines += ["## Entries that failed", ""]
        lines += [f"- `{e.get('entry')}`: {str(e.get('error', '')).splitlines()[0]}" for e in run.errors]
        lines.append("")
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
# Plots.
# ----------------------------------------------------------------------------------------------
def write_plots(run: Run, summary: pd.DataFrame, trials: pd.DataFrame,
                curves: pd.DataFrame | None = None) -> list[Path]:
    """Per device and list size: latency against throughput, and p50/p99 bars, per optimization."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = run.path / "plots"
    out.mkdir(exist_ok=True)
    written: list[Path] = []
    for (device, list_size), part in summary.groupby(["device", "list_size"], sort=False):
        counts = part.groupby("entry")["scenario"].nunique().to_dict()
        labels = [_label(r, counts) for _, r in part.iterrows()]

        fig, ax = plt.subplots(figsize=(8, 5))
        for index, ((_, row), label) in enumerate(zip(part.iterrows(), labels, strict=True)):
            color = f"C{index % 10}"
            points = trials[(trials["device"] == device) & (trials["list_size"] == list_size)
                            & (trials["entry"] == row["entry"]) & (trials["scenario"] == row["scenario"])]
            ax.scatter(points["rps"], points["p99"], color=color, alpha=0.35, s=18)
            ax.scatter([row["rps"]], [row["p99"]], color=color, s=60, label=label, edgecolors="black")
            ax.scatter([row["rps"]], [row["p50"]], color=color, s=40, marker="v")
            if curves is not None and not curves.empty:
                curve = curves[(curves["device"] == device) & (curves["list_size"] == list_size)
                               & (curves["entry"] == row["entry"])].sort_values("rps")
                if not curve.empty:
                    ax.plot(curve["rps"], curve["p99"], color=color, linestyle="--", marker=".", alpha=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("requests/s")
        ax.set_ylabel("latency, ms (circle p99, triangle p50)")
        slo_ms = run.sweep.get("slo", {}).get("p99_ms")
        if slo_ms:
            ax.axhline(float(slo_ms), color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"objective p99 {slo_ms} ms; dashed: open-loop SLO search (p99)",
                        (0.01, 0.01), xycoords="axes fraction", fontsize=7, color="grey")
        ax.set_title(f"Latency vs throughput, {device.upper()}, {list_size} docs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out / f"latency_vs_throughput_{device}_{list_size}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(part) + 2), 5))
        xs = range(len(part))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], part["p50"], width, label="p50")
        ax.bar([x + width / 2 for x in xs], part["p99"], width, label="p99")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms")
        ax.set_title(f"p50 / p99 per optimization, {device.upper()}, {list_size} docs")
        ax.legend()
        fig.tight_layout()
        path = out / f"latency_bars_{device}_{list_size}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# Entry points.
# ----------------------------------------------------------------------------------------------
def write_report(run_dir: Path | str, plots: bool = True) -> str:
    """Write trials.csv, summary.csv, breakdown.csv, summary.md and plots; return summary.md's text."""
    run = load_run(run_dir)
    trials, summary, breakdown = trials_frame(run), summary_frame(run), breakdown_frame(run)
    trials.to_csv(run.path / "trials.csv", index=False)
    summary.to_csv(run.path / "summary.csv", index=False)
    breakdown.to_csv(run.path / "breakdown.csv", index=False)
    slo_frame(run).to_csv(run.path / "slo.csv", index=False)
    curves = slo_curve_frame(run)
    curves.to_csv(run.path / "slo_steps.csv", index=False)
    written = write_plots(run, summary, trials, curves) if plots and not summary.empty else []
    text = summary_markdown(run, summary, breakdown, written)
    (run.path / "summary.md").write_text(text)
    return text


def headline_table(run_dir: Path | str) -> str:
    """README's headline: per device and list size, each optimization's p50/p99, req/s, SLO throughput."""
    run = load_run(run_dir)
    summary = summary_frame(run)
    if summary.empty:
        return "_No results in this run._\n"
    blocks = []
    for (device, list_size), part in summary.groupby(["device", "list_size"], sort=False):
        counts = part.groupby("entry")["scenario"].nunique().to_dict()
        table = pd.DataFrame({
            "optimization": [_label(r, counts) for _, r in part.iterrows()],
            "p50 ms": part["p50"].map(lambda v: _fmt(v, 2)),
            "p99 ms": part["p99"].map(lambda v: _fmt(v, 2)),
            "req/s": part["rps"].map(lambda v: _fmt(v, 0)),
            "max req/s at SLO": [_slo_cell(r) for _, r in part.iterrows()],
            "NDCG@10 kept": part["ndcg10_retention"].map(lambda v: "-" if pd.isna(v) else f"{100 * v:.1f}%"),
            "speedup": part["speedup"].map(lambda v: "-" if pd.isna(v) else f"{v:.1f}x"),
        })
        blocks.append(f"**{device.upper()}, {list_size} documents per request**\n\n{_markdown(table)}\n")
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
             f"(`python loadtest/report.py {link} --readme README.md`):\n\n{headline_table(run_dir)}{README_END}")
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
