"""Open-loop load like MLPerf's Server scenario: Poisson arrivals at a target rate.

Locust is closed-loop: a slow answer delays the next request, so the generator backs off exactly
when the service struggles and the percentiles hide it (coordinated omission). Here arrivals follow
a fixed schedule (deterministic for a seed) whatever the service does, and latency is measured from
each request's *scheduled* send time (corrected); the figures from the actual send time are reported
beside them (uncorrected), with the number of sends that left more than `late_ms` after schedule.

In-flight requests are bounded (`max_in_flight`, default 256, one aiohttp connection each): an
arrival that finds every slot busy waits for one and is counted in `waited_for_slot` (and, when that
makes it late, in `late_sends`; its corrected latency includes the wait). The run is bounded by the
schedule's duration and count, a per-request timeout and a drain timeout; loopback hosts only.

Command line (also what loadtest/runner.py runs in a subprocess):
    python loadtest/openloop.py --host http://127.0.0.1:8000 --payloads FILE --rate 200 --duration 10 --out r.json
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson

from loadtest.latency import LatencyRecorder
from loadtest.payloads import PayloadSet, ZipfSampler

TIMING_KEYS = ("parse", "cache", "queue", "inference", "total")
START_LEAD_S = 0.05  # the first arrival is scheduled this long after setup, so it is not born late


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
    rate_per_s: float, duration_s: float, seed: int = 0, max_requests: int | None = None
) -> np.ndarray:
    """Send times (seconds from start) of a Poisson process: exponential gaps of mean 1/rate.

    Deterministic for a seed; bounded by `duration_s` (times < duration) and `max_requests`.
    """
    if not (rate_per_s > 0 and math.isfinite(rate_per_s)):
        raise ValueError(f"rate_per_s must be a positive number, got {rate_per_s}")
    if not (duration_s > 0 and math.isfinite(duration_s)):
        raise ValueError(f"duration_s must be a positive number, got {duration_s}")
    rng = np.random.default_rng(seed)
    expected = rate_per_s * duration_s
    n = int(expected + 10 * math.sqrt(expected) + 10)  # P(more arrivals than this) is negligible
    if max_requests is not None:
        n = min(n, max_requests)
    times = np.cumsum(rng.exponential(1.0 / rate_per_s, size=n))
    return times[times < duration_s]


class _Recorder:
    """Everything measured during one open-loop run."""

    def __init__(self) -> None:
        self.corrected = LatencyRecorder()
        self.uncorrected = LatencyRecorder()
        self.sent = self.completed = self.failures = self.late = self.waited = 0
        self.cache_hits = self.docs = 0
        self.send_times: list[float] = []
        self.max_lag_ms = 0.0
        self.server_sum = dict.fromkeys(TIMING_KEYS, 0.0)
        self.server_n = dict.fromkeys(TIMING_KEYS, 0)
        self.errors: dict[str, int] = {}
        self.last_end = 0.0

    def fail(self, reason: str) -> None:
        self.failures += 1
        self.errors[reason] = self.errors.get(reason, 0) + 1


async def _run(
    host: str,
    payloads: PayloadSet,
    schedule: np.ndarray,
    *,
    seed: int,
    max_in_flight: int,
    late_ms: float,
    request_timeout_s: float,
    drain_timeout_s: float,
    unique_queries: bool,
    zipf_s: float | None = None,
    zipf_queries: int = 100_000,
) -> tuple[_Recorder, float]:
    import aiohttp  # here, not at import: the locustfile imports require_loopback from this module

    rec = _Recorder()
    order = np.random.default_rng(seed).permutation(len(payloads))
    nonce_base = int(np.random.default_rng().integers(10**11))  # fresh query ids on every run
    # Repeat traffic for a cache: request i asks for virtual query k_i, drawn with Zipf popularity,
    # as the locustfile's CacheMixUser does (payload k mod n, with query id nonce_base + k).
    popular = ZipfSampler(zipf_queries, zipf_s, seed=seed).sample_many(len(schedule)) if zipf_s else None
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max_in_flight)
    connector = aiohttp.TCPConnector(limit=max_in_flight, limit_per_host=max_in_flight, force_close=False)
    timeout = aiohttp.ClientTimeout(total=request_timeout_s)
    url = host.rstrip("/") + "/rank"

    async def one(i: int, scheduled: float, session: aiohttp.ClientSession) -> None:
        if popular is not None:
            k = int(popular[i])
            p = payloads.payloads[k % len(payloads)]
            body = p.with_nonce(nonce_base + k)
        else:
            p = payloads.payloads[order[i % len(order)]]
            body = p.with_nonce(nonce_base + i) if unique_queries else p.body
        answered = False
        try:
            start = loop.time()
            rec.sent += 1
            rec.send_times.append(start)
            lag_ms = (start - scheduled) * 1000.0
            rec.max_lag_ms = max(rec.max_lag_ms, lag_ms)
            rec.late += lag_ms > late_ms
            async with session.post(url, data=body, headers={"Content-Type": p.content_type}) as resp:
                raw = await resp.read()
                status = resp.status
            end = loop.time()
            answered = True
            rec.completed += 1
            rec.last_end = max(rec.last_end, end)
            if status != 200:
                rec.fail(f"HTTP {status}")
                return
            data = orjson.loads(raw)
            if len(data["results"]) != p.n_docs:
                rec.fail("wrong number of results")
                return
            rec.corrected.record((end - scheduled) * 1000.0)
            rec.uncorrected.record((end - start) * 1000.0)
            rec.docs += p.n_docs
            rec.cache_hits += bool(data.get("cached"))
            for k, v in (data.get("timings_ms") or {}).items():
                if k in rec.server_sum and isinstance(v, int | float):
                    rec.server_sum[k] += float(v)
                    rec.server_n[k] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError, orjson.JSONDecodeError, KeyError, TypeError) as e:
            rec.completed += 0 if answered else 1
            rec.fail(type(e).__name__)
        finally:
            slots.release()

    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = loop.time() + START_LEAD_S
        for i, offset in enumerate(schedule):
            target = t0 + float(offset)
            delay = target - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots.locked():
                rec.waited += 1
            await slots.acquire()
            task = asyncio.create_task(one(i, target, session))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=drain_timeout_s)
            for task in pending:  # bounded: whatever has not answered by now is a failure
                task.cancel()
                rec.completed += 1
                rec.fail("drain timeout")
            if pending:
                await asyncio.wait(pending, timeout=5)
    return rec, t0


def run_schedule(
    host: str,
    payloads: PayloadSet,
    rate_per_s: float,
    duration_s: float,
    *,
    seed: int = 0,
    max_requests: int | None = None,
    max_in_flight: int = 256,
    late_ms: float = 1.0,
    request_timeout_s: float = 30.0,
    drain_timeout_s: float = 30.0,
    unique_queries: bool = True,
    zipf_s: float | None = None,
) -> dict[str, Any]:
    """Run one open-loop trial in this process (asyncio) and return its summary as a dict."""
    require_loopback(host)
    schedule = poisson_schedule(rate_per_s, duration_s, seed, max_requests)
    rec, t0 = asyncio.run(
        _run(
            host,
            payloads,
            schedule,
            seed=seed,
            max_in_flight=max_in_flight,
            late_ms=late_ms,
            request_timeout_s=request_timeout_s,
            drain_timeout_s=drain_timeout_s,
            unique_queries=unique_queries,
            zipf_s=zipf_s,
        )
    )
    # achieved rate: answered requests over the arrival window, or until the last answer if later
    duration = max(rec.last_end - t0, duration_s)
    sends = np.sort(np.asarray(rec.send_times))
    gaps = np.diff(sends)
    successes = rec.completed - rec.failures
    return {
        "mode": "open-loop",
        "host": host,
        "target_rate_per_s": rate_per_s,
        "scheduled_duration_s": duration_s,
        "seed": seed,
        "scheduled": int(len(schedule)),
        "sent": rec.sent,
        "requests": rec.completed,
        "failures": rec.failures,
        "errors": rec.errors,
        "error_rate": rec.failures / rec.completed if rec.completed else 0.0,
        "duration_s": duration,
        "rps": rec.completed / duration,
        "send_rate_per_s": (len(sends) - 1) / float(sends[-1] - sends[0]) if len(sends) > 1 else 0.0,
        "mean_interarrival_ms": float(gaps.mean() * 1000.0) if len(gaps) else 0.0,
        "late_sends": rec.late,
        "late_threshold_ms": late_ms,
        "max_send_lag_ms": rec.max_lag_ms,
        "waited_for_slot": rec.waited,
        "max_in_flight": max_in_flight,
        "docs": rec.docs,
        "docs_per_s": rec.docs / duration,
        "latency_ms": rec.corrected.percentiles(),
        "uncorrected_latency_ms": rec.uncorrected.percentiles(),
        "latency_hdr": rec.corrected.to_dict(),
        "cache_hits": rec.cache_hits,
        "cache_hit_ratio": rec.cache_hits / successes if successes else 0.0,
        "server_timings_ms": {k: rec.server_sum[k] / rec.server_n[k] for k in TIMING_KEYS if rec.server_n[k]},
        "encoding": payloads.encoding,
        "sizes": payloads.sizes,
        "unique_queries": unique_queries,
        "zipf_s": zipf_s,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Open-loop (Poisson) load on POST /rank, MLPerf Server-style.")
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--payloads", required=True, help="payload file from loadtest/payloads.py")
    ap.add_argument("--rate", type=float, required=True, help="target arrivals per second")
    ap.add_argument("--duration", type=float, required=True, help="seconds of arrivals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-requests", type=int, default=None)
    ap.add_argument("--max-in-flight", type=int, default=256)
    ap.add_argument("--late-ms", type=float, default=1.0)
    ap.add_argument("--request-timeout", type=float, default=30.0)
    ap.add_argument("--reuse-queries", action="store_true", help="send the payloads' own query ids (cache hits)")
    ap.add_argument("--zipf-s", type=float, default=None,
                    help="draw queries with Zipf(s) popularity (repeat traffic for a cache), as cache-mix does")
    ap.add_argument("--out", help="write the result JSON here (default: print it)")
    args = ap.parse_args(argv)
    result = run_schedule(
        args.host,
        PayloadSet.load(args.payloads),
        args.rate,
        args.duration,
        seed=args.seed,
        max_requests=args.max_requests,
        max_in_flight=args.max_in_flight,
        late_ms=args.late_ms,
        request_timeout_s=args.request_timeout,
        drain_timeout_s=args.request_timeout,
        unique_queries=not args.reuse_queries,
        zipf_s=args.zipf_s,
    )
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
