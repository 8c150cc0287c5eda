"""Where generated files go: one git-ignored artifacts folder, overridable for tests and CI."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("RANKSERVE_ARTIFACTS", REPO_ROOT / "artifacts"))
RESULTS = REPO_ROOT / "results"


def model_dir(name: str) -> Path:
    """Folder of one trained checkpoint (weights and model card)."""
    return ARTIFACTS / "models" / name


def variants_dir(name: str) -> Path:
    """Folder of one model's exported variants and their manifest."""
    return ARTIFACTS / "variants" / name


# The loss each architecture is trained with by default: the best per architecture in the first
# comparison run; in results/ltr_losses.md the top losses of each architecture lie within one seed's
# noise of each other. A checkpoint's folder is named `<arch>-<loss>`.
DEFAULT_LOSS = {"mlp": "ranknet", "attention": "listmle"}


# Files in two_stage_dir(): the towers' outputs and the degraded answer's documents.
QUERY_TOWER_FILE = "query_tower.onnx"
DOC_EMBEDDINGS_FILE = "doc_embeddings.npy"
FALLBACK_FILE = "fallback_ids.npy"


def two_stage_dir() -> Path:
    """Folder of the two-stage artifacts: corpus, towers, document embeddings, vector indexes."""
    return ARTIFACTS / "two_stage"


def default_model_name(arch: str) -> str:
    return f"{arch}-{DEFAULT_LOSS[arch]}"
