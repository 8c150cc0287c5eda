"""A closed loop on the open-loop generator's HTTP client: `connections` clients, each sending its next
request the moment its answer arrives, for a bounded count and time.

Why our own and not Locust or wrk: Locust's Python client costs about a millisecond per request on
the generator's core and rounds times below 100 ms to whole milliseconds, too coarse for a 0.5 ms
cache hit; wrk is not on PyPI (`make lab` installs only from it) and does not read answers, and the
cache ladder must split latencies by the answer's `cached` flag and count degraded answers as
failures. Here each answer is parsed (loadtest/recorder.py's `classify_answer`, the open loop's
rule), and its latency goes to one HDR histogram for hits and one for misses.

    result = drive("http://127.0.0.1:8002", next_request, connections=1, max_requests=500,
                             max_seconds=3.0)
    result.latency["hit"]["p50"], result.throughput_rps, result.server_ms["hit"]["total"]
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from loadtest.http_client import ConnectionPool, PreparedRequest, clock
from loadtest.latency import LatencyRecorder
from loadtest.recorder import DEGRADED, CpuClock, classify_answer

# next_request(i) -> (the prepared request, the query-id nonce to splice in, or None for its own id)
NextRequest = Callable[[int], tuple[PreparedRequest, int | None]]
CLASSES = ("all", "hit", "miss")
GENERATOR_BOUND_CPU = 0.9  # a generator this busy may itself be what limits the phase's throughput


@dataclass
class ClosedLoopResult:
    """What one closed-loop phase measured (latencies in ms, by answer class)."""

    connections: int
    requests: int  # answered (good, degraded or failed)
    seconds: float
    good: int
    degraded: int  # counted as failures
    errors: dict[str, int]
    latency: dict[str, dict[str, float]]  # "all" / "hit" / "miss" -> p50, p99, mean, count ...
    server_ms: dict[str, dict[str, float]]  # "hit" / "miss" -> mean of each timings_ms stage
    generator_cpu: float = 0.0  # the generator's CPU over the phase, a fraction of one core
    generator: str = "closed loop (uvloop + httptools, loadtest/closed_loop.py)"
    notes: list[str] = field(default_factory=list)

    @property
    def throughput_rps(self) -> float:
        return self.good / self.seconds if self.seconds > 0 else 0.0

    @property
    def generator_bound(self) -> bool:
        """The generator's core was nearly saturated: throughput is then a floor, the tool's limit."""
        return self.generator_cpu >= GENERATOR_BOUND_CPU

    @property
    def hit_ratio(self) -> float:
        answered = self.latency["hit"]["count"] + self.latency["miss"]["count"]
        return self.latency["hit"]["count"] / answered if answered else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput_rps": self.throughput_rps, "hit_ratio": self.hit_ratio,
                "generator_bound": self.generator_bound}


async def _drive(url: str, next_request: NextRequest, connections: int, max_requests: int,
                 max_seconds: float, request_timeout_s: float) -> ClosedLoopResult:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    recorders = {name: LatencyRecorder() for name in CLASSES}
    stage_sums: dict[str, dict[str, float]] = {"hit": {}, "miss": {}}
    counts = {"sent": 0, "answered": 0, "good": 0, "degraded": 0}
    errors: dict[str, int] = {}
    done = asyncio.Event()
    deadline = [0.0]

    def send(i: int) -> None:
        req, nonce = next_request(i)
        counts["sent"] += 1
        pool.submit(req.parts(nonce), clock(), req.n_docs, i)

    def on_answer(conn: Any, status: int, body: bytes, error: str | None) -> None:
        latency_ms = (clock() - conn.sent_at) * 1000.0
        counts["answered"] += 1
        reason, data = (error, None) if error is not None else classify_answer(status, body, conn.n_docs)
        if reason is None and data is not None:
            counts["good"] += 1
            kind = "hit" if data.get("cached") else "miss"
            recorders["all"].record(latency_ms)
            recorders[kind].record(latency_ms)
            sums = stage_sums[kind]
            for stage, ms in (data.get("timings_ms") or {}).items():
                sums[stage] = sums.get(stage, 0.0) + ms
        elif reason == DEGRADED:
            counts["degraded"] += 1
        else:
            errors[reason] = errors.get(reason, 0) + 1
        if counts["sent"] < max_requests and clock() < deadline[0]:
            send(counts["sent"])
        elif counts["answered"] >= counts["sent"]:
            done.set()

    pool = ConnectionPool(host, port, on_answer, max_connections=connections, request_timeout_s=request_timeout_s)
    await pool.open(connections)
    gc.collect()
    gc.disable()  # bounded run: reference counting frees the answers; no collector pauses in the timings
    cpu = CpuClock()
    try:
        start = clock()
        deadline[0] = start + max_seconds
        for i in range(min(connections, max_requests)):
            send(i)
        try:
            await asyncio.wait_for(done.wait(), max_seconds + request_timeout_s)
        except asyncio.TimeoutError:
            pool.expire(float("inf"))
        seconds = clock() - start
        cpu.stop()
    finally:
        gc.enable()
        pool.close()
    server_ms = {kind: {stage: total / recorders[kind].count for stage, total in sums.items()}
                 for kind, sums in stage_sums.items() if recorders[kind].count}
    return ClosedLoopResult(
        connections=connections, requests=counts["answered"], seconds=seconds, good=counts["good"],
        degraded=counts["degraded"], errors=errors,
        latency={name: recorder.percentiles() for name, recorder in recorders.items()}, server_ms=server_ms,
        generator_cpu=cpu.read()["utilization"])


def drive(url: str, next_request: NextRequest, *, connections: int = 1, max_requests: int = 1000,
                    max_seconds: float = 3.0, request_timeout_s: float = 10.0) -> ClosedLoopResult:
    """Drive `url` with `connections` closed-loop clients until `max_requests` were sent or `max_seconds`
    passed, then wait for the answers in flight (bounded by `request_timeout_s`)."""
    import uvloop

    return uvloop.run(_drive(url, next_request, connections, max_requests, max_seconds, request_timeout_s))
