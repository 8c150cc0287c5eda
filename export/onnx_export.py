"""torch -> ONNX for both rankers, with symbolic list (and batch) sizes, checked by `onnx.checker`.

The serving stack sends lists of any length, so the graph must not bake in the example's shape:
the MLP is exported as a flat `features [docs, F] -> scores [docs]` (pointwise: lists can be
concatenated into one call), the attention ranker as `features [batch, docs, F], mask bool
[batch, docs] -> scores [batch, docs]`. The I/O names are the contract in docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

OPSET = 18  # >= 17 (LayerNormalization); 18 is the dynamo exporter's native opset in torch 2.13
MLP_INPUTS, ATTENTION_INPUTS, OUTPUTS = ["features"], ["features", "mask"], ["scores"]


def export_onnx(model: nn.Module, n_features: int, path: Path, *, pointwise: bool, opset: int = OPSET) -> Path:
    """Export `model` (eval mode) to `path` and check it; returns `path`.

    Example sizes are odd, distinct and > 1 (batch 3, 7 documents) so that the exporter cannot
    confuse the two dimensions or specialize a dimension of size 1.
    """
    docs = torch.export.Dim("docs", min=1, max=1 << 16)
    if pointwise:
        args: tuple = (torch.randn(7, n_features),)
        dynamic_shapes: tuple = ({0: docs},)
        input_names = MLP_INPUTS
    else:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        mask = torch.ones(3, 7, dtype=torch.bool)
        mask[1, 5:] = False
        args = (torch.randn(3, 7, n_features), mask)
        dynamic_shapes = ({0: batch, 1: docs}, {0: batch, 1: docs})
        input_names = ATTENTION_INPUTS
    return export_dynamo(model, args, path, input_names=input_names, output_names=OUTPUTS,
                         dynamic_shapes=dynamic_shapes, opset=opset)


def export_dynamo(model: nn.Module, args: tuple, path: Path, *, input_names: list[str], output_names: list[str],
                  dynamic_shapes: tuple, opset: int = OPSET) -> Path:
    """The dynamo exporter, quiet, one file (no external data), then `check_onnx`: every graph the project
    exports (rankers here, the query tower in models/two_tower.py) goes through it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), args, str(path), input_names=input_names, output_names=output_names,
            dynamic_shapes=dynamic_shapes, opset_version=opset, dynamo=True, external_data=False, verbose=False,
        )
    check_onnx(path)
    return path


def check_onnx(path: Path) -> None:
    """`onnx.checker` with shape inference (full_check): raises onnx.checker.ValidationError."""
    onnx.checker.check_model(str(path), full_check=True)


def op_types(path: Path) -> set[str]:
    """The operator types in a graph (the tests check that int8 graphs hold integer ops)."""
    return {node.op_type for node in onnx.load(str(path)).graph.node}


class _quiet_exporter:
    """The dynamo exporter logs its progress at INFO/WARNING on the root torch loggers."""

    def __enter__(self) -> None:
        self._levels = {name: logging.getLogger(name).level for name in ("torch.onnx", "torch.export")}
        for name in self._levels:
            logging.getLogger(name).setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
