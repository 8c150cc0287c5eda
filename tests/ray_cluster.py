"""A local multi-node Ray cluster for tests: `ray start --head`, then raylets joined with `ray start --address`.

Isolated from any Ray the user (or another test) runs on the machine:
- **A private, short `--temp-dir`** (`/tmp/rs2n-XXXXXXXX`; Unix socket paths are limited to 107 bytes):
  the session, its sockets and logs, and Ray's `ray_current_cluster` pointer, so `/tmp/ray` is
  never written and `ray.init()` elsewhere never attaches to this cluster.
- **An explicit environment for every command** (`env()`): every inherited `RAY_*` variable dropped,
  then `RAY_ADDRESS` (the head's GCS), `RAY_DASHBOARD_ADDRESS`, a private `HOME`, and token auth of
  its own: `RAY_AUTH_MODE=token` with `RAY_AUTH_TOKEN_PATH` naming a token file in that `HOME`
  (Ray 2.60 starts clusters with token auth; joining raylets and drivers need the token).
- **Free ports for everything with a fixed default** (GCS 6379, dashboard 8265, client server
  10001, dashboard agent 52365); the other ports Ray picks at random.
- **A stop that touches only this cluster.** Each `ray start` runs in a session of its own; Ray's
  daemons and workers keep that session id after `ray start` returns, so `processes()` finds exactly
  this cluster's processes (and, as fallbacks, anything whose command line names the temp dir or
  whose environment carries the cluster's marker, and their children). `ray stop` is never used:
  it kills every Ray process on the machine, whatever cluster it belongs to.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
SERVE = str(BIN / "serve")
LOOPBACK = "127.0.0.1"
MARKER_ENV = "RANKSERVE_TEST_RAY_CLUSTER"
START_TIMEOUT_S = 120.0
TERM_GRACE_S = 5.0
OBJECT_STORE_BYTES = 100 * 1024 * 1024  # the minimum is 75 MiB; the default, 30% of RAM per node


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports free on loopback right now (held open together, so never the same one twice)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int, host: str = LOOPBACK) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


@dataclass
class Node:
    role: str  # "head" or "worker"
    num_cpus: int
    resources: dict[str, float]
    session_id: int = 0  # the sid of its `ray start` (start_new_session): every daemon it starts keeps it
    output: str = ""


@dataclass
class LocalRayCluster:
    """`start()` the head, `add_worker()` raylets, `stop()` everything; see the module docstring."""

    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rs2n-", dir="/tmp")))
    extra_env: dict[str, str] = field(default_factory=dict)  # for every command, the raylets' included
    nodes: list[Node] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.gcs_port, self.dashboard_port, self.client_port = free_ports(3)
        self.home = self.temp_dir / "home"
        self.token_path = self.home / ".ray" / "auth_token"
        self.token_path.parent.mkdir(parents=True)
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        self.marker = f"{os.getpid()}-{self.temp_dir.name}"

    # ------------------------------------------------------------------------------------------
    @property
    def address(self) -> str:
        """The head's GCS address: what `ray start --address`, `ray.init` and `serve/run.py --address` take."""
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The head's dashboard: what `serve deploy|status|shutdown -a` take."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every command against this cluster (see the module docstring)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "RANKSERVE_RUN"}
        env.update({
            "HOME": str(self.home),
            "RAY_ADDRESS": self.address,
            "RAY_DASHBOARD_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            MARKER_ENV: self.marker,
        })
        env.update(self.extra_env)
        env.update(extra)
        return env

    def auth_headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token_path.read_text().strip()}"}

    # ------------------------------------------------------------------------------------------
    def start(self, num_cpus: int, resources: dict[str, float] | None = None) -> Node:
        """`ray start --head` on loopback; returns once the GCS and the dashboard answer."""
        agent_port, = free_ports(1)
        node = Node("head", num_cpus, resources or {})
        self._ray_start(node, [
            "--head", f"--port={self.gcs_port}", f"--ray-client-server-port={self.client_port}",
            "--include-dashboard=true", f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={agent_port}",
        ])
        self._wait(lambda: self._alive_nodes() is not None and len(self._alive_nodes()) >= 1,
                   "the head's dashboard to list it", node)
        return node

    def add_worker(self, num_cpus: int, resources: dict[str, float] | None = None) -> Node:
        """A second raylet: `ray start --address <head>`; returns once the head lists it alive."""
        agent_port, = free_ports(1)
        node = Node("worker", num_cpus, resources or {})
        want = len(self.nodes) + 1
        self._ray_start(node, [f"--address={self.address}", f"--dashboard-agent-listen-port={agent_port}"])
        self._wait(lambda: len(self._alive_nodes() or []) >= want, f"{want} alive nodes", node)
        return node

    def _ray_start(self, node: Node, args: Sequence[str]) -> None:
        command = [RAY, "start", *args, f"--node-ip-address={LOOPBACK}", f"--num-cpus={node.num_cpus}",
                   f"--resources={json.dumps(node.resources)}", f"--temp-dir={self.temp_dir}",
                   f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
                   "--include-log-monitor=false"]
        self.nodes.append(node)  # before it runs: stop() must find it even if the start fails half-way
        # Output to a file, not a pipe: a daemon that kept the pipe open would hold the read forever.
        log = self.temp_dir / f"ray-start-{node.role}-{len(self.nodes)}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(command, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.temp_dir)
        node.session_id = proc.pid
        try:
            proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired as slow:
            proc.kill()
            proc.wait(timeout=10)
            node.output = log.read_text()
            raise AssertionError(f"`ray start` ({node.role}) took over {START_TIMEOUT_S:.0f} s:\n"
                                 f"{node.output[-3000:]}") from slow
        node.output = log.read_text()
        assert proc.returncode == 0, f"`ray start` ({node.role}) failed ({proc.returncode}):\n{node.output[-3000:]}"

    def _wait(self, ready, what: str, node: Node, timeout_s: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"no {what} within {timeout_s:.0f} s; `ray start` said:\n{node.output[-3000:]}")

    # ------------------------------------------------------------------------------------------
    def get(self, path: str, timeout_s: float = 10) -> httpx.Response:
        """GET from the head's dashboard, with the cluster's token."""
        return httpx.get(f"{self.dashboard_url}{path}", headers=self.auth_headers(), timeout=timeout_s)

    def _alive_nodes(self) -> list[dict[str, Any]] | None:
        try:
            resp = self.get("/api/v0/nodes?limit=100")
        except httpx.HTTPError:
            return None
        if resp.status_code != 200:
            return None
        return [n for n in resp.json()["data"]["result"]["result"] if n.get("state") == "ALIVE"]

    def node_ids(self) -> dict[str, str]:
        """{"head": node id, "worker": node id} of the alive nodes (one worker)."""
        nodes = self._alive_nodes() or []
        ids = {("head" if n["is_head_node"] else "worker"): n["node_id"] for n in nodes}
        assert len(nodes) == 2 and set(ids) == {"head", "worker"}, nodes
        return ids

    def serve_details(self) -> dict[str, Any]:
        """What `serve status` reads: the Serve controller's view (applications, replicas and their nodes)."""
        resp = self.get("/api/serve/applications/")
        assert resp.status_code == 200, resp.text
        return resp.json()

    def run(self, command: Sequence[str], timeout_s: float = 120, **extra_env: str) -> str:
        """A CLI command against this cluster (`serve deploy ...`), bounded; its output, or an assertion."""
        proc = subprocess.run(list(command), env=self.env(**extra_env), capture_output=True, text=True,
                              timeout=timeout_s, cwd=self.temp_dir)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(command)} failed ({proc.returncode}):\n{out[-3000:]}"
        return out

    # ------------------------------------------------------------------------------------------
    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: in the session of one of its `ray start`s, or naming its temp
        dir on the command line, or carrying its marker in the environment; and their children."""
        sessions = {n.session_id for n in self.nodes if n.session_id}
        temp_dir = str(self.temp_dir)
        found: dict[int, psutil.Process] = {}
        me = os.getpid()
        for proc in psutil.process_iter(["cmdline"]):
            if proc.pid == me:
                continue
            try:
                ours = os.getsid(proc.pid) in sessions or temp_dir in " ".join(proc.info["cmdline"] or [])
                if not ours:
                    with contextlib.suppress(psutil.AccessDenied):
                        ours = proc.environ().get(MARKER_ENV) == self.marker
                if ours:
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found.setdefault(child.pid, child)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError, PermissionError):
                continue
        found.pop(me, None)
        alive = []
        for proc in found.values():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:  # a zombie is dead, only not yet reaped
                    alive.append(proc)
        return alive

    def process_names(self) -> list[str]:
        names = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                names.append(proc.name())
        return names

    def stop(self) -> list[str]:
        """SIGTERM every process of the cluster, SIGKILL what is left after a grace period, remove the
        temp dir; returns a description of any process still alive (empty: nothing left behind)."""
        for _ in range(3):  # killing a raylet can leave its workers for a moment: look again
            procs = self.processes()
            if not procs:
                break
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.send_signal(signal.SIGTERM)
            _, alive = psutil.wait_procs(procs, timeout=TERM_GRACE_S)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(alive, timeout=TERM_GRACE_S)
        left = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                left.append(f"{proc.pid} {proc.name()} {' '.join(proc.cmdline())[:200]}")
        if not left:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return left
