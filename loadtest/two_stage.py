"""The two-stage trade-off ladder: index type x K candidates x ranker precision -> recall, NDCG@10, latency.

    python loadtest/two_stage.py [--profile quick|full]

For each row: the offline quality of the configuration (loadtest/two_stage_quality.py, on a sample
of test queries), then the served pipeline: plain uvicorn with `--search` (serve/search.py) on the
service's core, result cache off (every request runs the whole pipeline), loaded by the open-loop
generator on the other core, whose SLO search (loadtest/runner.py: count-based Poisson steps, p99
by MLPerf's early stopping, errors and degraded answers fail a step) gives the maximum throughput
under p99 <= `slo_p99_ms`; p50/p99 are those of the best passing step, and the per-stage means are the
service's own `timings_ms` over sequential requests (one in flight) before the search. Writes
results/two_stage/<cpu>-<isa>[-<profile>].md, .csv (exactly the issue's columns), .json and
the plot NDCG@10 against p99, one point per row.

Needs: `python models/two_stage.py` (towers and ranker) and `python export/build_index.py --all`
(missing indexes are built here too).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import msgpack
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadtest.two_stage_report import STAGES  # noqa: E402
from models.corpus import load_or_make  # noqa: E402
from models.paths import RESULTS, two_stage_dir  # noqa: E402
from serve.index_config import IndexConfig  # noqa: E402

RANKER_MODEL = "two-stage-mlp"
PORT = 8031


class LadderRow(BaseModel):
    """One configuration: the index (serve's IndexConfig), K, and the ranker's variant."""

    model_config = ConfigDict(extra="forbid")
    index: IndexConfig
    k_candidates: int = Field(ge=1)
    variant: str = "onnx-int8-dynamic"
    load: bool = Field(True, description="False: offline figures only (quality, in-process retrieval ms), not served")

    @property
    def name(self) -> str:
        precision = "fp32" if "fp32" in self.variant else "int8"
        return f"{self.index.label}, {precision} ranker"


class LadderProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: list[LadderRow]
    queries: int = Field(60, ge=1, description="test queries in the offline sample (the ceiling ranks the whole "
                                               "corpus for each: ~0.3 s a query with the int8 ranker)")
    slo_p99_ms: float = 50.0
    slo_profile: str = "quick"
    row_budget_s: float = Field(30.0, gt=0, description="time for one row's SLO search")
    min_steps: int = Field(0, ge=0, description="stretch a row's budget to fit this many SLO steps at 30% of its "
                                                "one-at-a-time rate: a count-based step at a low rate is long (2,000 "
                                                "requests at 24/s take 83 s), so slow rows would end unbracketed")
    probe_requests: int = Field(30, ge=1, description="sequential requests whose timings give the stage means")
    load: bool = Field(True, description="False: offline quality only (no service, no load generator)")


def _rows(indexes: list[IndexConfig], ks: list[int], variant: str = "onnx-int8-dynamic",
          load: bool = True) -> list[LadderRow]:
    return [LadderRow(index=i, k_candidates=k, variant=variant, load=load) for i in indexes for k in ks]


FLAT, HNSW, IVFPQ = IndexConfig(kind="flat"), IndexConfig(kind="hnsw"), IndexConfig(kind="ivfpq")
MILVUS_HNSW, MILVUS_FLAT = IndexConfig(backend="milvus", kind="hnsw"), IndexConfig(backend="milvus", kind="flat")
PROFILES = {
    # make lab: the short ladder (about 2 minutes: 10 s SLO searches, so max req/s are often LOWER-BOUND;
    # Milvus Lite's flat index, whose build takes seconds where its HNSW takes half a minute, offline only:
    # its ms per query against faiss's, not its served latency, which the full profile measures)
    "quick": LadderProfile(rows=[*_rows([HNSW], [100, 300, 1000]), *_rows([FLAT, IVFPQ], [300]),
                                 *_rows([HNSW], [1000], "onnx-fp32"), *_rows([MILVUS_FLAT], [100], load=False)],
                           queries=30, row_budget_s=10.0),
    "full": LadderProfile(
        rows=[*_rows([FLAT, HNSW, IVFPQ, IndexConfig(kind="ivfpq", refine_factor=4)], [100, 300, 1000]),
              *_rows([HNSW], [100, 300, 1000], "onnx-fp32"), *_rows([MILVUS_HNSW, MILVUS_FLAT], [100, 300, 1000])],
        queries=200, slo_profile="full", row_budget_s=90.0, probe_requests=60, min_steps=3),
}


def search_payloads(attributes: np.ndarray, k: int, k_candidates: int):
    """One msgpack /search body per query, its query id carrying the generator's nonce."""
    from loadtest.payloads import NONCE_WIDTH, Payload, PayloadSet

    payloads = []
    for i, row in enumerate(attributes):
        query_id = f"ts-{i}-" + "0" * NONCE_WIDTH
        body = msgpack.packb({"query_id": query_id, "query": {"attributes": row.tolist()}, "k": k,
                              "candidates": k_candidates}, use_bin_type=True)
        offset = body.index(query_id.encode()) + len(query_id) - NONCE_WIDTH
        payloads.append(Payload(query_id, body, "application/msgpack", k, offset))
    return PayloadSet(payloads, "msgpack", meta={"path": "/search", "k": k, "candidates": k_candidates})


def probe_stages(url: str, payloads, n: int) -> dict[str, float]:
    """Mean ms per stage of `n` sequential requests (one in flight): each stage's own cost, with no
    other request's work on the event loop counted in it (under load an awaited stage's wall time
    also holds the other requests the loop ran meanwhile)."""
    import httpx

    totals: dict[str, float] = {}
    with httpx.Client(timeout=30) as client:
        for i in range(n + 3):
            p = payloads.payloads[i % len(payloads)]
            answer = client.post(f"{url}/search", content=p.with_nonce(10**9 + i),
                                 headers={"Content-Type": p.content_type})
            answer.raise_for_status()
            if i >= 3:  # the first requests warm the connection and the code paths
                for stage, ms in answer.json()["timings_ms"].items():
                    totals[stage] = totals.get(stage, 0.0) + ms
    return {stage: totals.get(stage, 0.0) / n for stage in STAGES}


def serve_and_load(row: LadderRow, profile: LadderProfile, attributes: np.ndarray, redis_url: str,
                   out_dir: Path) -> dict:
    """Start the service for `row`, measure its stages one request at a time, search its maximum rate
    under the SLO (starting at 60% of the one-at-a-time rate), stop it."""
    from loadtest.runner import max_throughput_under_slo
    from loadtest.services import UvicornServer, plan_cores
    from loadtest.sweep_config import ServiceSpec

    spec = ServiceSpec(server="uvicorn", encoding="msgpack", port=PORT, cache=False, search=True,
                       search_index=row.index, search_variant=row.variant, search_model=RANKER_MODEL)
    cores = plan_cores()
    payloads = search_payloads(attributes, 10, row.k_candidates)
    service = UvicornServer(spec).start(out_dir / f"service-{row.k_candidates}.log", cores=cores,
                                        redis_url=redis_url, timeout_s=120)
    try:
        stages = probe_stages(service.url, payloads, profile.probe_requests)
        start_rate = max(1.0, 0.6 * 1000.0 / stages["total"])
        if stages["total"] > profile.slo_p99_ms:  # slower than the objective alone: one short trial
            slow_rate = max(0.2, 0.3 * 1000.0 / stages["total"])
            return {"stage_ms": stages, **one_trial(service.url, payloads, slow_rate, profile, out_dir, cores)}
        budget = row_budget(profile, stages["total"])
        slo = max_throughput_under_slo(
            service.url, payloads, profile.slo_p99_ms, profile=profile.slo_profile, start_rate_per_s=start_rate,
            time_budget_s=budget, out_dir=out_dir, tolerance=0.15,
            cpus=cores["loadgen_cores"] if cores["pinned"] else None, expected_latency_ms=stages["total"])
    finally:
        service.stop()
    passing = [s for s in slo.steps if s["outcome"] == "pass"]
    tried = passing or slo.steps
    if not tried:
        return {"slo": slo.to_dict(), "stage_ms": stages, "budget_s": budget}
    shown = max(tried, key=lambda s: s["rate_per_s"]) if passing else min(tried, key=lambda s: s["rate_per_s"])
    trial = shown["trial"]
    return {"slo": slo.to_dict(), "stage_ms": stages, "budget_s": budget, "p50_ms": trial["latency_ms"].get("p50"),
            "p99_ms": trial["latency_ms"].get("p99"), "samples": trial["latency_ms"].get("count"),
            "at_rate_per_s": shown["rate_per_s"], "generator": trial.get("generator"),
            "late_fraction": trial.get("late_fraction"), "generator_bound": trial.get("generator_bound")}


def run(profile_name: str, out: Path | None = None, *, load: bool = True, log=print) -> Path:
    from loadtest.two_stage_quality import QuerySample, ceiling, evaluate, exact_top
    from models.environment import collect_environment
    from models.two_stage import TwoStageArtifacts
    from serve.redis_server import redis_url_or_embedded
    from serve.search_pipeline import SearchPipeline, index_dir
    from serve.vector_index import ensure_index

    profile = PROFILES[profile_name].model_copy(update={"load": load})
    started = time.perf_counter()
    directory = two_stage_dir()
    if not (directory / "towers.json").is_file():
        raise FileNotFoundError(f"{directory}: no towers; run `python models/two_stage.py` first")
    towers = json.loads((directory / "towers.json").read_text())
    described = towers["corpus"]  # the corpus the towers (and so the index and the ranker) were built on
    artifacts = TwoStageArtifacts(load_or_make(directory, described["docs"], sum(described["queries"].values()),
                                               seed=described["seed"]))
    sample = QuerySample.of(artifacts, profile.queries)
    exact = exact_top(artifacts, sample, max(r.k_candidates for r in profile.rows))
    ceilings: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix="rankserve-two-stage-"))
    rows = []
    redis_url, embedded = redis_url_or_embedded(maxmemory="1gb")
    pin_to_service_cores(embedded)
    try:
        if profile.load:
            from serve.feature_store import load_two_stage

            load_two_stage(redis_url)
        for row in profile.rows:
            ensure_index(row.index, artifacts.doc_embeddings, index_dir(directory))
            pipeline = SearchPipeline.load(row.index, variant=row.variant, model=RANKER_MODEL, directory=directory)
            try:
                quality = evaluate(pipeline, artifacts, sample, row.k_candidates, exact)
                if row.variant not in ceilings:  # per ranker, over the same queries as every row's NDCG
                    ceilings[row.variant] = ceiling(pipeline.scorer, artifacts, sample)
            finally:
                pipeline.close()  # Milvus Lite: one process per .db; the service must open it next
            result = {"name": row.name, "backend": "milvus-lite" if row.index.is_lite else row.index.backend,
                      "index": row.name, "k_candidates": row.k_candidates, "variant": row.variant,
                      "index_config": row.index.model_dump(), **quality, "ndcg10_ceiling": ceilings[row.variant]}
            if profile.load and row.load:
                served = serve_and_load(row, profile, corpus_attributes(artifacts, sample), redis_url, work)
                result |= served
            rows.append(result)
            log(f"{row.name:45s} K={row.k_candidates:<5d} ann {result['ann_recall_at_k']:.3f} "
                f"retr {result['retrieval_recall']:.3f} ndcg {result['ndcg10']:.4f}/{result['ndcg10_ceiling']:.4f} "
                f"p99 {result.get('p99_ms') or float('nan'):.2f} ms, max {(result.get('slo') or {}).get('max_rate_per_s')}/s")
    finally:
        if embedded is not None:
            embedded.stop()
    from loadtest.two_stage_report import write_results

    environment = collect_environment()
    report = {"profile": profile_name, "config": profile.model_dump(), "rows": rows, "towers": towers["recall_test"],
              "corpus": artifacts.corpus.describe(), "environment": environment,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "elapsed_s": round(time.perf_counter() - started, 1)}
    return write_results(report, out or RESULTS / "two_stage")


def row_budget(profile: LadderProfile, one_at_a_time_ms: float) -> float:
    """A row's SLO-search budget: the profile's, stretched to `min_steps` steps at 30% of the row's
    one-at-a-time rate (each step's cost as loadtest/runner.py counts it)."""
    from loadtest.runner import SLO_PROFILES, step_cost_s

    if not profile.min_steps:
        return profile.row_budget_s
    slo = SLO_PROFILES[profile.slo_profile]
    low = 0.3 * 1000.0 / one_at_a_time_ms
    return max(profile.row_budget_s,
               profile.min_steps * step_cost_s(low, slo["min_queries"], slo["min_duration_s"]))


def one_trial(url: str, payloads, rate: float, profile: LadderProfile, out_dir: Path, cores: dict) -> dict:
    """A configuration whose time per request alone passes the objective cannot meet it at any rate:
    measure its latency in one open-loop trial at 30% of its one-at-a-time rate, bounded by the row's
    budget, and say why it has no maximum rate."""
    from loadtest.runner import run_open_loop

    count = max(10, min(200, int(rate * profile.row_budget_s * 0.6)))
    trial = run_open_loop(url, payloads, rate, None, max_requests=count, out_dir=out_dir, scenario="slow-row",
                          cpus=cores["loadgen_cores"] if cores["pinned"] else None,
                          slo_ms=profile.slo_p99_ms, expected_latency_ms=1000.0 / rate)
    why = (f"one trial of {count} requests at {rate:.3g}/s: one request at a time already takes "
           f"{0.3 * 1000.0 / rate:.0f} ms, over the {profile.slo_p99_ms:g} ms objective, so no rate can meet it")
    return {"slo": {"status": "INVALID", "max_rate_per_s": None, "reasons": [why]},
            "p50_ms": trial.latency_ms.get("p50"), "p99_ms": trial.latency_ms.get("p99"),
            "samples": trial.latency_ms.get("count"), "at_rate_per_s": rate, "generator": trial.generator,
            "late_fraction": trial.late_fraction, "generator_bound": trial.generator_bound}


def pin_to_service_cores(embedded) -> None:
    """The feature store is a stage of the pipeline: its redis-server shares the service's core(s), so
    that the generator's core runs the generator alone (an unpinned Redis answering 1000-key MGETs on
    it left the generator late on 2-6% of its sends at 60-150 requests/s)."""
    from loadtest.services import plan_cores

    cores = plan_cores()
    if embedded is not None and cores["pinned"] and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(embedded.pid, cores["service_cores"])


def corpus_attributes(artifacts, sample) -> np.ndarray:
    return artifacts.corpus.query_attributes[sample.queries]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The two-stage trade-off ladder.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--no-load", action="store_true", help="offline quality only (no service, no load)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/two_stage)")
    args = parser.parse_args(argv)
    path = run(args.profile, args.out, load=not args.no_load)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
