"""The PNG plots of a sweep run (loadtest/report.py draws them from its frames).

Per device and list size: closed-loop latency against throughput (each trial, and the row's merged
p99/p50 at its median requests/s), p50/p99 bars per optimization, and the SLO searches' steps as a
latency-load curve: p99 against the *offered* rate (scheduled arrivals / scheduled duration, what the
open-loop generator really sent), each step marked pass, fail or generator-bound.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from loadtest.report_tables import labels

OUTCOME_MARKERS = {"pass": "o", "fail": "x", "generator-bound": "^"}


def write_plots(out: Path, summary: pd.DataFrame, trials: pd.DataFrame, steps: pd.DataFrame | None = None,
                slo_ms: float | None = None) -> list[Path]:
    """Write the plots into `out`; return their paths in reading order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for (device, list_size), part in summary.groupby(["device", "list_size"], sort=False):
        names = labels(part)
        at = trials[(trials["device"] == device) & (trials["list_size"] == list_size)]

        fig, ax = plt.subplots(figsize=(8, 5))
        for index, ((_, row), name) in enumerate(zip(part.iterrows(), names, strict=True)):
            color = f"C{index % 10}"
            points = at[(at["entry"] == row["entry"]) & (at["scenario"] == row["scenario"])]
            ax.scatter(points["rps"], points["p99"], color=color, alpha=0.35, s=18)
            ax.scatter([row["rps"]], [row["p99"]], color=color, s=60, label=name, edgecolors="black")
            ax.scatter([row["rps"]], [row["p50"]], color=color, s=40, marker="v")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("requests/s (closed loop)")
        ax.set_ylabel("latency, ms (circle p99, triangle p50; faint: single trials)")
        _objective(ax, slo_ms)
        ax.set_title(f"Latency vs throughput, {device.upper()}, {list_size} docs")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        written.append(_save(fig, plt, out / f"latency_vs_throughput_{device}_{list_size}.png"))

        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(part) + 2), 5))
        xs = range(len(part))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], part["p50"], width, label="p50")
        ax.bar([x + width / 2 for x in xs], part["p99"], width, label="p99")
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms (all trials' samples)")
        ax.set_title(f"p50 / p99 per optimization, {device.upper()}, {list_size} docs")
        ax.legend()
        written.append(_save(fig, plt, out / f"latency_bars_{device}_{list_size}.png"))

        if steps is not None and not steps.empty:
            curve = steps[(steps["device"] == device) & (steps["list_size"] == list_size) & steps["p99"].notna()]
            if not curve.empty:
                written.append(_slo_plot(plt, curve, slo_ms, out / f"slo_steps_{device}_{list_size}.png",
                                         f"SLO search steps, {device.upper()}, {list_size} docs"))
    return written


def _slo_plot(plt: Any, curve: pd.DataFrame, slo_ms: float | None, path: Path, title: str) -> Path:
    """p99 against the offered rate, one line per entry, each step marked by its outcome."""
    fig, ax = plt.subplots(figsize=(8, 5))
    curve = curve.assign(x=curve["offered_rate_per_s"].fillna(curve["rate_per_s"]))  # asked, where not recorded
    for index, (entry, part) in enumerate(curve.groupby("entry", sort=False)):
        color = f"C{index % 10}"
        part = part.sort_values("x")
        ax.plot(part["x"], part["p99"], color=color, linestyle="--", alpha=0.6,
                label=f"{entry} ({part['status'].iloc[0]})")
        for outcome, marker in OUTCOME_MARKERS.items():
            hit = part[part["outcome"] == outcome]
            ax.scatter(hit["x"], hit["p99"], color=color, marker=marker, s=40)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate, requests/s (open loop, Poisson arrivals)")
    ax.set_ylabel("p99, ms (o pass, x fail, ^ generator-bound)")
    _objective(ax, slo_ms)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, plt, path)


def _objective(ax: Any, slo_ms: float | None) -> None:
    if slo_ms:
        ax.axhline(float(slo_ms), color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"objective p99 {slo_ms} ms", (0.01, 0.01), xycoords="axes fraction", fontsize=7, color="grey")


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
