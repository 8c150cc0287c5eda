"""Open-loop load like MLPerf's Server scenario: Poisson arrivals at a target rate.

Locust is closed-loop: a slow answer delays the next request, so the generator backs off exactly
when the service struggles and the percentiles hide it (coordinated omission). Here arrivals follow
a fixed schedule (deterministic for a seed) whatever the service does, and latency is measured from
each request's *scheduled* send time (corrected); the figures from the actual send time are reported
beside them (uncorrected).

The generator must be faster than any service it measures, or its figures describe itself: requests
are prepared as bytes before the run and sent over keep-alive connections on uvloop, answers parsed
by httptools (loadtest/http_client.py); the self-test (`--self-test`, loadtest/selftest.py) measures
its capacity on this machine. Every trial says whether it kept its schedule: a send that left more
than `late_ms` after its scheduled time *while a connection was free* is the generator's own
lateness (`late_sends`); more than `GENERATOR_BOUND_LATE_FRACTION` of them marks the trial
`generator_bound`, and its figures are never the service's limit. A send that left late because the
idle generator woke up late (its loop slept past the wake-up time, using no CPU) is counted apart,
in `late_wakeups`: the machine's timer lag, charged to the service by the corrected latency; more
than `WAKEUP_LATE_FRACTION` of them marks the trial `generator_bound` too. An arrival that found
every one of `max_connections` busy waits for one (`waited_for_slot`): that is the service's
backlog, and the wait is part of its corrected latency.

Connections are opened before the run, sized from rate x expected latency, and more on demand.
`processes` > 1 splits the rate over that many processes (a superposition of Poisson processes is
Poisson), each pinned to one of `cpus`, starting on one shared clock; their histograms merge.
A trial is bounded by count or duration, a per-request timeout and a drain timeout; loopback only.
For the fault suite (loadtest/faults.py) a trial can start its schedule at a given CLOCK_MONOTONIC
time (`start_at`, `--start-at`) and keep one row per arrival (`timeline`, `--timeline FILE`).

    python loadtest/openloop.py --host http://127.0.0.1:8000 --payloads FILE --rate 200 --duration 10
    python loadtest/openloop.py --host http://127.0.0.1:8000 --payloads FILE --rate 2000 --count 5000
    python loadtest/openloop.py --self-test          # the generator's capacity on this machine
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from loadtest.payloads import PayloadSet, ZipfSampler
from loadtest.recorder import AnswerRecorder, AnswerTimeline, CpuClock, classify_answer, merge_cpu

START_LEAD_S = 0.05  # the first arrival is scheduled this long after setup, so it is not born late
PROCESS_START_LEAD_S = 1.0  # the same for a multi-process trial: children fork, connect, then start
SLEEP_AHEAD_S = 0.0015  # sleep (millisecond timers) until this close to a send, then poll the loop
# An idle core on these KVM machines wakes up late: sleeping until 1.5 ms before each send, 0.5-1.5%
# of sends against the Ray service at 300/s left 2 to 11 ms late although nothing else ran on the
# generator's core (perf sched: no wait for the CPU). Such a send is counted apart (`late_wakeups`):
# the generator was idle, not short of CPU, and the corrected latency (from the scheduled time)
# charges the lag to the service, so the trial stays valid. Spinning (`spin`: poll the loop, never
# sleep) avoids it, but is off by default: the two cores share a host core, and a spinning generator
# slowed the service's inference on the other core by half (0.21 to 0.33 ms per 100-document call).
WAKEUP_LATE_FRACTION = 0.10  # more sends than this left late by late wake-ups: the schedule is not kept
CPU_WAIT_FRACTION = 0.25  # a generator runnable but without a CPU for more of its send loop is starved
GENERATOR_BOUND_LATE_FRACTION = 0.01  # more own-late sends than this: the trial measured the generator
EXPIRE_EVERY_S = 0.1


def require_loopback(url: str) -> str:
    """Return the URL's host if it is a loopback address or 'localhost'; raise ValueError otherwise."""
    host = urlsplit(url if "://" in url else f"http://{url}").hostname or ""
    if host == "localhost":
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:
        pass
    raise ValueError(
        f"host {url!r}: load tests send traffic to loopback addresses only "
        "(127.0.0.0/8, ::1 or localhost); name the service by its loopback address"
    )


def poisson_schedule(
    rate_per_s: float, duration_s: float | None, seed: int | Sequence[int] = 0, max_requests: int | None = None
) -> np.ndarray:
    """Send times (seconds from start) of a Poisson process: exponential gaps of mean 1/rate.

    Deterministic for a seed. Bounded by `duration_s` (times < duration) and `max_requests`; with
    `duration_s=None` it is count-based: exactly `max_requests` arrivals.
    """
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s}")
    rng = np.random.default_rng(seed)
    if duration_s is None:
        if not max_requests or max_requests < 1:
            raise ValueError(f"a count-based schedule needs max_requests >= 1, got {max_requests}")
        return np.cumsum(rng.exponential(1.0 / rate_per_s, size=max_requests))
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be a positive number, got {duration_s}")
    expected = rate_per_s * duration_s
    n = int(expected + 10 * math.sqrt(expected) + 10)  # P(more arrivals than this) is negligible
    if max_requests is not None:
        n = min(n, max_requests)
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, size=n))
    return times[times < duration_s]


class CpuWaitClock:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat's run_delay).

    It tells a generator starved of CPU (its lateness is its own) from one whose idle core woke up
    late. Where the kernel does not expose it, it reads infinity, so that no lateness is ever put
    down to a late wake-up: all of it counts as the generator's own.
    """

    def __init__(self) -> None:
        try:
            self._fd: int | None = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        except OSError:
            self._fd = None

    def __call__(self) -> float:
        if self._fd is None:
            return math.inf  # unknown: a late wake-up can never be told apart, so none is claimed
        return int(os.pread(self._fd, 96, 0).split()[1]) / 1e9

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class OpenLoopConfig:
    """One open-loop trial: where, how fast, how long, and how the generator runs."""

    host: str
    rate_per_s: float
    duration_s: float | None = None  # time-bound: arrivals before this many seconds
    count: int | None = None  # count-based: exactly this many arrivals (duration_s None)
    seed: int = 0
    max_connections: int = 256
    expected_latency_ms: float = 5.0  # sizes the connections opened before the run
    late_ms: float = 1.0
    request_timeout_s: float = 30.0
    drain_timeout_s: float = 30.0
    unique_queries: bool = True
    zipf_s: float | None = None
    zipf_queries: int = 100_000
    slo_ms: float | None = None  # goodput counts good answers within it
    processes: int = 1
    cpus: list[int] = field(default_factory=list)  # pin process k to cpus[k % len(cpus)]
    spin: bool = False  # poll the loop between sends, never sleep (see WAKEUP_LATE_FRACTION)
    # One row per arrival (recorder.AnswerTimeline) in the result's "timeline": for loadtest/faults.py,
    # which must see figures change around a fault; off by default, so sweeps never pay for it.
    timeline: bool = False
    # CLOCK_MONOTONIC time of the schedule's start (shared by every process of the machine), so that a
    # caller can act at a known offset into the schedule (a fault); None: shortly after set-up.
    start_at: float | None = None
    # (at_s, duration_s, extra rate/s): a second Poisson process added to the schedule for a while (an
    # overload): one generator keeps one schedule, where a second process on the same core would
    # compete with the first for it (measured: both sent 20-28% of their requests late).
    surge: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        require_loopback(self.host)
        if self.duration_s is None and not self.count:
            raise ValueError("an open-loop trial needs duration_s or count")
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")

    def share(self, k: int) -> tuple[np.ndarray, int | Sequence[int]]:
        """Process k's arrivals (rate / processes each) and the seed they came from."""
        n = self.processes
        seed: int | Sequence[int] = self.seed if n == 1 else (self.seed, k)
        count = None if self.count is None else self.count // n + (k < self.count % n)
        if count == 0:
            return np.empty(0), seed
        times = poisson_schedule(self.rate_per_s / n, self.duration_s, seed, count)
        if self.surge is not None:  # two Poisson processes superpose to one
            at_s, length_s, extra = self.surge
            surge_seed = [*(seed if isinstance(seed, tuple) else (seed,)), 1]
            times = np.sort(np.concatenate([times, at_s + poisson_schedule(extra / n, length_s, surge_seed)]))
        return times, seed


@dataclass
class _ShareResult:
    """What one generator process sends back to be merged."""

    wire: dict[str, Any]
    scheduled: int
    last_offset_s: float
    sent: int
    late: int
    late_wakeups: int
    late_after_wait: int
    waited: int
    max_lag_ms: float
    max_wakeup_lag_ms: float
    cpu_wait_fraction: float | None  # of the send loop, runnable but waiting for a CPU (None: unknown)
    start: float
    first_send: float
    last_send: float
    last_end: float
    connections: int
    cpu: dict[str, float]
    cpu_affinity: list[int]
    timeline: dict[str, Any] | None = None  # AnswerTimeline.to_arrays(), when the config asks for it


def _requests_of(payloads: PayloadSet, cfg: OpenLoopConfig, seed: Any, n: int, nonce_base: int, k: int):
    """Per arrival: which prepared request, and which nonce (None: the payload's own query id)."""
    order = np.random.default_rng(seed).permutation(len(payloads))
    if cfg.zipf_s:
        # Repeat traffic for a cache: arrival i asks for virtual query q_i with Zipf popularity,
        # as the locustfile's CacheMixUser does (payload q mod n, query id nonce_base + q).
        popular = ZipfSampler(cfg.zipf_queries, cfg.zipf_s, seed=seed).sample_many(n)
        return (popular % len(payloads)).tolist(), (nonce_base + popular).tolist()
    index = order[np.arange(n) % len(order)].tolist()
    if not cfg.unique_queries:
        return index, [None] * n
    return index, (nonce_base + k * 10**9 + np.arange(n)).tolist()


async def _drive(cfg: OpenLoopConfig, payloads: PayloadSet, k: int, t0: float | None, nonce_base: int) -> _ShareResult:
    """One process's share of the trial, on the running event loop."""
    from loadtest.http_client import ConnectionPool, PreparedRequest, clock

    times, seed = cfg.share(k)
    parts = urlsplit(cfg.host if "://" in cfg.host else f"http://{cfg.host}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = payloads.meta.get("path", "/rank")  # two-stage payloads (loadtest/two_stage.py) go to /search
    prepared = [PreparedRequest(p, host, port, path) for p in payloads.payloads]
    which, nonces = _requests_of(payloads, cfg, seed, len(times), nonce_base, k)
    rec = AnswerRecorder(cfg.slo_ms, open_loop=True)
    last_end = [0.0]
    timeline = AnswerTimeline(times) if cfg.timeline else None

    def on_answer(conn: Any, status: int, body: bytes, error: str | None) -> None:
        end = clock()
        if error is not None:
            rec.error(error)
            if timeline is not None:
                timeline.record(conn.tag, status, error, (end - conn.scheduled) * 1000.0)
            return
        if timeline is None:
            rec.answer(status, body, conn.n_docs, (end - conn.scheduled) * 1000.0, (end - conn.sent_at) * 1000.0)
        else:  # what rec.answer does, keeping the answer for its `cached` flag
            latency_ms = (end - conn.scheduled) * 1000.0
            reason, data = classify_answer(status, body, conn.n_docs)
            rec.record(reason, latency_ms, conn.n_docs, data, (end - conn.sent_at) * 1000.0)
            timeline.record(conn.tag, status, reason, latency_ms, bool(data and data.get("cached")))
        last_end[0] = end

    pool = ConnectionPool(host, port, on_answer, max_connections=cfg.max_connections, late_s=cfg.late_ms / 1000.0,
                          request_timeout_s=cfg.request_timeout_s)
    rate = cfg.rate_per_s / cfg.processes
    await pool.open(max(2, math.ceil(rate * cfg.expected_latency_ms / 1000.0 * 2) + 2))
    loop = asyncio.get_running_loop()

    def expire() -> None:
        pool.expire(clock())
        timer[0] = loop.call_later(EXPIRE_EVERY_S, expire)

    timer = [loop.call_later(EXPIRE_EVERY_S, expire)]
    # No collector pauses during the run (answers allocate many small objects; a full collection
    # took up to 4 ms here): objects are freed by reference counting, the run is bounded, and the
    # collector runs again afterwards. Before the schedule starts: a collection can take long.
    gc.collect()
    gc.freeze()
    gc.disable()
    start = clock() + START_LEAD_S if t0 is None else t0
    cpu = CpuClock()
    sleep = asyncio.sleep
    nap_above = math.inf if cfg.spin else 2 * SLEEP_AHEAD_S
    late_s, thread_time, cpu_wait = cfg.late_ms / 1000.0, time.thread_time, CpuWaitClock()
    waited_at_start, started_at = cpu_wait(), clock()
    try:
        for i, offset in enumerate(times.tolist()):
            target = start + offset
            now = clock()
            while now < target:
                ahead = target - now
                if ahead <= nap_above:  # polling: a pass that ends late was busy, the generator's own
                    await sleep(0)
                    now = clock()
                    pool.woke_late = False
                    continue
                cpu_before, waited_before, before = thread_time(), cpu_wait(), now
                await sleep(ahead - SLEEP_AHEAD_S)
                now = clock()
                # Why a nap ended late: the thread neither ran nor waited for the CPU meanwhile (the
                # idle core woke up late), or it was busy (answers, sends) or starved of CPU: the
                # generator's own lateness. A send due while catching up keeps that reason.
                lag = now - target
                pool.woke_late = (lag > late_s and thread_time() - cpu_before < 0.5 * (now - before)
                                  and cpu_wait() - waited_before < 0.5 * lag)
            req = prepared[which[i]]
            pool.submit(req.parts(nonces[i]), target, req.n_docs, i)
    finally:
        starved_s = cpu_wait() - waited_at_start  # inf where unknown
        send_loop_s = clock() - started_at
        cpu_wait.close()
        gc.enable()
        gc.unfreeze()
    deadline = clock() + cfg.drain_timeout_s
    while pool.in_flight and clock() < deadline:
        await sleep(0.001)
    timer[0].cancel()
    pool.request_timeout_s = 0.0
    pool.expire(math.inf)  # bounded: whatever has not answered by now is a failure ("timeout")
    pool.close()
    await sleep(0)
    return _ShareResult(
        wire=rec.to_wire(), scheduled=len(times), last_offset_s=float(times[-1]) if len(times) else 0.0,
        sent=pool.n_sent, late=pool.late, late_wakeups=pool.late_wakeups, late_after_wait=pool.late_after_wait,
        waited=pool.waited, max_lag_ms=pool.max_lag_s * 1000.0, max_wakeup_lag_ms=pool.max_wakeup_lag_s * 1000.0,
        cpu_wait_fraction=starved_s / send_loop_s if math.isfinite(starved_s) and send_loop_s > 0 else None,
        start=start, first_send=pool.first_send, last_send=pool.last_send,
        last_end=max(last_end[0], start), connections=pool.connections_opened, cpu=cpu.read(),
        cpu_affinity=sorted(os.sched_getaffinity(0)),
        timeline=timeline.to_arrays() if timeline is not None else None,
    )


def _run_share(cfg: OpenLoopConfig, payloads: PayloadSet, k: int, t0: float | None, nonce_base: int) -> _ShareResult:
    import uvloop

    if cfg.cpus and cfg.processes > 1:
        os.sched_setaffinity(0, {cfg.cpus[k % len(cfg.cpus)]})
    return uvloop.run(_drive(cfg, payloads, k, t0, nonce_base))


def _child(cfg: OpenLoopConfig, payloads: PayloadSet, k: int, t0: float, nonce_base: int, conn: Any) -> None:
    try:
        conn.send(("ok", _run_share(cfg, payloads, k, t0, nonce_base)))
    except BaseException as error:  # noqa: BLE001 - report any failure to the parent
        conn.send(("error", f"{type(error).__name__}: {error}"))
    finally:
        conn.close()


def _run_processes(cfg: OpenLoopConfig, payloads: PayloadSet, nonce_base: int) -> list[_ShareResult]:
    """Fork one generator process per share; all start on one shared monotonic clock."""
    from loadtest.http_client import clock

    ctx = multiprocessing.get_context("fork")
    t0 = cfg.start_at if cfg.start_at is not None else clock() + PROCESS_START_LEAD_S
    children = []
    for k in range(cfg.processes):
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(cfg, payloads, k, t0, nonce_base, child_end), daemon=True)
        proc.start()
        child_end.close()
        children.append((proc, parent_end))
    budget = max(PROCESS_START_LEAD_S, t0 - clock()) + _expected_length_s(cfg) + cfg.drain_timeout_s + 30.0
    results: list[_ShareResult] = []
    errors: list[str] = []
    for proc, pipe in children:
        if pipe.poll(budget):
            status, value = pipe.recv()
            (results if status == "ok" else errors).append(value)
        else:
            errors.append("a generator process sent no result in time")
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    if errors:
        raise RuntimeError("open-loop generator process failed: " + "; ".join(errors))
    return results


def _expected_length_s(cfg: OpenLoopConfig) -> float:
    return cfg.duration_s if cfg.duration_s is not None else 1.5 * (cfg.count or 0) / cfg.rate_per_s + 5.0


def run_trial(cfg: OpenLoopConfig, payloads: PayloadSet) -> dict[str, Any]:
    """Run one open-loop trial and return its summary (the trial file's contents)."""
    nonce_base = int(np.random.default_rng().integers(10**11))  # fresh query ids on every run
    if cfg.processes == 1:
        shares = [_run_share(cfg, payloads, 0, cfg.start_at, nonce_base)]
    else:
        shares = _run_processes(cfg, payloads, nonce_base)
    return summarize(cfg, payloads, shares)


def summarize(cfg: OpenLoopConfig, payloads: PayloadSet, shares: list[_ShareResult]) -> dict[str, Any]:
    rec = AnswerRecorder(cfg.slo_ms, open_loop=True)
    for share in shares:
        rec.merge_wire(share.wire)
    scheduled = sum(s.scheduled for s in shares)
    sent = sum(s.sent for s in shares)
    late = sum(s.late for s in shares)
    wakeups = sum(s.late_wakeups for s in shares)
    first = min((s.first_send for s in shares if s.sent), default=0.0)
    last = max((s.last_send for s in shares if s.sent), default=0.0)
    start = min(s.start for s in shares)
    # The schedule's own length: the trial's duration when time-bound, else its last arrival.
    scheduled_duration = cfg.duration_s if cfg.duration_s is not None else max(s.last_offset_s for s in shares)
    window = max(max((s.last_end for s in shares), default=0.0) - start, scheduled_duration or 0.0, 1e-9)
    own_late_fraction = late / sent if sent else 0.0
    wakeup_fraction = wakeups / sent if sent else 0.0
    starved = [s.cpu_wait_fraction for s in shares if s.cpu_wait_fraction is not None]
    cpu_wait_fraction = max(starved) if starved else None
    out = rec.summary(window)
    out.update({
        "mode": "open-loop",
        "generator": "rankserve open loop (uvloop + httptools)",
        "host": cfg.host,
        "target_rate_per_s": cfg.rate_per_s,
        "offered_rate_per_s": scheduled / scheduled_duration if scheduled_duration else 0.0,
        "achieved_rate_per_s": out["rps"],
        "scheduled_duration_s": scheduled_duration,
        "count_based": cfg.duration_s is None,
        "seed": cfg.seed,
        "scheduled": scheduled,
        "sent": sent,
        "send_rate_per_s": (sent - 1) / (last - first) if sent > 1 and last > first else 0.0,
        "mean_interarrival_ms": (last - first) * 1000.0 / (sent - 1) if sent > 1 else 0.0,
        "late_sends": late,
        "late_fraction": own_late_fraction,
        "late_wakeups": wakeups,  # late because the idle generator woke up late: not its own cost
        "late_wakeup_fraction": wakeup_fraction,
        "late_after_wait": sum(s.late_after_wait for s in shares),
        "late_threshold_ms": cfg.late_ms,
        "max_send_lag_ms": max((s.max_lag_ms for s in shares), default=0.0),
        "max_wakeup_lag_ms": max((s.max_wakeup_lag_ms for s in shares), default=0.0),
        "waited_for_slot": sum(s.waited for s in shares),
        "max_in_flight": cfg.max_connections,
        "connections_opened": sum(s.connections for s in shares),
        # The busiest process's share of its send loop spent waiting for a CPU: a starved generator
        # is late on sends that then look like waits for a connection (it reads answers late).
        "generator_cpu_wait_fraction": cpu_wait_fraction,
        "generator_bound": (own_late_fraction > GENERATOR_BOUND_LATE_FRACTION
                            or wakeup_fraction > WAKEUP_LATE_FRACTION
                            or (cpu_wait_fraction or 0.0) > CPU_WAIT_FRACTION),
        "generator_cpu": merge_cpu([s.cpu for s in shares]),
        "processes": cfg.processes,
        "spin": cfg.spin,
        "encoding": payloads.encoding,
        "sizes": payloads.sizes,
        "unique_queries": cfg.unique_queries,
        "zipf_s": cfg.zipf_s,
        "cpu_affinity": sorted({c for s in shares for c in s.cpu_affinity}),
    })
    if cfg.timeline:  # offsets from the earliest share's start (multi-process shares share one)
        parts = [s.timeline for s in shares if s.timeline is not None]
        offsets = [s.start - start for s in shares if s.timeline is not None]
        out["timeline"] = AnswerTimeline.merge([{**p, "scheduled_s": p["scheduled_s"] + o}
                                               for p, o in zip(parts, offsets, strict=True)])
        out["timeline_start_monotonic"] = start
    return out


def run_schedule(host: str, payloads: PayloadSet, rate_per_s: float, duration_s: float | None, *,
                 seed: int = 0, max_requests: int | None = None, max_in_flight: int = 256, **options: Any
                 ) -> dict[str, Any]:
    """Run one open-loop trial in this process: time-bound, count-based (`duration_s=None`), or both."""
    cfg = OpenLoopConfig(host=host, rate_per_s=rate_per_s, duration_s=duration_s, seed=seed,
                         count=max_requests, max_connections=max_in_flight, **options)
    return run_trial(cfg, payloads)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Open-loop (Poisson) load on POST /rank, MLPerf Server-style.")
    ap.add_argument("--self-test", action="store_true",
                    help="measure the generator's own capacity against a trivial loopback responder "
                         "(loadtest/selftest.py; writes results/loadgen/)")
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--payloads", help="payload file from loadtest/payloads.py")
    ap.add_argument("--rate", type=float, help="target arrivals per second")
    ap.add_argument("--duration", type=float, default=None, help="seconds of arrivals (time-bound trial)")
    ap.add_argument("--count", type=int, default=None, help="exactly this many arrivals (count-based trial)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-in-flight", type=int, default=256, help="most connections (= requests in flight)")
    ap.add_argument("--expected-latency-ms", type=float, default=5.0,
                    help="sizes the connections opened before the run (rate x latency x 2)")
    ap.add_argument("--late-ms", type=float, default=1.0)
    ap.add_argument("--request-timeout", type=float, default=30.0)
    ap.add_argument("--slo-ms", type=float, default=None, help="goodput counts good answers within this latency")
    ap.add_argument("--processes", type=int, default=1, help="generator processes (one core each)")
    ap.add_argument("--cpus", default="", help="comma-separated cores for the generator processes")
    ap.add_argument("--spin", action="store_true",
                    help="poll the event loop between sends instead of sleeping: no late wake-ups, but a "
                         "busy core (it can slow a service on a sibling core)")
    ap.add_argument("--reuse-queries", action="store_true", help="send the payloads' own query ids (cache hits)")
    ap.add_argument("--zipf-s", type=float, default=None,
                    help="draw queries with Zipf(s) popularity (repeat traffic for a cache), as cache-mix does")
    ap.add_argument("--out", help="write the result JSON here (default: print it)")
    ap.add_argument("--surge", type=float, nargs=3, metavar=("AT_S", "DURATION_S", "RATE"), default=None,
                    help="add RATE arrivals/s from AT_S for DURATION_S seconds (an overload in one schedule)")
    ap.add_argument("--timeline", default=None,
                    help="write one row per arrival (scheduled offset, latency, status, outcome, cached) to "
                         "this .npz file (loadtest/faults.py)")
    ap.add_argument("--start-at", type=float, default=None,
                    help="CLOCK_MONOTONIC time at which the schedule starts (default: just after set-up)")
    ap.add_argument("--seconds-per-step", type=float, default=3.0, help="--self-test: length of each rate step")
    args = ap.parse_args(argv)
    if args.self_test:
        from loadtest import selftest

        selftest.main(seconds_per_step=args.seconds_per_step)
        return
    if not args.payloads or not args.rate or (args.duration is None and args.count is None):
        ap.error("--payloads, --rate and one of --duration or --count are needed (or --self-test)")
    cfg = OpenLoopConfig(
        host=args.host, rate_per_s=args.rate, duration_s=args.duration,
        count=args.count, seed=args.seed, max_connections=args.max_in_flight,
        expected_latency_ms=args.expected_latency_ms, late_ms=args.late_ms, request_timeout_s=args.request_timeout,
        drain_timeout_s=args.request_timeout, unique_queries=not args.reuse_queries, zipf_s=args.zipf_s,
        slo_ms=args.slo_ms, processes=args.processes, cpus=[int(c) for c in args.cpus.split(",") if c.strip()],
        spin=args.spin, timeline=bool(args.timeline), start_at=args.start_at,
        surge=tuple(args.surge) if args.surge else None,
    )  # fmt: skip
    result = run_trial(cfg, PayloadSet.load(args.payloads))
    if args.timeline:
        Path(args.timeline).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.timeline, **result.pop("timeline"),
                            start_monotonic=np.float64(result["timeline_start_monotonic"]))
    result["config"] = asdict(cfg)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main(sys.argv[1:])
