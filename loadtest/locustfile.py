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

Every answer is an error (HTTP status, transport, a body that is not a ranking, a wrong number of
results), a *degraded* answer (HTTP 200 with `degraded: true`: the service's fallback, every score
null) or a success. A degraded answer is marked failed in Locust's own statistics ("degraded answer")
and counted apart from errors in the results (`degraded`, `degraded_rate`; `failures` and
`error_rate` are errors only); neither errors nor degraded answers enter the latency histograms, the
docs count, the cache hit ratio or the server timings. Goodput: `good` counts the successes whose
latency is within the objective `RANKSERVE_SLO_MS` (default 50 ms); `goodput_per_s` = good / duration_s,
beside `rps`. `generator_cpu` is the load generator's own CPU use between test start and stop (cpu_s,
wall_s, utilization = cpu_s / wall_s as a fraction of one core, processes): one process is one core,
so a utilization near 1 means the generator, not the service, may be the bottleneck; in distributed
mode the workers' cpu_s add up and the busiest worker's utilization is kept.

Other knobs (environment): RANKSERVE_SLO_MS (goodput objective in ms, default 50), RANKSERVE_ZIPF_S
(cache-mix skew, default 1.1), RANKSERVE_ZIPF_QUERIES (cache-mix query universe, default 100000),
RANKSERVE_N_DOCS (list size for steady/ramp/spike, default:
every size in the file), RANKSERVE_THINK_MS (closed-loop think time, default 0),
RANKSERVE_UNIQUE_QUERIES (default 1: steady/ramp/spike/list-mix requests never hit a result cache),
RANKSERVE_RUN_SALT (cache-mix: share one salt across distributed workers), RANKSERVE_RAMP_* and
RANKSERVE_SPIKE_* (shape sizes and durations).

Locust must be imported before torch or ray (gevent's monkey-patching; an ssl RecursionError
otherwise), so this file imports locust first and nothing here imports torch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import locust.stats  # before any torch or ray import: gevent monkey-patching
from locust import FastHttpUser, LoadTestShape, constant, events, task
from locust.runners import MasterRunner, WorkerRunner

from loadtest.openloop import require_loopback
from loadtest.payloads import NONCE_WIDTH, Payload, PayloadSet, ZipfSampler
from loadtest.recorder import DEGRADED, AnswerRecorder, CpuClock, classify_answer, merge_cpu

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
SLO_MS = _env_float("RANKSERVE_SLO_MS", 50.0)  # goodput: a success within this latency is good
if not (math.isfinite(SLO_MS) and SLO_MS > 0):
    raise ValueError(f"RANKSERVE_SLO_MS must be a positive number of milliseconds, got {SLO_MS}")
_NONCE_MOD = 10**NONCE_WIDTH
if not 1 <= ZIPF_QUERIES <= 10**6:  # cache-mix query ids are salt * 10**6 + k
    raise ValueError(f"RANKSERVE_ZIPF_QUERIES must be in 1..1000000, got {ZIPF_QUERIES}")
logger = logging.getLogger(__name__)


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

CPU = CpuClock()  # restarted at test start in each process that sends load (local runner, worker)


class RunStats(AnswerRecorder):
    """The recorder both generators share (loadtest/recorder.py: exact latencies, errors and degraded
    answers apart, goodput, server timings), plus what a Locust run adds: the wall-clock span of its
    requests, the peak user count, and each load-sending process's CPU use."""

    def __init__(self, slo_ms: float = SLO_MS) -> None:
        super().__init__(slo_ms)

    def reset(self) -> None:
        super().reset()
        self.first_start: float | None = None  # wall clock, seconds
        self.last_end: float | None = None
        self.peak_users = 0
        self.generator_cpu: dict[str, dict[str, float]] = {}  # process id -> its latest CpuClock.read()
        self._slo_warned = False

    def record_request(self, name: str, response_time_ms: float, n_docs: int, outcome: str | None,
                       answer: dict[str, Any] | None) -> None:
        """One request as Locust's request event reports it (see RankUser.rank for the outcome)."""
        now = time.time()
        start = now - response_time_ms / 1000.0
        self.first_start = start if self.first_start is None else min(self.first_start, start)
        self.last_end = now if self.last_end is None else max(self.last_end, now)
        self.record(outcome, response_time_ms, n_docs, answer, name=name)

    def record_generator_cpu(self, process_id: str, figures: dict[str, float]) -> None:
        """A process's cumulative CPU figures since test start: the latest report replaces the earlier."""
        self.generator_cpu[process_id] = {k: float(figures[k]) for k in ("cpu_s", "wall_s", "utilization")}

    def to_wire(self) -> dict[str, Any]:
        """For a worker's report to the master (counts are deltas since the last one)."""
        return {**super().to_wire(), "span": [self.first_start, self.last_end], "generator_cpu": self.generator_cpu}

    def merge_wire(self, data: dict[str, Any]) -> None:
        super().merge_wire(data)
        if data["slo_ms"] != self.slo_ms and not self._slo_warned:
            self._slo_warned = True
            logger.warning("a worker counts goodput with RANKSERVE_SLO_MS=%s, the master writes %s: give every "
                           "process the same environment", data["slo_ms"], self.slo_ms)  # fmt: skip
        first, last = data["span"]
        if first is not None:
            self.first_start = first if self.first_start is None else min(self.first_start, first)
        if last is not None:
            self.last_end = last if self.last_end is None else max(self.last_end, last)
        for pid, figures in data["generator_cpu"].items():
            self.record_generator_cpu(pid, figures)

    def run_summary(self) -> dict[str, Any]:
        duration = (self.last_end - self.first_start) if self.first_start is not None else 0.0
        return {**self.summary(duration),
                "generator_cpu": merge_cpu([{**f, "processes": 1} for f in self.generator_cpu.values()]),
                "peak_users": self.peak_users}


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
        """An error, a degraded answer (failed in Locust's table, counted apart in ours) or a success."""
        name = f"/rank [{payload.n_docs} docs]"
        headers = {"Content-Type": payload.content_type}
        with self.client.post("/rank", data=body, headers=headers, name=name, catch_response=True,
                              context={"n_docs": payload.n_docs}) as resp:
            reason, answer = classify_answer(resp.status_code, resp.content or b"", payload.n_docs)
            context = resp.request_meta["context"]  # Locust's copy: what our request hook receives
            context["outcome"], context["answer"] = reason, answer
            if reason is not None:
                resp.failure(reason if reason == DEGRADED else f"{reason}: {(resp.text or '')[:200]}")


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
    if not isinstance(environment.runner, MasterRunner):  # this process sends load
        CPU.start()


@events.request.add_listener
def _on_request(name: str, response_time: float, exception: Any, context: dict | None = None, **_kw: Any) -> None:
    context = context or {}
    outcome = context.get("outcome")
    if exception is not None and outcome is None:  # transport errors never reached RankUser's check
        outcome = type(exception).__name__
    STATS.record_request(name, float(response_time), int(context.get("n_docs", 0)), outcome,
                         context.get("answer"))


@events.spawning_complete.add_listener
def _on_spawning_complete(user_count: int, **_kw: Any) -> None:
    STATS.peak_users = max(STATS.peak_users, user_count)


@events.report_to_master.add_listener
def _on_report_to_master(client_id: str, data: dict, **_kw: Any) -> None:
    """Worker side: send what was recorded since the last report (a delta) and this process's CPU use
    since test start (cumulative: the master keeps each worker's latest), then start afresh."""
    cpu = CPU.read()
    if cpu is not None:
        STATS.record_generator_cpu(client_id, cpu)
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
    cpu = CPU.read()
    if cpu is not None and not isinstance(environment.runner, MasterRunner):
        STATS.record_generator_cpu("local", cpu)  # the local runner is the one generator process
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
        **STATS.run_summary(),
        "locust": {  # Locust's own (3-significant-digit) view, for cross-checking
            "requests": total.num_requests,
            "failures": total.num_failures,  # errors + degraded answers
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
    CPU.stop()  # the window ends here; later reports and writes give the same figures
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
