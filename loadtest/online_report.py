"""The offline-online alignment table (results/online_eval/): written from loadtest/online_eval.py's report.

Every sentence of the findings is computed from the rows: signs, the order of the pairs, and the
factor by which interleaving needed fewer queries than A/B.

    python loadtest/online_report.py results/online_eval/<stem>.json   # re-render, no new measurement
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.report import results_stem
from models.environment import environment_markdown


def _interval(d: dict, digits: int = 4) -> str:
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _needed(section: dict) -> str:
    return f"{section['queries_needed']:,}" if section["queries_needed"] is not None else f"> {section['cap']:,}"


def factor(row: dict) -> float | None:
    """A/B's queries needed over interleaving's (None when either did not get there)."""
    ab, il = row["ab"]["queries_needed"], row["interleaving"]["queries_needed"]
    return ab / il if ab and il else None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def findings(report: dict) -> list[str]:
    rows = report["rows"]
    out = []
    for row in rows:
        gap, ab, il = row["offline"]["gap"], row["ab"], row["interleaving"]
        ab_sig, il_sig = ab["difference"]["significant"], il["win_rate_b"]["significant"]
        ab_agrees = _sign(ab["difference"]["estimate"]) == _sign(gap)
        il_agrees = _sign(il["win_rate_b"]["estimate"] - 0.5) == _sign(gap)
        f = factor(row)
        out.append(
            f"{row['pair']}: offline NDCG@10 gap {gap:+.4f}. A/B: CTR difference {ab['difference']['estimate']:+.4f} "
            f"({'significant' if ab_sig else 'not significant'}, {'same' if ab_agrees else 'opposite'} sign). "
            f"Interleaving: b won {il['win_rate_b']['estimate']:.1%} of {il['win_rate_b']['n']:,} decided queries "
            f"({'significant' if il_sig else 'not significant'}, {'same' if il_agrees else 'opposite'} sign). "
            + (f"Interleaving needed **{f:.1f}x fewer queries** than A/B ({_needed(il)} against {_needed(ab)})."
               if f else f"Queries needed: interleaving {_needed(il)}, A/B {_needed(ab)}."))
    by_gap = [r["pair"] for r in sorted(rows, key=lambda r: abs(r["offline"]["gap"]))]
    by_ab = [r["pair"] for r in sorted(rows, key=lambda r: abs(r["ab"]["difference"]["estimate"]))]
    by_il = [r["pair"] for r in sorted(rows, key=lambda r: abs(r["interleaving"]["win_rate_b"]["estimate"] - 0.5))]
    out.append(f"Order of the pairs by the size of the difference: offline {' < '.join(by_gap)}; "
               f"A/B {'the same' if by_ab == by_gap else ' < '.join(by_ab)}; "
               f"interleaving {'the same' if by_il == by_gap else ' < '.join(by_il)}.")
    failures = sum(r["failures"] for r in rows)
    out.append(f"Failed or degraded answers during the experiments: {failures} (counted, never clicked).")
    return out


def markdown(report: dict) -> str:
    config = report["config"]
    lines = [
        "# Offline-online alignment: A/B and interleaving against the offline NDCG gap", "",
        f"Written by `python loadtest/online_eval.py --impressions {config['impressions_per_method']} "
        f"--click-model {config['click_model']}` in {report['seconds']:.0f} s.", "",
        "## Findings (computed from the rows below)", "",
        *[f"- {line}" for line in findings(report)], "",
        "## The table", "",
        "| pair (a -> b) | NDCG@10 a | NDCG@10 b | offline gap | CTR a | CTR b | A/B CTR difference [95% CI] "
        "| A/B queries needed | interleaving: b's win rate [95% CI] | decided / all | interleaving queries needed "
        "| A/B / interleaving |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        o, ab, il = row["offline"], row["ab"], row["interleaving"]
        w = il["win_rate_b"]
        f = factor(row)
        lines.append(
            f"| {row['pair']} ({row['a']['name']} -> {row['b']['name']}) | {o['ndcg10_a']:.4f} | {o['ndcg10_b']:.4f} "
            f"| {o['gap']:+.4f} | {ab['ctr_a']:.4f} | {ab['ctr_b']:.4f} | {_interval(ab['difference'])} "
            f"| {_needed(ab)} | {w['estimate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] "
            f"| {il['wins_a'] + il['wins_b']:,} / {il['impressions']:,} | {_needed(il)} "
            f"| {f'{f:.1f}x' if f else '-'} |")
    params = config["click_model_parameters"]
    lines += [
        "", "How to read it:",
        f"- Traffic: simulated users (loadtest/online_users.py) searching the {config['test_queries']} test queries "
        f"(first {config['max_docs']} documents each) of the synthetic data, {config['impressions_per_method']:,} "
        f"searches per method per pair, against plain uvicorn (serve/uvicorn_server.py) running the experiment; "
        "the arms were set through `PUT /admin/experiment` between phases, with the server up.",
        f"- Clicks: the {config['click_model']} click model over the true grades ("
        + ", ".join(f"{k} {v}" for k, v in params.items()) + ").",
        "- Offline: mean NDCG@10 of each arm's scorer over the same lists. The gap is b - a.",
        "- A/B: 50/50 by a hash of the user; CTR is clicks per impression (a page of 10). The interval is "
        "Welch's. Interleaving: team-draft of a and b on every page; a query is won by the team with more "
        "clicks; b's win rate is over decided (non-tied) queries, with Wilson's interval.",
        "- Queries needed: the fewest queries (A/B: both arms together) at which the method detects the offline "
        "gap's direction at the 5% level in 80% of experiments, from 200 resamples of the logged queries per "
        "count (a bootstrap power curve; '> N' where it did not within 4x the logged count). For a pair whose "
        "true online difference is nil (int8 against fp32), any count found is chance.",
        "", environment_markdown(report["environment"]),
    ]
    return "\n".join(lines) + "\n"


def write_results(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = results_stem(report["environment"], "quick")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    path = out / f"{stem}.md"
    path.write_text(markdown(report))
    return path


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python loadtest/online_report.py <report.json>", file=sys.stderr)
        return 2
    path = Path(args[0])
    report: dict[str, Any] = json.loads(path.read_text())
    print(f"wrote {write_results(report, path.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
