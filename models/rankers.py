"""Ranking models built from a short config (allRank style): an MLP scorer and a listwise
self-attention ranker, each with its feature normalization baked in as the first layer.

Why the normalization lives inside the model: the serving stack sends raw features, and the ONNX
export must hold the exact transform fitted at training time. ``FeatureNormalizer`` keeps mean and
std as buffers, so they travel in the state dict and into the exported graph.

Why the attention blocks are hand-written instead of ``nn.TransformerEncoder``: its fast path and
nested tensors get in the way of ONNX export with dynamic batch and list sizes. Here every op is
explicit (Linear, reshape to heads, softmax with an additive finite mask, LayerNorm, residual), and
padding documents cannot change real documents' scores: their keys get -1e4 added before the
softmax (exp underflows to exactly 0; finite so a list of only padding gives no NaN, and
representable in float16 for the fp16 variant).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

MASK_BIAS = -1e4


@dataclass
class RankerConfig:
    """Everything needed to rebuild a ranker (mean/std come from the state dict or the caller)."""

    arch: Literal["mlp", "attention"] = "mlp"
    n_features: int = 136
    hidden: tuple[int, ...] = (256, 128)  # MLP hidden sizes (multiples of 16 suit int8 kernels)
    d_model: int = 64  # attention width
    n_heads: int = 4
    n_blocks: int = 2
    d_ff: int = 128
    dropout: float = 0.1
    log_features: bool = True  # signed log1p before standardization (heavy-tailed LETOR features)
    clip: float = 10.0  # clamp standardized features to [-clip, clip]; 0 disables

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        if self.arch not in ("mlp", "attention"):
            raise ValueError(f"arch: must be 'mlp' or 'attention', got {self.arch!r}")
        if self.n_features < 1:
            raise ValueError(f"n_features: must be >= 1, got {self.n_features}")
        if self.arch == "attention" and self.d_model % self.n_heads:
            raise ValueError(f"d_model: must be divisible by n_heads ({self.d_model} % {self.n_heads} != 0)")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankerConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RankerConfig fields: {sorted(unknown)}")
        return cls(**data)


def signed_log1p(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|): compresses heavy tails, keeps sign and zero."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def fit_normalizer(
    X: np.ndarray, log_features: bool = True, min_std: float = 1e-2
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std per feature of the (optionally signed-log1p'd) training features.

    Call it on the train split only. Constant features get std 1 (they are only centred), and every
    other std is floored at ``min_std`` so near-constant features cannot explode at serving time.
    ``log_features`` must match the ``RankerConfig.log_features`` of the model.
    """
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X: must be a non-empty 2-D array [n_docs, n_features], got shape {X.shape}")
    if log_features:
        X = np.sign(X) * np.log1p(np.abs(X))
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std < 1e-12, 1.0, np.maximum(std, min_std))
    return mean.astype(np.float32), std.astype(np.float32)


class FeatureNormalizer(nn.Module):
    """(transform(x) - mean) / std, clamped; mean and std are buffers (saved and exported)."""

    def __init__(self, mean: Any, std: Any, log_features: bool = True, clip: float = 10.0) -> None:
        super().__init__()
        mean_t = torch.as_tensor(np.asarray(mean, dtype=np.float32))
        std_t = torch.as_tensor(np.asarray(std, dtype=np.float32))
        if mean_t.shape != std_t.shape or mean_t.dim() != 1:
            raise ValueError(f"mean and std: must be 1-D of one length, got {mean_t.shape}, {std_t.shape}")
        self.register_buffer("mean", mean_t.clone())
        self.register_buffer("std", std_t.clone())
        self.log_features = log_features
        self.clip = clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log_features:
            x = signed_log1p(x)
        x = (x - self.mean) / self.std
        if self.clip > 0:
            x = torch.clamp(x, -self.clip, self.clip)
        return x


class MLPRanker(nn.Module):
    """Pointwise scorer: one score per document, independent of the rest of the list."""

    def __init__(self, config: RankerConfig, normalizer: FeatureNormalizer) -> None:
        super().__init__()
        self.config = config
        self.normalizer = normalizer
        layers: list[nn.Module] = []
        width = config.n_features
        for hidden in config.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, F] -> [B, L] or [N, F] -> [N]; ``mask`` is ignored (scores are per document)."""
        return self.mlp(self.normalizer(features)).squeeze(-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the documents of each list, with a key padding mask."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, D], key_bias [B, 1, 1, L] (0 for real documents, MASK_BIAS for padding)."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        # [B, L, D] -> [B, H, L, d_head]; unflatten keeps batch and list sizes symbolic for export.
        q, k, v = (t.unflatten(-1, (self.n_heads, self.d_head)).transpose(1, 2) for t in (q, k, v))
        logits = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.d_head)) + key_bias
        attn = self.dropout(torch.softmax(logits, dim=-1))
        context = torch.matmul(attn, v).transpose(1, 2).flatten(2)  # [B, L, D]
        return self.out(context)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block (as allRank): x + Attn(LN(x)), then x + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, d_ff), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x), key_bias))
        return x + self.dropout(self.ff(self.norm2(x)))


class AttentionRanker(nn.Module):
    """Listwise ranker: each document's score depends on the other real documents of its list."""

    def __init__(self, config: RankerConfig, normalizer: FeatureNormalizer) -> None:
        super().__init__()
        self.config = config
        self.normalizer = normalizer
        self.input = nn.Linear(config.n_features, config.d_model)
        self.blocks = nn.ModuleList(
            EncoderBlock(config.d_model, config.n_heads, config.d_ff, config.dropout)
            for _ in range(config.n_blocks)
        )
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, L, F], mask bool [B, L] (True = real document) -> scores [B, L].

        Scores of padding documents are meaningless (finite); callers ignore them.
        """
        x = self.input(self.normalizer(features))
        if mask is None:
            key_bias = torch.zeros_like(x[:, None, None, :, 0])
        else:
            key_bias = (~mask.to(torch.bool)).to(x.dtype)[:, None, None, :] * MASK_BIAS
        for block in self.blocks:
            x = block(x, key_bias)
        return self.head(self.norm(x)).squeeze(-1)


def build_ranker(config: RankerConfig, mean: Any = None, std: Any = None) -> nn.Module:
    """The ranker named by ``config.arch`` with its normalizer; mean/std None = identity (to be
    overwritten by ``load_state_dict``)."""
    if mean is None:
        mean = np.zeros(config.n_features, dtype=np.float32)
    if std is None:
        std = np.ones(config.n_features, dtype=np.float32)
    if len(mean) != config.n_features or len(std) != config.n_features:
        raise ValueError(
            f"mean/std: length {len(mean)}/{len(std)} does not match n_features={config.n_features}"
        )
    normalizer = FeatureNormalizer(mean, std, log_features=config.log_features, clip=config.clip)
    if config.arch == "mlp":
        return MLPRanker(config, normalizer)
    return AttentionRanker(config, normalizer)


def is_pointwise(model_or_config: nn.Module | RankerConfig) -> bool:
    """True when a document's score does not depend on its list (the MLP), so lists can be split,
    merged or scored as flat [N, F] rows."""
    config = model_or_config if isinstance(model_or_config, RankerConfig) else model_or_config.config
    return config.arch == "mlp"


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (normalization buffers excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mlp_layer_multiply_adds(config: RankerConfig) -> list[int]:
    """Multiply-adds per document of each of the MLP's dense layers, in order."""
    widths = [config.n_features, *config.hidden, 1]
    return [a * b for a, b in zip(widths[:-1], widths[1:], strict=True)]


def multiply_adds_per_document(config: RankerConfig, list_len: int | None = None) -> int:
    """Multiply-adds per document of one forward pass (dense layers, plus attention's QK^T and AV).

    Elementwise work (normalization, activations, LayerNorm, softmax) is left out. The attention
    ranker's cost grows with the list length, so ``list_len`` is required for it.
    """
    if config.arch == "mlp":
        return sum(mlp_layer_multiply_adds(config))
    if list_len is None or list_len < 1:
        raise ValueError("list_len: required (>= 1) for the attention ranker, whose cost grows with it")
    d, ff = config.d_model, config.d_ff
    per_block = 3 * d * d + d * d + 2 * d * ff + 2 * list_len * d  # qkv, out proj, FFN, QK^T + AV
    return config.n_features * d + config.n_blocks * per_block + d
