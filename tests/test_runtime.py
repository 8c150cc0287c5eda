"""export/runtime.py: every variant loads by name from the manifest and ranks the test queries."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from export_support import built_variants

from export.runtime import InvalidVariantError, load_manifest, load_scorer, resolve_providers
from export.variants import VARIANTS
from models.data import pad_queries
from models.metrics import evaluate_padded


@pytest.fixture(scope="module", params=["mlp", "attention"])
def built(request):
    return built_variants(request.param)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_variant_loads_and_ranks_the_test_queries(built, variant) -> None:
    if variant in built.manifest.skipped:
        with pytest.raises(KeyError, match="skipped"):
            load_scorer(variant, manifest_path=built.manifest_path)
        return
    scorer = load_scorer(variant, manifest_path=built.manifest_path, threads=1, allow_invalid=True)
    entry = built.manifest.variants[variant]
    assert scorer.variant == variant and scorer.model == built.manifest.model.name
    assert scorer.version == f"{built.manifest.model.version}-{entry.sha256[:12]}"
    assert scorer.n_features == built.dataset.n_features and scorer.pointwise == (built.arch == "mlp")
    test = built.dataset.test
    batch = pad_queries(test, np.arange(test.n_queries))
    scores = scorer.score_lists(batch.features, batch.mask)
    assert scores.dtype == np.float32 and scores.shape == batch.mask.shape
    assert np.isneginf(scores[~batch.mask]).all() and np.isfinite(scores[batch.mask]).all()
    ndcg = evaluate_padded(np.where(batch.mask, scores, 0), batch.labels, batch.mask)["ndcg@10"]
    assert ndcg == pytest.approx(entry.accuracy.ndcg10, abs=2e-3)


def test_pointwise_scores_match_between_lists_and_documents() -> None:
    built = built_variants("mlp")
    scorer = load_scorer("onnx-int8-dynamic", manifest_path=built.manifest_path, allow_invalid=True)
    test = built.dataset.test
    batch = pad_queries(test, [0, 1, 2])
    lists = scorer.score_lists(batch.features, batch.mask)
    docs = scorer.score_documents(batch.features[batch.mask])
    np.testing.assert_allclose(lists[batch.mask], docs, rtol=1e-6, atol=1e-6)


def test_listwise_padding_does_not_change_real_scores() -> None:
    built = built_variants("attention")
    scorer = load_scorer("onnx-fp32", manifest_path=built.manifest_path)
    X, _ = built.dataset.test.query(0)
    alone = scorer.score_lists(X[None], np.ones((1, len(X)), bool))
    padded = np.zeros((2, len(X) + 9, X.shape[1]), np.float32)
    padded[0, : len(X)], padded[1, :5] = X, X[:5]
    mask = np.zeros(padded.shape[:2], bool)
    mask[0, : len(X)], mask[1, :5] = True, True
    together = scorer.score_lists(padded, mask)
    np.testing.assert_allclose(together[0, : len(X)], alone[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(TypeError, match="listwise"):
        scorer.score_documents(X)


def test_bad_input_is_a_clear_error() -> None:
    built = built_variants("mlp")
    scorer = load_scorer("onnx-fp32", manifest_path=built.manifest_path)
    with pytest.raises(ValueError, match="features"):
        scorer.score_documents(np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="mask"):
        scorer.score_lists(np.zeros((2, 3, scorer.n_features), np.float32), np.ones((2, 4), bool))
    assert scorer.score_documents(np.zeros((0, scorer.n_features), np.float32)).shape == (0,)
    with pytest.raises(KeyError, match="onnx-int3"):
        load_scorer("onnx-int3", manifest_path=built.manifest_path)
    with pytest.raises(ValueError, match="threads"):
        load_scorer("onnx-fp32", manifest_path=built.manifest_path, threads=0)
    with pytest.raises(FileNotFoundError):
        load_manifest(manifest_path=built.out_dir / "missing.json")


def test_invalid_variant_is_refused_unless_allowed(tmp_path) -> None:
    built = built_variants("mlp")
    folder = tmp_path / "variants"
    shutil.copytree(built.out_dir, folder)
    data = json.loads((folder / "manifest.json").read_text())
    data["variants"]["onnx-int8-static"]["valid"] = False
    data["variants"]["onnx-int8-static"]["accuracy"]["retention"] = 0.5
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(InvalidVariantError, match="accuracy gate"):
        load_scorer("onnx-int8-static", manifest_path=folder / "manifest.json")
    assert load_scorer("onnx-int8-static", manifest_path=folder / "manifest.json", allow_invalid=True)


def test_a_changed_file_is_refused(tmp_path) -> None:
    built = built_variants("mlp")
    folder = tmp_path / "variants"
    shutil.copytree(built.out_dir, folder)
    (folder / "onnx-fp32-opt.onnx").write_bytes((folder / "onnx-fp32.onnx").read_bytes())
    with pytest.raises(ValueError, match="sha256"):
        load_scorer("onnx-fp32-opt", manifest_path=folder / "manifest.json")


def test_manifest_loads_as_a_dict_and_threads_are_applied() -> None:
    built = built_variants("mlp")
    manifest = load_manifest(manifest_path=built.manifest_path)
    assert set(manifest["variants"]) | set(manifest["skipped"]) == set(VARIANTS) and manifest["model"]["pointwise"] is True
    scorer = load_scorer("onnx-fp32", manifest_path=built.manifest_path, threads=2)
    assert scorer.threads == 2 and scorer.session.get_session_options().intra_op_num_threads == 2
    assert scorer.session.get_session_options().inter_op_num_threads == 1


def test_providers_fall_back_to_cpu_with_a_warning() -> None:
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("auto")[-1] == "CPUExecutionProvider"
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_providers(["CUDAExecutionProvider"]) == ["CPUExecutionProvider"]
    assert any("CUDAExecutionProvider" in str(w.message) for w in caught)
