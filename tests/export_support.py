"""Tiny trained rankers and their variants for the export and runtime tests, built once per session.

A synthetic dataset of 90 queries, a model trained for a few seconds (one thread), and every
variant built by `export.quantize.quantize` with explicit paths (nothing under artifacts/). The
benchmark is skipped except for a quick MLP run whose only purpose is to fill the manifest's
benchmark fields and the results table.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from export.benchmark import BenchConfig
from export.manifest import Manifest
from export.quantize import quantize
from models.data import LTRDataset, load_dataset
from models.train import TrainArgs, save_checkpoint, train

ROOT = Path(tempfile.mkdtemp(prefix="rankserve-export-tests-"))
atexit.register(shutil.rmtree, ROOT, ignore_errors=True)


@dataclass
class Built:
    arch: str
    dataset: LTRDataset
    checkpoint: Path
    out_dir: Path
    manifest_path: Path
    manifest: Manifest
    results_dir: Path


@functools.cache
def tiny_dataset() -> LTRDataset:
    return load_dataset("synthetic", seed=0, n_queries=90)


@functools.cache
def built_variants(arch: str) -> Built:
    dataset = tiny_dataset()
    result = train(TrainArgs(arch=arch, n_queries=90, epochs=3, max_seconds=6, threads=1, save=False,
                             quiet=True, name=f"{arch}-exporttest"), dataset=dataset)
    checkpoint = save_checkpoint(result.model, result.card, ROOT / "models" / f"{arch}-exporttest")
    out_dir, results_dir = ROOT / "variants" / f"{arch}-exporttest", ROOT / "results"
    bench = BenchConfig.quick(sizes=(1, 100), threads=(1,), max_seconds=0.02, repeats=5)
    manifest = quantize(checkpoint, out_dir=out_dir, dataset=dataset, bench=bench,
                        skip_bench=arch != "mlp", results_dir=results_dir, log=lambda *a, **k: None)
    return Built(arch, dataset, checkpoint, out_dir, out_dir / "manifest.json", manifest, results_dir)
