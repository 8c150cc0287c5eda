"""Turn a trained ranker into every optimized variant, prove each is still accurate, and time it.

    python export/quantize.py                                  # both archs, every variant
    python export/quantize.py --arch mlp --variants onnx-fp32 onnx-int8-dynamic --quick
    python export/quantize.py --checkpoint artifacts/models/mlp-lambdarank --arch mlp --skip-bench

Per model: variant files and `manifest.json` in `artifacts/variants/<model>/` (what serve/ loads),
and a table per machine in `results/models/<cpu-slug>-<arch>.md|.csv`. Without a checkpoint the
default model is trained first (bounded by --train-seconds), so a fresh clone works.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # run as `python export/quantize.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rich.console import Console  # noqa: E402

from export.accuracy import gate as accuracy_gate  # noqa: E402
from export.accuracy import score_split  # noqa: E402
from export.benchmark import BenchConfig, bench_scorer, gpu_rows, measure_roofs  # noqa: E402
from export.manifest import Manifest, ModelInfo, Roofs, VariantEntry, sha256_of, size_of  # noqa: E402
from export.report import print_table, write_tables  # noqa: E402
from export.runtime import TorchScorer, open_variant  # noqa: E402
from export.variants import VARIANTS, BuildContext  # noqa: E402
from models.data import LTRDataset, load_dataset  # noqa: E402
from models.environment import collect_environment  # noqa: E402
from models.paths import ARTIFACTS, RESULTS, model_dir  # noqa: E402
from models.rankers import RankerConfig, multiply_adds_per_document  # noqa: E402
from models.train import DEFAULT_LOSS, TrainArgs, load_checkpoint, train  # noqa: E402

CALIBRATION_QUERIES = 32  # training lists for static calibration and the per-channel measurement
console = Console(width=None if sys.stdout.isatty() else 200)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def dataset_of(card: dict) -> LTRDataset:
    """The dataset the checkpoint was trained on (same spec, seed and size), for its test split."""
    data = card["data"]
    return load_dataset(data["spec"], seed=data.get("seed", 0), n_queries=data.get("n_queries"))


def quantize(checkpoint: Path, *, out_dir: Path | None = None, variants: list[str] | None = None,
             dataset: LTRDataset | None = None, bench: BenchConfig | None = None, skip_bench: bool = False,
             results_dir: Path | None = None, log=console.print) -> Manifest:
    """Build, gate and (unless `skip_bench`) benchmark the variants of one checkpoint.

    Returns the saved manifest. Entries of variants not rebuilt now are kept from an existing
    manifest of the same model version and test data, so `--variants X` updates X alone.
    """
    checkpoint = Path(checkpoint)
    model, card = load_checkpoint(checkpoint)
    config = RankerConfig.from_dict(card["config"])
    pointwise, n_features = bool(card["pointwise"]), int(card["n_features"])
    out_dir = Path(out_dir) if out_dir else ARTIFACTS / "variants" / card["name"]
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(variants or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"variants: unknown {unknown}; known: {list(VARIANTS)}")
    dataset = dataset or dataset_of(card)
    test = dataset.test
    bench = bench or BenchConfig()
    all_threads = max(bench.all_threads)
    environment = collect_environment(extra_threads={
        "bench_threads": list(bench.all_threads), "intra_op_num_threads": "= bench threads",
        "inter_op_num_threads": 1, "execution_mode": "sequential", "allow_spinning": False})

    log(f"[bold]{card['name']}[/] (version {card['version']}, {config.arch}): "
        f"{test.n_queries} test queries, {test.n_docs} documents")
    reference = score_split(TorchScorer(model, pointwise=pointwise, n_features=n_features, threads=all_threads), test)
    sizes = sorted(set(bench.sizes) | {100})
    macs = {n: float(multiply_adds_per_document(config, list_len=n)) for n in sizes}
    roofs = None
    if not skip_bench:
        started = time.perf_counter()
        roofs = measure_roofs(bench)
        log(f"roofs measured in {time.perf_counter() - started:.1f} s: " + ", ".join(
            f"{t} thread(s) fp32 {roofs.fp32[t] / 1e9:.1f} / int8 {roofs.int8[t] / 1e9:.1f}"
            + (f" / bf16 {roofs.bf16[t] / 1e9:.1f}" if t in roofs.bf16 else "") + " GMAC/s" for t in roofs.fp32))

    data_info = {"spec": card["data"]["spec"], "seed": card["data"].get("seed"), "test": test.summary(),
                 "test_sha256": hashlib.sha256(test.X.tobytes() + test.y.tobytes()).hexdigest()[:16]}
    manifest_path = out_dir / "manifest.json"
    kept: dict[str, VariantEntry] = {}
    if manifest_path.exists():
        try:
            previous = Manifest.load(manifest_path)
            if previous.model.version == card["version"] and previous.data == data_info:
                kept = {k: v for k, v in previous.variants.items() if k not in names and k in VARIANTS}
                roofs = roofs or previous.roofs
        except ValueError as error:  # an old schema: rebuild from scratch
            log(f"[yellow]ignoring {manifest_path}: {error.__class__.__name__}[/]")

    ctx = BuildContext(model=model, checkpoint=checkpoint, pointwise=pointwise, n_features=n_features,
                       out_dir=out_dir, calibration=dataset.train.subset(
                           range(min(CALIBRATION_QUERIES, dataset.train.n_queries))))
    entries: dict[str, VariantEntry] = {}
    built_paths: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for name in names:
        variant = VARIANTS[name]
        reason = variant.unavailable()
        if reason is not None:
            skipped[name] = reason
            log(f"  {name:18s} [yellow]skipped[/]: {reason}")
            continue
        started = time.perf_counter()
        built = variant.build(ctx)
        built_paths[name] = built.path

        def open_scorer(threads: int, variant=variant, built=built):
            return open_variant(built.path, variant.format, pointwise=pointwise, n_features=n_features,
                                threads=threads, precision=variant.precision)
        report = accuracy_gate(reference, score_split(open_scorer(all_threads), test), test)
        rows = [] if skip_bench else bench_scorer(
            open_scorer, test.X, bench, macs_per_doc=lambda n: multiply_adds_per_document(config, list_len=n),
            roof=roof_of(variant.precision, roofs), roofs=roofs)
        entries[name] = VariantEntry(
            name=name, description=variant.description, format=variant.format, precision=variant.precision,
            file=os.path.relpath(built.path, out_dir), sha256=sha256_of(built.path), size_bytes=size_of(built.path),
            build=built.build, accuracy=report, valid=report.valid, benchmark=rows, environment=environment)
        mark = "[green]valid[/]" if report.valid else "[red]INVALID[/]"
        log(f"  {name:18s} {mark} retention {report.retention:.4f}  tau {report.kendall_tau:.4f}  "
            f"top10 {report.top10_overlap:.3f}  max|diff| {report.max_abs_diff:.2e}  "
            f"({time.perf_counter() - started:.1f} s)")

    if not skip_bench:
        onnx_files = {n: str(p) for n, p in built_paths.items() if n in ("onnx-fp32", "onnx-fp16")}
        for name, rows in gpu_rows(model, onnx_files, test.X, bench, pointwise=pointwise, n_features=n_features,
                                   macs_per_doc=lambda n: multiply_adds_per_document(config, list_len=n),
                                   log=log).items():
            if name in entries:
                entries[name].benchmark.extend(rows)

    manifest = Manifest(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        model=ModelInfo(name=card["name"], version=card["version"], arch=config.arch, pointwise=pointwise,
                        n_features=n_features, checkpoint=str(checkpoint.resolve()),
                        macs_per_document={str(n): m for n, m in macs.items()}),
        data=data_info,
        roofs=roofs,
        variants={name: (entries.get(name) or kept[name]) for name in VARIANTS if name in entries or name in kept},
        skipped=skipped,
    )
    manifest.save(manifest_path)
    log(f"manifest: {manifest_path}")
    if not skip_bench:
        print_table(manifest, console)
        md, csv = write_tables(manifest, Path(results_dir) if results_dir else RESULTS / "models", environment)
        log(f"results: {md} and {csv}")
    return manifest


def roof_of(precision: str, roofs: Roofs | None) -> str:
    """The roof a variant is measured against: int8's for int8, bf16's for bf16 where it was measured,
    fp32's otherwise (fp16 on the CPU runs fp32 kernels)."""
    if precision == "int8":
        return "int8"
    return "bf16" if precision == "bf16" and roofs and roofs.bf16 else "fp32"


def default_checkpoint(arch: str) -> Path:
    return model_dir(f"{arch}-{DEFAULT_LOSS[arch]}")


def ensure_checkpoint(arch: str, train_seconds: float, allow_train: bool) -> Path:
    """The default checkpoint of `arch`, trained first (time-bounded) when there is none."""
    path = default_checkpoint(arch)
    if (path / "model_card.json").is_file():
        return path
    if not allow_train:
        raise FileNotFoundError(f"{path}: no checkpoint; run `python models/train.py --arch {arch}` first")
    console.print(f"[yellow]no checkpoint at {path}: training the default {arch} model "
                  f"(at most {train_seconds:.0f} s)[/]")
    result = train(TrainArgs(arch=arch, max_seconds=train_seconds))
    return Path(result.checkpoint_dir)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Export, quantize, gate and benchmark the variants of trained rankers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", nargs="+", default=["mlp", "attention"], choices=sorted(DEFAULT_LOSS),
                        help="architectures to process; the default checkpoint of each is "
                             "artifacts/models/<arch>-<DEFAULT_LOSS[arch]>")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a checkpoint folder (model.safetensors + model_card.json); only with one --arch")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="NAME",
                        help=f"variants to build (others already in the manifest are kept): {', '.join(VARIANTS)}")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="variants root; files go to <out-dir>/<model name>/ (default artifacts/variants)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS / "models", help="where the tables go")
    parser.add_argument("--skip-bench", action="store_true", help="build and gate only; no timings, no tables")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shorter cells (smoke runs)")
    parser.add_argument("--threads", nargs="+", type=int, default=None,
                        help="thread settings to benchmark (default: 1 and every usable core)")
    parser.add_argument("--sizes", nargs="+", type=int, default=[1, 10, 100, 1000],
                        help="documents per list in the benchmark")
    parser.add_argument("--train-seconds", type=float, default=60.0,
                        help="time bound when a missing default checkpoint has to be trained first")
    parser.add_argument("--no-train", action="store_true", help="fail instead of training a missing checkpoint")
    args = parser.parse_args(argv)
    if args.checkpoint and len(args.arch) != 1:
        parser.error("--checkpoint: give exactly one --arch with it")
    if any(n < 1 for n in args.sizes) or (args.threads and any(t < 1 for t in args.threads)):
        parser.error("--sizes/--threads: every value must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = tuple(args.threads) if args.threads else (1, usable_cores())
    bench = (BenchConfig.quick if args.quick else BenchConfig)(sizes=tuple(args.sizes), threads=threads)
    started = time.perf_counter()
    for arch in args.arch:
        checkpoint = args.checkpoint or ensure_checkpoint(arch, args.train_seconds, not args.no_train)
        _, card = load_checkpoint(checkpoint)
        out_dir = (args.out_dir / card["name"]) if args.out_dir else None
        quantize(checkpoint, out_dir=out_dir, variants=args.variants, bench=bench, skip_bench=args.skip_bench,
                 results_dir=args.results_dir)
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
