"""Locust scenarios for POST /rank: steady, step ramp, spike, cache mix (Zipf), list-size mix.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                   # web UI, pick a user class
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 SteadyUser        # Locust's class picking
    RANKSERVE_SCENARIO=ramp locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 -t 60s

Scenario selection: `RANKSERVE_SCENARIO` (steady|ramp|spike|cache-mix|list-mix) makes only that
scenario's user class (and shape, for ramp and spike) concrete. Locust uses the first LoadTestShape it
finds in a file, so the shapes are abstract unless RANKSERVE_SCENARIO names one, or `--class-picker`
is given without a scenario (then the web UI lets you pick a shape or "Default").

Payloads are read from the file `RANKSERVE_PAYLOADS` (written by loadtest/payloads.py) at init, never
built in the request loop; without it a default set is built once in a subprocess and cached under
artifacts/payloads/. Exact latencies (HDR histogram, microseconds) plus the server's timings_ms and
cache flags are written as JSON to `RANKSERVE_RESULTS` when the test stops and when Locust quits; in
distributed mode every worker sends its histogram in its stats report and the master merges them.

Other knobs (environment): RANKSERVE_ZIPF_S (cache-mix skew, default 1.1), RANKSERVE_ZIPF_QUERIES
(cache-mix query universe, default 100000), RANKSERVE_N_DOCS (list size for steady/ramp/spike, default:
every size in the file), RANKSERVE_THINK_MS (closed-loop think time, default 0),
RANKSERVE_UNIQUE_QUERIES (default 1: steady/ramp/spike/list-mix requests never hit a result cache),
RANKSERVE_RUN_SALT (cache-mix: share one salt across distributed workers), RANKSERVE_RAMP_* and
RANKSERVE_SPIKE_* (shape sizes and durations).

Locust must be imported before torch or ray (gevent's monkey-patching; an ssl RecursionError
otherwise), so this file imports locust first and nothing here imports torch.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import locust.stats  # before any torch or ray import: gevent monkey-patching
import orjson
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from loadtest.latency import LatencyRecorder
from loadtest.openloop import require_loopback
from loadtest.payloads import NONCE_WIDTH, Payload, PayloadSet, ZipfSampler

SCENARIOS = ("steady", "ramp", "spike", "cache-mix", "list-mix")
SCENARIO = os.environ.get("RANKSERVE_SCENARIO", "").strip()
if SCENARIO and SCENARIO not in SCENARIOS:
    raise ValueError(f"RANKSERVE_SCENARIO must be one of {SCENARIOS}, got {SCENARIO!r}")
_USER_OF = {"steady": "SteadyUser", "ramp": "SteadyUser", "spike": "SteadyUser",
            "cache-mix": "CacheMixUser", "list-mix": "ListMixUser"}  # fmt: skip
_SHAPE_OF = {"ramp": "StepRampShape", "spike": "SpikeShape"}
_CLASS_PICKER = "--class-picker" in sys.argv


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


ZIPF_S = _env_float("RANKSERVE_ZIPF_S", 1.1)
ZIPF_QUERIES = _env_int("RANKSERVE_ZIPF_QUERIES", 100_000)
THINK_S = _env_float("RANKSERVE_THINK_MS", 0.0) / 1000.0
UNIQUE_QUERIES = os.environ.get("RANKSERVE_UNIQUE_QUERIES", "1") not in ("0", "false", "no")
_NONCE_MOD = 10**NONCE_WIDTH
if not 1 <= ZIPF_QUERIES <= 10**6:  # cache-mix query ids are salt * 10**6 + k
    raise ValueError(f"RANKSERVE_ZIPF_QUERIES must be in 1..1000000, got {ZIPF_QUERIES}")


def _bucket_3_significant(response_time: float) -> float:
    """Round to 3 significant digits (2.3456 ms -> 2.35 ms), not to whole milliseconds.

    Replaces locust.stats.bucket_response_time (Locust's documented hook) so that Locust's own
    table and CSV resolve a few-millisecond service; the exact figures come from the HDR histogram.
    """
    if response_time <= 0:
        return 0
    return round(response_time, 2 - int(math.floor(math.log10(response_time))))


locust.stats.bucket_response_time = _bucket_3_significant


# ----------------------------------------------------------------------------------------------
# Exact statistics of this process (or, on the master, of all workers merged)
# ----------------------------------------------------------------------------------------------

TIMING_KEYS = ("parse", "cache", "queue", "inference", "total")


class RunStats:
    """What Locust does not keep: an HDR histogram of exact latencies, server timings, cache hits."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.latency = LatencyRecorder()
        self.by_name: dict[str, LatencyRecorder] = {}
        self.requests = self.failures = self.successes = self.cache_hits = self.docs = 0
        self.server_sum = dict.fromkeys(TIMING_KEYS, 0.0)
        self.server_n = dict.fromkeys(TIMING_KEYS, 0)
        self.first_start: float | None = None  # wall clock, seconds
        self.last_end: float | None = None
        self.peak_users = 0

    def record_request(self, name: str, response_time_ms: float, failed: bool, n_docs: int) -> None:
        now = time.time()
        start = now - response_time_ms / 1000.0
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        self.last_end = now if self.last_end is None else max(self.last_end, now)
        self.requests += 1
        if failed:
            self.failures += 1
            return
        self.successes += 1
        self.docs += n_docs
        self.latency.record(response_time_ms)
        self.by_name.setdefault(name, LatencyRecorder()).record(response_time_ms)

    def record_server(self, timings: dict[str, Any], cached: bool) -> None:
        self.cache_hits += int(bool(cached))
        for k in TIMING_KEYS:
            v = timings.get(k)
            if isinstance(v, int | float):
                self.server_sum[k] += float(v)
                self.server_n[k] += 1

    def to_wire(self) -> dict[str, Any]:
        """msgpack-safe form for a worker's report to the master."""
        return {
            "latency": self.latency.to_dict(),
            "by_name": {k: v.to_dict() for k, v in self.by_name.items()},
            "counts": [self.requests, self.failures, self.successes, self.cache_hits, self.docs],
            "server_sum": self.server_sum,
            "server_n": self.server_n,
            "span": [self.first_start, self.last_end],
        }

    def merge_wire(self, data: dict[str, Any]) -> None:
        self.latency.merge(LatencyRecorder.from_dict(data["latency"]))
        for k, v in data["by_name"].items():
            self.by_name.setdefault(k, LatencyRecorder()).merge(LatencyRecorder.from_dict(v))
        r, f, s, h, d = data["counts"]
        self.requests += r
        self.failures += f
        self.successes += s
        self.cache_hits += h
        self.docs += d
        for k in TIMING_KEYS:
            self.server_sum[k] += data["server_sum"].get(k, 0.0)
            self.server_n[k] += data["server_n"].get(k, 0)
        first, last = data["span"]
        if first is not None:
            self.first_start = first if self.first_start is None else min(self.first_start, first)
        if last is not None:
            self.last_end = last if self.last_end is None else max(self.last_end, last)

    def summary(self) -> dict[str, Any]:
        duration = (self.last_end - self.first_start) if self.first_start is not None else 0.0
        return {
            "requests": self.requests,
            "failures": self.failures,
            "error_rate": self.failures / self.requests if self.requests else 0.0,
            "duration_s": duration,
            "rps": self.requests / duration if duration > 0 else 0.0,
            "docs": self.docs,
            "docs_per_s": self.docs / duration if duration > 0 else 0.0,
            "latency_ms": self.latency.percentiles(),
            "latency_hdr": self.latency.to_dict(),
            "latency_by_name_ms": {k: v.percentiles() for k, v in sorted(self.by_name.items())},
            "cache_hits": self.cache_hits,
            "cache_hit_ratio": self.cache_hits / self.successes if self.successes else 0.0,
            "server_timings_ms": {
                k: self.server_sum[k] / self.server_n[k] for k in TIMING_KEYS if self.server_n[k]
            },
            "peak_users": self.peak_users,
        }


STATS = RunStats()


# ----------------------------------------------------------------------------------------------
# Payloads: loaded once per process at init
# ----------------------------------------------------------------------------------------------


class Workload:
    """The payloads of this process and the per-scenario views the user classes draw from."""

    payload_set: PayloadSet | None = None
    steady: list[Payload] = []
    by_size: dict[int, list[Payload]] = {}
    zipf: ZipfSampler | None = None
    salt: int = 0

    @classmethod
    def load(cls) -> None:
        path = os.environ.get("RANKSERVE_PAYLOADS") or str(_default_payload_file())
        ps = PayloadSet.load(path)
        cls.payload_set = ps
        cls.by_size = ps.by_size()
        n_docs = os.environ.get("RANKSERVE_N_DOCS")
        cls.steady = cls.by_size.get(int(n_docs), []) if n_docs else list(ps.payloads)
        if not cls.steady:
            raise ValueError(f"RANKSERVE_N_DOCS={n_docs}: no payload of that size in {path} (sizes {ps.sizes})")
        cls.zipf = ZipfSampler(ZIPF_QUERIES, ZIPF_S, seed=_env_int("RANKSERVE_SEED", 0))
        salt = os.environ.get("RANKSERVE_RUN_SALT")
        cls.salt = int(salt) if salt else random.SystemRandom().randrange(10**5)


def _default_payload_file() -> Path:
    """Build the default payload set once, in a subprocess (it loads the dataset), and cache it."""
    from models.paths import ARTIFACTS

    sizes = "10,100,1000" if SCENARIO == "list-mix" else os.environ.get("RANKSERVE_N_DOCS", "100")
    encoding = os.environ.get("RANKSERVE_ENCODING", "json")
    path = ARTIFACTS / "payloads" / f"default-{encoding}-{sizes.replace(',', '_')}.msgpack"
    if not path.exists():
        cmd = [sys.executable, "-m", "loadtest.payloads", "--n-docs", sizes, "--encoding", encoding,
               "--n-queries", "32", "--out", str(path)]  # fmt: skip
        subprocess.run(cmd, check=True, timeout=600)
    return path


_nonce_next = random.SystemRandom().randrange(_NONCE_MOD)


def _unique_body(p: Payload) -> bytes:
    """The payload with a query id never sent before (so a result cache cannot answer it)."""
    global _nonce_next
    if not UNIQUE_QUERIES:
        return p.body
    _nonce_next = (_nonce_next + 1) % _NONCE_MOD
    return p.with_nonce(_nonce_next)


# ----------------------------------------------------------------------------------------------
# Users: each reads like the traffic it makes
# ----------------------------------------------------------------------------------------------


class RankUser(FastHttpUser):
    """Shared request code: POST one prepared body to /rank and check the ranking that comes back."""

    abstract = True
    wait_time = constant(THINK_S)
    network_timeout = 60.0
    connection_timeout = 10.0

    def rank(self, payload: Payload, body: bytes) -> None:
        name = f"/rank [{payload.n_docs} docs]"
        headers = {"Content-Type": payload.content_type}
        with self.client.post(
            "/rank", data=body, headers=headers, name=name, catch_response=True, context={"n_docs": payload.n_docs}
        ) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
                return
            try:
                data = orjson.loads(resp.content)
                results, timings = data["results"], data.get("timings_ms") or {}
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                resp.failure(f"response is not a ranking: {e}")
                return
            if len(results) != payload.n_docs:
                resp.failure(f"{len(results)} results for {payload.n_docs} documents")
                return
            STATS.record_server(timings, bool(data.get("cached")))


class SteadyUser(RankUser):
    """Closed loop: each user sends the next list as soon as the last answer arrives (plus think time)."""

    abstract = bool(SCENARIO) and _USER_OF[SCENARIO] != "SteadyUser"

    def on_start(self) -> None:
        self.i = random.randrange(len(Workload.steady))

    @task
    def rank_next_list(self) -> None:
        self.i = (self.i + 1) % len(Workload.steady)
        p = Workload.steady[self.i]
        self.rank(p, _unique_body(p))


class CacheMixUser(RankUser):
    """Repeat traffic: query popularity is Zipf(s) over a large universe, so s sets the cache hit ratio."""

    abstract = bool(SCENARIO) and _USER_OF[SCENARIO] != "CacheMixUser"

    @task
    def rank_popular_query(self) -> None:
        assert Workload.zipf is not None
        k = Workload.zipf.sample()  # virtual query k: payload k mod n, with its own query id
        p = Workload.payload_set.payloads[k % len(Workload.payload_set)]  # type: ignore[union-attr]
        self.rank(p, p.with_nonce(Workload.salt * 10**6 + k))


class ListMixUser(RankUser):
    """Short and long lists mixed: each request picks a list size (10, 100, 1000 docs) at random."""

    abstract = bool(SCENARIO) and _USER_OF[SCENARIO] != "ListMixUser"

    @task
    def rank_list_of_random_size(self) -> None:
        size = random.choice(list(Workload.by_size))
        p = random.choice(Workload.by_size[size])
        self.rank(p, _unique_body(p))


# ----------------------------------------------------------------------------------------------
# Shapes (concrete only when selected: Locust runs the first shape it finds)
# ----------------------------------------------------------------------------------------------


def _shape_abstract(name: str) -> bool:
    if not SCENARIO:
        return not _CLASS_PICKER
    return _SHAPE_OF.get(SCENARIO) != name


class StepRampShape(LoadTestShape):
    """Add `step` users every `step_s` seconds up to `max_users`: latency bends where the service saturates."""

    abstract = _shape_abstract("StepRampShape")
    step = _env_int("RANKSERVE_RAMP_STEP_USERS", 2)
    step_s = _env_float("RANKSERVE_RAMP_STEP_S", 10.0)
    max_users = _env_int("RANKSERVE_RAMP_MAX_USERS", 32)

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        n_steps = math.ceil(self.max_users / self.step)
        if t >= n_steps * self.step_s:
            return None
        users = min(self.max_users, (int(t // self.step_s) + 1) * self.step)
        return users, float(users)


class SpikeShape(LoadTestShape):
    """A baseline load, a sudden spike of users, then the baseline again: does the tail recover?"""

    abstract = _shape_abstract("SpikeShape")
    base_users = _env_int("RANKSERVE_SPIKE_BASE_USERS", 4)
    spike_users = _env_int("RANKSERVE_SPIKE_USERS", 32)
    base_s = _env_float("RANKSERVE_SPIKE_BASE_S", 10.0)
    spike_s = _env_float("RANKSERVE_SPIKE_S", 5.0)
    recover_s = _env_float("RANKSERVE_SPIKE_RECOVER_S", 10.0)

    def tick(self) -> tuple[int, float] | None:
        t = self.get_run_time()
        if t < self.base_s:
            return self.base_users, float(self.base_users)
        if t < self.base_s + self.spike_s:
            return self.spike_users, float(self.spike_users)
        if t < self.base_s + self.spike_s + self.recover_s:
            return self.base_users, float(self.spike_users)
        return None


# ----------------------------------------------------------------------------------------------
# Event hooks: load payloads, record exact latencies, merge worker reports, write the results
# ----------------------------------------------------------------------------------------------


@events.init.add_listener
def _on_init(environment: Any, **_kw: Any) -> None:
    if environment.host:
        require_loopback(environment.host)
    if not isinstance(environment.runner, MasterRunner):
        Workload.load()


@events.test_start.add_listener
def _on_test_start(environment: Any, **_kw: Any) -> None:
    if environment.host:
        require_loopback(environment.host)
    STATS.reset()


@events.request.add_listener
def _on_request(name: str, response_time: float, exception: Any, context: dict | None = None, **_kw: Any) -> None:
    n_docs = int((context or {}).get("n_docs", 0))
    STATS.record_request(name, float(response_time), exception is not None, n_docs)


@events.spawning_complete.add_listener
def _on_spawning_complete(user_count: int, **_kw: Any) -> None:
    STATS.peak_users = max(STATS.peak_users, user_count)


@events.report_to_master.add_listener
def _on_report_to_master(data: dict, **_kw: Any) -> None:
    """Worker side: send what was recorded since the last report (a delta), then start afresh."""
    data["rankserve"] = STATS.to_wire()
    peak = STATS.peak_users
    STATS.reset()
    STATS.peak_users = peak


@events.worker_report.add_listener
def _on_worker_report(data: dict, **_kw: Any) -> None:
    if "rankserve" in data:
        STATS.merge_wire(data["rankserve"])


def write_results(environment: Any) -> Path | None:
    """Write the exact-latency JSON to RANKSERVE_RESULTS (master or local runner only)."""
    out = os.environ.get("RANKSERVE_RESULTS")
    if not out or isinstance(environment.runner, WorkerRunner):
        return None
    ps = Workload.payload_set
    user_classes = sorted(u.__name__ for u in (environment.user_classes or []))
    total = environment.stats.total
    result = {
        "scenario": SCENARIO or "+".join(user_classes),
        "mode": "closed-loop",
        "host": environment.host,
        "user_classes": user_classes,
        "encoding": ps.encoding if ps else None,
        "sizes": ps.sizes if ps else None,
        "zipf_s": ZIPF_S if SCENARIO == "cache-mix" or "CacheMixUser" in user_classes else None,
        "unique_queries": UNIQUE_QUERIES,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        **STATS.summary(),
        "locust": {  # Locust's own (3-significant-digit) view, for cross-checking
            "requests": total.num_requests,
            "failures": total.num_failures,
            "p50_ms": total.get_response_time_percentile(0.5),
            "p99_ms": total.get_response_time_percentile(0.99),
        },
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path


@events.test_stop.add_listener
def _on_test_stop(environment: Any, **_kw: Any) -> None:
    write_results(environment)


_ENV: Any = None  # the Locust Environment, kept at init for the quit hook (which is not given it)


@events.init.add_listener
def _keep_environment(environment: Any, **_kw: Any) -> None:
    global _ENV
    _ENV = environment


@events.quit.add_listener
def _on_quit(**_kw: Any) -> None:
    """After the runner quit (the master has the workers' final reports by then): the final write."""
    if _ENV is not None:
        write_results(_ENV)
