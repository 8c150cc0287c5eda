"""Where one call's time goes, node by node: ONNX Runtime's own profiler over repeated calls, grouped
into the feature normalizer, the dense layers, (de)quantization and the rest.

Why: int8 speeds up the dense layers only. The work beside them (the normalizer's log1p and sign on
every raw feature, quantizing activations) is fixed, so it bounds any int8 variant's gain over fp32
(Amdahl's law) however close its integer kernels come to the roof. This module measures that bound
instead of assuming it: `amdahl_bound` is the speed-up over fp32 that int8 would reach with its dense
layers at the int8 roof and everything else as fast as fp32's.

The profiler is ONNX Runtime's (`SessionOptions.enable_profiling`, one JSON event per node per
call); each node's time is its median over the calls.
"""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Dense layers however they are expressed: fp32 (Gemm, FusedGemm with its ReLU, MatMul), static int8
# (QGemm, QLinearMatMul, MatMulIntegerToFloat after ORT fuses the QDQ pairs) and dynamic int8.
DENSE_KERNELS = frozenset({"Gemm", "FusedGemm", "MatMul", "FusedMatMul", "QGemm", "QLinearMatMul", "MatMulInteger",
                           "MatMulIntegerToFloat", "DynamicQuantizeMatMul"})
QUANTIZE_KERNELS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
GROUPS = ("normalizer", "dense", "quantize", "other")


@dataclass(frozen=True)
class NodeTime:
    name: str
    op: str
    us: float  # median microseconds per call


def node_times(path: Path, feed: dict[str, np.ndarray], calls: int = 200, warmup: int = 20) -> list[NodeTime]:
    """Median kernel time of every node over `calls` calls (1 thread, as export/runtime.py runs it),
    in execution order; the first `warmup` calls are profiled too and dropped."""
    import onnxruntime as ort

    from export.runtime import session_options

    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(threads=1)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + calls):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)  # insertion order = execution order
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            durations[(event["name"].removesuffix("_kernel_time"), event["args"]["op_name"])].append(event["dur"])
    return [NodeTime(name, op, float(np.median(d[warmup:] or d))) for (name, op), d in durations.items()]


def grouped(times: list[NodeTime]) -> dict[str, float]:
    """Microseconds per group: the normalizer is every node before the first dense or quantize node
    (the graph's first layer is the feature normalizer), then dense, quantize and other (activations,
    bias adds, reshapes)."""
    out = dict.fromkeys(GROUPS, 0.0)
    seen_layer = False
    for t in times:
        seen_layer = seen_layer or t.op in DENSE_KERNELS or t.op in QUANTIZE_KERNELS
        group = ("dense" if t.op in DENSE_KERNELS else "quantize" if t.op in QUANTIZE_KERNELS
                 else "other" if seen_layer else "normalizer")
        out[group] += t.us
    return out


def dense_layer_rates(times: list[NodeTime], layer_macs: list[int]) -> list[dict]:
    """Each dense node's op, microseconds and achieved multiply-adds per second, matched to the MLP's
    layers in order (`layer_macs`: multiply-adds of each layer for the whole call)."""
    dense = [t for t in times if t.op in DENSE_KERNELS]
    if len(dense) != len(layer_macs):
        raise ValueError(f"dense nodes: {len(dense)} in the profile, {len(layer_macs)} layers in the model")
    return [{"op": t.op, "us": t.us, "macs_per_s": macs / (t.us * 1e-6) if t.us else None}
            for t, macs in zip(dense, layer_macs, strict=True)]


def amdahl_bound(fp32: dict[str, float], total_macs: float, int8_roof: float) -> float:
    """fp32's time over (fp32's non-dense time + every multiply-add at the int8 roof): the most an int8
    variant could gain if its integer kernels ran at the roof and quantizing cost nothing."""
    fp32_total = sum(fp32.values())
    return fp32_total / (fp32_total - fp32["dense"] + total_macs / int8_roof * 1e6)
