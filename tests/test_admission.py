"""Admission control (serve/admission.py): past its bounds /rank answers a fast 503 with Retry-After.

The bounds' logic is tested on the middleware alone (a fake ASGI app is pure logic here); the
behaviour end to end on the real plain-uvicorn server, over real sockets: concurrent long lists past
`--max-inflight` get 503s naming the rule, with Retry-After, counted in /metrics, and the server
answers normally once the burst is over.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from loadtest_rank_app import wait_for_line
from serving_artifacts import build_test_artifacts

from models.paths import REPO_ROOT
from serve.admission import AdmissionControl, AdmissionLimits
from serve.config import ServiceConfig
from serve.redis_server import free_port


class Recorded:
    """What the middleware sent back for one request."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return self.messages[0]["status"]

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _scope(path: str = "/rank") -> dict[str, Any]:
    return {"type": "http", "path": path, "method": "POST", "headers": []}


async def _ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


def test_a_request_queued_behind_a_long_pass_of_the_loop_is_refused_with_retry_after() -> None:
    """Three requests read in one pass of the loop: the first blocks the loop for 30 ms (a long
    list scored inline), so the others have waited past the 20 ms a burst may queue."""
    rejected: list[str] = []

    async def slow_then_ok(scope: dict[str, Any], receive: Any, send: Any) -> None:
        time.sleep(0.03)  # blocks the loop, as inline scoring does
        await _ok(scope, receive, send)

    gate = AdmissionControl(slow_then_ok, limits=lambda: AdmissionLimits(10.0, 20.0), on_reject=rejected.append)

    async def one_pass() -> list[Recorded]:
        answers = [Recorded() for _ in range(3)]
        await asyncio.gather(*(gate(_scope(), _receive, a.send) for a in answers))
        return answers

    first, second, third = asyncio.run(one_pass())
    assert first.status == 200
    assert (second.status, third.status) == (503, 503)
    assert second.headers[b"retry-after"] == b"1"
    assert b"admission_queue_ms" in second.messages[1]["body"] and b'"field":"load"' in second.messages[1]["body"]
    assert rejected == ["queue", "queue"]


def test_a_standing_queue_lowers_the_bound_until_the_loop_catches_up() -> None:
    """Passes of two requests, the first blocking 8 ms: the second waits 8 ms, within the 20 ms a
    burst may queue. Once no pass has been shorter than 5 ms for 20 ms, the queue is standing and
    the bound drops to 5 ms: the second request is refused. A short pass restores the burst bound."""
    rejected: list[str] = []

    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        time.sleep(0.008)
        await _ok(scope, receive, send)

    gate = AdmissionControl(slow, limits=lambda: AdmissionLimits(5.0, 20.0), on_reject=rejected.append)

    async def passes(n: int) -> list[list[int]]:
        statuses = []
        for _ in range(n):
            answers = [Recorded() for _ in range(2)]
            await asyncio.gather(*(gate(_scope(), _receive, a.send) for a in answers))
            await asyncio.sleep(0)
            statuses.append([a.status for a in answers])
        return statuses

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        loaded = await passes(5)  # 5 passes of >= 8 ms: the queue stands after 20 ms
        quiet = Recorded()
        gate.app = _ok
        await gate(_scope(), _receive, quiet.send)  # a short pass: caught up
        await asyncio.sleep(0)
        gate.app = slow
        return loaded, await passes(1)

    loaded, after = asyncio.run(run())
    assert loaded[0] == [200, 200]  # a burst: admitted
    assert loaded[-1] == [200, 503]  # a standing queue: the bound is 5 ms
    assert after == [[200, 200]]
    assert set(rejected) == {"queue"}


def test_an_idle_loop_is_not_a_standing_queue() -> None:
    """At a low rate the loop sits idle between passes for longer than the interval: a pass of two
    requests after that is a burst (bound 20 ms), not a standing queue (5 ms)."""
    async def slow(scope: dict[str, Any], receive: Any, send: Any) -> None:
        time.sleep(0.008)
        await _ok(scope, receive, send)

    gate = AdmissionControl(slow, limits=lambda: AdmissionLimits(5.0, 20.0), on_reject=lambda reason: None)

    async def sparse_passes() -> list[list[int]]:
        statuses = []
        for _ in range(3):
            answers = [Recorded() for _ in range(2)]
            await asyncio.gather(*(gate(_scope(), _receive, a.send) for a in answers))
            statuses.append([a.status for a in answers])
            await asyncio.sleep(0.03)  # idle, longer than the interval
        return statuses

    assert asyncio.run(sparse_passes()) == [[200, 200]] * 3


def test_a_new_pass_of_the_loop_starts_a_new_queue() -> None:
    """Requests in separate passes never wait for each other: none is refused however slow each is."""
    gate = AdmissionControl(_ok, limits=lambda: AdmissionLimits(10.0, 15.0), on_reject=lambda reason: None)

    async def separate_passes() -> list[int]:
        statuses = []
        for _ in range(3):
            answer = Recorded()
            await gate(_scope(), _receive, answer.send)
            statuses.append(answer.status)
            time.sleep(0.02)  # longer than both bounds, but between passes
            await asyncio.sleep(0)  # the pass ends: the marker runs
        return statuses

    assert asyncio.run(separate_passes()) == [200, 200, 200]


def test_the_in_flight_bound_refuses_the_request_past_it_and_admits_once_one_finishes() -> None:
    rejected: list[str] = []
    release = None

    async def waits(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await release.wait()
        await _ok(scope, receive, send)

    gate = AdmissionControl(waits, limits=lambda: AdmissionLimits(max_inflight=2), on_reject=rejected.append)

    async def run() -> tuple[list[int], int]:
        nonlocal release
        release = asyncio.Event()
        answers = [Recorded() for _ in range(3)]
        tasks = [asyncio.create_task(gate(_scope(), _receive, a.send)) for a in answers]
        await asyncio.sleep(0.01)
        assert gate.inflight == 2
        release.set()
        await asyncio.gather(*tasks)
        after = Recorded()
        await gate(_scope(), _receive, after.send)
        return [a.status for a in answers], after.status

    statuses, after = asyncio.run(run())
    assert sorted(statuses) == [200, 200, 503] and after == 200
    assert rejected == ["inflight"] and gate.inflight == 0


def test_other_paths_and_a_service_without_admission_are_never_refused() -> None:
    gate = AdmissionControl(_ok, limits=AdmissionLimits, on_reject=lambda reason: None)
    health = AdmissionControl(_ok, limits=lambda: AdmissionLimits(0.001, 0.001, 1), on_reject=lambda reason: None)

    async def run() -> list[int]:
        answers = [Recorded() for _ in range(3)]
        await asyncio.gather(*(gate(_scope(), _receive, a.send) for a in answers))
        probe = Recorded()
        health.inflight = 5
        await health(_scope("/readyz"), _receive, probe.send)
        return [a.status for a in answers] + [probe.status]

    assert asyncio.run(run()) == [200, 200, 200, 200]


def test_derived_bounds() -> None:
    assert ServiceConfig().inflight_bound == 64
    assert ServiceConfig(inference_workers=2).inflight_bound == 128
    assert ServiceConfig(topology="split").inflight_bound is None
    assert ServiceConfig(max_inflight=3).inflight_bound == 3
    assert ServiceConfig(replicas=2, ingress_max_ongoing_requests=64).queued_requests == 128
    assert ServiceConfig(max_queued_requests=5).queued_requests == 5


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


def test_real_server_sheds_a_burst_past_max_inflight_with_fast_503s(manifest: Path) -> None:
    """Plain uvicorn, long lists in the thread pool (`--inline-max-docs 0`), `--max-inflight 1`:
    a burst of concurrent requests on separate connections gets 200s and 503s only (never a 5xx
    other than the refusal, never a dropped connection); every 503 has Retry-After and names the
    rule; /metrics counts them; and a request after the burst is answered."""
    port = free_port()
    cmd = [sys.executable, "serve/uvicorn_server.py", "--manifest-path", str(manifest), "--variant", "onnx-fp32",
           "--port", str(port), "--inline-max-docs", "0", "--max-inflight", "1"]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(3)
    n_features = json.loads(manifest.read_text())["model"]["n_features"]
    body = {"query_id": "burst", "doc_ids": list(range(2000)),
            "features": rng.normal(size=(2000, n_features)).round(3).tolist()}

    async def burst(n: int) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await asyncio.gather(*(client.post(f"{url}/rank", json=body) for _ in range(n)))

    try:
        wait_for_line(proc, "READY", lines, timeout_s=120)
        statuses: list[int] = []
        refusals: list[httpx.Response] = []
        for _ in range(5):  # bounded: a burst the server happens to read one request at a time has no refusal
            answers = asyncio.run(burst(12))
            statuses += [a.status_code for a in answers]
            refusals += [a for a in answers if a.status_code == 503]
            if refusals:
                break
        assert set(statuses) <= {200, 503}, statuses
        assert refusals, f"no refusal in {len(statuses)} concurrent requests with --max-inflight 1"
        for refusal in refusals:
            assert refusal.headers["retry-after"] == "1"
            assert refusal.json()["field"] == "load" and "max_inflight" in refusal.json()["rule"]
        with httpx.Client(timeout=30) as client:
            assert client.post(f"{url}/rank", json=body).status_code == 200
            metrics = client.get(f"{url}/metrics").text
        assert f'rankserve_rejected_total{{reason="inflight"}} {float(len(refusals))}' in metrics
        assert 'rankserve_requests_total{encoding="unknown",status="503"}' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_start_up_heap_is_frozen_out_of_full_collections() -> None:
    """`freeze_startup_objects`: the objects alive now are never walked by the collector again (a full
    pass over a server's start-up heap was a ~90 ms stall); later garbage is still collected."""
    import gc

    from serve.http_app import freeze_startup_objects

    try:
        freeze_startup_objects()
        assert gc.get_freeze_count() > 1000
        cycle: list[Any] = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1  # new garbage: still collected
    finally:
        gc.unfreeze()
