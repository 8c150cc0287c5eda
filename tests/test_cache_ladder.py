"""The cache ladder's parts: the closed loop against a real HTTP server, the traffic of a fixed hit
ratio, and the report's derived sentences against hand-worked figures."""

from __future__ import annotations

import pytest
from loadtest_rank_app import running_rank_app

from loadtest.cache_ladder import FRESH_QUERIES, Traffic
from loadtest.cache_ladder_report import break_even, csv_row, findings, markdown
from loadtest.closed_loop import drive
from loadtest.http_client import PreparedRequest
from loadtest.payloads import NONCE_WIDTH, Payload


def prepared(port: int, n: int = 4, n_docs: int = 3) -> list[PreparedRequest]:
    out = []
    for i in range(n):
        query_id = f"cl-{i}-" + "0" * NONCE_WIDTH
        ids = ", ".join(f'"d{j}"' for j in range(n_docs))
        features = ", ".join("[1.0, 2.0]" for _ in range(n_docs))
        body = f'{{"query_id": "{query_id}", "doc_ids": [{ids}], "features": [{features}]}}'.encode()
        offset = body.index(query_id.encode()) + len(query_id) - NONCE_WIDTH
        out.append(PreparedRequest(Payload(query_id, body, "application/json", n_docs, offset), "127.0.0.1", port))
    return out


def test_fixed_ratio_traffic_repeats_warm_queries_and_never_repeats_fresh_ones() -> None:
    traffic = Traffic(list(range(4)), hit_ratio=0.9, warm=8, seed=3)
    assert traffic.warm_requests() == [(j % 4, j) for j in range(8)]
    drawn = [traffic(i) for i in range(2000)]
    fresh = [nonce for _, nonce in drawn if nonce >= FRESH_QUERIES]
    assert len(fresh) == len(set(fresh))  # a miss is a query never sent before
    assert abs(1 - len(fresh) / 2000 - 0.9) < 0.03
    assert all(nonce < 8 for _, nonce in drawn if nonce < FRESH_QUERIES)  # every repeat is a warm query
    zipf = Traffic(list(range(4)), zipf_s=1.1, zipf_queries=1000, seed=0)
    assert all(0 <= nonce < 1000 and payload == nonce % 4 for payload, nonce in (zipf(i) for i in range(500)))


def test_the_closed_loop_splits_hits_from_misses_and_counts_degraded_answers_as_failures() -> None:
    with running_rank_app() as url:
        port = int(url.rsplit(":", 1)[1])
        requests = prepared(port)
        traffic = Traffic(requests, hit_ratio=0.5, warm=2, seed=1)
        warm = traffic.warm_requests()
        drive(url, lambda i: warm[i], max_requests=len(warm))
        result = drive(url, traffic, connections=2, max_requests=120, max_seconds=20)
    assert result.requests == result.good == 120 and result.degraded == 0 and not result.errors
    hits, misses = result.latency["hit"]["count"], result.latency["miss"]["count"]
    assert hits + misses == 120 and 0.3 < result.hit_ratio < 0.7
    assert result.latency["all"]["count"] == 120 and result.latency["hit"]["p50"] > 0
    assert result.server_ms["hit"]["inference"] == 0.0 and "total" in result.server_ms["miss"]
    assert 0 < result.generator_cpu and result.throughput_rps > 0
    with running_rank_app(degraded=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        degraded = drive(url, Traffic(prepared(port)), max_requests=10, max_seconds=20)
    assert degraded.degraded == 10 and degraded.good == 0 and degraded.latency["all"]["count"] == 0


def phase(p50: dict[str, float], counts: dict[str, int], server: dict[str, dict[str, float]], rps: float) -> dict:
    latency = {k: {"p50": p50.get(k, 0.0), "p99": 2 * p50.get(k, 0.0), "count": counts.get(k, 0)}
               for k in ("all", "hit", "miss")}
    hits = counts.get("hit", 0)
    return {"latency": latency, "server_ms": server, "throughput_rps": rps, "degraded": 0, "errors": {},
            "generator_cpu": 0.5, "generator_bound": False,
            "hit_ratio": hits / max(1, hits + counts.get("miss", 0))}


def row(mode: str, latency: dict, throughput: dict, **extra) -> dict:
    return {"model": "m", "arch": "mlp", "variant": "v", "n_docs": 100, "encoding": "msgpack", "mode": mode,
            "latency": latency, "throughput": throughput, **extra}


@pytest.fixture
def rows() -> list[dict]:
    """Hand-made figures: uncached 2.0 ms (scoring 1.0 ms, so F = 1.0); hits 0.5 ms; a miss with the
    cache 2.3 ms (O = 0.3). At 50% hits the cache pays above C* = 0.5 - 1.0 + 0.3 = -0.2 (always);
    at 90%, above 0.5 - 1.0 + 0.3 / 9 = -0.467."""
    uncached = row("uncached", phase({"all": 2.0, "miss": 2.0}, {"all": 100, "miss": 100},
                                     {"miss": {"inference": 1.0, "total": 1.8}}, 400.0),
                   phase({"all": 2.0}, {"all": 800}, {}, 400.0))
    half = row("fixed", phase({"all": 1.4, "hit": 0.5, "miss": 2.3}, {"all": 100, "hit": 50, "miss": 50},
                              {"hit": {"read": 0.01, "parse": 0.05, "key": 0.01, "cache": 0.2, "total": 0.3}}, 0),
               phase({"all": 1.4}, {"all": 1000}, {}, 600.0), hit_ratio=0.5,
               memory={"bytes_per_entry": 4096.0, "value_bytes": 3000.0, "maxmemory_bytes": 2**28,
                       "maxmemory_policy": "allkeys-lru", "entries_in_maxmemory": 65536})
    return [uncached, half]


def test_break_even_and_the_findings_are_derived_from_the_rows(rows: list[dict]) -> None:
    cost, terms = break_even(rows, 100, 0.5)
    assert terms["H"] == 0.5 and terms["F"] == pytest.approx(1.0) and terms["O"] == pytest.approx(0.3)
    assert cost == pytest.approx(-0.2)
    assert break_even(rows, 100, 0.9)[0] == pytest.approx(0.5 - 1.0 + 0.3 / 9)
    c = csv_row(rows, rows[1])
    assert c["hit_over_uncached"] == pytest.approx(0.25) and c["throughput_vs_uncached"] == pytest.approx(1.5)
    lines = findings({"rows": rows, "config": {"list_sizes": [100], "zipf_s": 1.1, "zipf_queries": 10}})
    # handling: total 0.3 less Redis 0.2 and the body's arrival 0.01
    assert any("**0.25x**" in line and "**0.090 ms** of handling" in line for line in lines)
    assert any("pays for every model" in line for line in lines)


def test_the_markdown_names_generator_cores_and_memory(rows: list[dict], monkeypatch: pytest.MonkeyPatch) -> None:
    report = {"profile": "quick", "rows": rows, "elapsed_s": 1.0, "digests_us": {100: {"xxh3_128": 3.0, "sha256": None}},
              "cores": {"service_cores": [0], "loadgen_cores": [1]}, "redis": "embedded", "generator": "closed loop",
              "config": {"variant": "v", "connections": 8, "latency_requests": 10, "latency_seconds": 1,
                         "throughput_seconds": 1, "warm_queries": 4, "list_sizes": [100], "zipf_s": 1.1,
                         "zipf_queries": 10},
              "environment": None}
    monkeypatch.setattr("loadtest.cache_ladder_report.environment_markdown", lambda env: "environment")
    text = markdown(report)
    assert "| 100 | 4,096 | 3,000 | 256 MiB | allkeys-lru | 65,536 |" in text
    assert "core(s) [1]" in text and "not installed" in text and "closed loop" in text
