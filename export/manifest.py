"""The schema of `artifacts/variants/<model>/manifest.json`, the file serve/ and the load tests trust.

Everything downstream (the runtime, the Ray Serve app, the results tables) reads a variant through
this manifest, so its shape is pinned here with pydantic: a typo or a missing field fails at load
time with the field's name instead of as a KeyError deep inside a replica.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
# MLPerf Inference's two accuracy targets: 99% of the fp32 reference, and the 99.9% "high accuracy" one.
VALID_RETENTION = 0.99
HIGH_ACCURACY_RETENTION = 0.999


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AccuracyReport(_Strict):
    """A variant's test-split quality beside the fp32 torch reference (the MLPerf-style gate)."""

    ndcg10: float = Field(description="mean NDCG@10 of the variant on the test split")
    reference_ndcg10: float = Field(description="mean NDCG@10 of the fp32 torch model")
    retention: float = Field(description="ndcg10 / reference_ndcg10, 4 digits")
    valid: bool = Field(description=f"retention >= {VALID_RETENTION}")
    high_accuracy: bool = Field(description=f"retention >= {HIGH_ACCURACY_RETENTION}")
    max_abs_diff: float = Field(description="max |variant score - reference score| over test documents")
    kendall_tau: float = Field(description="Kendall tau between variant and reference scores, mean over queries")
    top10_overlap: float = Field(description="|top-10 variant ∩ top-10 reference| / 10, mean over queries")
    n_queries: int
    n_docs: int


class BenchRow(_Strict):
    """One cell of the model-level benchmark: one list size, one thread setting, one device."""

    device: str = Field(description="'cpu' or 'cuda'")
    mode: str = Field(default="default", description="e.g. 'default', 'tf32', 'fp16-autocast', 'compile'")
    threads: int
    n_docs: int
    repeats: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    docs_per_s: float
    macs_per_s: float | None = None
    roof: Literal["fp32", "int8", "bf16"] | None = None
    roof_fraction: float | None = Field(default=None, description="achieved MAC/s over the roof's MAC/s")


class VariantEntry(_Strict):
    name: str
    description: str
    format: Literal["torch", "onnx"]
    precision: Literal["fp32", "fp16", "bf16", "int8"]
    file: str = Field(description="path relative to the manifest's folder (a folder for torch-eager)")
    sha256: str
    size_bytes: int
    build: dict = Field(default_factory=dict, description="options chosen at build time, and why")
    accuracy: AccuracyReport
    valid: bool
    benchmark: list[BenchRow] = Field(default_factory=list)
    environment: dict = Field(description="models.environment.collect_environment() with thread settings")


class ModelInfo(_Strict):
    name: str
    version: str
    arch: Literal["mlp", "attention"]
    pointwise: bool
    n_features: int
    checkpoint: str
    macs_per_document: dict[str, float] = Field(
        description="list size -> multiply-adds per document (the attention ranker's grow with the list)")


class Roofs(_Strict):
    """Practical roofs measured on the same machine in the same run, in multiply-adds per second."""

    fp32: dict[str, float] = Field(description="threads -> MAC/s of a large fp32 matmul")
    int8: dict[str, float] = Field(description="threads -> MAC/s of a large int8 matmul")
    bf16: dict[str, float] = Field(default_factory=dict, description=(
        "threads -> MAC/s of a large bfloat16 matmul; measured only on CPUs with native bf16 math"))
    method: dict[str, str] = Field(default_factory=dict)


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    created: str
    model: ModelInfo
    data: dict
    roofs: Roofs | None = None
    variants: dict[str, VariantEntry]
    skipped: dict[str, str] = Field(default_factory=dict, description="variant -> why this CPU skipped it")

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.model_dump_json(indent=2))
        tmp.replace(path)  # atomic: a reader never sees half a manifest

    @classmethod
    def load(cls, path: Path) -> Manifest:
        return cls.model_validate(json.loads(Path(path).read_text()))


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a folder's files (sorted by name) for the torch checkpoint."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for file in files:
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def size_of(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
