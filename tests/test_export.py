"""Export, variants, accuracy gate, manifest and results table (export/), on tiny trained rankers."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pydantic
import pytest
from export_support import built_variants
from onnx import numpy_helper

from export.accuracy import gate, ranking_agreement, score_split
from export.manifest import Manifest
from export.onnx_export import op_types
from export.quantize import main as quantize_main
from export.runtime import OrtScorer, open_variant
from export.variants import VARIANTS, gemm_to_matmul, weight_dense_nodes

ARCHS = ["mlp", "attention"]
INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm", "QLinearMatMul"}


@pytest.fixture(scope="module", params=ARCHS)
def built(request):
    return built_variants(request.param)


def test_every_variant_is_in_the_manifest_with_its_file(built) -> None:
    manifest = built.manifest
    assert list(manifest.variants) == [name for name in VARIANTS if name not in manifest.skipped]
    assert set(manifest.skipped) <= {name for name, v in VARIANTS.items() if v.unavailable() is not None}
    for entry in manifest.variants.values():
        assert (built.out_dir / entry.file).exists()
        assert len(entry.sha256) == 64 and entry.size_bytes > 0
        assert entry.environment["cpu"]["logical_cores"] >= 1
        assert entry.environment["threads"]["inter_op_num_threads"] == 1


def test_onnx_export_parity_with_torch(built) -> None:
    """The plain export scores the test split like torch: same scores, same rankings, same NDCG."""
    accuracy = built.manifest.variants["onnx-fp32"].accuracy
    assert accuracy.max_abs_diff < 1e-4
    assert accuracy.kendall_tau > 0.999 and accuracy.top10_overlap == 1.0
    assert accuracy.retention == 1.0 and accuracy.valid and accuracy.high_accuracy


def test_onnx_graph_is_checked_with_symbolic_sizes(built) -> None:
    path = built.out_dir / "onnx-fp32.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    outputs = [o.name for o in model.graph.output]
    assert outputs == ["scores"]
    if built.arch == "mlp":
        assert set(inputs) == {"features"} and isinstance(inputs["features"][0], str)
    else:
        assert set(inputs) == {"features", "mask"}
        assert all(isinstance(d, str) for d in inputs["features"][:2] + inputs["mask"])
    scorer = OrtScorer(path, pointwise=built.arch == "mlp", n_features=built.dataset.n_features)
    for batch, docs in [(1, 1), (2, 37), (1, 300)]:
        features = np.random.default_rng(docs).normal(size=(batch, docs, built.dataset.n_features)).astype(np.float32)
        assert scorer.score_lists(features, np.ones((batch, docs), bool)).shape == (batch, docs)


def test_int8_graphs_hold_integer_ops(built, tmp_path) -> None:
    """Dynamic: the dense layers run integer kernels. Static (QDQ): every weight dense layer reads a
    DequantizeLinear'd weight, and ONNX Runtime turns them into integer kernels when it loads them."""
    dynamic = built.out_dir / "onnx-int8-dynamic.onnx"
    assert op_types(dynamic) & INTEGER_OPS
    assert not weight_dense_nodes(onnx.load(str(dynamic))), "a float dense layer with a weight was left"

    static_path = built.out_dir / "onnx-int8-static.onnx"
    static = onnx.load(str(static_path))
    assert {"QuantizeLinear", "DequantizeLinear"} <= op_types(static_path)
    dequantized = {n.output[0] for n in static.graph.node if n.op_type == "DequantizeLinear"}
    fp32_dense = set(weight_dense_nodes(onnx.load(str(built.out_dir / "onnx-fp32.onnx"))))
    dense = [n for n in static.graph.node if n.name in fp32_dense]
    assert len(dense) == len(fp32_dense)
    assert dense and all(n.input[0] in dequantized and n.input[1] in dequantized for n in dense)

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    ort.InferenceSession(str(static_path), options, providers=["CPUExecutionProvider"])
    assert op_types(tmp_path / "loaded.onnx") & INTEGER_OPS


def test_variants_keep_the_ranking(built) -> None:
    for name in ("onnx-fp32-opt", "onnx-int8-dynamic", "onnx-int8-static", "onnx-fp16"):
        accuracy = built.manifest.variants[name].accuracy
        assert accuracy.kendall_tau > 0.8, name
        assert accuracy.retention > 0.9, name
        assert built.manifest.variants[name].valid == (accuracy.retention >= 0.99)


def test_gate_fails_a_damaged_variant(built, tmp_path) -> None:
    """Weights multiplied by random factors: the ranking breaks and the gate says invalid."""
    model = onnx.load(str(built.out_dir / "onnx-fp32.onnx"))
    rng = np.random.default_rng(0)
    for init in model.graph.initializer:
        if init.name in {n.input[1] for n in model.graph.node if n.op_type in ("Gemm", "MatMul")}:
            weight = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(
                (weight * rng.lognormal(0.0, 1.5, weight.shape)).astype(np.float32), init.name))
    damaged = tmp_path / "damaged.onnx"
    onnx.save(model, str(damaged))
    pointwise = built.arch == "mlp"
    test = built.dataset.test
    reference = score_split(open_variant(built.out_dir / "torch-eager", "torch", pointwise=pointwise,
                                         n_features=test.X.shape[1]), test)
    report = gate(reference, score_split(OrtScorer(damaged, pointwise=pointwise, n_features=test.X.shape[1]), test), test)
    assert not report.valid and not report.high_accuracy
    assert report.retention < 0.99 and report.kendall_tau < 0.9
    assert gate(reference, reference.copy(), test).valid


def test_gate_rejects_non_finite_scores(built) -> None:
    test = built.dataset.test
    reference = np.linspace(0, 1, test.n_docs)
    broken = reference.copy()
    broken[3] = np.nan
    assert not gate(reference, broken, test).valid


def test_ranking_agreement_on_known_orders() -> None:
    offsets = np.array([0, 5, 10])
    scores = np.arange(10, dtype=float)
    tau, overlap = ranking_agreement(scores, scores, offsets, k=3)
    assert tau == pytest.approx(1.0) and overlap == 1.0
    tau, overlap = ranking_agreement(scores, -scores, offsets, k=3)
    assert tau == pytest.approx(-1.0) and overlap == pytest.approx(1 / 3)


def test_gemm_to_matmul_keeps_the_math(built) -> None:
    if built.arch != "mlp":
        pytest.skip("the MLP graph is the one with Gemm")
    path = built.out_dir / "onnx-fp32.onnx"
    rewritten = gemm_to_matmul(onnx.load(str(path)))
    assert "Gemm" not in {n.op_type for n in rewritten.graph.node}
    X = built.dataset.test.X[:50]
    a = ort.InferenceSession(str(path)).run(None, {"features": X})[0]
    b = ort.InferenceSession(rewritten.SerializeToString()).run(None, {"features": X})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_manifest_schema_round_trip_and_rejections(built, tmp_path) -> None:
    data = json.loads(built.manifest_path.read_text())
    assert Manifest.model_validate(data).model.version == built.manifest.model.version
    path = tmp_path / "manifest.json"
    built.manifest.save(path)
    assert Manifest.load(path) == built.manifest

    extra = json.loads(json.dumps(data))
    extra["variants"]["onnx-fp32"]["surprise"] = 1
    with pytest.raises(pydantic.ValidationError, match="surprise"):
        Manifest.model_validate(extra)
    missing = json.loads(json.dumps(data))
    del missing["variants"]["onnx-fp32"]["accuracy"]
    with pytest.raises(pydantic.ValidationError, match="accuracy"):
        Manifest.model_validate(missing)
    wrong = json.loads(json.dumps(data))
    wrong["variants"]["onnx-fp32"]["precision"] = "int4"
    with pytest.raises(pydantic.ValidationError, match="precision"):
        Manifest.model_validate(wrong)


def test_benchmark_fields_and_results_table() -> None:
    from export.quantize import roof_of

    built = built_variants("mlp")
    manifest = built.manifest
    assert manifest.roofs and manifest.roofs.fp32["1"] > 0 and manifest.roofs.int8["1"] > 0
    for entry in manifest.variants.values():
        cells = {(row.threads, row.n_docs): row for row in entry.benchmark}
        assert set(cells) == {(1, 1), (1, 100)}
        row = cells[(1, 100)]
        assert 0 < row.p50_ms <= row.p99_ms and row.docs_per_s > 0 and row.repeats >= 3
        assert row.roof == roof_of(entry.precision, manifest.roofs) and row.roof_fraction > 0
    tables = list(built.results_dir.glob("*-mlp.md"))
    assert len(tables) == 1
    from export.report import isa_slug
    from models.environment import collect_environment

    assert tables[0].name.endswith(f"-{isa_slug(collect_environment())}-mlp.md")  # named by the ISA too
    text = tables[0].read_text()
    for name in manifest.variants:
        assert f"| {name} |" in text
    for name, reason in manifest.skipped.items():
        assert f"Skipped on this CPU: `{name}`: {reason}." in text
    assert "| CPU |" in text and "speedup vs onnx-fp32" in text
    assert tables[0].with_suffix(".csv").read_text().count("\n") == 1 + 2 * len(manifest.variants)


def test_cli_help_documents_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--arch", "--checkpoint", "--variants", "--out-dir", "--results-dir", "--skip-bench", "--quick",
                 "--threads", "--sizes", "--train-seconds", "--no-train"):
        assert flag in text


def test_cli_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        quantize_main(["--variants", "onnx-int3"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        quantize_main(["--checkpoint", "x", "--arch", "mlp", "attention"])
    assert "--checkpoint" in capsys.readouterr().err


def test_bf16_is_skipped_with_one_clear_line_where_the_cpu_lacks_the_flags(built, tmp_path, monkeypatch) -> None:
    import models.environment
    from export.quantize import quantize

    monkeypatch.setattr(models.environment, "cpu_flags", lambda: {"avx", "avx2", "avx512f", "avx512_vnni"})
    lines: list[str] = []
    manifest = quantize(built.checkpoint, out_dir=tmp_path, variants=["onnx-fp32", "torch-bf16"],
                        dataset=built.dataset, skip_bench=True, log=lambda line, **_: lines.append(str(line)))
    skip_lines = [line for line in lines if "torch-bf16" in line]
    assert len(skip_lines) == 1 and "skipped" in skip_lines[0]
    assert "neither avx512_bf16 nor amx_bf16" in skip_lines[0]
    assert "torch-bf16" not in manifest.variants and "onnx-fp32" in manifest.variants
    assert "neither avx512_bf16 nor amx_bf16" in manifest.skipped["torch-bf16"]


def test_bf16_is_built_and_gated_where_the_cpu_has_the_flags(built, tmp_path, monkeypatch) -> None:
    """With the flags (forced here: torch emulates bf16 on any CPU) the variant is built, gated on
    NDCG@10 like the others and loads by name, scoring under bfloat16 autocast."""
    import models.environment
    from export.quantize import quantize
    from export.runtime import load_scorer

    monkeypatch.setattr(models.environment, "cpu_flags", lambda: {"avx512_bf16"})
    manifest = quantize(built.checkpoint, out_dir=tmp_path, variants=["torch-bf16"], dataset=built.dataset,
                        skip_bench=True, log=lambda *_a, **_k: None)
    entry = manifest.variants["torch-bf16"]
    assert entry.precision == "bf16" and not manifest.skipped
    assert entry.accuracy.retention > 0.95 and entry.accuracy.kendall_tau > 0.9
    scorer = load_scorer("torch-bf16", manifest_path=tmp_path / "manifest.json", allow_invalid=True)
    assert scorer.bf16 is True


def test_node_profile_splits_a_call_into_normalizer_dense_layers_and_quantize(built) -> None:
    """ONNX Runtime's profiler, read back: the fp32 graph's time falls in the normalizer and the dense
    layers (one per MLP layer, each with a rate), the dynamic int8 graph's dense layers are its integer
    kernels; a profile that does not match the model's layers is refused."""
    if built.arch != "mlp":
        pytest.skip("the node split and layer rates are the MLP's (export/int8_attempts.py)")
    from export.node_profile import DENSE_KERNELS, dense_layer_rates, grouped, node_times
    from models.rankers import RankerConfig, mlp_layer_multiply_adds
    from models.train import load_checkpoint

    _model, card = load_checkpoint(built.checkpoint)
    config = RankerConfig.from_dict(card["config"])
    rows = np.random.default_rng(0).lognormal(size=(64, built.dataset.n_features)).astype(np.float32)
    fp32 = node_times(built.out_dir / "onnx-fp32.onnx", {"features": rows}, calls=5, warmup=2)
    split = grouped(fp32)
    assert split["normalizer"] > 0 and split["dense"] > 0 and split["quantize"] == 0
    assert {t.op for t in fp32[:3]} <= {"Abs", "Sign", "Log", "Add", "Mul", "Sub", "Div", "Clip"}
    layers = dense_layer_rates(fp32, [64 * macs for macs in mlp_layer_multiply_adds(config)])
    assert len(layers) == len(config.hidden) + 1 and all(layer["macs_per_s"] > 0 for layer in layers)

    dynamic = node_times(built.out_dir / "onnx-int8-dynamic.onnx", {"features": rows}, calls=5, warmup=2)
    assert {t.op for t in dynamic if t.op in DENSE_KERNELS} <= INTEGER_OPS
    assert grouped(dynamic)["dense"] > 0
    with pytest.raises(ValueError, match="dense nodes"):
        dense_layer_rates(fp32, [1])


def test_amdahl_bound_and_grouping_arithmetic() -> None:
    """Pure arithmetic: nodes before the first layer are the normalizer; with 60 of 100 us in dense
    layers whose 6e6 multiply-adds take 6 us at a 1e12/s roof, int8 gains at most 100 / 46."""
    from export.node_profile import NodeTime, amdahl_bound, grouped

    times = [NodeTime("a", "Log", 20.0), NodeTime("b", "Sign", 10.0), NodeTime("c", "QuantizeLinear", 4.0),
             NodeTime("d", "QGemm", 60.0), NodeTime("e", "Relu", 5.0), NodeTime("f", "Add", 1.0)]
    assert grouped(times) == {"normalizer": 30.0, "dense": 60.0, "quantize": 4.0, "other": 6.0}
    fp32 = {"normalizer": 30.0, "dense": 60.0, "quantize": 0.0, "other": 10.0}
    assert amdahl_bound(fp32, total_macs=6e6, int8_roof=1e12) == pytest.approx(100 / 46)


def test_width_curve_findings_name_where_int8_pays_and_where_it_pays_strongly() -> None:
    """The findings are computed from the rows: the smallest width at which a valid int8 variant
    reaches 1.1x and 2.5x onnx-fp32, at each size; an invalid variant never counts."""
    from export.width_curve import findings

    def row(macs: int, variant: str, speedup: float, valid: bool = True) -> dict:
        return {"macs_per_doc": macs, "variant": variant, "valid": valid, "retention": 0.999, **{
            f"{key}@{n}": value for n in (100, 1000)
            for key, value in (("speedup", speedup), ("roof_fraction", speedup / 5))}}

    rows = [row(68_000, "onnx-fp32", 1.0), row(68_000, "onnx-int8-dynamic", 1.8),
            row(251_000, "onnx-int8-dynamic", 2.6), row(126_000, "onnx-int8-static", 3.0, valid=False)]
    lines = findings(rows, {"int8": {"1": 200e9}, "fp32": {"1": 50e9}})
    assert "4.00x" in lines[0]
    assert all("paid (1.1x or more) from 68K" in line and "2.5x or more from 251K." in line for line in lines[1:])
    assert len(lines) == 3
    # bf16: its own line, never counted as int8; where it was skipped, the reason instead.
    with_bf16 = findings([*rows, row(251_000, "torch-bf16", 1.3), row(68_000, "torch-bf16", 0.6)],
                         {"int8": {"1": 200e9}, "fp32": {"1": 50e9}})
    assert with_bf16[:3] == lines
    assert with_bf16[3].startswith("torch-bf16 (bfloat16 autocast)") and "100 documents 0.60x, 1.30x" in with_bf16[3]
    skipped = findings(rows, {"int8": {"1": 200e9}, "fp32": {"1": 50e9}}, {"torch-bf16": "no avx512_bf16"})
    assert skipped[3] == "torch-bf16 was skipped on this CPU: no avx512_bf16."


def test_session_option_study_times_every_option_and_tables_them(built) -> None:
    """Each registered session option opens the graph and times one call per size; the table has a
    row per option with the served settings at 1.00x."""
    if built.arch != "mlp":
        pytest.skip("the int8 study is the MLP's")
    from export.benchmark import BenchConfig
    from export.int8_attempts import SESSION_OPTIONS, session_option_lines, session_option_times

    rows = np.random.default_rng(0).lognormal(size=(100, built.dataset.n_features)).astype(np.float32)
    times = session_option_times(built.out_dir / "onnx-int8-dynamic.onnx", {100: rows, 1000: np.tile(rows, (10, 1))},
                                 BenchConfig.quick())
    assert set(times) == set(SESSION_OPTIONS)
    assert all(t["p50_ms@100"] > 0 and t["p50_ms@1000"] > 0 for t in times.values())
    lines = session_option_lines({"session_options": {"onnx-int8-dynamic": times}})
    served = next(line for line in lines if line.startswith("| as served |"))
    assert served.count("1.00x") == 2
    assert sum(line.startswith("| ") for line in lines) == len(SESSION_OPTIONS) + 2  # + header and rule


def test_model_table_says_what_the_instruction_set_decided_and_rerenders_from_its_manifest(tmp_path) -> None:
    """The table's ISA section is computed: the fastest valid int8 variant's speed-up equals the roofs'
    ratio times its roof fraction over onnx-fp32's. `python export/report.py <manifest>` writes the
    same table again with no new measurement."""
    import re

    from export.report import main as report_main

    built = built_variants("mlp")
    table = next(built.results_dir.glob("*-mlp.md"))
    text = table.read_text()
    assert "## What the instruction set decides" in text
    found = re.search(r"ran \*\*([0-9.]+)x\*\* onnx-fp32: ([0-9.]+)x \(the roofs\) times .*\(([0-9.]+)\)\.", text)
    assert found, text
    speedup, ratio, fractions = map(float, found.groups())
    assert speedup == pytest.approx(ratio * fractions, rel=0.02)
    assert report_main([str(built.out_dir / "manifest.json"), str(tmp_path)]) == 0
    assert (tmp_path / table.name).read_text() == text
    assert report_main([]) == 2


def test_bf16_roof_is_measured_only_with_native_bf16_and_bf16_rows_use_it(monkeypatch) -> None:
    """The bf16 roof (torch.mm in bfloat16) is measured where the CPU has avx512_bf16 or amx_bf16, and a
    bf16 variant's roof fraction is then over it; without the flags no bf16 roof, and fp32's is used."""
    import models.environment
    from export.benchmark import BenchConfig, measure_roofs
    from export.quantize import roof_of

    config = BenchConfig.quick(threads=(1,))
    monkeypatch.setattr(models.environment, "cpu_flags", lambda: {"avx2"})
    without = measure_roofs(config)
    assert without.bf16 == {} and "bf16" not in without.method
    assert roof_of("bf16", without) == "fp32" and roof_of("int8", without) == "int8" and roof_of("fp16", None) == "fp32"
    monkeypatch.setattr(models.environment, "cpu_flags", lambda: {"avx512_bf16"})
    native = measure_roofs(config)
    assert native.bf16["1"] > 0 and "bfloat16" in native.method["bf16"]
    assert roof_of("bf16", native) == "bf16"


def test_width_curve_rows_take_each_cells_median_over_rounds() -> None:
    """Pure arithmetic on three rounds' manifests: a speed-up is taken within each round, then the median
    over rounds, with the rounds' range; retention and validity come from the (deterministic) build."""
    from export.width_curve import VARIANTS, markdown, rows_of
    from models.environment import collect_environment

    def manifest(fp32: float, int8: float) -> dict:
        def entry(docs_per_s: float) -> dict:
            return {"valid": True, "accuracy": {"retention": 0.999}, "benchmark": [
                {"threads": 1, "n_docs": n, "device": "cpu", "docs_per_s": docs_per_s, "roof_fraction": 0.5}
                for n in (100, 1000)]}
        return {"model": {"macs_per_document": {"1000": 68_000}},
                "variants": {v: entry(fp32 if v == "onnx-fp32" else int8) for v in VARIANTS}}

    rows = rows_of((256, 128), [manifest(100, 300), manifest(50, 200), manifest(100, 150)])
    int8 = next(r for r in rows if r["variant"] == "onnx-int8-dynamic")
    assert int8["speedup@100"] == 3.0 and int8["speedup_range@100"] == [1.5, 4.0]
    assert int8["docs_per_s@1000"] == 200 and int8["rounds"] == 3 and int8["retention"] == 0.999
    text = markdown({"widths": [[256, 128]], "train_seconds": 30, "rounds": 3, "rows": rows,
                     "roofs": {"int8": {"1": 200e9}, "fp32": {"1": 50e9}},
                     "environment": collect_environment()})
    assert "--rounds 3`" in text and "| 3.00x (1.50-4.00) |" in text and "median of 3 benchmark rounds" in text


def test_int8_study_report_keeps_the_fastest_valid_attempt_and_states_the_amdahl_bound() -> None:
    """Pure rendering of a study's rows: the kept attempt is the fastest valid one at 1000 documents (an
    invalid faster one is not), and the time split states the bound and what the kept attempt reached."""
    from export.int8_attempts import kept, markdown
    from models.environment import collect_environment

    def row(name: str, docs_per_s: float, valid: bool = True) -> dict:
        split = {"normalizer": 30.0, "dense": 60.0, "quantize": 0.0, "other": 10.0}
        return {"attempt": name, "retention": 0.999, "valid": valid, "ops": ["MatMulInteger"],
                "roof_fraction@1000": 0.3, **{key: value for n in (100, 1000) for key, value in (
                    (f"p50_ms@{n}", n / docs_per_s * 1e3), (f"docs_per_s@{n}", docs_per_s),
                    (f"speedup@{n}", docs_per_s / 100.0), (f"profile@{n}", split),
                    (f"layers@{n}", [{"op": "QGemm", "us": 10.0, "macs_per_s": 1e11}]))}}

    rows = [row("onnx-fp32 (the baseline)", 100.0), row("static QDQ", 150.0), row("too lossy", 400.0, valid=False),
            row("dynamic", 180.0)]
    report = {"model": "m", "macs_per_document": 68_000, "rows": rows, "amdahl_bound": {"100": 2.03, "1000": 2.19},
              "roofs": {"int8": {"1": 200e9}, "fp32": {"1": 50e9}}, "environment": collect_environment()}
    assert kept(report)["attempt"] == "dynamic"
    text = markdown(report)
    assert "- **dynamic**: 1.80x onnx-fp32 at 1000 documents" in text
    assert "int8 could reach at most **2.19x** onnx-fp32; the kept attempt reached 1.80x." in text
    assert "the feature normalizer takes 30% of onnx-fp32's time" in text
    assert kept({"rows": rows[:1] + [row("lossy", 300.0, valid=False)]}) is None


def test_width_curve_rerenders_its_markdown_from_its_json(tmp_path) -> None:
    """`--from-json` writes the Markdown again from a report's JSON, with no measurement."""
    from export.width_curve import main as width_main
    from export.width_curve import markdown
    from models.environment import collect_environment

    report = {"widths": [[256, 128]], "train_seconds": 30, "rows": [], "roofs": {"int8": {"1": 2e11}, "fp32": {"1": 5e10}},
              "environment": collect_environment()}
    source = tmp_path / "x-mlp-widths.json"
    source.write_text(json.dumps(report))
    assert width_main(["--from-json", str(source)]) == 0
    assert (tmp_path / "x-mlp-widths.md").read_text() == markdown(report)
