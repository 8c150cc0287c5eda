"""Model-level benchmark: raw in-process inference per variant, and its distance to the hardware.

No HTTP, no batching, no cache: one list per call (for the attention ranker: batch 1, L docs),
after warm-up, repeated, at 1 thread and at all threads. Each cell reports p50/p99 latency and
documents per second, and the achieved multiply-add rate as a fraction of a practical roof measured
in the same run on the same machine: a large fp32 matrix product (torch.mm, i.e. the BLAS sgemm
that torch ships) for fp32/fp16 variants, and a large int8 one (ONNX Runtime's MatMulInteger,
uint8 x int8 -> int32, the kernel dynamic quantization runs) for int8 variants. A small model scoring
one list can be far from its roof (call overhead, small matrices); that distance is the point.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from export.manifest import BenchRow, Roofs
from export.runtime import Scorer

ROOF_SIZE = 1024  # M = N = K of the roof matrix products (~1.07 G multiply-adds per call)


@dataclass(frozen=True)
class BenchConfig:
    """How long and at what sizes to measure. `quick()` for smoke runs; figures need the default."""

    sizes: tuple[int, ...] = (1, 10, 100, 1000)
    threads: tuple[int, ...] = (1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    warmup: int = 5
    repeats: int = 200  # at most, per cell
    min_repeats: int = 5
    max_seconds: float = 0.3  # per cell, after warm-up: a slow cell gets fewer repeats (>= min_repeats)
    roof_repeats: int = 5

    @classmethod
    def quick(cls, **overrides: object) -> BenchConfig:
        return cls(**{"warmup": 2, "repeats": 30, "min_repeats": 3, "max_seconds": 0.08, "roof_repeats": 2,
                      **overrides})

    @property
    def all_threads(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.threads)))


def time_calls(fn: Callable[[], object], config: BenchConfig) -> np.ndarray:
    """Seconds per call of `fn` after `config.warmup` calls; bounded in count and time."""
    for _ in range(config.warmup):
        fn()
    times: list[float] = []
    deadline = time.perf_counter() + config.max_seconds
    while len(times) < config.repeats and (len(times) < config.min_repeats or time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.asarray(times)


def bench_row(times: np.ndarray, n_docs: int, threads: int, *, device: str = "cpu", mode: str = "default",
              macs_per_doc: float | None = None, roof: str | None = None, roof_macs: float | None = None) -> BenchRow:
    docs_per_s = n_docs * times.size / float(times.sum())
    macs = macs_per_doc * docs_per_s if macs_per_doc else None
    return BenchRow(
        device=device, mode=mode, threads=threads, n_docs=n_docs, repeats=int(times.size),
        p50_ms=float(np.percentile(times, 50) * 1e3), p99_ms=float(np.percentile(times, 99) * 1e3),
        mean_ms=float(times.mean() * 1e3), docs_per_s=docs_per_s, macs_per_s=macs,
        roof=roof if roof_macs else None, roof_fraction=macs / roof_macs if macs and roof_macs else None,
    )


def sample_list(rows: np.ndarray, n_docs: int, seed: int = 0) -> np.ndarray:
    """`n_docs` real feature rows (drawn with replacement from `rows`), float32 [n_docs, F]."""
    rng = np.random.default_rng(seed)
    return np.ascontiguousarray(rows[rng.integers(0, len(rows), n_docs)], dtype=np.float32)


def one_list_call(scorer: Scorer, X: np.ndarray) -> Callable[[], object]:
    """Score one list per call: flat rows for a pointwise model, batch 1 for a listwise one."""
    if scorer.pointwise:
        return lambda: scorer.score_documents(X)
    features, mask = X[None], np.ones((1, len(X)), dtype=bool)
    return lambda: scorer.score_lists(features, mask)


def bench_scorer(open_scorer: Callable[[int], Scorer], rows: np.ndarray, config: BenchConfig, *,
                 macs_per_doc: Callable[[int], float], roof: str, roofs: Roofs | None) -> list[BenchRow]:
    """Every (threads, list size) cell of one variant; `open_scorer(threads)` loads it fresh."""
    out = []
    for threads in config.all_threads:
        scorer = open_scorer(threads)
        for n_docs in config.sizes:
            call = one_list_call(scorer, sample_list(rows, n_docs))
            roof_macs = getattr(roofs, roof).get(str(threads)) if roofs else None
            out.append(bench_row(time_calls(call, config), n_docs, threads, device=scorer.device,
                                 macs_per_doc=macs_per_doc(n_docs), roof=roof, roof_macs=roof_macs))
        del scorer
    return out


# ---------------------------------------------------------------------------------------------- roofs

def torch_mm_roof(threads: int, repeats: int, size: int = ROOF_SIZE, dtype: str = "float32") -> float:
    """Best multiply-adds/s of a size^3 torch.mm at `threads` threads (torch's own threads restored), in
    float32 or, for the bf16 roof, `dtype="bfloat16"`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = (torch.randn(size, size, dtype=getattr(torch, dtype)) for _ in range(2))
        torch.mm(a, b)
        best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    finally:
        torch.set_num_threads(before)
    return size**3 / best


def int8_roof(threads: int, repeats: int, size: int = ROOF_SIZE) -> float:
    """Best multiply-adds/s of a size^3 ONNX Runtime MatMulInteger (uint8 x constant int8 -> int32)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "B")
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "int8_roof",
        [helper.make_tensor_value_info("A", TensorProto.UINT8, [size, size])],
        [helper.make_tensor_value_info("Y", TensorProto.INT32, [size, size])], initializer=[weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feed = {"A": rng.integers(0, 256, (size, size), dtype=np.uint8)}
    session.run(None, feed)
    best = min(_timed(lambda: session.run(None, feed)) for _ in range(repeats))
    return size**3 / best


def measure_roofs(config: BenchConfig) -> Roofs:
    """fp32 and int8 roofs at every thread count; a bf16 one too where the CPU has native bf16 math
    (elsewhere torch emulates it and the torch-bf16 variant is skipped, export/variants.py)."""
    from export.variants import bf16_unavailable

    native_bf16 = bf16_unavailable() is None
    return Roofs(
        fp32={str(t): torch_mm_roof(t, config.roof_repeats) for t in config.all_threads},
        int8={str(t): int8_roof(t, config.roof_repeats) for t in config.all_threads},
        bf16={str(t): torch_mm_roof(t, config.roof_repeats, dtype="bfloat16") for t in config.all_threads}
        if native_bf16 else {},
        method={"fp32": f"torch.mm float32 {ROOF_SIZE}^3, best of {config.roof_repeats}",
                "int8": f"onnxruntime MatMulInteger uint8 x int8 -> int32 {ROOF_SIZE}^3, best of "
                        f"{config.roof_repeats}",
                **({"bf16": f"torch.mm bfloat16 {ROOF_SIZE}^3, best of {config.roof_repeats}"} if native_bf16 else {})},
    )


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------- GPU

def gpu_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def gpu_rows(model: object, onnx_files: dict[str, str], rows: np.ndarray, config: BenchConfig, *,
             pointwise: bool, n_features: int, macs_per_doc: Callable[[int], float],
             log: Callable[[str], None] = print) -> dict[str, list[BenchRow]]:
    """GPU cells by variant name (torch modes under torch-eager): torch fp32, TF32, fp16 and bf16 autocast, torch.compile; ORT's CUDA provider for the
    given ONNX files when this onnxruntime has it. Each call includes the host<->device copies, as a
    served request would. Without a GPU: one printed line and no rows (never faked)."""
    if not gpu_available():
        log("GPU rows skipped: torch.cuda.is_available() is False on this machine")
        return {}
    import torch

    model = model.eval().cuda()
    modes: dict[str, tuple[Callable, bool, torch.dtype | None]] = {
        "fp32": (model, False, None), "tf32": (model, True, None),
        "fp16-autocast": (model, False, torch.float16), "bf16-autocast": (model, False, torch.bfloat16),
        "compile": (torch.compile(model, dynamic=True), False, None),
    }
    out: dict[str, list[BenchRow]] = {}
    for mode, (module, tf32, dtype) in modes.items():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        cells = []
        try:
            for n_docs in config.sizes:
                X = sample_list(rows, n_docs)
                args = (X,) if pointwise else (X[None], np.ones((1, n_docs), dtype=bool))

                def call(args: tuple = args, module: Callable = module, dtype: torch.dtype | None = dtype) -> object:
                    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                                 enabled=dtype is not None):
                        result = module(*(torch.from_numpy(a).cuda(non_blocking=True) for a in args)).float().cpu()
                    torch.cuda.synchronize()
                    return result
                cells.append(bench_row(time_calls(call, config), n_docs, 1, device="cuda", mode=mode,
                                       macs_per_doc=macs_per_doc(n_docs)))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
            torch.backends.cudnn.allow_tf32 = previous
        out.setdefault("torch-eager", []).extend(cells)

    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        log("ONNX Runtime GPU rows skipped: CUDAExecutionProvider is not in this onnxruntime build")
        return out
    from export.runtime import OrtScorer

    for name, path in onnx_files.items():
        scorer = OrtScorer(path, pointwise=pointwise, n_features=n_features, providers=["CUDAExecutionProvider"])
        if scorer.device != "cuda":
            continue
        cells = []
        for n_docs in config.sizes:
            call = one_list_call(scorer, sample_list(rows, n_docs))
            cells.append(bench_row(time_calls(call, config), n_docs, 1, device="cuda", mode="ort-cuda",
                                   macs_per_doc=macs_per_doc(n_docs)))
        out[name] = cells
    return out
