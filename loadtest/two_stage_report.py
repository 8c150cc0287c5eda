"""The two-stage ladder's files: results/two_stage/<cpu>-<isa>[-<profile>].md, .csv, .json and the plot.

Why its own module: loadtest/two_stage.py measures; this only writes, and every sentence of the
summary is derived from the rows (which configuration reaches 95% of the ceiling, what HNSW's ANN
recall is, how much slower Milvus Lite retrieves than faiss), never written by hand.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from export.report import results_stem
from loadtest.report_tables import fmt
from models.environment import environment_markdown

CSV_COLUMNS = ["backend", "index", "k_candidates", "ann_recall_at_k", "retrieval_recall", "ndcg10",
               "ndcg10_ceiling", "p50_ms", "p99_ms", "max_rps_under_slo", "slo_status"]
STAGES = ("parse", "embed", "retrieve", "features", "rank", "total")
CEILING_SHARE = 0.95


def csv_row(row: dict) -> dict:
    slo = row.get("slo") or {}
    return {"backend": row["backend"], "index": row["index"], "k_candidates": row["k_candidates"],
            "ann_recall_at_k": round(row["ann_recall_at_k"], 4), "retrieval_recall": round(row["retrieval_recall"], 4),
            "ndcg10": round(row["ndcg10"], 4), "ndcg10_ceiling": round(row["ndcg10_ceiling"], 4),
            "p50_ms": _round(row.get("p50_ms")), "p99_ms": _round(row.get("p99_ms")),
            "max_rps_under_slo": _round(slo.get("max_rate_per_s"), 1), "slo_status": slo.get("status", "not measured")}


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(float(value), digits)


def findings(rows: list[dict]) -> list[str]:
    """Sentences computed from the rows."""
    out = []
    good = [r for r in rows if r["k_candidates"] <= 1000 and r["ndcg10"] >= CEILING_SHARE * r["ndcg10_ceiling"]]
    if good:
        best = max(good, key=lambda r: ((r.get("slo") or {}).get("max_rate_per_s") or 0, r["ndcg10"]))
        served = bool((best.get("slo") or {}).get("max_rate_per_s"))  # --no-load, or no rate passed: by NDCG@10
        out.append(f"{len(good)} of {len(rows)} configurations reach at least {CEILING_SHARE:.0%} of their ranker's "
                   f"whole-corpus NDCG@10 at K <= 1000; of those, the one with the highest "
                   f"{'throughput under the SLO' if served else 'NDCG@10 (no rate met the SLO, or none was measured)'}"
                   f" is `{best['index']}` at K = {best['k_candidates']}: NDCG@10 {best['ndcg10']:.4f} against "
                   f"a ceiling of {best['ndcg10_ceiling']:.4f} ({best['ndcg10'] / best['ndcg10_ceiling']:.1%}).")
    else:
        out.append(f"No configuration reaches {CEILING_SHARE:.0%} of the ceiling at K <= 1000.")
    hnsw = [r for r in rows if r["index_config"]["kind"] == "hnsw"]
    if hnsw:
        worst = min(hnsw, key=lambda r: r["ann_recall_at_k"])
        out.append(f"HNSW's ANN recall@K against exact search is at least {worst['ann_recall_at_k']:.3f} on every "
                   f"HNSW row (lowest: `{worst['index']}` at K = {worst['k_candidates']}).")
    for row in (r for r in rows if r["backend"] == "milvus-lite"):
        twin = [r for r in rows if r["backend"] == "faiss" and r["index_config"]["kind"] == row["index_config"]["kind"]
                and r["k_candidates"] == row["k_candidates"]] or [
            r for r in rows if r["backend"] == "faiss" and r["index_config"]["kind"] == row["index_config"]["kind"]]
        if twin:
            faiss_ms, lite_ms = twin[0]["offline_retrieve_ms"], row["offline_retrieve_ms"]
            out.append(f"Milvus Lite retrieves in {lite_ms:.1f} ms per query against faiss's {faiss_ms:.2f} ms "
                       f"({row['index_config']['kind']}, K = {row['k_candidates']} against K = "
                       f"{twin[0]['k_candidates']}; offline, in-process): {lite_ms / faiss_ms:.0f}x.")
    return out


def markdown(report: dict, plot: Path | None) -> str:
    rows, env = report["rows"], report["environment"]
    towers = report["towers"]
    ks = [k.split("@")[1] for k in towers["towers"]]
    lines = [
        f"# Two-stage retrieval then ranking: the trade-off ladder ({report['profile']})",
        "",
        f"Written by `python loadtest/two_stage.py --profile {report['profile']}` in {report['elapsed_s']:.0f} s. "
        f"Corpus: {report['corpus']['docs']:,} documents, {sum(report['corpus']['queries'].values()):,} queries "
        f"(models/corpus.py, fingerprint {report['corpus']['fingerprint']}); quality on "
        f"{rows[0]['queries'] if rows else 0} test queries.",
        "",
        "## Findings (computed from the rows below)",
        "",
        *[f"- {line}" for line in findings(rows)],
        "",
        "## The towers alone: recall@K of the relevant set (exact inner-product search, test queries)",
        "",
        "| retriever | " + " | ".join(f"recall@{k}" for k in ks) + " |",
        "| --- | " + " | ".join("---" for _ in ks) + " |",
        "| two towers (models/two_tower.py) | " + " | ".join(f"{v:.3f}" for v in towers["towers"].values()) + " |",
        "| exact search over the true latent factors (ceiling) | "
        + " | ".join(f"{v:.3f}" for v in towers["latent_exact"].values()) + " |",
        "",
        "## The ladder",
        "",
        "| backend | index, ranker | K | ANN recall@K | retrieval recall | NDCG@10 | ceiling | of ceiling | "
        "p50 ms | p99 ms | samples | max req/s under SLO | status | "
        + " | ".join(f"{s} ms" for s in STAGES) + " |",
        "| " + " | ".join("---" for _ in range(13 + len(STAGES))) + " |",
    ]
    for row in rows:
        c, stages = csv_row(row), row.get("stage_ms") or {}
        lines.append(
            f"| {c['backend']} | {_cell(c['index'])} | {c['k_candidates']} | {c['ann_recall_at_k']:.3f} | "
            f"{c['retrieval_recall']:.3f} | {c['ndcg10']:.4f} | {c['ndcg10_ceiling']:.4f} | "
            f"{row['ndcg10'] / row['ndcg10_ceiling']:.1%} | {fmt(c['p50_ms'], 2)} | {fmt(c['p99_ms'], 2)} | "
            f"{row.get('samples') or '-'} | {fmt(c['max_rps_under_slo'], 1)} | {c['slo_status']} | "
            + " | ".join(fmt(stages.get(s), 3) for s in STAGES) + " |")
    generator = next((r.get("generator") for r in rows if r.get("generator")), None)
    late = [r["late_fraction"] for r in rows if r.get("late_fraction") is not None]
    lines += [
        "",
        "How to read it:",
        "- ANN recall@K: the share of the exact top-K (brute force over the same embeddings) the index returned. "
        "Retrieval recall: the share of each query's 100 relevant documents among the K candidates. NDCG@10: the "
        "final top 10, the ideal DCG taken over the whole corpus; the ceiling is the same ranker scoring every "
        "document of the corpus (no retrieval).",
        f"- Load: {generator or 'not measured'} on its own core, the service (plain uvicorn, `--search`, "
        f"result cache off so every request runs the whole pipeline) on the other. Max req/s under SLO: the "
        f"highest Poisson rate whose p99 met {report['config']['slo_p99_ms']:g} ms by MLPerf's early stopping "
        f"(profile `{report['config']['slo_profile']}`); errors and degraded answers fail a step. p50/p99 and "
        "samples are those of that step (or of the lowest rate tried when none passed). "
        + (f"The generator sent at most {max(late):.1%} of a shown step's requests late. " if late else "")
        + search_budget(report["config"], rows),
        f"- Stage columns: the service's own `timings_ms`, mean over {report['config']['probe_requests']} "
        "sequential requests (one in flight, before the SLO search), so that each stage shows its own cost; "
        "`features` is the one MGET of the K candidates' rows from Redis (redis-server on the service's core).",
    ]
    if plot is not None:
        lines += ["", f"![NDCG@10 against p99]({plot.name})"]
    lines += ["", environment_markdown(env), ""]
    return "\n".join(lines)


def search_budget(config: dict, rows: list[dict]) -> str:
    """What time each row's SLO search had: a status of INVALID or LOWER-BOUND may be the budget's doing."""
    budgets = [r["budget_s"] for r in rows if r.get("budget_s")]
    if not config.get("min_steps") or not budgets:
        return f"Each row's search had {config['row_budget_s']:g} s."
    return (f"Each row's search had {min(budgets):.0f} to {max(budgets):.0f} s: the profile's "
            f"{config['row_budget_s']:g} s, stretched to fit {config['min_steps']} steps at 30% of the row's "
            "one-at-a-time rate.")


def _cell(text: str) -> str:
    """A table cell's text with its pipes escaped (row names before 2026-12-01 held " | ")."""
    return text.replace("|", "\\|")


def write_plot(rows: list[dict], path: Path, slo_ms: float) -> Path | None:
    points = [r for r in rows if r.get("p99_ms") is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for i, row in enumerate(points):
        ax.scatter([row["p99_ms"]], [row["ndcg10"]], s=55, color=f"C{i % 10}", edgecolors="black",
                   label=f"{row['index']}, K={row['k_candidates']}")
    ceiling = max(r["ndcg10_ceiling"] for r in rows)
    ax.axhline(ceiling, color="gray", linestyle="--", linewidth=1, label="ceiling (whole corpus)")
    ax.axvline(slo_ms, color="red", linestyle=":", linewidth=1, label=f"SLO p99 {slo_ms:g} ms")
    ax.set_xscale("log")
    ax.set_xlabel("p99 latency at the highest rate under the SLO (ms, log scale)")
    ax.set_ylabel("end-to-end NDCG@10")
    ax.set_title("Two-stage search: quality against tail latency, one point per configuration")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_results(report: dict, out: Path) -> Path:
    """Write the four files; returns the .md path."""
    out.mkdir(parents=True, exist_ok=True)
    name = results_stem(report["environment"], report["profile"])
    plot = write_plot(report["rows"], out / f"{name}.png", report["config"]["slo_p99_ms"])
    with (out / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_row(r) for r in report["rows"])
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = out / f"{name}.md"
    md.write_text(markdown(report, plot))
    return md


def main(argv: list[str] | None = None) -> int:
    """Write the files again from a run's JSON (e.g. after a change of layout): no measurement."""
    import argparse

    parser = argparse.ArgumentParser(description="Render a two-stage ladder's files from its JSON.")
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    print(write_results(json.loads(args.json.read_text()), args.json.parent))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
