"""Losses: finite with padding, padding-blind, shift-invariant where they should be, oriented the right
way, and equal to small reference implementations written differently (plain Python loops)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.losses import LOSSES, approxndcg, lambdarank, listmle, listnet, neuralndcg, ranknet
from models.metrics import ndcg_at_k

LISTWISE_AND_PAIRWISE = [name for name, loss in LOSSES.items() if loss.family != "pointwise"]


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4 lists of length 8 with 8, 5, 1 and 3 real documents; the last one has only zero labels."""
    gen = torch.Generator().manual_seed(seed)
    lengths = [8, 5, 1, 3]
    mask = torch.arange(8)[None, :] < torch.tensor(lengths)[:, None]
    scores = torch.randn(4, 8, generator=gen)
    labels = torch.randint(0, 5, (4, 8), generator=gen).float()
    labels[0, :3] = torch.tensor([4.0, 0.0, 2.0])  # make sure list 0 has several grades
    labels[3] = 0.0
    return scores, labels, mask


def _junk_padding(x: torch.Tensor, mask: torch.Tensor, value: float) -> torch.Tensor:
    return torch.where(mask, x, torch.full_like(x, value))


def test_registry_names_and_families() -> None:
    assert set(LOSSES) == {
        "mse",
        "sigmoid_ce",
        "ranknet",
        "lambdarank",
        "listnet",
        "listmle",
        "approxndcg",
        "neuralndcg",
    }
    families = {name: loss.family for name, loss in LOSSES.items()}
    assert families["mse"] == families["sigmoid_ce"] == "pointwise"
    assert families["ranknet"] == families["lambdarank"] == "pairwise"
    assert {families[n] for n in ("listnet", "listmle", "approxndcg", "neuralndcg")} == {"listwise"}
    assert all(loss.name == name and loss.description for name, loss in LOSSES.items())


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("pad_value", [0.0, 1e4, -1e4, float("inf"), float("nan")])
def test_finite_value_and_gradients_with_padding(name: str, pad_value: float) -> None:
    scores, labels, mask = _batch()
    scores = _junk_padding(scores, mask, pad_value).requires_grad_(True)
    torch.manual_seed(0)
    value = LOSSES[name].fn(scores, _junk_padding(labels, mask, 3.0), mask)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(scores.grad).all()
    assert (scores.grad[~mask] == 0).all()
    assert scores.grad[mask].abs().sum() > 0


@pytest.mark.parametrize("name", list(LOSSES))
def test_degenerate_batches_are_finite(name: str) -> None:
    """Lists of one real document, and lists whose labels are all zero."""
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 0] = True
    for labels in (torch.tensor([[2.0] * 5] * 3), torch.zeros(3, 5)):
        scores = torch.randn(3, 5, requires_grad=True)
        value = LOSSES[name].fn(scores, labels, mask)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(scores.grad).all()
    scores = torch.randn(2, 6, requires_grad=True)
    value = LOSSES[name].fn(scores, torch.zeros(2, 6), torch.ones(2, 6, dtype=torch.bool))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(scores.grad).all()


@pytest.mark.parametrize("name", list(LOSSES))
def test_padding_values_do_not_change_the_loss(name: str) -> None:
    scores, labels, mask = _batch(1)
    torch.manual_seed(0)
    reference = LOSSES[name].fn(scores, labels, mask)
    # Junk values in the padding, and extra padding columns.
    junk_scores = torch.cat([_junk_padding(scores, mask, 50.0), torch.full((4, 3), -7.0)], dim=1)
    junk_labels = torch.cat([_junk_padding(labels, mask, 4.0), torch.full((4, 3), 4.0)], dim=1)
    wider_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], dim=1)
    torch.manual_seed(0)
    if name == "listmle":  # its random tie-breaking draws per column: compare without ties instead
        labels = torch.arange(8.0).expand(4, 8).flip(1) * mask
        torch.manual_seed(0)
        reference = listmle(scores, labels, mask)
        junk_labels = torch.cat([_junk_padding(labels, mask, 4.0), torch.full((4, 3), 4.0)], dim=1)
    value = LOSSES[name].fn(junk_scores, junk_labels, wider_mask)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", LISTWISE_AND_PAIRWISE)
def test_shifting_a_list_by_a_constant_changes_nothing(name: str) -> None:
    scores, labels, mask = _batch(2)
    shift = torch.tensor([[3.0], [-100.0], [7.5], [0.25]])
    torch.manual_seed(0)
    reference = LOSSES[name].fn(scores, labels, mask)
    torch.manual_seed(0)
    shifted = LOSSES[name].fn(scores + shift, labels, mask)
    assert shifted.item() == pytest.approx(reference.item(), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_is_lower_when_scores_agree_with_labels(name: str) -> None:
    _, labels, mask = _batch(3)
    agree = 2.0 * (labels - 2.0)
    torch.manual_seed(0)
    good = LOSSES[name].fn(agree, labels, mask)
    torch.manual_seed(0)
    bad = LOSSES[name].fn(-agree, labels, mask)
    assert good < bad


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x)) if x < 30 else x


def _ranknet_reference(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    losses = []
    for s, y, m in zip(scores, labels, mask, strict=True):
        idx = np.flatnonzero(m)
        for i in idx:
            for j in idx:
                if y[i] > y[j]:
                    losses.append(_softplus(-(s[i] - s[j])))
    return float(np.mean(losses))


def _listnet_reference(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    per_list = []
    for s, y, m in zip(scores, labels, mask, strict=True):
        s, y = s[m].astype(np.float64), y[m].astype(np.float64)
        target = np.exp(y) / np.exp(y).sum()
        pred = np.exp(s) / np.exp(s).sum()
        per_list.append(-np.sum(target * np.log(pred)))
    return float(np.mean(per_list))


def _lambdarank_reference(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    """|delta NDCG| measured by really swapping two documents' scores and recomputing full NDCG."""
    per_list = []
    for s, y, m in zip(scores, labels, mask, strict=True):
        s, y = s[m].astype(np.float64), y[m]
        n = len(s)
        base = ndcg_at_k(s, y, n)
        total, has_pair = 0.0, False
        for i in range(n):
            for j in range(n):
                if y[i] > y[j]:
                    swapped = s.copy()
                    swapped[[i, j]] = swapped[[j, i]]
                    delta = abs(ndcg_at_k(swapped, y, n) - base)
                    total += delta * _softplus(-(s[i] - s[j]))
                    has_pair = True
        if has_pair:
            per_list.append(total)
    return float(np.mean(per_list))


def _listmle_reference(scores: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    per_list = []
    for s, y, m in zip(scores, labels, mask, strict=True):
        s, y = s[m].astype(np.float64), y[m]
        ordered = list(s[np.argsort(-y)])
        nll = 0.0
        while ordered:
            nll += math.log(sum(math.exp(v) for v in ordered)) - ordered[0]
            ordered.pop(0)
        per_list.append(nll)
    return float(np.mean(per_list))


@pytest.mark.parametrize(
    "fn, reference",
    [(ranknet, _ranknet_reference), (listnet, _listnet_reference), (lambdarank, _lambdarank_reference)],
)
def test_matches_reference_implementation(fn, reference) -> None:
    scores, labels, mask = _batch(4)
    expected = reference(scores.numpy(), labels.numpy(), mask.numpy())
    assert fn(scores, labels, mask).item() == pytest.approx(expected, rel=1e-5)


def test_listmle_matches_reference_without_ties() -> None:
    scores, _, mask = _batch(5)
    labels = torch.randperm(32, generator=torch.Generator().manual_seed(0)).float().reshape(4, 8) / 8
    expected = _listmle_reference(scores.numpy(), labels.numpy(), mask.numpy())
    assert listmle(scores, labels, mask).item() == pytest.approx(expected, rel=1e-5)


def test_smooth_ndcg_losses_approach_true_ndcg_when_sharp() -> None:
    """With a sharp sigmoid / low temperature, -approxndcg and -neuralndcg tend to the real NDCG."""
    scores, labels, mask = _batch(6)
    true_ndcg = np.mean(
        [
            ndcg_at_k(s[m], y[m], int(m.sum()))
            for s, y, m in zip(scores.numpy(), labels.numpy(), mask.numpy(), strict=True)
            if y[m].max() > 0
        ]
    )
    assert -approxndcg(scores, labels, mask, alpha=1000.0).item() == pytest.approx(true_ndcg, abs=1e-3)
    assert -neuralndcg(scores, labels, mask, tau=1e-3).item() == pytest.approx(true_ndcg, abs=1e-3)
    assert 0.0 < -approxndcg(scores, labels, mask).item() <= 1.0
    assert 0.0 < -neuralndcg(scores, labels, mask).item() <= 1.0


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        ranknet(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3, dtype=torch.bool))
