"""The open-loop generator's own capacity on this machine: how fast it can keep a schedule.

A load figure is honest only if the generator was not the bottleneck, so the lab measures its
generator the way it measures services. A trivial responder (uvloop + httptools, a canned answer of
the service's shape for 100 documents, no model) runs pinned to one core; the generator, pinned to
another, sends 100-document msgpack bodies (the lab's main payload) at rising Poisson rates. For each
rate it records the fraction of sends that left within 1 ms of schedule and the latency it measured.
The result is the highest rate at which at least 99% of sends were on time, and the latency the
generator adds there: its p50 minus the round-trip floor of the same responder measured by a
blocking socket client (one request at a time, no event loop).

    python loadtest/openloop.py --self-test    # writes results/loadgen/<cpu>-<isa>-selftest.{json,md}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from loadtest.payloads import CONTENT_TYPES, NONCE_WIDTH, Payload, PayloadSet, encode_body

N_DOCS = 100
N_FEATURES = 136
RATES = (1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 16000, 20000)
ON_TIME_TARGET = 0.99
FLOOR_REQUESTS = 2000


def canned_answer(n_docs: int = N_DOCS) -> bytes:
    """An HTTP response of the ranking service's shape, so the generator parses a realistic body."""
    results = [{"id": f"test-{i}", "score": 1.0 / (i + 1), "rank": i + 1} for i in range(n_docs)]
    body = orjson.dumps({"query_id": "q", "model": {"name": "m", "variant": "v", "version": "1"},
                         "results": results, "cached": False, "degraded": False,
                         "timings_ms": {"parse": 0.0, "cache": 0.0, "queue": 0.0, "inference": 0.0, "total": 0.0}})
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def self_test_payloads(n_queries: int = 32, seed: int = 0) -> PayloadSet:
    """100-document msgpack bodies of random float32 features: the size of the lab's bodies."""
    rng = np.random.default_rng(seed)
    payloads = []
    for i in range(n_queries):
        qid = f"lt-{N_DOCS}-{i}-{'0' * NONCE_WIDTH}"
        body = encode_body(qid, [f"test-{j}" for j in range(N_DOCS)],
                           rng.standard_normal((N_DOCS, N_FEATURES)).astype(np.float32), "msgpack")
        offset = body.find(qid.encode()) + len(qid) - NONCE_WIDTH
        payloads.append(Payload(qid, body, CONTENT_TYPES["msgpack"], N_DOCS, offset))
    return PayloadSet(payloads=payloads, encoding="msgpack", meta={"sizes": [N_DOCS], "synthetic": "random"})


def _serve(port: int, cpu: int | None, ready: Any) -> None:
    """The trivial responder: parse each request with llhttp, answer the canned bytes."""
    import httptools
    import uvloop

    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    answer = canned_answer()

    class Responder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError:
                self.transport.close()

        def on_message_complete(self) -> None:
            self.transport.write(answer)  # type: ignore[attr-defined]

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Responder, "127.0.0.1", port, backlog=1024)
        ready.set()
        async with server:
            await server.serve_forever()

    uvloop.run(main())


@contextlib.contextmanager
def trivial_responder(cpu: int | None) -> Iterator[str]:
    """Start the responder in a child process (pinned to `cpu`); yield its URL; stop it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=_serve, args=(port, cpu, ready), daemon=True)
    proc.start()
    try:
        if not ready.wait(30):
            raise RuntimeError("the self-test responder did not start in 30 s")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()


def round_trip_floor_ms(url: str, payload: Payload, n: int = FLOOR_REQUESTS) -> float:
    """p50 of one request at a time over a blocking socket: the loopback + responder floor."""
    from loadtest.http_client import PreparedRequest

    port = int(url.rsplit(":", 1)[1])
    request = PreparedRequest(payload, "127.0.0.1", port).whole
    expected = len(canned_answer())
    times = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            start = time.perf_counter()
            sock.sendall(request)
            got = 0
            while got < expected:
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the responder closed the connection")
                got += len(chunk)
            times.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(times))


def run_self_test(seconds_per_step: float = 3.0, rates: tuple[int, ...] = RATES,
                  cores: list[int] | None = None) -> dict[str, Any]:
    """Rising rates until fewer than 99% of sends leave on time; the highest passing rate and its cost."""
    from loadtest.openloop import OpenLoopConfig, run_trial

    cores = cores if cores is not None else sorted(os.sched_getaffinity(0))
    responder_cpu, generator_cpu = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    payloads = self_test_payloads()
    original = os.sched_getaffinity(0)
    steps: list[dict[str, Any]] = []
    try:
        with trivial_responder(responder_cpu) as url:
            if generator_cpu is not None:
                os.sched_setaffinity(0, {generator_cpu})
            floor = round_trip_floor_ms(url, payloads.payloads[0])
            for seed, rate in enumerate(rates):
                cfg = OpenLoopConfig(host=url, rate_per_s=float(rate), count=int(rate * seconds_per_step),
                                     seed=seed, expected_latency_ms=1.0, late_ms=1.0, request_timeout_s=10.0,
                                     drain_timeout_s=10.0)
                trial = run_trial(cfg, payloads)
                on_time = 1.0 - trial["late_sends"] / trial["sent"] if trial["sent"] else 0.0
                step = {"rate_per_s": rate, "offered_rate_per_s": trial["offered_rate_per_s"],
                        "achieved_rate_per_s": trial["achieved_rate_per_s"], "sent": trial["sent"],
                        "late_sends": trial["late_sends"], "late_wakeups": trial["late_wakeups"],
                        "waited_for_slot": trial["waited_for_slot"],
                        "on_time_fraction": on_time, "failures": trial["failures"],
                        "latency_ms": trial["latency_ms"], "uncorrected_latency_ms": trial["uncorrected_latency_ms"],
                        "generator_cpu": trial["generator_cpu"], "connections": trial["connections_opened"]}
                step["kept_schedule"] = (on_time >= ON_TIME_TARGET and trial["failures"] == 0
                                         and trial["waited_for_slot"] <= 0.01 * trial["sent"])
                steps.append(step)
                print(f"  {rate:>6}/s: {on_time:7.2%} on time, p50 {trial['latency_ms']['p50']:.3f} ms, "
                      f"p99 {trial['latency_ms']['p99']:.3f} ms, generator CPU "
                      f"{trial['generator_cpu']['utilization']:.0%}", flush=True)
                if not step["kept_schedule"]:
                    break
    finally:
        os.sched_setaffinity(0, original)
    passing = [s for s in steps if s["kept_schedule"]]
    best = passing[-1] if passing else None
    return {
        "what": "open-loop generator self-test: 100-document msgpack bodies against a trivial loopback responder",
        "on_time_rule": f">= {ON_TIME_TARGET:.0%} of sends within 1 ms of schedule, no errors, <= 1% waited for a connection",
        "seconds_per_step": seconds_per_step,
        "responder_cpu": responder_cpu,
        "generator_cpu": generator_cpu,
        "round_trip_floor_p50_ms": floor,
        "max_rate_on_time_per_s": best["rate_per_s"] if best else None,
        "p50_at_max_ms": best["latency_ms"]["p50"] if best else None,
        "added_p50_at_max_ms": best["latency_ms"]["p50"] - floor if best else None,
        "limited_by_rate_list": bool(best) and len(passing) == len(rates),
        "steps": steps,
    }


def markdown(result: dict[str, Any], env: dict[str, Any]) -> str:
    from models.environment import environment_markdown

    lines = [
        "# Open-loop generator self-test",
        "",
        "Written by `python loadtest/openloop.py --self-test` (loadtest/selftest.py). "
        + result["what"] + f"; responder on core {result['responder_cpu']}, generator on core "
        f"{result['generator_cpu']}; each rate is a count-based Poisson step of {result['seconds_per_step']:g} s.",
        "",
        f"- **Highest rate on schedule:** {result['max_rate_on_time_per_s'] or 'none'} requests/s "
        f"({result['on_time_rule']})" + (" (the highest rate tried: the capacity is higher)"
                                         if result["limited_by_rate_list"] else ""),
        f"- **Latency the generator adds there:** p50 {result['p50_at_max_ms'] or 0:.3f} ms measured, against a "
        f"round-trip floor of {result['round_trip_floor_p50_ms']:.3f} ms (a blocking socket, one request at a "
        f"time): **{result['added_p50_at_max_ms'] or 0:.3f} ms added**.",
        "",
        "| rate/s | offered/s | achieved/s | sent | on time | waited | p50 ms | p99 ms | uncorrected p50 ms "
        "| generator CPU | connections | kept schedule |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['rate_per_s']} | {s['offered_rate_per_s']:.0f} | {s['achieved_rate_per_s']:.0f} | {s['sent']} "
            f"| {s['on_time_fraction']:.2%} | {s['waited_for_slot']} | {s['latency_ms']['p50']:.3f} "
            f"| {s['latency_ms']['p99']:.3f} | {s['uncorrected_latency_ms']['p50']:.3f} "
            f"| {s['generator_cpu']['utilization']:.0%} | {s['connections']} | {'yes' if s['kept_schedule'] else 'no'} |"
        )
    lines += ["", environment_markdown(env)]
    return "\n".join(lines) + "\n"


def selftest_stem(environment: dict) -> str:
    """`<cpu>-<isa>-selftest`: named by CPU and ISA, as one CPU model name covers machines with and
    without AVX-512 here (loadtest/report.py finds a run's self-test by it)."""
    from export.report import results_stem

    return f"{results_stem(environment, 'quick')}-selftest"


def main(seconds_per_step: float = 3.0, out_dir: Path | None = None) -> dict[str, Any]:
    from models.environment import collect_environment
    from models.paths import RESULTS

    print("open-loop generator self-test (responder and generator on separate cores)", flush=True)
    result = run_self_test(seconds_per_step)
    env = collect_environment()
    out_dir = out_dir or RESULTS / "loadgen"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / selftest_stem(env)
    stem.with_suffix(".json").write_text(json.dumps({**result, "environment": env}, indent=1))
    stem.with_suffix(".md").write_text(markdown(result, env))
    print(f"max rate on schedule: {result['max_rate_on_time_per_s']}/s, added p50 "
          f"{result['added_p50_at_max_ms']} ms; wrote {stem}.json and .md", flush=True)
    return result
