"""Learning-to-rank losses, allRank style: every loss is a plain function ``fn(scores, labels, mask)``.

``scores`` and ``labels`` are float [B, L], ``mask`` is bool [B, L] (True = real document); the
result is a scalar tensor to minimise. Padding is masked out everywhere, and never with ``-inf``:
padded entries are replaced by finite values before any exp/log, so the value and the gradients
stay finite with padding, with lists of a single real document, and with lists whose labels are all
zero (such lists contribute zero to the ranking losses, and the loss is 0 when no list in the batch
has any signal).

Families: pointwise (``mse``, ``sigmoid_ce``), pairwise (``ranknet``, ``lambdarank``), listwise
(``listnet``, ``listmle``, ``approxndcg``, ``neuralndcg``). Gains are ``2**label - 1`` and
discounts ``1 / log2(rank + 1)``, as in ``models/metrics.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

# A finite stand-in for -inf: exp() of it underflows to exactly 0 in float32, and 0 * it is 0.
_NEG = -1e9
_EPS = 1e-10

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Loss:
    """One registry entry: a name, its family, one line on what it optimises, the function."""

    name: str
    family: Literal["pointwise", "pairwise", "listwise"]
    description: str
    fn: LossFn


def _check(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if scores.shape != labels.shape or scores.shape != mask.shape or scores.dim() != 2:
        raise ValueError(
            f"scores, labels and mask must share one [B, L] shape, got "
            f"{tuple(scores.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    return mask.to(torch.bool)


def _zero(scores: torch.Tensor) -> torch.Tensor:
    """A zero that keeps the graph connected (so ``.backward()`` works on a batch without signal)."""
    return scores.sum() * 0.0


def _gains(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, torch.pow(2.0, labels) - 1.0, torch.zeros_like(labels))


def _discounts(length: int, like: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(length, device=like.device, dtype=like.dtype)
    return 1.0 / torch.log2(positions + 2.0)


def _ideal_dcg(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Ideal DCG per list, [B]."""
    ideal = torch.sort(_gains(labels, mask), dim=1, descending=True).values
    return (ideal * _discounts(labels.shape[1], labels)).sum(dim=1)


def _mean_over(values: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """Weighted mean over lists; 0 (graph-connected) when no list has weight."""
    total = weights.sum()
    if total <= 0:
        return _zero(scores)
    return (values * weights).sum() / total


# ---------------------------------------------------------------- pointwise


def mse(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Regression of scores on graded labels, mean over real documents."""
    mask = _check(scores, labels, mask)
    err = torch.where(mask, scores - labels, torch.zeros_like(scores))
    return (err**2).sum() / mask.sum().clamp(min=1)


def sigmoid_ce(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of sigmoid(score) against label / 4 (MSLR grades 0..4 -> [0, 1])."""
    mask = _check(scores, labels, mask)
    targets = (labels / 4.0).clamp(0.0, 1.0)
    per_doc = F.binary_cross_entropy_with_logits(
        torch.where(mask, scores, torch.zeros_like(scores)),
        torch.where(mask, targets, torch.zeros_like(targets)),
        reduction="none",
    )
    return (per_doc * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------- pairwise


def _pairs(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise logistic loss softplus(-(s_i - s_j)) [B, L, L] and the mask of pairs with y_i > y_j."""
    safe_scores = torch.where(mask, scores, torch.zeros_like(scores))
    diff = safe_scores[:, :, None] - safe_scores[:, None, :]
    valid = (labels[:, :, None] > labels[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    return F.softplus(-diff), valid


def ranknet(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RankNet: logistic loss on every pair of one list with different labels, mean over pairs."""
    mask = _check(scores, labels, mask)
    pair_loss, valid = _pairs(scores, labels, mask)
    n_pairs = valid.sum()
    if n_pairs == 0:
        return _zero(scores)
    return (pair_loss * valid).sum() / n_pairs


def lambdarank(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LambdaRank: RankNet pairs weighted by |delta NDCG| of swapping them in the current ranking.

    |delta NDCG_ij| = |G_i - G_j| * |1/log2(1 + r_i) - 1/log2(1 + r_j)| / IDCG, with ranks r taken
    from the current scores (no gradient through them). Per list the weighted pair losses are
    summed; the loss is the mean over lists that have at least one pair.
    """
    mask = _check(scores, labels, mask)
    pair_loss, valid = _pairs(scores, labels, mask)
    with torch.no_grad():
        key = torch.where(mask, scores, torch.full_like(scores, _NEG))
        order = torch.argsort(key, dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
        inv_discount = 1.0 / torch.log2(ranks.to(scores.dtype) + 2.0)
        gains = _gains(labels, mask)
        ideal = _ideal_dcg(labels, mask)
        delta = (gains[:, :, None] - gains[:, None, :]).abs() * (
            inv_discount[:, :, None] - inv_discount[:, None, :]
        ).abs()
        weights = delta / ideal.clamp(min=_EPS)[:, None, None]
    per_list = (pair_loss * weights * valid).sum(dim=(1, 2))
    has_pairs = valid.any(dim=(1, 2)).to(scores.dtype)
    return _mean_over(per_list, has_pairs, scores)


# ---------------------------------------------------------------- listwise


def listnet(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ListNet: cross-entropy between the top-1 distributions softmax(labels) and softmax(scores)."""
    mask = _check(scores, labels, mask)
    neg = torch.full_like(scores, _NEG)
    target = torch.softmax(torch.where(mask, labels, neg), dim=1)
    log_pred = torch.log_softmax(torch.where(mask, scores, neg), dim=1)
    per_list = -(target * torch.where(mask, log_pred, torch.zeros_like(log_pred))).sum(dim=1)
    return _mean_over(per_list, mask.any(dim=1).to(scores.dtype), scores)


def listmle(scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ListMLE: negative Plackett-Luce log-likelihood of the label order (ties broken at random).

    Uses torch's global RNG for tie-breaking (seed it for reproducibility). Sum over positions per
    list, mean over lists with at least one real document.
    """
    mask = _check(scores, labels, mask)
    batch, length = scores.shape
    # Random tie-breaking: shuffle, then a stable sort by label (padding last) keeps the shuffle in ties.
    shuffle = torch.argsort(torch.rand(batch, length, device=scores.device), dim=1)
    sort_key = torch.where(mask, labels, torch.full_like(labels, _NEG)).gather(1, shuffle)
    order = shuffle.gather(1, torch.argsort(sort_key, dim=1, descending=True, stable=True))
    s = torch.where(mask, scores, torch.full_like(scores, _NEG)).gather(1, order)
    real = mask.gather(1, order)
    # log sum_{j >= i} exp(s_j): padding sits at the end and contributes exp(-1e9) = 0.
    tail_lse = torch.flip(torch.logcumsumexp(torch.flip(s, dims=[1]), dim=1), dims=[1])
    per_list = torch.where(real, tail_lse - s, torch.zeros_like(s)).sum(dim=1)
    return _mean_over(per_list, mask.any(dim=1).to(scores.dtype), scores)


def approxndcg(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """ApproxNDCG (Qin et al. 2010): NDCG with each rank replaced by a smooth sigmoid count.

    rank_i ~ 1 + sum_{j != i} sigmoid(-alpha (s_i - s_j)). Loss = -mean approximate NDCG over lists
    with a positive ideal DCG (lists without relevant documents carry no signal).
    """
    mask = _check(scores, labels, mask)
    safe_scores = torch.where(mask, scores, torch.zeros_like(scores))
    diff = safe_scores[:, :, None] - safe_scores[:, None, :]
    others = mask[:, None, :] & ~torch.eye(scores.shape[1], dtype=torch.bool, device=scores.device)
    approx_rank = 1.0 + (torch.sigmoid(-alpha * diff) * others).sum(dim=2)
    approx_dcg = (_gains(labels, mask) / torch.log2(1.0 + approx_rank)).sum(dim=1)
    ideal = _ideal_dcg(labels, mask)
    ndcg = approx_dcg / ideal.clamp(min=_EPS)
    return -_mean_over(ndcg, (ideal > 0).to(scores.dtype), scores)


def _neural_sort(scores: torch.Tensor, mask: torch.Tensor, tau: float) -> torch.Tensor:
    """NeuralSort relaxed permutation matrix P[b, i, j] ~ P(document j at rank i), padding-aware.

    Row i (rank position, 1-based) is softmax_j(((n + 1 - 2i) s_j - sum_k |s_j - s_k|) / tau) over
    the n real documents of the list (Grover et al. 2019); rows i > n and padding columns are 0.
    """
    length = scores.shape[1]
    maskf = mask.to(scores.dtype)
    n = maskf.sum(dim=1, keepdim=True)  # [B, 1]
    s = torch.where(mask, scores, torch.zeros_like(scores))
    pair_mask = mask[:, :, None] & mask[:, None, :]
    abs_diff_sum = ((s[:, :, None] - s[:, None, :]).abs() * pair_mask).sum(dim=2)  # [B, L] over j
    positions = torch.arange(1, length + 1, device=scores.device, dtype=scores.dtype)
    scaling = n + 1.0 - 2.0 * positions[None, :]  # [B, L] over rank i
    logits = (scaling[:, :, None] * s[:, None, :] - abs_diff_sum[:, None, :]) / tau  # [B, i, j]
    logits = torch.where(mask[:, None, :], logits, torch.full_like(logits, _NEG))
    rows_real = positions[None, :] <= n  # [B, L] over rank i
    block = rows_real[:, :, None] & mask[:, None, :]
    return torch.softmax(logits, dim=2) * block


def _sinkhorn(p: torch.Tensor, block: torch.Tensor, n_iter: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Alternate row and column normalisation toward a doubly-stochastic matrix on the real block."""
    p = p * block
    # Empty (padding) rows and columns divide by 1, not by a clamped ~0: 30 rounds of 1/eps would
    # overflow the backward pass into inf * 0 = NaN.
    empty_cols = (~block.any(dim=1, keepdim=True)).to(p.dtype)
    empty_rows = (~block.any(dim=2, keepdim=True)).to(p.dtype)
    for _ in range(n_iter):
        p = p / (p.sum(dim=1, keepdim=True) + empty_cols).clamp(min=_EPS)
        p = p / (p.sum(dim=2, keepdim=True) + empty_rows).clamp(min=_EPS)
        # Rows now sum to 1; stop once the real columns do too (allRank's tolerance rule).
        if ((p.sum(dim=1, keepdim=True) - 1.0) * (1.0 - empty_cols)).abs().max() < tol:
            break
    return p * block


def neuralndcg(
    scores: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """NeuralNDCG (Pobrotyn & Bialobrzeski 2021, allRank): NDCG of the NeuralSort-relaxed ranking.

    Gains are sorted by the Sinkhorn-scaled NeuralSort matrix, discounted by rank, and divided by
    the ideal DCG; loss = -mean over lists with a positive ideal DCG.
    """
    mask = _check(scores, labels, mask)
    length = scores.shape[1]
    p = _neural_sort(scores, mask, tau)
    n = mask.sum(dim=1, keepdim=True)
    rows_real = torch.arange(1, length + 1, device=scores.device)[None, :] <= n
    p = _sinkhorn(p, rows_real[:, :, None] & mask[:, None, :])
    sorted_gains = torch.bmm(p, _gains(labels, mask).unsqueeze(2)).squeeze(2)  # [B, rank]
    dcg = (sorted_gains * _discounts(length, scores)).sum(dim=1)
    ideal = _ideal_dcg(labels, mask)
    ndcg = dcg / ideal.clamp(min=_EPS)
    return -_mean_over(ndcg, (ideal > 0).to(scores.dtype), scores)


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss("mse", "pointwise", "squared error of the score against the graded label", mse),
        Loss("sigmoid_ce", "pointwise", "binary cross-entropy of sigmoid(score) against label/4", sigmoid_ce),
        Loss("ranknet", "pairwise", "logistic loss on every mis-orderable pair (RankNet)", ranknet),
        Loss("lambdarank", "pairwise", "RankNet pairs weighted by |delta NDCG| of swapping them", lambdarank),
        Loss(
            "listnet",
            "listwise",
            "cross-entropy of top-1 distributions softmax(labels) vs softmax(scores)",
            listnet,
        ),
        Loss(
            "listmle",
            "listwise",
            "Plackett-Luce likelihood of the label order (random tie-breaking)",
            listmle,
        ),
        Loss("approxndcg", "listwise", "negative NDCG with ranks approximated by sigmoids", approxndcg),
        Loss(
            "neuralndcg", "listwise", "negative NDCG of the NeuralSort-relaxed ranking (allRank)", neuralndcg
        ),
    )
}
