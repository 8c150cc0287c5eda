"""`IndexConfig`: every parameter of the retrieval stage's vector index, in one validated object.

Why its own module: `serve/config.py`'s ServiceConfig embeds it (the service's index is configuration
like every other optimization, and the two-stage ladder varies it), and importing the config must
not import faiss or pymilvus. The index itself is serve/vector_index.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LITE_KINDS = "FLAT, HNSW, HNSW_SQ, IVF_FLAT, IVF_SQ8"
BUILD_PARAMS = {"flat": (), "hnsw": ("hnsw_m", "ef_construction"), "ivf_flat": ("nlist",),
                "ivfpq": ("nlist", "pq_m", "pq_nbits")}
NAME_ABBREV = {"hnsw_m": "M", "ef_construction": "efc", "nlist": "nlist", "pq_m": "m", "pq_nbits": "nbits"}


class IndexUnavailableError(RuntimeError):
    """The index cannot answer (file missing/corrupt, Milvus down, collection missing): the service
    answers degraded. Here, not in serve/vector_index.py, so that catching it imports no faiss."""


class IndexConfig(BaseModel):
    """The index: backend and structure, build-time and search-time parameters."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    backend: Literal["faiss", "milvus"] = Field("faiss", description="in-process FAISS, or Milvus by `uri`")
    kind: Literal["flat", "hnsw", "ivf_flat", "ivfpq"] = Field("hnsw", description="index structure")
    hnsw_m: int = Field(32, ge=2, description="HNSW graph degree M (build)")
    ef_construction: int = Field(200, ge=1, description="HNSW candidate list while building")
    nlist: int = Field(1024, ge=1, description="IVF cells (build); clamped to n_docs // 39")
    pq_m: int = Field(16, ge=1, description="PQ sub-quantizers (build); must divide the embedding dim")
    pq_nbits: int = Field(8, ge=1, le=16, description="bits per PQ sub-quantizer code (build)")
    ef_search: int = Field(
        256, ge=1, description="HNSW candidate list while searching; a search for k > ef_search explores k")
    nprobe: int = Field(32, ge=1, description="IVF cells visited per query")
    refine_factor: int = Field(
        1, ge=1, description="faiss ivfpq only: >1 wraps the index in IndexRefineFlat (keeps the raw "
        "vectors) and re-ranks k*refine_factor PQ candidates by exact inner product")
    uri: str | None = Field(
        None, description="milvus: None = Milvus Lite <index_dir>/milvus.db; a path ending .db = Lite "
        "there; http://host:19530 = a Milvus server or cluster")
    collection: str = Field(
        "two_stage_docs", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="milvus: base collection name; the build params are appended (collection_name)")

    @model_validator(mode="after")
    def _lite_has_no_ivfpq(self) -> IndexConfig:
        if self.backend == "milvus" and self.kind == "ivfpq" and self.is_lite:
            raise ValueError(
                f"kind: ivfpq is not supported by Milvus Lite (it has {LITE_KINDS}); "
                "use a Milvus server URI or backend faiss")
        return self

    @property
    def is_lite(self) -> bool:
        return self.backend == "milvus" and (self.uri is None or self.uri.endswith(".db"))

    @property
    def refined(self) -> bool:
        return self.backend == "faiss" and self.kind == "ivfpq" and self.refine_factor > 1

    @property
    def label(self) -> str:
        """Row name in result tables, e.g. "hnsw M32 ef128", "ivfpq nlist1024 m16 nprobe32", "flat"."""
        text = {
            "flat": "flat",
            "hnsw": f"hnsw M{self.hnsw_m} ef{self.ef_search}",
            "ivf_flat": f"ivf_flat nlist{self.nlist} nprobe{self.nprobe}",
            "ivfpq": f"ivfpq nlist{self.nlist} m{self.pq_m} nprobe{self.nprobe}",
        }[self.kind]
        text += f" rf{self.refine_factor}" if self.refined else ""
        return f"milvus {text}" if self.backend == "milvus" else text

    def build_key(self) -> dict[str, Any]:
        """The build-time params relevant to this kind: what names and caches a built index."""
        key = {"backend": self.backend, "kind": self.kind, **{f: getattr(self, f) for f in BUILD_PARAMS[self.kind]}}
        return key | ({"refine": True} if self.refined else {}) | ({"mips": True} if self.mips_augmented else {})

    @property
    def mips_augmented(self) -> bool:
        """HNSW is built on norm-equalized vectors (serve/vector_index.py's `mips_augment`): a graph over
        raw inner products, whose norms vary, found 0.38-0.44 of the exact top-K (hand-measured on the 100k corpus before this build)."""
        return self.kind == "hnsw"

    def _name_parts(self) -> list[str]:  # hnsw, M32, efc200
        items = list(self.build_key().items())[2:]
        return [self.kind, *(k if k in ("refine", "mips") else f"{NAME_ABBREV[k]}{v}" for k, v in items)]

    def file_name(self) -> str:
        """faiss-hnsw-M32-efc200.index; milvus: milvus-<collection_name> (names the json sidecar)."""
        if self.backend == "milvus":
            return f"milvus-{self.collection_name}"
        return "-".join(["faiss", *self._name_parts()]) + ".index"

    @property
    def collection_name(self) -> str:
        """The Milvus collection: base name plus build params (two_stage_docs_hnsw_M32_efc200)."""
        return "_".join([self.collection, *self._name_parts()])

    def resolve_uri(self, index_dir: Path) -> str:
        return str(index_dir / "milvus.db") if self.uri is None else self.uri
