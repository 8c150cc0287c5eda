"""Build the first stage's vector indexes over the document embeddings (serve/vector_index.py).

    python export/build_index.py                                   # faiss hnsw, the IndexConfig defaults
    python export/build_index.py --backend faiss --kind ivfpq --nlist 1024 --pq-m 16 --refine-factor 4
    python export/build_index.py --backend milvus --kind hnsw --uri http://milvus:19530
    python export/build_index.py --all                             # the default set, for the benchmark

Reads `<artifacts>/two_stage/doc_embeddings.npy` (float32 [n_docs, dim], written by
models/two_tower.py) and writes to `<artifacts>/two_stage/index/`. Each index has a json sidecar;
an index whose build params and embeddings are unchanged is not rebuilt (--force rebuilds it).
Every flag is an IndexConfig field, so a setting is declared once, in the model. Milvus Lite allows
one process per .db: stop a service that has it open before building into it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python export/build_index.py`: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from models.paths import two_stage_dir  # noqa: E402
from serve.vector_index import IndexConfig, IndexUnavailableError, build_index, ensure_index  # noqa: E402

# --all: what the retrieval benchmark compares. ivf_flat is left out: between flat and ivfpq.
DEFAULT_SET = [("faiss", "flat"), ("faiss", "hnsw"), ("faiss", "ivfpq"), ("milvus", "hnsw"), ("milvus", "flat")]


def _flag_type(annotation: Any) -> dict[str, Any]:
    """argparse kwargs for one IndexConfig field's type: Literal -> choices, int, str (also `str | None`)."""
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": list(typing.get_args(annotation))}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return {"type": annotation}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("index settings (IndexConfig fields; unset = the model's default)")
    for name, field in IndexConfig.model_fields.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, **_flag_type(field.annotation),
                           help=f"{field.description} (default: {field.default})")
    parser.add_argument("--all", action="store_true", help="build " + ", ".join(f"{b} {k}" for b, k in DEFAULT_SET))
    parser.add_argument("--force", action="store_true", help="rebuild even when the sidecar says it is current")
    parser.add_argument("--embeddings", type=Path, default=None, help="default: <two_stage>/doc_embeddings.npy")
    parser.add_argument("--index-dir", type=Path, default=None, help="default: <two_stage>/index")
    args = parser.parse_args(argv)
    if args.all and (args.backend or args.kind):
        parser.error("--all builds its own backends and kinds: drop --backend/--kind")
    return args


def configs_from_args(args: argparse.Namespace) -> list[IndexConfig]:
    settings = {name: getattr(args, name) for name in IndexConfig.model_fields if getattr(args, name) is not None}
    if not args.all:
        return [IndexConfig(**settings)]
    return [IndexConfig(**(settings | {"backend": backend, "kind": kind})) for backend, kind in DEFAULT_SET]


def size_on_disk(config: IndexConfig, path: Path) -> str:
    if config.backend == "milvus" and not config.is_lite:
        return "on the server"
    if config.is_lite:  # one .db folder holds every collection: count this one's folder
        folders = [p for p in (path / "collections").glob(config.collection_name) if p.is_dir()] or [path]
        files = [f for folder in folders for f in folder.rglob("*") if f.is_file()]
    else:
        files = [path]
    return f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    embeddings_path = args.embeddings or two_stage_dir() / "doc_embeddings.npy"
    index_dir = args.index_dir or two_stage_dir() / "index"
    if not embeddings_path.is_file():
        print(f"no document embeddings at {embeddings_path}: run `python models/two_tower.py` first", file=sys.stderr)
        return 2
    try:
        configs = configs_from_args(args)
    except ValueError as exc:  # pydantic's ValidationError: names the field
        print(exc, file=sys.stderr)
        return 2
    embeddings = np.load(embeddings_path, mmap_mode="r")
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    print(f"{len(embeddings)} x {embeddings.shape[1]} embeddings from {embeddings_path} -> {index_dir}")
    print(f"{'index':42s} {'build s':>9s} {'on disk':>14s}  path")
    for config in configs:
        sidecar = index_dir / f"{config.file_name()}.json"
        before = sidecar.stat().st_mtime_ns if sidecar.exists() else None
        try:
            path = (build_index if args.force else ensure_index)(config, embeddings, index_dir)
        except (ValueError, IndexUnavailableError) as exc:
            print(f"{config.label:42s} FAILED: {exc}", file=sys.stderr)
            return 1
        meta = json.loads(sidecar.read_text())
        cached = " (cached)" if sidecar.stat().st_mtime_ns == before else ""
        print(f"{config.label:42s} {meta['build_seconds']:9.1f} {size_on_disk(config, path):>14s}  {path}{cached}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
