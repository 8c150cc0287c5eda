"""The offline-online alignment table (results/online_eval/): written from loadtest/online_eval.py's report.

Every sentence of the findings is computed from the rows: signs, the order of the pairs, and the
factor by which interleaving needed fewer queries than A/B.

    python loadtest/online_report.py results/online_eval/<stem>.json   # re-render, no new measurement
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.report import rerender_main, results_stem, write_report_files
from models.environment import environment_markdown


def _interval(d: dict, digits: int = 4) -> str:
    return f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


def _needed(section: dict) -> str:
    return f"{section['queries_needed']:,}" if section["queries_needed"] is not None else f"> {section['cap']:,}"


def factor(ab: dict, il: dict) -> str:
    """A/B's queries needed over interleaving's: 'Nx', '> Nx' when A/B did not get there within its
    cap, '-' when interleaving did not either (or only A/B did: '< Nx')."""
    a, i = ab["queries_needed"], il["queries_needed"]
    if a and i:
        return f"{a / i:.1f}x"
    if i:
        return f"> {ab['cap'] / i:.1f}x"
    if a:
        return f"< {a / il['cap']:.1f}x"
    return "-"


METRICS = {"ctr": "CTR", "rr": "first-click RR"}


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def findings(report: dict) -> list[str]:
    rows = report["rows"]
    out = []
    for row in rows:
        gap, il = row["offline"]["gap"], row["interleaving"]
        il_sig = il["win_rate_b"]["significant"]
        il_agrees = _sign(il["win_rate_b"]["estimate"] - 0.5) == _sign(gap)
        ab_parts = []
        for metric, name in METRICS.items():
            ab = row["ab"][metric]
            ab_parts.append(f"{name} difference {ab['difference']['estimate']:+.4f} "
                            f"({'significant' if ab['difference']['significant'] else 'not significant'}, "
                            f"{'same' if _sign(ab['difference']['estimate']) == _sign(gap) else 'opposite'} sign, "
                            f"queries needed {_needed(ab)})")
        out.append(
            f"{row['pair']}: offline NDCG@10 gap {gap:+.4f}. A/B: " + "; ".join(ab_parts) + ". "
            f"Interleaving: b won {il['win_rate_b']['estimate']:.1%} of {il['win_rate_b']['n']:,} decided queries "
            f"({'significant' if il_sig else 'not significant'}, {'same' if il_agrees else 'opposite'} sign, queries "
            f"needed {_needed(il)}). Queries A/B needs over those interleaving needs: **{factor(row['ab']['ctr'], il)}** "
            f"on CTR, {factor(row['ab']['rr'], il)} on first-click RR ('-': neither got there).")
    by_gap = [r["pair"] for r in sorted(rows, key=lambda r: abs(r["offline"]["gap"]))]
    by_ab = [r["pair"] for r in sorted(rows, key=lambda r: abs(r["ab"]["ctr"]["difference"]["estimate"]))]
    by_il = [r["pair"] for r in sorted(rows, key=lambda r: abs(r["interleaving"]["win_rate_b"]["estimate"] - 0.5))]
    out.append(f"Order of the pairs by the size of the difference (signs aside): offline {' < '.join(by_gap)}; "
               f"A/B on CTR {'the same as offline' if by_ab == by_gap else ' < '.join(by_ab)}; "
               f"interleaving {'the same as offline' if by_il == by_gap else ' < '.join(by_il)}.")
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
        "| pair (a -> b) | NDCG@10 a | NDCG@10 b | offline gap | A/B CTR a / b | A/B CTR difference [95% CI] "
        "| queries needed | A/B first-click RR a / b | RR difference [95% CI] | queries needed "
        "| interleaving: b's win rate [95% CI] | decided / all | queries needed | A/B (CTR) / interleaving |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["rows"]:
        o, ctr, rr, il = row["offline"], row["ab"]["ctr"], row["ab"]["rr"], row["interleaving"]
        w = il["win_rate_b"]
        lines.append(
            f"| {row['pair']} ({row['a']['name']} -> {row['b']['name']}) | {o['ndcg10_a']:.4f} | {o['ndcg10_b']:.4f} "
            f"| {o['gap']:+.4f} | {ctr['a']:.3f} / {ctr['b']:.3f} | {_interval(ctr['difference'])} | {_needed(ctr)} "
            f"| {rr['a']:.3f} / {rr['b']:.3f} | {_interval(rr['difference'])} | {_needed(rr)} "
            f"| {w['estimate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] "
            f"| {il['wins_a'] + il['wins_b']:,} / {il['impressions']:,} | {_needed(il)} | {factor(ctr, il)} |")
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
        "- A/B: 50/50 by a hash of the user; CTR is clicks per impression (a page of 10); first-click RR is "
        "1 / (position of the first click), 0 without a click. Intervals are Welch's. Interleaving: team-draft of a and b on every page; a query is won by the team with more "
        "clicks; b's win rate is over decided (non-tied) queries, with Wilson's interval.",
        "- Queries needed: the fewest queries (A/B: both arms together) at which the method detects the offline "
        "gap's direction at the 5% level in 80% of experiments, from 200 resamples of the logged queries per "
        "count (a bootstrap power curve, up to the logged count and no further: '> N' where it did not get "
        "there). A resampled count near the logged one treats the observed difference as the true one, so for a "
        "pair whose true online difference is nil (int8 against fp32) a count found is chance.",
        "", environment_markdown(report["environment"]),
    ]
    return "\n".join(lines) + "\n"


def write_results(report: dict, out: Path) -> Path:
    return write_report_files(out, results_stem(report["environment"], "quick"), report, lambda: markdown(report))


def main(argv: list[str] | None = None) -> int:
    return rerender_main(argv, write_results, "loadtest/online_report.py")


if __name__ == "__main__":
    raise SystemExit(main())
