"""loadtest/cpu_cost.py: CPU per request by process, against a real server in a subprocess."""

from __future__ import annotations

import pytest

from loadtest.cpu_cost import measure, table
from loadtest.payloads import build_payloads


def test_the_server_process_carries_the_requests_cpu(rank_url: str) -> None:
    payloads = build_payloads(10, "json", n_queries=8, seed=0, dataset_n_queries=60)
    result = measure(rank_url, payloads, count=200)
    assert result["requests"] == 200 and result["failures"] == 0
    assert result["p50_ms"] > 0 and result["wall_s"] > 0
    server = [p for p in result["processes"] if "loadtest_rank_app" in p["name"]]
    assert len(server) == 1 and server[0]["cpu_ms_per_request"] > 0
    shares = [p["cpu_ms_per_request"] for p in result["processes"]]
    assert shares == sorted(shares, reverse=True)
    assert result["total_cpu_ms_per_request"] == pytest.approx(sum(shares))
    assert "ms CPU / request" in table(result)


def test_only_loopback_targets() -> None:
    payloads = build_payloads(10, "json", n_queries=2, seed=0, dataset_n_queries=60)
    with pytest.raises(ValueError):
        measure("http://10.0.0.1:8000", payloads, count=1)
