"""Which int8 recipe wins on this machine: static quantization's format, calibration and weight
granularity, against dynamic quantization, each measured for speed and accuracy.

Why a study beside the lab's variants: the lab builds one static recipe (QDQ, MinMax, granularity
chosen by score error) and one dynamic one. What the int8 kernels can do depends on the instruction
set (VNNI or not), so the recipes are measured on each machine and the figures kept, with the one
that wins. Every attempt is built with onnxruntime.quantization (ONNX Runtime's own tool), gated on
NDCG@10 retention against the checkpoint's torch model as every variant is, and timed one list per
call at 100 and 1000 documents on one thread (export/benchmark.py's `time_calls`).

Attempts: static in QDQ form (ONNX Runtime fuses QDQ pairs into integer kernels when it loads the
graph) and in QOperator form (QLinearMatMul: activations stay integer between the layers), each with
MinMax, Entropy and Percentile calibration, per-tensor and per-channel weights; dynamic, per-tensor
and per-channel. Activations u8, weights s8 throughout (the VNNI pairing).

Beside the speeds, ONNX Runtime's profiler splits fp32's and the kept attempt's calls into the
feature normalizer, the dense layers and (de)quantization (export/node_profile.py), with each dense
layer's multiply-add rate, and the report gives the Amdahl bound: what int8 could reach over fp32 with
its dense layers at the int8 roof, measured in the same run. Where that bound is below a target, no
int8 recipe can reach it on this model.

    python export/int8_attempts.py [--checkpoint artifacts/models/mlp-ranknet]

Writes results/models/<cpu>-<isa>-<model>-int8-attempts.{md,json}.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.accuracy import gate, score_split
from export.benchmark import BenchConfig, measure_roofs, one_list_call, sample_list, time_calls
from export.node_profile import amdahl_bound, dense_layer_rates, grouped, node_times
from export.onnx_export import op_types
from export.report import results_stem, write_report_files
from export.runtime import OrtScorer, TorchScorer
from export.variants import DENSE_OPS, BuildContext, feeds_reader, gemm_to_matmul, quiet, weight_dense_nodes
from models.environment import collect_environment, environment_markdown
from models.paths import REPO_ROOT, model_dir
from models.rankers import RankerConfig, mlp_layer_multiply_adds, multiply_adds_per_document

CALIBRATION_QUERIES = 32
CALIBRATION_BLOCK = 100  # rows per calibration batch
SIZES = (100, 1000)


# ONNX Runtime session options that can matter when one call takes tens of microseconds, each what it
# changes from export/runtime.session_options (the served settings: ORT_ENABLE_ALL, memory arena and
# memory pattern on, sequential, no spinning; at 1 thread there is no pool to spin). Each function gets
# the options and the onnxruntime module.
SESSION_OPTIONS: dict[str, Callable[[Any, Any], None]] = {
    "as served": lambda options, ort: None,
    "graph optimization EXTENDED (no layout transforms)": lambda options, ort: setattr(
        options, "graph_optimization_level", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED),
    "graph optimization BASIC (no fusions)": lambda options, ort: setattr(
        options, "graph_optimization_level", ort.GraphOptimizationLevel.ORT_ENABLE_BASIC),
    "no CPU memory arena": lambda options, ort: setattr(options, "enable_cpu_mem_arena", False),
    "no memory pattern": lambda options, ort: setattr(options, "enable_mem_pattern", False),
    "denormals flushed to zero": lambda options, ort: options.add_session_config_entry(
        "session.set_denormal_as_zero", "1"),
}


def session_option_times(path: Path, lists: dict[int, np.ndarray], bench: BenchConfig) -> dict[str, dict[str, float]]:
    """p50 milliseconds of one call per session option and list size (1 thread)."""
    import onnxruntime as ort

    from export.runtime import session_options

    out = {}
    for name, change in SESSION_OPTIONS.items():
        options = session_options(threads=1)
        change(options, ort)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        out[name] = {f"p50_ms@{n}": float(np.median(time_calls(
            lambda run=session.run, feed={"features": rows}: run(None, feed), bench)) * 1e3)
            for n, rows in lists.items()}
    return out


def attempts() -> list[dict[str, Any]]:
    """Every recipe tried: name and options."""
    out: list[dict[str, Any]] = [{"kind": "dynamic", "per_channel": pc} for pc in (False, True)]
    for fmt, method, pc in itertools.product(("QDQ", "QOperator"), ("MinMax", "Entropy", "Percentile"), (False, True)):
        out.append({"kind": "static", "format": fmt, "calibration": method, "per_channel": pc})
    return out


def label(attempt: dict) -> str:
    weights = "per-channel" if attempt["per_channel"] else "per-tensor"
    if attempt["kind"] == "dynamic":
        return f"dynamic, {weights}"
    return f"static {attempt['format']}, {attempt['calibration']}, {weights}"


def build(attempt: dict, ctx: BuildContext, target: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    source = ctx.onnx_fp32()
    if attempt["kind"] == "dynamic":
        with tempfile.TemporaryDirectory() as tmp:
            matmul = Path(tmp) / "matmul.onnx"
            import onnx

            model = gemm_to_matmul(onnx.load(str(source)))
            onnx.save(model, str(matmul))
            quiet(lambda: quantize_dynamic(str(matmul), str(target), op_types_to_quantize=["MatMul"],
                                            nodes_to_quantize=weight_dense_nodes(model),
                                            per_channel=attempt["per_channel"], weight_type=QuantType.QInt8))
        return
    import onnx

    nodes = weight_dense_nodes(onnx.load(str(source)))

    # Equal-sized blocks of the calibration rows (the MLP scores rows independently): ONNX Runtime's
    # histogram calibrators (Entropy, Percentile) stack every batch's tensors and need one shape.
    rows = ctx.calibration.X[: (len(ctx.calibration.X) // CALIBRATION_BLOCK) * CALIBRATION_BLOCK]
    blocks = [{"features": block} for block in np.split(rows.astype(np.float32), len(rows) // CALIBRATION_BLOCK)]

    quiet(lambda: quantize_static(
        str(source), str(target), feeds_reader(blocks), quant_format=getattr(QuantFormat, attempt["format"]),
        op_types_to_quantize=list(DENSE_OPS), nodes_to_quantize=nodes, per_channel=attempt["per_channel"],
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, attempt["calibration"]),
        extra_options={"WeightSymmetric": True}))


def measure(path: Path, ctx: BuildContext, test: Any, reference: np.ndarray, bench: BenchConfig,
            config: RankerConfig) -> dict[str, Any]:
    """Retention, ops, p50 and documents per second at each size, and where each size's call spends
    its time (`profile@n`: microseconds per group; `layers@n`: each dense layer's rate)."""
    scorer = OrtScorer(path, pointwise=ctx.pointwise, n_features=ctx.n_features, threads=1)
    report = gate(reference, score_split(scorer, test), test)
    ops = sorted(op_types(path))
    row: dict[str, Any] = {"retention": report.retention, "valid": report.valid, "ops": ops}
    for n in SIZES:
        rows = sample_list(test.X, n)
        times = time_calls(one_list_call(scorer, rows), bench)
        row[f"p50_ms@{n}"] = float(np.median(times) * 1e3)
        row[f"docs_per_s@{n}"] = n / float(np.median(times))
        nodes = node_times(path, {"features": np.ascontiguousarray(rows, dtype=np.float32)})
        row[f"profile@{n}"] = grouped(nodes)
        row[f"layers@{n}"] = dense_layer_rates(nodes, [n * macs for macs in mlp_layer_multiply_adds(config)])
    return row


def run(checkpoint: Path) -> dict[str, Any]:
    from export.quantize import dataset_of
    from models.train import load_checkpoint

    model, card = load_checkpoint(checkpoint)
    if not card["pointwise"]:
        raise SystemExit("int8_attempts: the MLP (pointwise) only; the attention ranker's graph is another study")
    config = RankerConfig.from_dict(card["config"])
    dataset = dataset_of(card)
    test = dataset.test
    bench = BenchConfig(threads=(1,))
    roofs = measure_roofs(bench)
    reference = score_split(TorchScorer(model, pointwise=True, n_features=card["n_features"]), test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ctx = BuildContext(model=model, checkpoint=checkpoint, pointwise=True, n_features=card["n_features"],
                           out_dir=Path(tmp), calibration=dataset.train.subset(range(CALIBRATION_QUERIES)))
        fp32 = measure(ctx.onnx_fp32(), ctx, test, reference, bench, config)
        rows.append({"attempt": "onnx-fp32 (the baseline)", **fp32})
        for i, attempt in enumerate(attempts()):
            target = Path(tmp) / f"attempt-{i}.onnx"
            build(attempt, ctx, target)
            row = {"attempt": label(attempt), **attempt, **measure(target, ctx, test, reference, bench, config)}
            for n in SIZES:
                row[f"speedup@{n}"] = row[f"docs_per_s@{n}"] / fp32[f"docs_per_s@{n}"]
            rows.append(row)
            print(f"{row['attempt']:<40} retention {row['retention']:.4f}  x fp32 @100 {row['speedup@100']:.2f}  "
                  f"@1000 {row['speedup@1000']:.2f}", flush=True)
        # The session options, on fp32 and on the attempt the study keeps (rows[0] is fp32, so the
        # attempt's file is attempt-{best - 1}).
        lists = {n: sample_list(test.X, n) for n in SIZES}
        best = kept_index(rows)
        options = {rows[0]["attempt"]: session_option_times(ctx.onnx_fp32(), lists, bench)}
        if best is not None:
            options[rows[best]["attempt"]] = session_option_times(Path(tmp) / f"attempt-{best - 1}.onnx", lists, bench)
    macs = multiply_adds_per_document(config)
    for row in rows:
        roof = roofs.fp32["1"] if row is rows[0] else roofs.int8["1"]
        row["roof_fraction@1000"] = macs * row["docs_per_s@1000"] / roof
    return {"model": card["name"], "version": card["version"], "macs_per_document": macs,
            "roofs": roofs.model_dump(),
            "amdahl_bound": {str(n): amdahl_bound(fp32[f"profile@{n}"], macs * n, roofs.int8["1"]) for n in SIZES},
            "rows": rows, "session_options": options, "environment": collect_environment()}


def kept_index(rows: list[dict]) -> int | None:
    """The winner's index in `rows` (rows[0] is the fp32 baseline): the valid attempt with the most
    documents per second at 1000 documents."""
    return max((i for i, r in enumerate(rows) if i and r["valid"]), key=lambda i: rows[i]["docs_per_s@1000"],
               default=None)


def kept(report: dict) -> dict | None:
    best = kept_index(report["rows"])
    return None if best is None else report["rows"][best]


def time_split(report: dict, best: dict | None) -> list[str]:
    """The 'where the time goes' section: fp32's and the kept attempt's calls split by ONNX Runtime's
    profiler, each dense layer's rate, and the Amdahl bound that the split implies."""
    roofs, fp32 = report["roofs"], report["rows"][0]
    shown = [fp32] + ([best] if best else [])
    lines = ["", "## Where the time goes (ONNX Runtime's profiler, median microseconds per call)", "",
             f"Roofs in this run, 1 thread: int8 {roofs['int8']['1'] / 1e9:.1f} G multiply-adds/s, fp32 "
             f"{roofs['fp32']['1'] / 1e9:.1f} G ({roofs['int8']['1'] / roofs['fp32']['1']:.2f}x).", ""]
    for n in SIZES:
        split = fp32[f"profile@{n}"]
        share = split["normalizer"] / sum(split.values())
        achieved = best[f"speedup@{n}"] if best else None
        lines.append(f"- At {n} documents the feature normalizer takes {share:.0%} of onnx-fp32's time. With every "
                     f"dense layer at the int8 roof and the rest as fast as fp32's, int8 could reach at most "
                     f"**{report['amdahl_bound'][str(n)]:.2f}x** onnx-fp32"
                     + (f"; the kept attempt reached {achieved:.2f}x." if achieved else "."))
    lines += ["", "| attempt | documents | normalizer | dense layers | (de)quantize | other | each dense layer: op, "
              "microseconds, G multiply-adds/s (roof fraction) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in shown:
        roof = roofs["fp32"]["1"] if r is fp32 else roofs["int8"]["1"]
        for n in SIZES:
            split = r[f"profile@{n}"]
            layers = "; ".join(f"{layer['op']} {layer['us']:.0f} us, {layer['macs_per_s'] / 1e9:.1f} G "
                               f"({layer['macs_per_s'] / roof:.0%})" for layer in r[f"layers@{n}"] if layer["macs_per_s"])
            lines.append(f"| {r['attempt']} | {n} | {split['normalizer']:.0f} | {split['dense']:.0f} | "
                         f"{split['quantize']:.0f} | {split['other']:.0f} | {layers} |")
    lines += ["", "The normalizer is the model's first layer (signed log1p of every raw feature, standardization, "
              "clamp): float work that int8 cannot speed up. Node times are kernel times only, so they sum to a "
              "little less than the p50 below."]
    return lines


def session_option_lines(report: dict) -> list[str]:
    """The session options table: p50 per option, and its ratio to the served settings."""
    measured = report.get("session_options") or {}
    if not measured:
        return []
    header = " | ".join(f"{name}: p50 ms @{n} | x served @{n}" for name in measured for n in SIZES)
    lines = ["", "## ONNX Runtime session options (1 thread)", "",
             "Each row changes one option from the served settings (export/runtime.session_options); "
             "x served is the served p50 over this row's (above 1.00x: faster).", "",
             f"| option | {header} |", "| --- |" + " --- | --- |" * (len(measured) * len(SIZES))]
    for option in SESSION_OPTIONS:
        cells = []
        for times in measured.values():
            for n in SIZES:
                p50, served = times[option][f"p50_ms@{n}"], times["as served"][f"p50_ms@{n}"]
                cells += [f"{p50:.3f}", f"{served / p50:.2f}x"]
        lines.append(f"| {option} | {' | '.join(cells)} |")
    return lines


def markdown(report: dict) -> str:
    best = kept(report)
    lines = [f"# int8 recipes for `{report['model']}` ({report['macs_per_document']:,} multiply-adds per document)", "",
             f"Written by `python export/int8_attempts.py --checkpoint artifacts/models/{report['model']}`.", "",
             "## Kept (computed from the rows)", "",
             (f"- **{best['attempt']}**: {best['speedup@1000']:.2f}x onnx-fp32 at 1000 documents, "
              f"{best['speedup@100']:.2f}x at 100, NDCG@10 retention {best['retention']:.4f}: the valid attempt "
              "with the most documents per second at 1000 documents." if best else "- No attempt passed the gate."),
             *time_split(report, best),
             *session_option_lines(report),
             "", "| attempt | retention | valid | p50 ms @100 | x fp32 @100 | p50 ms @1000 | x fp32 @1000 "
             "| roof fraction @1000 | ops |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["rows"]:
        lines.append(f"| {r['attempt']} | {r['retention']:.4f} | {'yes' if r['valid'] else 'no'} | "
                     f"{r['p50_ms@100']:.3f} | {r.get('speedup@100', 1.0):.2f}x | {r['p50_ms@1000']:.3f} | "
                     f"{r.get('speedup@1000', 1.0):.2f}x | {r['roof_fraction@1000']:.0%} | "
                     f"{', '.join(o for o in r['ops'] if o not in ('Relu', 'Add'))} |")
    lines += ["", "How to read it: one thread, one list per call, after warm-up (export/benchmark.py). Retention: "
              "NDCG@10 over the torch model's on the test split; valid at 0.99 or more, as in the lab's gate. "
              "Calibration: the rows of the first 32 training lists, in batches of 100. Activations u8, weights s8 "
              "(symmetric).", "",
              environment_markdown(report["environment"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=model_dir("mlp-ranknet"))
    p.add_argument("--out", type=Path, default=REPO_ROOT / "results" / "models")
    args = p.parse_args(argv)
    report = run(args.checkpoint)
    stem = f"{results_stem(report['environment'], 'quick')}-{report['model']}-int8-attempts"
    print(f"wrote {write_report_files(args.out, stem, report, lambda: markdown(report))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
