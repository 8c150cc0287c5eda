"""The optimization variants, one registered entry each: a name, a one-line description, a builder.

Every builder takes a `BuildContext` (the trained fp32 model, its checkpoint, calibration data and
the output folder) and returns a `Built` (the file and the options it chose). The ONNX variants all
start from the plain export `onnx-fp32`, which the context builds once on first use, so any subset
of variants can be built alone (`--variants onnx-int8-dynamic`).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from export.onnx_export import export_onnx
from export.runtime import OrtScorer
from models.data import LTRSplit, pad_queries

OPTIMIZED_LEVEL = "ORT_ENABLE_EXTENDED"  # the highest level whose saved graph is portable across CPUs
DENSE_OPS = ("MatMul", "Gemm")


@dataclass
class BuildContext:
    """What every builder may use. `calibration` is a few training queries (never the test split)."""

    model: nn.Module
    checkpoint: Path
    pointwise: bool
    n_features: int
    out_dir: Path
    calibration: LTRSplit
    _fp32: Path | None = None

    def onnx_fp32(self) -> Path:
        """The plain ONNX export, built once per context."""
        if self._fp32 is None or not self._fp32.exists():
            self._fp32 = export_onnx(self.model, self.n_features, self.out_dir / "onnx-fp32.onnx",
                                     pointwise=self.pointwise)
        return self._fp32

    def calibration_feeds(self, max_lists: int = 32) -> list[dict[str, np.ndarray]]:
        """ONNX Runtime feeds from training lists: one list per feed (rows for the flat MLP graph)."""
        feeds = []
        for q in range(min(max_lists, self.calibration.n_queries)):
            batch = pad_queries(self.calibration, [q])
            if self.pointwise:
                feeds.append({"features": batch.features[0]})
            else:
                feeds.append({"features": batch.features, "mask": batch.mask})
        return feeds


@dataclass
class Built:
    path: Path
    build: dict = field(default_factory=dict)


def always_available() -> str | None:
    return None


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    format: str  # "torch" | "onnx"
    precision: str  # "fp32" | "fp16" | "bf16" | "int8"
    build: Callable[[BuildContext], Built]
    # Why this CPU cannot run the variant usefully (export/quantize.py skips it and says so), or None.
    unavailable: Callable[[], str | None] = always_available


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def bf16_unavailable() -> str | None:
    """bf16 pays only with native bf16 math (AVX-512 BF16 or AMX); elsewhere torch emulates it, slower
    than fp32, so the variant is skipped rather than measured as a loss."""
    from models.environment import cpu_flags

    if cpu_flags() & set(BF16_FLAGS):
        return None
    return f"this CPU has neither {' nor '.join(BF16_FLAGS)} (bf16 would be emulated, slower than fp32)"


# ---------------------------------------------------------------------------------------------- helpers

def weight_dense_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the MatMul/Gemm nodes whose second input is a weight (an initializer).

    Only these are quantized: attention's activation-by-activation products (Q.K^T, A.V) keep
    float precision, which is where int8 costs accuracy and buys little.
    """
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in DENSE_OPS and n.input[1] in weights]


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite each Gemm (x @ W^T + b) as MatMul + Add, in place; returns the model.

    Why: ONNX Runtime's dynamic (IntegerOps) quantizer handles MatMul but not Gemm, and the dynamo
    exporter emits Gemm for the MLP's 2-D input. ORT's own graph optimizer later fuses the quantized
    MatMul + Add back into DynamicQuantizeMatMul with a bias. No library offers this rewrite.
    """
    inits = {init.name: init for init in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        if attrs.get("transB", 0):
            weight = inits[node.input[1]]
            weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), weight.name))
        product = f"{node.name}_matmul_out"
        has_bias = len(node.input) > 2 and node.input[2]
        nodes.append(helper.make_node("MatMul", [node.input[0], node.input[1]],
                                      [product if has_bias else node.output[0]], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    del model.graph.value_info[:]  # stale shapes (transposed weights); shape inference redoes them
    return model


def optimize_offline(source: Path, target: Path, level: str = OPTIMIZED_LEVEL) -> Path:
    """Apply ONNX Runtime's graph optimizations once and save the result (loads faster, same math)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    options.optimized_model_filepath = str(target)
    options.log_severity_level = 3
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    return target


def _score_error_and_latency(ctx: BuildContext, path: Path, reference: list[np.ndarray]) -> tuple[float, float]:
    """Mean |score - fp32 score| on calibration lists, and p50 ms of one 100-document list (1 thread)."""
    session = OrtScorer(path, pointwise=ctx.pointwise, n_features=ctx.n_features, threads=1).session
    feeds = ctx.calibration_feeds()
    errors = [np.abs(session.run(None, f)[0] - ref).mean() for f, ref in zip(feeds, reference, strict=True)]
    rows = np.resize(ctx.calibration.X, (100, ctx.n_features)).astype(np.float32)
    feed = {"features": rows} if ctx.pointwise else {"features": rows[None], "mask": np.ones((1, 100), bool)}
    for _ in range(5):
        session.run(None, feed)
    times = []
    for _ in range(40):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return float(np.mean(errors)), float(np.median(times) * 1e3)


def choose_granularity(ctx: BuildContext, quantize: Callable[[bool, Path], None], target: Path) -> dict:
    """Build per-tensor and per-channel weights, measure both, keep one at `target`; returns why.

    Rule: per-channel (one scale per output unit) when it cuts the mean score error vs fp32 by at
    least 10% and costs at most 10% latency; per-tensor otherwise (fewer scales, no slower).
    Both measurements go into the manifest, so the choice can be checked on every machine.
    """
    fp32 = OrtScorer(ctx.onnx_fp32(), pointwise=ctx.pointwise, n_features=ctx.n_features).session
    reference = [fp32.run(None, f)[0] for f in ctx.calibration_feeds()]
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for per_channel in (False, True):
            path = Path(tmp) / f"per_channel_{per_channel}.onnx"
            quantize(per_channel, path)
            error, p50 = _score_error_and_latency(ctx, path, reference)
            measured["per-channel" if per_channel else "per-tensor"] = {
                "mean_abs_score_error": error, "p50_ms_100_docs": p50, "path": path}
        tensor, channel = measured["per-tensor"], measured["per-channel"]
        per_channel = (channel["mean_abs_score_error"] <= 0.9 * tensor["mean_abs_score_error"]
                       and channel["p50_ms_100_docs"] <= 1.1 * tensor["p50_ms_100_docs"])
        chosen = "per-channel" if per_channel else "per-tensor"
        shutil.copyfile(measured[chosen]["path"], target)
    for value in measured.values():
        value.pop("path")
    reason = ("per-channel: >=10% lower score error at <=10% extra latency" if per_channel else
              "per-tensor: per-channel did not cut the score error by >=10% at <=10% extra latency")
    return {"weights": chosen, "granularity_reason": reason, "granularity_measured": measured}


def feeds_reader(feeds: list[dict[str, np.ndarray]]) -> Any:
    """ONNX Runtime's calibration input: an `onnxruntime.quantization.CalibrationDataReader` handing
    out `feeds` once, in order (a fresh one per quantize_static call)."""
    from onnxruntime.quantization import CalibrationDataReader

    class FeedsReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.feeds, None)

    return FeedsReader()


# ---------------------------------------------------------------------------------------------- builders

def copy_checkpoint(ctx: BuildContext, folder: str) -> Path:
    """The checkpoint (weights + model card) copied into the variants folder, so it is self-contained."""
    target = ctx.out_dir / folder
    target.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "model_card.json"):
        shutil.copyfile(ctx.checkpoint / name, target / name)
    return target


def build_torch_eager(ctx: BuildContext) -> Built:
    """A copy of the checkpoint, scored as trained."""
    return Built(copy_checkpoint(ctx, "torch-eager"), {"runtime": "torch eager, inference_mode"})


def build_torch_bf16(ctx: BuildContext) -> Built:
    """The checkpoint again, scored under torch.autocast(bfloat16): the same weights, bf16 matmuls."""
    return Built(copy_checkpoint(ctx, "torch-bf16"),
                 {"runtime": "torch eager, inference_mode, torch.autocast('cpu', dtype=torch.bfloat16)"})


def build_onnx_fp32(ctx: BuildContext) -> Built:
    from export.onnx_export import OPSET
    return Built(ctx.onnx_fp32(), {"opset": OPSET, "exporter": "torch.onnx.export(dynamo=True)"})


def build_onnx_fp32_opt(ctx: BuildContext) -> Built:
    target = optimize_offline(ctx.onnx_fp32(), ctx.out_dir / "onnx-fp32-opt.onnx")
    return Built(target, {"graph_optimization_level": OPTIMIZED_LEVEL,
                          "why": "EXTENDED is portable across CPUs; ENABLE_ALL adds layout (NCHWc) "
                                 "transforms specific to the CPU that saved it"})


def build_onnx_int8_dynamic(ctx: BuildContext) -> Built:
    """optimum's avx512_vnni preset (int8 symmetric weights, uint8 activations quantized per call).

    Not the `avx2` preset: it stores uint8 weights, measured 2x slower than int8 ones here.
    """
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    matmul_model = gemm_to_matmul(onnx.load(str(ctx.onnx_fp32())))
    nodes = weight_dense_nodes(matmul_model)

    def quantize(per_channel: bool, target: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / "matmul.onnx"
            onnx.save(matmul_model, str(source))
            config = AutoQuantizationConfig.avx512_vnni(
                is_static=False, per_channel=per_channel, nodes_to_quantize=nodes, operators_to_quantize=["MatMul"])
            quiet(lambda: ORTQuantizer.from_pretrained(tmp, file_name="matmul.onnx").quantize(
                save_dir=Path(tmp) / "q", quantization_config=config))
            # Fuse DynamicQuantizeLinear + MatMulInteger + Cast + Mul (+ bias Add) into one
            # DynamicQuantizeMatMul kernel, at the portable level, and save that graph.
            optimize_offline(Path(tmp) / "q" / "matmul_quantized.onnx", target)

    target = ctx.out_dir / "onnx-int8-dynamic.onnx"
    info = choose_granularity(ctx, quantize, target)
    return Built(target, {"tool": "optimum AutoQuantizationConfig.avx512_vnni (is_static=False)",
                          "weights_dtype": "int8 (symmetric)", "activations_dtype": "uint8, per call",
                          "quantized_nodes": len(nodes), "post_optimization": OPTIMIZED_LEVEL, **info})


def build_onnx_int8_static(ctx: BuildContext) -> Built:
    """QDQ static quantization, activation ranges calibrated (MinMax) on training lists.

    Uses onnxruntime.quantization directly: optimum's static path needs a `datasets.Dataset` for
    calibration and its presets leave Gemm out; here Gemm and MatMul are named explicitly.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    source = ctx.onnx_fp32()
    nodes = weight_dense_nodes(onnx.load(str(source)))

    def quantize(per_channel: bool, target: Path) -> None:
        quiet(lambda: quantize_static(
            str(source), str(target), feeds_reader(ctx.calibration_feeds()), quant_format=QuantFormat.QDQ, op_types_to_quantize=list(DENSE_OPS),
            nodes_to_quantize=nodes, per_channel=per_channel, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, extra_options={"WeightSymmetric": True}))

    target = ctx.out_dir / "onnx-int8-static.onnx"
    info = choose_granularity(ctx, quantize, target)
    return Built(target, {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                          "op_types_to_quantize": list(DENSE_OPS), "quantized_nodes": len(nodes),
                          "calibration": f"MinMax over {len(ctx.calibration_feeds())} training lists",
                          "weights_dtype": "int8 (symmetric)", "activations_dtype": "uint8", **info})


def build_onnx_fp16(ctx: BuildContext) -> Built:
    """float16 weights and math for GPU serving; float32 inputs and outputs (keep_io_types).

    Every node is converted: raw features beyond float16's range (65504) become inf, and the
    normalizer's signed log1p and clamp map them to the clip bound, as float32 nearly does. (Keeping
    the normalizer in float32 with `node_block_list` was tried and gave wrong scores: the converter
    mis-casts initializers shared across the boundary.)
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(ctx.onnx_fp32()))
    fp16 = quiet(lambda: convert_float_to_float16(model, keep_io_types=True))
    target = ctx.out_dir / "onnx-fp16.onnx"
    onnx.save(fp16, str(target))
    return Built(target, {"tool": "onnxruntime.transformers.float16.convert_float_to_float16",
                          "keep_io_types": True})


def quiet(fn: Callable):
    """Run a quantization/conversion call with the root logger's warnings silenced (they advise
    pre-processing steps that do not apply to these small dense graphs)."""
    loggers = [logging.getLogger(name) for name in ("", "optimum", "optimum.onnxruntime.quantization")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return fn()
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("torch-eager", "the trained PyTorch model itself: the reference and the naive baseline",
            "torch", "fp32", build_torch_eager),
    Variant("onnx-fp32", "plain ONNX export, float32", "onnx", "fp32", build_onnx_fp32),
    Variant("onnx-fp32-opt", f"ONNX Runtime graph optimizations applied offline ({OPTIMIZED_LEVEL}, portable)",
            "onnx", "fp32", build_onnx_fp32_opt),
    Variant("onnx-int8-dynamic", "int8 weights, activations quantized per call (dynamic quantization)",
            "onnx", "int8", build_onnx_int8_dynamic),
    Variant("onnx-int8-static", "QDQ int8 weights and activations, ranges calibrated on training data",
            "onnx", "int8", build_onnx_int8_static),
    Variant("onnx-fp16", "float16 weights and math with float32 I/O, for GPU serving", "onnx", "fp16",
            build_onnx_fp16),
    Variant("torch-bf16", "the PyTorch model under bfloat16 autocast, for CPUs with AVX-512 BF16 or AMX", "torch",
            "bf16", build_torch_bf16, bf16_unavailable),
]}
