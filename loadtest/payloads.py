"""Request bodies built once, before a load test, from the dataset's real feature vectors.

Encoding a 1000-document JSON body takes longer than the service takes to score it, so a load
generator that builds bodies in its request loop measures itself. `build_payloads` encodes every body
up front and `PayloadSet.save` writes them to one msgpack file that the locustfile and the open-loop
generator load at start (`RANKSERVE_PAYLOADS`). This module never imports torch, so the locustfile
may import it (Locust must be imported before torch).

Each query id ends in a fixed-width nonce (`NONCE_WIDTH` characters) whose byte offset in the body is
stored with the payload: `Payload.with_nonce` rewrites it so that a steady or open-loop run can make
every request distinct (a guaranteed cache miss) without re-encoding the body.

Command line: `python loadtest/payloads.py --n-docs 10,100,1000 --encoding json --out FILE`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import orjson

ENCODINGS = ("json", "compact", "msgpack", "feature-store")
CONTENT_TYPES = {
    "json": "application/json",
    "compact": "application/json",
    "msgpack": "application/msgpack",
    "feature-store": "application/json",
}
NONCE_WIDTH = 12
_NONCE_FILL = "0" * NONCE_WIDTH
FILE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Payload:
    """One prepared POST /rank request."""

    query_id: str
    body: bytes
    content_type: str
    n_docs: int
    nonce_offset: int = -1  # byte offset of the query id's nonce in body; -1: none

    def with_nonce(self, n: int) -> bytes:
        """The body with the query id's nonce set to `n` (a distinct request for a result cache)."""
        if self.nonce_offset < 0:
            return self.body
        nonce = f"{n % 10**NONCE_WIDTH:0{NONCE_WIDTH}d}".encode()
        start = self.nonce_offset
        return b"".join((self.body[:start], nonce, self.body[start + NONCE_WIDTH :]))


@dataclass
class PayloadSet:
    """The payloads of one run and how they were made (encoding, sizes, dataset, seed)."""

    payloads: list[Payload]
    encoding: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.payloads)

    @property
    def sizes(self) -> list[int]:
        """The distinct list sizes (documents per request), ascending."""
        return sorted({p.n_docs for p in self.payloads})

    def by_size(self) -> dict[int, list[Payload]]:
        out: dict[int, list[Payload]] = {}
        for p in self.payloads:
            out.setdefault(p.n_docs, []).append(p)
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": "rankserve-payloads",
            "version": FILE_FORMAT_VERSION,
            "encoding": self.encoding,
            "meta": self.meta,
            "payloads": [[p.query_id, p.body, p.content_type, p.n_docs, p.nonce_offset] for p in self.payloads],
        }
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per writer: Locust workers race
        tmp.write_bytes(msgpack.packb(doc, use_bin_type=True))
        tmp.replace(path)  # atomic: a reader never sees half a file
        return path

    @classmethod
    def load(cls, path: str | Path) -> PayloadSet:
        path = Path(path)
        doc = msgpack.unpackb(path.read_bytes(), raw=False)
        if not isinstance(doc, dict) or doc.get("format") != "rankserve-payloads":
            raise ValueError(f"{path}: not a rankserve payload file (expected format 'rankserve-payloads')")
        if doc.get("version") != FILE_FORMAT_VERSION:
            raise ValueError(f"{path}: payload file version {doc.get('version')}, expected {FILE_FORMAT_VERSION}")
        payloads = [Payload(q, bytes(b), ct, int(n), int(off)) for q, b, ct, n, off in doc["payloads"]]
        if not payloads:
            raise ValueError(f"{path}: the payload file holds no payloads")
        return cls(payloads=payloads, encoding=doc["encoding"], meta=doc.get("meta", {}))


def _query_id(index: int, n_docs: int) -> str:
    return f"lt-{n_docs}-{index}-{_NONCE_FILL}"


def encode_body(query_id: str, doc_ids: list[str], X: np.ndarray, encoding: str) -> bytes:
    """One request body in one of the four request formats of POST /rank (docs/ARCHITECTURE.md)."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    if encoding == "json":
        docs = [{"id": d, "features": row} for d, row in zip(doc_ids, X, strict=True)]
        return orjson.dumps({"query_id": query_id, "documents": docs}, option=orjson.OPT_SERIALIZE_NUMPY)
    if encoding == "compact":
        return orjson.dumps(
            {"query_id": query_id, "doc_ids": doc_ids, "features": X}, option=orjson.OPT_SERIALIZE_NUMPY
        )
    if encoding == "msgpack":
        return msgpack.packb(
            {
                "query_id": query_id,
                "doc_ids": doc_ids,
                "n_features": int(X.shape[1]),
                "features": X.astype("<f4").tobytes(),
            },
            use_bin_type=True,
        )
    if encoding == "feature-store":
        return orjson.dumps({"query_id": query_id, "doc_ids": doc_ids})
    raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")


def _pick_rows(offsets: np.ndarray, n_rows: int, query: int, n_docs: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of one query, topped up with random rows of other queries when the query is shorter.

    Real lists hold ~100 documents; a 1000-document request is one query's documents plus other
    real documents of the same split (distinct rows, so distinct doc ids).
    """
    own = np.arange(offsets[query], offsets[query + 1])
    if len(own) >= n_docs:
        return np.sort(rng.choice(own, size=n_docs, replace=False))
    if n_docs > n_rows:
        raise ValueError(f"n_docs={n_docs} is more than the split's {n_rows} documents")
    others = np.setdiff1d(rng.choice(n_rows, size=min(n_rows, 2 * n_docs), replace=False), own)
    return np.concatenate([own, others[: n_docs - len(own)]])


def build_payloads(
    n_docs: int | Sequence[int],
    encoding: str = "json",
    n_queries: int = 64,
    seed: int = 0,
    *,
    dataset: str = "synthetic",
    split: str = "test",
    dataset_n_queries: int | None = None,
) -> PayloadSet:
    """Encode `n_queries` request bodies per list size from the dataset's `split`.

    Doc ids are `"<split>-<row>"`, the feature store's keys, so the feature-store encoding asks for
    documents that `python serve/feature_store.py load` has stored.
    """
    from models.data import load_dataset  # numpy only; imported here so the locustfile stays light

    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    sizes = [int(n_docs)] if isinstance(n_docs, int | np.integer) else [int(n) for n in n_docs]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"n_docs must be positive list sizes, got {n_docs!r}")
    if n_queries < 1:
        raise ValueError(f"n_queries must be >= 1, got {n_queries}")
    ds = load_dataset(dataset, seed=0, n_queries=dataset_n_queries)
    data = getattr(ds, split)
    rng = np.random.default_rng(seed)
    payloads: list[Payload] = []
    for size in sizes:
        queries = rng.choice(data.n_queries, size=n_queries, replace=n_queries > data.n_queries)
        for i, q in enumerate(queries):
            rows = _pick_rows(data.offsets, data.n_docs, int(q), size, rng)
            qid = _query_id(i, size)
            body = encode_body(qid, [f"{split}-{r}" for r in rows], data.X[rows], encoding)
            offset = body.find(qid.encode()) + len(qid) - NONCE_WIDTH
            payloads.append(Payload(qid, body, CONTENT_TYPES[encoding], size, offset))
    meta = {
        "dataset": dataset,
        "split": split,
        "n_features": int(ds.n_features),
        "sizes": sizes,
        "n_queries": n_queries,
        "seed": seed,
    }
    return PayloadSet(payloads=payloads, encoding=encoding, meta=meta)


# ----------------------------------------------------------------------------------------------
# Query popularity: a Zipf law over the payloads, so that the cache hit ratio is a parameter.
# ----------------------------------------------------------------------------------------------


def zipf_probabilities(n: int, s: float) -> np.ndarray:
    """P(rank k) proportional to 1 / k**s for k = 1..n (s = 0: uniform; larger s: a hotter head)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if s < 0:
        raise ValueError(f"the Zipf exponent s must be >= 0, got {s}")
    w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** s
    return w / w.sum()


def zipf_head_share(n: int, s: float, k: int) -> float:
    """Expected share of requests that go to the `k` most popular of `n` queries."""
    return float(zipf_probabilities(n, s)[:k].sum())


class ZipfSampler:
    """Draws payload indices with Zipf popularity (index 0 the most popular); cheap per draw."""

    def __init__(self, n: int, s: float, seed: int | None = None) -> None:
        self._cdf = np.cumsum(zipf_probabilities(n, s))
        self._cdf[-1] = 1.0
        self._rng = np.random.default_rng(seed)

    def sample(self) -> int:
        return int(np.searchsorted(self._cdf, self._rng.random(), side="right"))

    def sample_many(self, size: int) -> np.ndarray:
        return np.searchsorted(self._cdf, self._rng.random(size), side="right")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Build load-test request bodies from the dataset's test split.")
    ap.add_argument("--n-docs", default="100", help="list sizes, comma-separated (e.g. 10,100,1000)")
    ap.add_argument("--encoding", default="json", choices=ENCODINGS)
    ap.add_argument("--n-queries", type=int, default=64, help="payloads per list size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="synthetic", help="dataset spec for models.data.load_dataset")
    ap.add_argument("--out", required=True, help="payload file to write")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.n_docs.split(",") if s.strip()]
    ps = build_payloads(sizes, args.encoding, args.n_queries, args.seed, dataset=args.data)
    path = ps.save(args.out)
    print(f"wrote {len(ps)} payloads ({args.encoding}, sizes {sizes}) to {path}")


if __name__ == "__main__":
    main()
