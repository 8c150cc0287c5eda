"""Rankers: normalization baked in, padding invariance, state-dict round trip, shapes, cost counts, and
a clean ONNX export with dynamic sizes checked against ONNX Runtime at another list length."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from models.losses import listnet
from models.rankers import (
    FeatureNormalizer,
    RankerConfig,
    build_ranker,
    count_parameters,
    fit_normalizer,
    is_pointwise,
    multiply_adds_per_document,
)

N_FEATURES = 12


def _features(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Heavy-tailed, signed, with a constant column: what LETOR features look like."""
    x = rng.lognormal(mean=0.0, sigma=2.0, size=(*shape, N_FEATURES)) * rng.choice([-1, 1], size=N_FEATURES)
    x[..., 3] = 5.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def stats() -> tuple[np.ndarray, np.ndarray]:
    return fit_normalizer(_features(np.random.default_rng(0), 500))


def _model(arch: str, stats, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return build_ranker(RankerConfig(arch=arch, n_features=N_FEATURES, **kwargs), *stats).eval()


def test_config_round_trip_and_validation() -> None:
    config = RankerConfig(arch="attention", n_features=136, hidden=[64, 32], n_heads=2)
    data = json.loads(json.dumps(config.to_dict()))
    assert RankerConfig.from_dict(data) == config
    with pytest.raises(ValueError, match="arch"):
        RankerConfig(arch="gbdt")
    with pytest.raises(ValueError, match="d_model"):
        RankerConfig(arch="attention", d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="unknown"):
        RankerConfig.from_dict({"arch": "mlp", "layers": 3})


def test_fit_normalizer_is_robust(stats) -> None:
    mean, std = stats
    assert mean.shape == std.shape == (N_FEATURES,) and mean.dtype == np.float32
    assert std[3] == 1.0  # constant feature: only centred
    assert (std >= 1e-2).all() and np.isfinite(mean).all()
    norm = FeatureNormalizer(mean, std)
    x = torch.from_numpy(_features(np.random.default_rng(1), 200))
    x[0] = 1e30  # an outlier far beyond anything seen in training
    out = norm(x)
    assert torch.isfinite(out).all() and out.abs().max() <= 10.0
    with pytest.raises(ValueError, match="X"):
        fit_normalizer(np.zeros((0, 3)))


@pytest.mark.parametrize("arch", ["mlp", "attention"])
def test_model_on_raw_features_equals_normalize_then_score(arch: str, stats) -> None:
    mean, std = stats
    model = _model(arch, stats)
    x = _features(np.random.default_rng(2), 3, 9)
    by_hand = np.clip((np.sign(x) * np.log1p(np.abs(x)) - mean) / std, -10, 10).astype(np.float32)
    bare = copy.deepcopy(model)
    bare.normalizer = nn.Identity()
    with torch.no_grad():
        expected = bare(torch.from_numpy(by_hand))
        got = model(torch.from_numpy(x))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert next(iter(model.children())) is model.normalizer  # the first layer
    assert {"normalizer.mean", "normalizer.std"} <= set(model.state_dict())


def test_mlp_accepts_2d_and_3d_input(stats) -> None:
    model = _model("mlp", stats)
    x = torch.from_numpy(_features(np.random.default_rng(3), 4, 7))
    with torch.no_grad():
        flat = model(x.reshape(-1, N_FEATURES))
        lists = model(x, torch.zeros(4, 7, dtype=torch.bool))  # mask ignored
    assert flat.shape == (28,) and lists.shape == (4, 7)
    torch.testing.assert_close(flat.reshape(4, 7), lists)


def test_attention_padding_does_not_change_real_scores(stats) -> None:
    model = _model("attention", stats)
    rng = np.random.default_rng(4)
    x = torch.from_numpy(_features(rng, 3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 1:] = False
    junk = torch.from_numpy(_features(rng, 3, 7)) * 1e3
    wide_x = torch.cat([torch.where(mask[..., None], x, torch.full_like(x, -4e3)), junk], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        narrow = model(x, mask)
        wide = model(wide_x, wide_mask)
        alone = model(x[1:2, :6], None)  # list 1 on its own, without any padding
    assert torch.isfinite(wide).all()
    torch.testing.assert_close(wide[:, :10][mask], narrow[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(narrow[1, :6], alone[0], rtol=1e-5, atol=1e-5)


def test_attention_scores_depend_on_the_list(stats) -> None:
    model = _model("attention", stats)
    x = torch.from_numpy(_features(np.random.default_rng(5), 1, 6))
    changed = x.clone()
    changed[0, 5] *= 3.0
    with torch.no_grad():
        before, after = model(x), model(changed)
    assert not torch.allclose(before[0, :5], after[0, :5])
    assert is_pointwise(model) is False and is_pointwise(_model("mlp", stats)) is True
    assert is_pointwise(RankerConfig(arch="mlp")) is True


@pytest.mark.parametrize("arch", ["mlp", "attention"])
def test_state_dict_round_trip(arch: str, stats) -> None:
    model = _model(arch, stats)
    config = RankerConfig.from_dict(model.config.to_dict())
    restored = build_ranker(config).eval()  # mean/std come back from the state dict
    restored.load_state_dict(model.state_dict())
    x = torch.from_numpy(_features(np.random.default_rng(6), 2, 8))
    with torch.no_grad():
        torch.testing.assert_close(restored(x), model(x))


def test_parameter_and_multiply_add_counts() -> None:
    mlp = RankerConfig(arch="mlp", n_features=136)
    assert multiply_adds_per_document(mlp) == 136 * 256 + 256 * 128 + 128
    model = build_ranker(mlp)
    assert count_parameters(model) == (136 * 256 + 256) + (256 * 128 + 128) + (128 + 1)

    att = RankerConfig(arch="attention", n_features=136)
    per_block = 4 * 64 * 64 + 2 * 64 * 128 + 2 * 100 * 64
    assert multiply_adds_per_document(att, 100) == 136 * 64 + 2 * per_block + 64
    assert multiply_adds_per_document(att, 200) > multiply_adds_per_document(att, 100)
    with pytest.raises(ValueError, match="list_len"):
        multiply_adds_per_document(att)
    with pytest.raises(ValueError, match="n_features"):
        build_ranker(mlp, np.zeros(3), np.ones(3))


@pytest.mark.parametrize("arch", ["mlp", "attention"])
def test_a_few_steps_of_training_reduce_the_loss(arch: str, stats) -> None:
    torch.manual_seed(0)
    model = build_ranker(RankerConfig(arch=arch, n_features=N_FEATURES, dropout=0.0), *stats)
    rng = np.random.default_rng(7)
    x = torch.from_numpy(_features(rng, 8, 12))
    labels = torch.from_numpy(np.clip(np.round(np.log1p(np.abs(x[..., 0].numpy()))), 0, 4)).float()
    mask = torch.ones(8, 12, dtype=torch.bool)
    mask[:, 9:] = False
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = listnet(model(x, mask), labels, mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("arch", ["mlp", "attention"])
def test_exports_to_onnx_with_dynamic_sizes(arch: str, stats, tmp_path) -> None:
    """The contract's I/O names and dynamic axes; ONNX Runtime agrees at other sizes than the example."""
    onnxruntime = pytest.importorskip("onnxruntime")
    model = _model(arch, stats)
    rng = np.random.default_rng(8)
    path = tmp_path / f"{arch}.onnx"
    docs = torch.export.Dim("docs", min=1, max=4096)
    if arch == "mlp":
        example = (torch.from_numpy(_features(rng, 20)),)
        dynamic_shapes = {"features": {0: docs}}
        input_names = ["features"]
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        example = (torch.from_numpy(_features(rng, 3, 20)), torch.ones(3, 20, dtype=torch.bool))
        dynamic_shapes = {"features": {0: batch, 1: docs}, "mask": {0: batch, 1: docs}}
        input_names = ["features", "mask"]
    torch.onnx.export(
        model,
        example,
        str(path),
        input_names=input_names,
        output_names=["scores"],
        dynamic_shapes=dynamic_shapes,
        opset_version=18,
        dynamo=True,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if arch == "mlp":
        x = _features(rng, 137)
        feeds = {"features": x}
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
    else:
        x = _features(rng, 5, 33)
        mask = np.ones((5, 33), dtype=bool)
        mask[2, 10:] = False
        feeds = {"features": x, "mask": mask}
        with torch.no_grad():
            expected = model(torch.from_numpy(x), torch.from_numpy(mask)).numpy()
    (got,) = session.run(["scores"], feeds)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    # One document (a list of one document): the smallest request the server can send.
    single = {name: value[:1, :1] if arch == "attention" else value[:1] for name, value in feeds.items()}
    (one,) = session.run(["scores"], single)
    with torch.no_grad():
        expected_one = model(*(torch.from_numpy(value) for value in single.values())).numpy()
    np.testing.assert_allclose(one, expected_one, rtol=1e-4, atol=1e-4)
