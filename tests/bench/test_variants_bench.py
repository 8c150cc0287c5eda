"""Model-level benchmark through pytest-benchmark (`make bench`): one 100- or 1000-document list per
call, one thread, for each variant of a small MLP trained for a few seconds. The full table with
roofs and all-thread rows comes from `python export/quantize.py`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.benchmark import sample_list
from export.quantize import quantize
from export.runtime import load_scorer
from export.variants import VARIANTS
from models.data import load_dataset
from models.train import TrainArgs, save_checkpoint, train


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bench-variants")
    dataset = load_dataset("synthetic", seed=0, n_queries=60)
    result = train(TrainArgs(arch="mlp", n_queries=60, epochs=1, max_seconds=5, threads=1, save=False,
                             quiet=True, name="mlp-benchtest"), dataset=dataset)
    checkpoint = save_checkpoint(result.model, result.card, root / "models" / "mlp-benchtest")
    quantize(checkpoint, out_dir=root / "variants", dataset=dataset, skip_bench=True, log=lambda *a, **k: None)
    return root / "variants" / "manifest.json"


@pytest.mark.parametrize("n_docs", [100, 1000])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_score_one_list(benchmark, manifest_path: Path, variant: str, n_docs: int) -> None:
    reason = VARIANTS[variant].unavailable()
    if reason is not None:
        pytest.skip(f"{variant}: {reason}")
    scorer = load_scorer(variant, manifest_path=manifest_path, threads=1, allow_invalid=True)
    rows = sample_list(load_dataset("synthetic", seed=0, n_queries=60).test.X, n_docs)
    benchmark.extra_info.update({"variant": variant, "n_docs": n_docs, "threads": 1})
    scores = benchmark(scorer.score_documents, rows)
    assert scores.shape == (n_docs,) and np.isfinite(scores).all()
