"""The cache ladder's files: results/cache/<cpu>-<isa>[-<profile>].md, .csv and .json.

Why its own module: loadtest/cache_ladder.py measures; this only writes. Every sentence of the
summary is computed from the rows: the hit/miss ratios, the server time of a hit, and the model
cost per list above which the cache pays, from this cost model (p50s at one connection):

    with the cache, a request costs  h * H + (1 - h) * (F + C + O)   without it  F + C
    so the cache pays when           C > H - F + O * (1 - h) / h

H: a hit's latency; F: an uncached request's latency less the model's own scoring time (parse,
HTTP, sorting, serializing); C: the model's scoring time per list (the uncached row's mean
`timings_ms.inference`); O: what the cache adds to a miss (key, lookup, store) against the uncached
row; h: the hit ratio.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from export.report import results_stem
from loadtest.report_tables import fmt
from models.environment import environment_markdown

CSV_COLUMNS = ["model", "n_docs", "encoding", "traffic", "hit_ratio_reached", "hit_p50_ms", "hit_samples", "miss_p50_ms",
               "miss_samples", "p99_ms", "hit_over_uncached", "throughput_rps", "throughput_vs_uncached",
               "hit_server_ms", "hit_redis_ms", "inference_ms", "failures", "bytes_per_entry"]


def traffic(row: dict) -> str:
    if row["mode"] == "fixed":
        return f"{row['hit_ratio']:.0%} hits"
    return f"Zipf s={row['zipf_s']:g}" if row["mode"] == "zipf" else "uncached"


def uncached_of(rows: list[dict], row: dict) -> dict | None:
    return next((r for r in rows if r["mode"] == "uncached" and same_list(r, row["model"], row["n_docs"],
                                                                           row["encoding"])), None)


def same_list(row: dict, model: str, n_docs: int, encoding: str = "msgpack") -> bool:
    return row["model"] == model and row["n_docs"] == n_docs and row["encoding"] == encoding


def _p50(latency: dict, kind: str) -> float | None:
    part = latency["latency"][kind]
    return part["p50"] if part["count"] else None


def failures(row: dict) -> int:
    return sum(row[phase]["degraded"] + sum(row[phase]["errors"].values()) for phase in ("latency", "throughput"))


def csv_row(rows: list[dict], row: dict) -> dict[str, Any]:
    lat, tp = row["latency"], row["throughput"]
    base = uncached_of(rows, row)
    uncached_p50 = _p50(base["latency"], "all") if base else None
    hit = _p50(lat, "hit")
    hit_server = lat["server_ms"].get("hit", {})
    miss_server = (base or row)["latency"]["server_ms"].get("miss", {})
    return {
        "model": row["model"], "n_docs": row["n_docs"], "encoding": row["encoding"], "traffic": traffic(row),
        "hit_ratio_reached": round(lat["hit_ratio"], 3),
        "hit_p50_ms": hit, "hit_samples": lat["latency"]["hit"]["count"],
        "miss_p50_ms": _p50(lat, "miss"), "miss_samples": lat["latency"]["miss"]["count"],
        "p99_ms": lat["latency"]["all"]["p99"],
        "hit_over_uncached": hit / uncached_p50 if hit and uncached_p50 else None,
        "throughput_rps": tp["throughput_rps"],
        "throughput_vs_uncached": tp["throughput_rps"] / base["throughput"]["throughput_rps"]
        if base and base["throughput"]["throughput_rps"] else None,
        "hit_server_ms": hit_server.get("total"), "hit_redis_ms": hit_server.get("cache"),
        "inference_ms": miss_server.get("inference"), "failures": failures(row),
        "bytes_per_entry": (row.get("memory") or {}).get("bytes_per_entry"),
    }


def best_hit_row(rows: list[dict], model: str, n_docs: int, encoding: str = "msgpack") -> dict | None:
    """The fixed-ratio row of this model, size and encoding with the most hits (the steadiest hit p50)."""
    fixed = [r for r in rows if r["mode"] == "fixed" and same_list(r, model, n_docs, encoding)]
    return max(fixed, key=lambda r: r["latency"]["latency"]["hit"]["count"], default=None)


def break_even(rows: list[dict], n_docs: int, h: float) -> tuple[float, dict] | None:
    """C* for one list size and hit ratio, from the cheapest model's rows (its overheads are the
    least hidden by scoring), with the terms it came from."""
    candidates = []
    for base in (r for r in rows if r["mode"] == "uncached" and same_list(r, r["model"], n_docs)):
        hits = best_hit_row(rows, base["model"], n_docs)
        half = min((r for r in rows if r["mode"] == "fixed" and same_list(r, base["model"], n_docs)
                    and 0 < r["hit_ratio"] < 1), key=lambda r: abs(r["hit_ratio"] - 0.5), default=None)
        inference = base["latency"]["server_ms"].get("miss", {}).get("inference")
        if hits is None or half is None or inference is None or not _p50(hits["latency"], "hit") \
                or not _p50(half["latency"], "miss"):
            continue
        uncached = _p50(base["latency"], "all")
        terms = {"H": _p50(hits["latency"], "hit"), "F": uncached - inference, "C": inference,
                 "O": max(0.0, _p50(half["latency"], "miss") - uncached), "model": base["model"]}
        candidates.append(terms)
    if not candidates:
        return None
    terms = min(candidates, key=lambda t: t["C"])
    return terms["H"] - terms["F"] + terms["O"] * (1 - h) / h, terms


def handling(server_ms: dict) -> float:
    """A hit's own handling: its server time less the Redis round trip and the body's arrival."""
    return server_ms.get("total", 0) - server_ms.get("cache", 0) - server_ms.get("read", 0)


def findings(report: dict) -> list[str]:
    rows = report["rows"]
    out = []
    lists = dict.fromkeys((r["model"], r["n_docs"], r["encoding"]) for r in rows)
    for model, n_docs, encoding in lists:
        base = next((r for r in rows if r["mode"] == "uncached" and same_list(r, model, n_docs, encoding)), None)
        hits = best_hit_row(rows, model, n_docs, encoding)
        if base is None or hits is None or not _p50(hits["latency"], "hit"):
            continue
        hit, uncached = _p50(hits["latency"], "hit"), _p50(base["latency"], "all")
        s = hits["latency"]["server_ms"].get("hit", {})
        body = "msgpack bodies with features" if encoding == "msgpack" else "feature-store bodies (ids only)"
        out.append(
            f"{model}, {n_docs} documents, {body}: a hit's p50 is {hit:.3f} ms "
            f"(n={hits['latency']['latency']['hit']['count']}, {traffic(hits)}) against {uncached:.3f} ms uncached "
            f"(n={base['latency']['latency']['all']['count']}): **{hit / uncached:.2f}x**. The server's own time "
            f"of a hit: {s.get('total', float('nan')):.3f} ms: the Redis round trip {s.get('cache', 0):.3f} ms, "
            f"receiving the body {s.get('read', 0):.3f} ms, and **{handling(s):.3f} ms** of handling (parsing "
            f"{s.get('parse', 0):.3f}, the key {s.get('key', 0):.3f}, the rest "
            f"{handling(s) - s.get('parse', 0) - s.get('key', 0):.3f}).")
    for n_docs in report["config"]["list_sizes"]:
        for h in (0.5, 0.9):
            found = break_even(rows, n_docs, h)
            if found is None:
                continue
            cost, t = found
            costs = ", ".join(f"{r['model']} {r['latency']['server_ms'].get('miss', {}).get('inference', float('nan')):.2f} ms"
                              for r in rows if r["mode"] == "uncached" and same_list(r, r["model"], n_docs))
            verdict = (f"the cache pays for any model whose scoring takes more than {cost:.2f} ms per list"
                       if cost > 0 else "the cache pays for every model, however cheap its scoring")
            out.append(f"At {n_docs} documents and {h:.0%} hits, {verdict} (H {t['H']:.3f}, F {t['F']:.3f}, "
                       f"O {t['O']:.3f} ms from {t['model']}'s rows; scoring per list: {costs}).")
    busy = [r for r in rows if r["throughput"].get("generator_bound")]
    out.append(f"The generator's core was at least 90% busy in {len(busy)} of {len(rows)} throughput phases"
               + (": their req/s are floors, the generator's limit, not the service's ("
                  + ", ".join(f"{r['model']} {r['n_docs']} {traffic(r)}" for r in busy) + ")." if busy else "."))
    zipf = [r for r in rows if r["mode"] == "zipf"]
    if zipf:
        out.append("The Zipf traffic (s = {:g} over {:,} queries, from a cold cache) reached a hit ratio of {} "
                   "in its latency phase.".format(report["config"]["zipf_s"], report["config"]["zipf_queries"],
                                                   ", ".join(f"{r['latency']['hit_ratio']:.0%} ({r['model']}, "
                                                             f"{r['n_docs']} docs)" for r in zipf)))
    return out


def memory_table(rows: list[dict]) -> list[str]:
    lines = ["| documents | bytes per entry (MEMORY USAGE) | value bytes | maxmemory | policy | entries that fit |",
             "| --- | --- | --- | --- | --- | --- |"]
    seen = set()
    for row in rows:
        memory = row.get("memory") or {}
        if row["n_docs"] in seen or not memory.get("bytes_per_entry"):
            continue
        seen.add(row["n_docs"])
        fit = memory.get("entries_in_maxmemory")
        lines.append(f"| {row['n_docs']} | {memory['bytes_per_entry']:,.0f} | {memory['value_bytes']:,.0f} | "
                     f"{memory['maxmemory_bytes'] / 2**20:,.0f} MiB | {memory['maxmemory_policy']} | "
                     f"{'-' if fit is None else f'{fit:,}'} |")
    return lines


def markdown(report: dict) -> str:
    rows, config = report["rows"], report["config"]
    cores = report["cores"]
    table = [
        "| model | docs | body | traffic | hit ratio | hit p50 ms (n) | miss p50 ms (n) | p99 ms | hit / uncached | "
        f"req/s at {config['connections']} conns | vs uncached | generator CPU | hit server ms | of it Redis | failures |",
        "| " + " | ".join("---" for _ in range(15)) + " |",
    ]
    for row in rows:
        c = csv_row(rows, row)
        table.append(
            f"| {c['model']} | {c['n_docs']} | {c['encoding']} | {c['traffic']} | {c['hit_ratio_reached']:.2f} | "
            f"{fmt(c['hit_p50_ms'], 3)} ({c['hit_samples']}) | {fmt(c['miss_p50_ms'], 3)} ({c['miss_samples']}) | "
            f"{fmt(c['p99_ms'], 2)} | {fmt(c['hit_over_uncached'], 2)} | {c['throughput_rps']:,.0f} | "
            f"{fmt(c['throughput_vs_uncached'], 2)} | {row['throughput']['generator_cpu']:.0%} | {fmt(c['hit_server_ms'], 3)} | {fmt(c['hit_redis_ms'], 3)} | "
            f"{c['failures']} |")
    digests = report["digests_us"]
    names = list(next(iter(digests.values())))
    lines = [
        f"# Where the result cache pays ({report['profile']})",
        "",
        f"Written by `python loadtest/cache_ladder.py --profile {report['profile']}` in {report['elapsed_s']:.0f} s.",
        "",
        "## Findings (computed from the rows below)",
        "",
        *[f"- {line}" for line in findings(report)],
        "",
        "## The ladder",
        "",
        *table,
        "",
        "How to read it:",
        f"- Service: plain uvicorn (serve/uvicorn_server.py), {config['variant']}; body `msgpack`: features in the "
        "body (float32 bytes), the key hashes them; `feature-store`: ids only, features read from Redis on a miss, "
        f"the key holds the store's version; on core(s) {cores['service_cores']}; Redis: {report['redis']}. Generator: {report['generator']}, "
        f"on core(s) {cores['loadgen_cores']}.",
        f"- Latency columns: one connection, at most {config['latency_requests']} requests or "
        f"{config['latency_seconds']:g} s per row; hit and miss p50 split by the answer's `cached` flag, with "
        "their sample counts. p99: all answers of the row. Hit / uncached: the hit p50 over the uncached row's p50.",
        f"- Throughput: {config['connections']} connections for {config['throughput_seconds']:g} s; good answers "
        "per second. Degraded answers and errors count as failures (the failures column, both phases).",
        f"- Fixed hit ratios: {config['warm_queries']} queries are cached before the row; each request is, by a "
        "seeded coin, one of them or a query never sent before. Zipf: the sweep's cache-mix traffic from a cold "
        "cache. The cache is emptied before each row.",
        "- Hit server ms: the service's own `timings_ms.total` of a hit (mean), from the first byte of the body read "
        "to the answer ready; of it Redis: `timings_ms.cache`, the lookup's round trip. Generator CPU: the "
        "generator's share of its core in the throughput phase (90% or more: the req/s may be the generator's).",
        "",
        "## Cache memory",
        "",
        *memory_table(rows),
        "",
        "Entries that fit: maxmemory over bytes per entry, if the cache had Redis to itself (feature-store rows "
        "share it; eviction is LRU over both).",
        "",
        "## The key's digest (median microseconds over one request's ids and float32 features)",
        "",
        "| documents | " + " | ".join(names) + " |",
        "| --- | " + " | ".join("---" for _ in names) + " |",
        *[f"| {n} | " + " | ".join("not installed" if v is None else f"{v:,.1f}" for v in d.values()) + " |"
          for n, d in digests.items()],
        "",
        "Keys use the first (serve/cache_keys.py).",
        "",
        environment_markdown(report["environment"]),
        "",
    ]
    return "\n".join(lines)


def write_results(report: dict, out: Path) -> Path:
    """Write the .md, .csv and .json; returns the .md path."""
    out.mkdir(parents=True, exist_ok=True)
    name = results_stem(report["environment"], report["profile"])
    rows = report["rows"]
    with (out / f"{name}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_row(rows, r) for r in rows)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = out / f"{name}.md"
    md.write_text(markdown(report))
    return md
