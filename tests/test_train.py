"""Training, checkpoints, the LightGBM reference and the loss comparison report (small and fast)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

import models.paths
from models.data import make_synthetic
from models.metrics import evaluate
from models.train import DEFAULT_LOSS, TrainArgs, load_checkpoint, parse_args, score_split, train


@pytest.fixture(scope="module")
def tiny():
    return make_synthetic(120, seed=1)


@pytest.fixture()
def artifacts(tmp_path, monkeypatch):
    monkeypatch.setattr(models.paths, "ARTIFACTS", tmp_path)
    return tmp_path


def _random_ndcg10(split, n: int = 5) -> float:
    rng = np.random.default_rng(0)
    return float(np.mean([evaluate(split, rng.random(split.n_docs))["ndcg@10"] for _ in range(n)]))


def test_short_mlp_training_beats_random_and_round_trips(tiny, artifacts):
    result = train(TrainArgs(arch="mlp", loss="lambdarank", epochs=6, max_seconds=30, threads=1, quiet=True),
                   dataset=tiny)
    card = result.card
    assert card["metrics"]["test"]["ndcg@10"] > _random_ndcg10(tiny.test) + 0.05
    directory = result.checkpoint_dir
    assert directory == artifacts / "models" / "mlp-lambdarank"
    weights = (directory / "model.safetensors").read_bytes()
    assert card["version"] == hashlib.sha256(weights).hexdigest()[:12]
    on_disk = json.loads((directory / "model_card.json").read_text())
    for key in ("name", "version", "arch", "config", "pointwise", "n_features", "data", "normalization", "params",
                "loss", "metrics", "train_seconds", "git"):
        assert key in on_disk, key
    assert on_disk["pointwise"] is True and on_disk["n_features"] == 136
    assert set(on_disk["metrics"]) == {"train", "vali", "test"}

    model, loaded_card = load_checkpoint(directory)
    assert loaded_card["version"] == card["version"]
    np.testing.assert_array_equal(score_split(model, tiny.test), score_split(result.model, tiny.test))
    by_name, _ = load_checkpoint("mlp-lambdarank")  # a bare name resolves under artifacts/models/
    np.testing.assert_array_equal(score_split(by_name, tiny.vali), score_split(result.model, tiny.vali))


def test_attention_checkpoint_round_trip_scores_identically(tiny, artifacts):
    result = train(TrainArgs(arch="attention", loss="listnet", epochs=1, max_seconds=20, threads=1, quiet=True,
                             name="att-test"), dataset=tiny)
    assert result.card["pointwise"] is False
    model, card = load_checkpoint(artifacts / "models" / "att-test")
    assert card["config"]["arch"] == "attention"
    np.testing.assert_array_equal(score_split(model, tiny.test), score_split(result.model, tiny.test))
    # Scores of one list do not depend on the padding around it.
    X, _ = tiny.test.query(0)
    with torch.no_grad():
        alone = model(torch.from_numpy(X)[None])[0].numpy()
    start, end = tiny.test.offsets[0], tiny.test.offsets[1]
    np.testing.assert_allclose(alone, score_split(model, tiny.test)[start:end], rtol=1e-4, atol=1e-5)


def test_normalization_is_fitted_on_train_only(tiny, artifacts):
    result = train(TrainArgs(arch="mlp", loss="mse", epochs=1, max_seconds=10, threads=1, quiet=True, save=False),
                   dataset=tiny)
    from models.rankers import fit_normalizer

    mean, std = fit_normalizer(tiny.train.X)
    np.testing.assert_allclose(result.model.normalizer.mean.numpy(), mean)
    np.testing.assert_allclose(result.model.normalizer.std.numpy(), std)
    assert result.checkpoint_dir is None and not (artifacts / "models").exists()


def test_cli_defaults_use_the_default_loss():
    args = parse_args(["--arch", "attention", "--max-seconds", "0"]).resolved()
    assert args.loss == DEFAULT_LOSS["attention"] and args.name == f"attention-{DEFAULT_LOSS['attention']}"
    assert args.max_seconds is None
    with pytest.raises(ValueError, match="loss"):
        TrainArgs(loss="nope").resolved()


def test_lightgbm_reference_beats_random(tiny):
    pytest.importorskip("lightgbm")
    from models.gbdt import GBDTConfig, train_lightgbm

    result = train_lightgbm(tiny, GBDTConfig(n_estimators=40, n_jobs=1))
    assert set(result.metrics) == {"train", "vali", "test"}
    assert result.metrics["test"]["ndcg@10"] > _random_ndcg10(tiny.test) + 0.05


def test_compare_losses_writes_markdown_and_csv(tmp_path, artifacts):
    from models import compare_losses

    compare_losses.main(["--n-queries", "60", "--archs", "mlp", "--losses", "mse", "listnet", "--seconds-mlp", "3",
                         "--skip-gbdt", "--out", str(tmp_path)])
    text = (tmp_path / "ltr_losses.md").read_text()
    assert "listnet" in text and "ndcg@10" in text and "| CPU |" in text
    csv = (tmp_path / "ltr_losses.csv").read_text().splitlines()
    assert csv[0].startswith("model,loss,family,ndcg@1") and len(csv) == 3


def test_the_mlp_size_option_round_trips_through_the_checkpoint_and_export(tiny, artifacts, tmp_path):
    """`--hidden 48 16`: the model card keeps the sizes, the checkpoint rebuilds them, and the ONNX export
    holds weights of those shapes and scores as the torch model does."""
    import onnx
    from onnx import numpy_helper

    from export.onnx_export import export_onnx
    from export.runtime import OrtScorer

    assert parse_args(["--hidden", "48", "16"]).hidden == [48, 16]
    with pytest.raises(ValueError, match="hidden"):
        TrainArgs(arch="attention", hidden=(32,)).resolved()
    result = train(TrainArgs(arch="mlp", hidden=(48, 16), epochs=1, max_seconds=30, threads=1, quiet=True,
                             name="mlp-wide"), dataset=tiny)
    assert result.card["config"]["hidden"] == [48, 16]
    model, card = load_checkpoint(result.checkpoint_dir)
    assert card["config"]["hidden"] == [48, 16] and card["params"] == result.card["params"]
    path = export_onnx(model, 136, tmp_path / "wide.onnx", pointwise=True)
    shapes = {tuple(numpy_helper.to_array(t).shape) for t in onnx.load(str(path)).graph.initializer}
    assert {(136, 48), (48, 16)} & shapes or {(48, 136), (16, 48)} & shapes, shapes
    X = tiny.test.query(0)[0]
    scores = OrtScorer(path, pointwise=True, n_features=136).score_documents(X)
    np.testing.assert_allclose(scores, score_split(model, tiny.test)[: len(X)], atol=1e-4)
