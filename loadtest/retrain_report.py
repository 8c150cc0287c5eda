"""The retraining run's report (results/online_eval/<cpu>-<isa>-retrain.{md,json}) from loadtest/retrain_run.py.

    python loadtest/retrain_report.py results/online_eval/<stem>-retrain.json   # re-render, no new run
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.report import rerender_main, results_stem, write_report_files
from models.environment import environment_markdown


def _step(candidate: dict, name: str) -> dict:
    return next((s for s in candidate["steps"] if s["step"] == name), {})


def findings(report: dict) -> list[str]:
    out = []
    for c in report["candidates"]:
        offline, online = _step(c, "offline gate"), _step(c, "online gate")
        trained = _step(c, "trained")
        what = "a deliberately bad candidate (labels shuffled within each query)" if trained.get("shuffle_labels") \
            else "a candidate retrained on the training split plus the logged feedback"
        parts = [f"{c['candidate']}, {what}, against {c['serving']}:"]
        if offline:
            parts.append(f"offline NDCG@10 on the held-out vali split {offline['candidate_ndcg10']:.4f} against "
                         f"{offline['serving_ndcg10']:.4f};")
        if online:
            w = online["win_rate"]
            parts.append(f"interleaving win rate {w['estimate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] over "
                         f"{w['n']:,} decided queries;")
        parts.append("**promoted**." if c["promoted"] else f"**refused at the {c['refused_at']} gate**: {c['reason']}.")
        out.append(" ".join(parts))
    t = report["traffic"]
    switches = ", ".join(f"{name} from {s:.0f} s" for s, name in t["models"])
    out.append(f"Background traffic during the whole run: {t['requests']:,} requests, **{t['failures']} failed or "
               f"degraded**; the model that answered: {switches}.")
    return out


def markdown(report: dict) -> str:
    lines = ["# Retraining: a good candidate promoted, a bad one refused, under traffic", "",
             f"Written by `python loadtest/retrain_run.py --feedback-impressions "
             f"{report['config']['feedback_impressions']} --seconds {report['config']['train_seconds']:g}` in "
             f"{report['seconds']:.0f} s.", "",
             "## Findings (computed from the run's log)", "", *[f"- {line}" for line in findings(report)], "",
             "## Each candidate's steps", ""]
    for c in report["candidates"]:
        lines += [f"### {c['candidate']}", "", "| step | figures |", "| --- | --- |"]
        for step in c["steps"]:
            figures = {k: v for k, v in step.items() if k != "step"}
            lines.append(f"| {step['step']} | `{json.dumps(figures, default=str)}` |")
        lines.append("")
    lines += ["How to read it: the steps are models/retrain.py's (feedback to labels, training, export with the "
              "accuracy gate, the offline gate on the vali split with its tolerance, the online interleaving gate "
              "on the running service, the swap by `POST /admin/model`). Background traffic: the test queries sent "
              "one after another from a thread for the whole run; an error or a degraded answer is a failure.",
              "", environment_markdown(report["environment"])]
    return "\n".join(lines) + "\n"


def write_results(report: dict, out: Path) -> Path:
    stem = results_stem(report["environment"], "quick") + "-retrain"
    return write_report_files(out, stem, report, lambda: markdown(report))


def main(argv: list[str] | None = None) -> int:
    return rerender_main(argv, write_results, "loadtest/retrain_report.py")


if __name__ == "__main__":
    raise SystemExit(main())
