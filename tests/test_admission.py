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
import socket
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
from serve.admission import IDLE_GAP_S, MIN_STANDING_REQUESTS, AdmissionControl, AdmissionLimits
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


class Clocks:
    """Wall time and the loop thread's CPU time, moved by hand: `busy` runs on the CPU (inline
    scoring), `idle` sits off it (the loop waiting in its poll)."""

    def __init__(self) -> None:
        self.wall = 100.0
        self.cpu = 10.0

    def busy(self, ms: float) -> None:
        self.wall += ms / 1000
        self.cpu += ms / 1000

    def idle(self, ms: float) -> None:
        self.wall += ms / 1000


def _gate(app: Any, clocks: Clocks, queue_ms: float, interval_ms: float, rejected: list[str],
          standing_ms: float = 50.0) -> AdmissionControl:
    return AdmissionControl(app, limits=lambda: AdmissionLimits(queue_ms, interval_ms, standing_ms=standing_ms),
                            on_reject=rejected.append, clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu)


def _scoring(clocks: Clocks, ms: float) -> Any:
    """An app that scores inline for `ms` of CPU, blocking the loop."""
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        clocks.busy(ms)
        await _ok(scope, receive, send)
    return app


async def _one_pass(gate: AdmissionControl, n: int) -> list[int]:
    """n requests read in one pass of the loop (their handlers run one after another), then the pass ends."""
    answers = [Recorded() for _ in range(n)]
    await asyncio.gather(*(gate(_scope(), _receive, a.send) for a in answers))
    await asyncio.sleep(0)  # the marker runs: the pass is over
    return [a.status for a in answers]


def test_a_request_queued_behind_a_long_pass_of_the_loop_is_refused_with_retry_after() -> None:
    """Three requests read in one pass: the first blocks the loop for 30 ms (a long list scored
    inline), so the others have waited past the 20 ms a burst may queue."""
    clocks, rejected = Clocks(), []
    gate = _gate(_scoring(clocks, 30), clocks, 10.0, 20.0, rejected)
    answers = [Recorded() for _ in range(3)]

    async def one_pass() -> None:
        await asyncio.gather(*(gate(_scope(), _receive, a.send) for a in answers))

    asyncio.run(one_pass())
    first, second, third = answers
    assert first.status == 200
    assert (second.status, third.status) == (503, 503)
    assert second.headers[b"retry-after"] == b"1"
    assert b"admission_queue_ms" in second.messages[1]["body"] and b'"field":"load"' in second.messages[1]["body"]
    assert rejected == ["queue", "queue"]


def test_a_request_read_after_a_long_busy_pass_waited_in_the_kernel_and_is_refused() -> None:
    """The loop never idled: a request read by the next pass may have arrived when the previous pass
    began, so it has waited that pass's 30 ms (in the socket buffer) though it is first in its own."""
    clocks, rejected = Clocks(), []
    gate = _gate(_scoring(clocks, 30), clocks, 10.0, 20.0, rejected)

    async def run() -> list[list[int]]:
        return [await _one_pass(gate, 1), await _one_pass(gate, 1)]

    assert asyncio.run(run()) == [[200], [503]]
    assert rejected == ["queue"]


def test_an_idle_loop_starts_every_wait_afresh() -> None:
    """Between passes the loop sat off the CPU (idle in its poll) for longer than IDLE_GAP_S: nothing
    was queued, however long the previous pass was."""
    clocks, rejected = Clocks(), []
    gate = _gate(_scoring(clocks, 30), clocks, 10.0, 20.0, rejected)

    async def run() -> list[list[int]]:
        statuses = []
        for _ in range(3):
            statuses.append(await _one_pass(gate, 1))
            clocks.idle(1000 * IDLE_GAP_S + 1)
        return statuses

    assert asyncio.run(run()) == [[200]] * 3 and rejected == []


def test_a_steady_queue_inside_the_standing_bound_is_never_refused() -> None:
    """A closed loop of a few clients keeps a queue that never drains but never grows: every request
    waits the previous pass's 8 ms, past the 5 ms target but under the 15 ms standing bound. It is
    not an overload, and refusing it would only make the clients send again at once."""
    clocks, rejected = Clocks(), []
    gate = _gate(_scoring(clocks, 8), clocks, 5.0, 20.0, rejected, standing_ms=15.0)

    async def run() -> list[int]:
        return [(await _one_pass(gate, 1))[0] for _ in range(3 * MIN_STANDING_REQUESTS)]

    assert asyncio.run(run()) == [200] * (3 * MIN_STANDING_REQUESTS)
    assert not gate.standing and rejected == []


def test_a_growing_queue_stands_lowers_the_bound_and_keeps_it_low_until_it_is_gone() -> None:
    """Passes of two requests scoring 8 ms each, the loop never idle: each waits 16-24 ms, past the
    15 ms standing bound, so after MIN_STANDING_REQUESTS long waits in a row the queue stands and the
    bound drops to 5 ms: requests are refused, and the refusals' short passes bring short waits back.
    The bound stays low through them (a first short wait does not end an overload); it rises once
    no wait has reached 5 ms for the 50 ms interval."""
    clocks, rejected = Clocks(), []
    gate = _gate(_scoring(clocks, 8), clocks, 5.0, 50.0, rejected, standing_ms=15.0)

    async def run() -> tuple[list[int], list[int], bool, bool]:
        loaded = [status for _ in range(MIN_STANDING_REQUESTS) for status in await _one_pass(gate, 2)]
        standing_under_load = gate.standing
        gate.app = _scoring(clocks, 1)  # short lists now: waits of 1 ms, under the 5 ms bound
        calm = [(await _one_pass(gate, 1))[0] for _ in range(80)]
        return loaded, calm, standing_under_load, gate.standing

    loaded, calm, standing_under_load, standing_after = asyncio.run(run())
    assert loaded[:4] == [200] * 4  # a burst: admitted
    assert 503 in loaded and standing_under_load  # a growing queue: the bound is 5 ms
    assert calm[-5:] == [200] * 5 and not standing_after  # 50 ms of short waits: no longer standing
    assert set(rejected) == {"queue"}


def test_a_hiccup_at_a_low_rate_is_not_a_standing_queue() -> None:
    """A few requests that each waited long (the loop held up by something else) are a hiccup, not
    an overload: fewer than MIN_STANDING_REQUESTS in a row, so the bound stays the burst's and none
    of them is refused."""
    clocks, rejected = Clocks(), []
    gate = _gate(_scoring(clocks, 30), clocks, 5.0, 100.0, rejected, standing_ms=15.0)

    async def run() -> list[int]:
        return [(await _one_pass(gate, 1))[0] for _ in range(MIN_STANDING_REQUESTS - 2)]

    assert asyncio.run(run()) == [200] * (MIN_STANDING_REQUESTS - 2)
    assert not gate.standing and rejected == []


def test_the_loop_going_idle_ends_an_overload_at_once() -> None:
    clocks, rejected = Clocks(), []
    gate = _gate(_scoring(clocks, 8), clocks, 5.0, 50.0, rejected, standing_ms=15.0)

    async def run() -> tuple[bool, list[int]]:
        for _ in range(MIN_STANDING_REQUESTS):
            await _one_pass(gate, 2)
        standing = gate.standing
        clocks.idle(1000 * IDLE_GAP_S + 1)
        return standing, await _one_pass(gate, 2)

    standing, after_idle = asyncio.run(run())
    assert standing and not gate.standing
    assert after_idle == [200, 200]  # the second waited 8 ms: a burst again, not a standing queue


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


def _read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length from a blocking socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_plain_uvicorn_refuses_in_its_protocol_and_keeps_the_connection() -> None:
    """serve/http_protocol.py on a real uvicorn server and real sockets: with the in-flight slot held,
    a POST /rank is refused by the HTTP protocol before its body is read (the middleware never sees
    it); the body that follows is dropped, and the same keep-alive connection serves the next request."""
    import threading

    import uvicorn
    from fastapi import FastAPI

    from serve.http_protocol import http_protocol

    app = FastAPI()
    release = threading.Event()
    seen: list[str] = []

    @app.post("/rank")
    async def rank() -> dict[str, str]:
        seen.append("rank")
        while not release.is_set():  # bounded by the test's own timeouts below
            await asyncio.sleep(0.005)
        return {"ok": "yes"}

    rejected: list[str] = []
    app.add_middleware(AdmissionControl, limits=lambda: AdmissionLimits(max_inflight=1), on_reject=rejected.append,
                       publish=lambda gate: setattr(app.state, "admission", gate))
    asgi_calls: list[str] = []

    class Recorder:  # outermost: every request that reaches the ASGI app at all
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                asgi_calls.append(scope["path"])
            await self.inner(scope, receive, send)

    app.add_middleware(Recorder)
    app.middleware_stack = app.build_middleware_stack()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=http_protocol(app)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    payload = b"x" * 300_000  # larger than one read: the rest arrives after the refusal
    request = (f"POST /rank HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {len(payload)}\r\n\r\n"
               ).encode() + payload
    try:
        for _ in range(200):  # bounded wait for the server
            if server.started:
                break
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as holder, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            holder.sendall(request)
            for _ in range(200):  # until the holder's request runs
                if seen:
                    break
                time.sleep(0.01)
            sock.sendall(request)
            status, headers, refused = _read_answer(sock)
            assert status == 503 and headers["retry-after"] == "1"
            assert json.loads(refused)["field"] == "load" and "max_inflight" in json.loads(refused)["rule"]
            assert seen == ["rank"] and rejected == ["inflight"] and asgi_calls == ["/rank"]
            release.set()
            assert _read_answer(holder)[0] == 200
            sock.sendall(request)  # the same connection, the slot free again
            assert _read_answer(sock)[0] == 200 and seen == ["rank", "rank"]
    finally:
        release.set()
        server.should_exit = True
        thread.join(timeout=10)


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
