"""The drift timeline (results/online_eval/<cpu>-<isa>-drift.{md,json,png}) from loadtest/drift_run.py's report.

Every finding is computed from the timeline: when each shifted feature was first flagged after the
shift began, whether any unshifted feature was ever flagged, and the largest PSI and KS an unshifted
feature reached.

    python loadtest/drift_report.py results/online_eval/<stem>-drift.json   # re-render, no new run
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.report import rerender_main, results_stem, write_report_files
from models.environment import environment_markdown


def first_flagged(timeline: list[dict], feature: int, after: float) -> float | None:
    """Seconds after `after` at which `feature` was first flagged (None: never)."""
    return next((p["t"] - after for p in timeline if p["t"] >= after and feature in p["flagged"]), None)


def summary(report: dict) -> dict[str, Any]:
    config, timeline = report["config"], report["timeline"]
    shifted = set(config["shifted"])
    n_features = len(timeline[0]["psi"]) if timeline else 0
    unshifted = [j for j in range(n_features) if j not in shifted]
    false_flags = sorted({j for p in timeline for j in p["flagged"] if j not in shifted})
    active = [p for p in timeline if p["rows"] >= config["settings"]["min_rows"]]  # polls where flags can rise
    last = timeline[-1] if timeline else {"flagged": [], "psi": [], "ks": []}
    return {
        "detected_after_s": {j: first_flagged(timeline, j, config["shift_at_s"]) for j in config["shifted"]},
        "flagged_before_shift": sorted({j for p in timeline if not p["shifted"] for j in p["flagged"]}),
        "flagged_at_end": last["flagged"],
        "false_flags": false_flags,
        "max_unshifted_psi": max((p["psi"][j] for p in active for j in unshifted), default=0.0),
        "max_unshifted_ks": max((p["ks"][j] for p in active for j in unshifted), default=0.0),
        "all_shifted_flagged": all(j in last["flagged"] for j in config["shifted"]),
    }


def findings(report: dict) -> list[str]:
    s, config = summary(report), report["config"]
    detected = ", ".join(f"{j} after {t:.1f} s" if t is not None else f"{j} never"
                         for j, t in s["detected_after_s"].items())
    return [
        f"The traffic's features {', '.join(map(str, config['shifted']))} shifted at {config['shift_at_s']:.0f} s "
        f"(feature {config['scaled']}: multiplied by 3; the others: mean moved by one training standard deviation).",
        f"Flagged after the shift: {detected}. At the end of the run "
        f"{'every shifted feature was' if s['all_shifted_flagged'] else 'not every shifted feature was'} flagged.",
        f"Unshifted features flagged at any poll: {s['false_flags'] or 'none'}; before the shift: "
        f"{s['flagged_before_shift'] or 'none'}. Once the sample held {config['settings']['min_rows']} rows, the "
        f"largest PSI an unshifted feature reached was "
        f"{s['max_unshifted_psi']:.3f} (threshold {config['settings']['psi_threshold']}); the largest KS: "
        f"{s['max_unshifted_ks']:.3f} (threshold {config['settings']['ks_threshold']}).",
        f"Requests: {report['requests']:,}, failed or degraded: {report['failures']}.",
    ]


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, timeline = report["config"], report["timeline"]
    shifted = set(config["shifted"])
    t = [p["t"] for p in timeline]
    fig, ax = plt.subplots(figsize=(8, 4))
    for j in config["shifted"]:
        ax.plot(t, [p["psi"][j] for p in timeline], label=f"feature {j} (shifted)")
    unshifted = [j for j in range(len(timeline[0]["psi"])) if j not in shifted]
    ax.plot(t, [max(p["psi"][j] for j in unshifted) for p in timeline], "k--", label="max over unshifted")
    ax.axvline(config["shift_at_s"], color="grey", lw=1)
    ax.axhline(config["settings"]["psi_threshold"], color="red", lw=1, ls=":", label="PSI threshold")
    ax.set_xlabel("seconds")
    ax.set_ylabel("PSI against the training split")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(report: dict, png: str) -> str:
    config = report["config"]
    settings = config["settings"]
    rows = ["| s | shifted | rows in the sample | flagged | " + " | ".join(f"PSI f{j}" for j in config["shifted"])
            + " | max PSI unshifted |",
            "| --- | --- | --- | --- | " + " | ".join("---" for _ in config["shifted"]) + " | --- |"]
    shifted = set(config["shifted"])
    for p in report["timeline"]:
        unshifted = max(v for j, v in enumerate(p["psi"]) if j not in shifted)
        rows.append(f"| {p['t']:.1f} | {'yes' if p['shifted'] else 'no'} | {p['rows']:,} | "
                    f"{', '.join(map(str, p['flagged'])) or '-'} | "
                    + " | ".join(f"{p['psi'][j]:.3f}" for j in config["shifted"]) + f" | {unshifted:.3f} |")
    return "\n".join([
        "# Feature drift: the monitor against a shift part-way through", "",
        f"Written by `python loadtest/drift_run.py --seconds {config['seconds']:g} --poll-s {config['poll_s']:g}`.", "",
        "## Findings (computed from the timeline)", "",
        *[f"- {line}" for line in findings(report)], "",
        f"![PSI over time]({png})", "",
        "## The timeline", "", *rows, "",
        "How to read it:",
        "- Service: plain uvicorn (serve/uvicorn_server.py `--drift`), onnx-int8-dynamic, answering the synthetic "
        f"test queries (first {config['max_docs']} documents each, msgpack bodies) one after another.",
        f"- Monitor (serve/drift.py): a {settings['sample_rate']:.0%} share of scored lists adds "
        f"{settings['rows_per_list']} random rows to a sample of at most {settings['window']:,} rows; each poll "
        "(`GET /drift`) compares every feature of the sample with the training split: PSI over the training "
        f"deciles, the two-sample KS statistic, and the share out of the training range. A feature is flagged once "
        f"the sample holds {settings['min_rows']} rows and its PSI passes {settings['psi_threshold']} or its KS "
        f"passes {settings['ks_threshold']}.",
        "", environment_markdown(report["environment"]),
    ]) + "\n"


def write_results(report: dict, out: Path) -> Path:
    stem = results_stem(report["environment"], "quick") + "-drift"
    out.mkdir(parents=True, exist_ok=True)
    png = plot(report, out / f"{stem}.png")
    return write_report_files(out, stem, report, lambda: markdown(report, png.name))


def main(argv: list[str] | None = None) -> int:
    return rerender_main(argv, write_results, "loadtest/drift_report.py")


if __name__ == "__main__":
    raise SystemExit(main())
