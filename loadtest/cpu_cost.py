"""Where one request's CPU goes, process by process: the cost behind a server's latency.

A latency figure says how long a request took, not what it cost. This sends `--count` requests over
one keep-alive connection (a closed loop, one in flight) and divides the CPU time every other process
on the machine used meanwhile by the number of requests: for a Ray row, the replica, HAProxy, the
HAProxyManager, the controller, the GCS... each in ms per request. What a process spends while idle
(Ray's control loop, say) shows up too, spread over the requests; run it twice at different counts to
tell a per-request cost from a background one. The client itself is not counted.

    python loadtest/cpu_cost.py --host http://127.0.0.1:8000 --payloads FILE [--count 3000] [--cores 0]

`--cores` keeps only processes allowed on those cores (the service's, when it is pinned).
psutil reads the processes' CPU times (user + system); a blocking http.client sends the requests:
the simplest client is enough here, since only the service's processes are measured.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

import psutil

from loadtest.openloop import require_loopback
from loadtest.payloads import PayloadSet


@dataclass
class ProcessCost:
    pid: int
    name: str
    cpu_ms_per_request: float
    share_of_wall: float  # CPU seconds over the window's wall seconds (a fraction of one core)


def _cpu_times(cores: set[int] | None) -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) and a short name of every process, except this one."""
    out: dict[int, tuple[float, str]] = {}
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        try:
            if proc.pid == os.getpid() or (cores and not set(proc.cpu_affinity()) <= cores):
                continue
            times = proc.cpu_times()
            cmd = " ".join(os.path.basename(a) if a.startswith("/") else a for a in proc.info["cmdline"] or [])
            name = proc.info["name"] or ""
            label = name if name.startswith("ray::") or not cmd else f"{name}: {cmd[:60]}"
            out[proc.pid] = (times.user + times.system, label)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def measure(host: str, payloads: PayloadSet, count: int = 3000, cores: Sequence[int] | None = None,
            path: str = "/rank") -> dict[str, Any]:
    """Send `count` requests one at a time; each process's CPU per request, largest first."""
    require_loopback(host)
    parts = urlsplit(host if "://" in host else f"http://{host}")
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    core_set = set(cores) if cores else None
    first = payloads.payloads[0]
    conn.request("POST", path, body=first.with_nonce(0), headers={"Content-Type": first.content_type})
    conn.getresponse().read()  # connected and warm before the window opens
    before, start = _cpu_times(core_set), time.perf_counter()
    latencies, failures = [], 0
    for i in range(count):
        p = payloads.payloads[i % len(payloads.payloads)]
        t = time.perf_counter()
        conn.request("POST", path, body=p.with_nonce(i + 1), headers={"Content-Type": p.content_type})
        resp = conn.getresponse()
        resp.read()
        latencies.append((time.perf_counter() - t) * 1000.0)
        failures += resp.status != 200
    wall = time.perf_counter() - start
    after = _cpu_times(core_set)
    conn.close()
    costs = [ProcessCost(pid, label, (cpu - before[pid][0]) * 1000.0 / count, (cpu - before[pid][0]) / wall)
             for pid, (cpu, label) in after.items() if pid in before and cpu > before[pid][0]]
    costs.sort(key=lambda c: -c.cpu_ms_per_request)
    latencies.sort()
    return {"host": host, "requests": count, "failures": failures, "wall_s": wall, "cores": sorted(core_set or []),
            "p50_ms": latencies[len(latencies) // 2], "total_cpu_ms_per_request": sum(c.cpu_ms_per_request for c in costs),
            "processes": [asdict(c) for c in costs]}


def table(result: dict[str, Any], top: int = 12) -> str:
    lines = [f"{result['requests']} requests, one at a time, to {result['host']}: p50 {result['p50_ms']:.3f} ms, "
             f"{result['failures']} failures; CPU per request by process "
             f"(total {result['total_cpu_ms_per_request']:.3f} ms)", ""]
    lines += ["| ms CPU / request | share of a core | process |", "|---:|---:|:---|"]
    for c in result["processes"][:top]:
        lines.append(f"| {c['cpu_ms_per_request']:.3f} | {c['share_of_wall']:.1%} | {c['name']} (pid {c['pid']}) |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="http://127.0.0.1:8000")
    ap.add_argument("--payloads", required=True, help="payload file from loadtest/payloads.py")
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--cores", default="", help="only processes allowed on these cores (comma-separated)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    cores = [int(c) for c in args.cores.split(",") if c.strip()]
    result = measure(args.host, PayloadSet.load(args.payloads), args.count, cores or None)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
