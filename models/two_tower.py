"""The retrieval stage's embeddings: a two-tower model (query tower, document tower) on the corpus.

Why two towers: the document side runs offline (every document embedded once, then indexed), the
query side online (one small MLP per request, exported to ONNX), and relevance is their inner
product, which a vector index can search. Trained with a sampled softmax over in-batch negatives
plus uniformly drawn corpus documents ("mixed negative sampling", Yang et al. 2020): in-batch
negatives alone are documents that are relevant to some query, so they over-represent good
documents and the model would under-weight quality; the uniform ones put the rest of the corpus
back. Document embeddings are not normalized: their norm is free to carry quality.

    python models/two_tower.py [--docs 100000] [--queries 3000] [--max-seconds 60]

writes artifacts/two_stage/: the corpus, the towers' weights, query_tower.onnx, doc_embeddings.npy and
towers.json (retrieval recall@K of the towers beside exact search over the true latent factors).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.corpus import RELEVANT_PER_QUERY, Corpus, add_corpus_options, load_or_make, top_k  # noqa: E402
from models.environment import collect_environment  # noqa: E402
from models.paths import DOC_EMBEDDINGS_FILE as EMBEDDINGS_FILE  # noqa: E402
from models.paths import QUERY_TOWER_FILE, two_stage_dir  # noqa: E402
from models.rankers import FeatureNormalizer, fit_normalizer  # noqa: E402

EMBEDDING_DIM = 32
RECALL_KS = (10, 100, 300, 1000)
REPORT_FILE = "towers.json"
HARD_NEGATIVE_DEPTH = 200
# The query tower learns from a few thousand distinct queries only (each brings ~100 pairs, all with
# the same input): a linear tower generalizes to new queries where an MLP overfits them (hand-measured:
# vali recall@100 0.42 with two hidden layers of 128, 0.44 linear, at 100k documents and 3,000 queries).
QUERY_HIDDEN = 0
_GRADE_WEIGHT = {4: 4.0, 3: 3.0, 2: 2.0, 1: 1.0}


class Tower(nn.Module):
    """Raw features -> normalization (baked in, as the rankers do) -> MLP -> embedding."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, hidden: int, *, log_features: bool) -> None:
        """`hidden` 0: a linear tower."""
        super().__init__()
        self.normalizer = FeatureNormalizer(mean, std, log_features=log_features, clip=10.0)
        self.mlp = nn.Sequential(nn.Linear(mean.size, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, EMBEDDING_DIM)) if hidden else nn.Linear(mean.size, EMBEDDING_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.normalizer(x))


@dataclass
class Towers:
    query: Tower
    doc: Tower


def build_towers(corpus: Corpus, hidden: int = 128, query_hidden: int = QUERY_HIDDEN) -> Towers:
    """Towers with normalizers fitted on train queries' attributes and on the corpus (all documents are
    known offline; no query label is involved)."""
    train_attributes = corpus.query_attributes[corpus.queries_of("train")]
    return Towers(
        query=Tower(*fit_normalizer(train_attributes, log_features=False), query_hidden, log_features=False),
        doc=Tower(*fit_normalizer(corpus.doc_features, log_features=True), hidden, log_features=True),
    )


def training_pairs(corpus: Corpus, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query index, relevant doc id, weight by grade) for every relevant document of `queries`."""
    ids, grades = corpus.relevant(queries)
    q = np.repeat(queries, ids.shape[1])
    weights = np.vectorize(_GRADE_WEIGHT.get)(grades.reshape(-1)).astype(np.float32)
    return q, ids.reshape(-1), weights


def embed(tower: Tower, X: np.ndarray, batch: int = 65536) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate([tower(torch.from_numpy(X[i:i + batch])).numpy() for i in range(0, len(X), batch)]) \
            if len(X) else np.zeros((0, EMBEDDING_DIM), np.float32)


def retrieval_recall(found: np.ndarray, relevant: np.ndarray) -> float:
    """Mean over queries of the share of the relevant set that `found` holds."""
    return float(np.mean([np.intersect1d(f, r).size / r.size for f, r in zip(found, relevant, strict=True)]))


def tower_recall(towers: Towers, corpus: Corpus, queries: np.ndarray, ks: tuple[int, ...] = RECALL_KS,
                 doc_embeddings: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Recall@K of the towers (exact inner-product search) and of exact search over the true latent factors."""
    relevant, _ = corpus.relevant(queries)
    docs = embed(towers.doc, corpus.doc_features) if doc_embeddings is None else doc_embeddings
    q = embed(towers.query, corpus.query_attributes[queries])
    kmax = max(ks)
    found = np.concatenate([top_k(q[i:i + 64] @ docs.T, kmax) for i in range(0, len(q), 64)])
    ceiling = corpus.latent_top(queries, kmax)
    return {
        "towers": {f"recall@{k}": round(retrieval_recall(found[:, :k], relevant), 4) for k in ks},
        "latent_exact": {f"recall@{k}": round(retrieval_recall(ceiling[:, :k], relevant), 4) for k in ks},
    }


def mine_hard_negatives(towers: Towers, corpus: Corpus, queries: np.ndarray, relevant: np.ndarray,
                        depth: int = HARD_NEGATIVE_DEPTH) -> np.ndarray:
    """Per query, the documents the current towers rank in their top `depth` that are not relevant
    (ANCE-style): the near misses random negatives almost never are. int64 [len(queries), depth], -1 padded."""
    docs = embed(towers.doc, corpus.doc_features)
    q = embed(towers.query, corpus.query_attributes[queries])
    out = np.full((queries.size, depth), -1, np.int64)
    for i in range(0, queries.size, 64):
        top = top_k(q[i:i + 64] @ docs.T, depth + relevant.shape[1])
        for row, (found, rel) in enumerate(zip(top, relevant[i:i + 64], strict=True)):
            misses = found[~np.isin(found, rel)][:depth]
            out[i + row, :misses.size] = misses
    return out


def train_towers(corpus: Corpus, *, epochs: int = 30, batch: int = 1024, uniform_negatives: int = 1024,
                 lr: float = 2e-3, max_seconds: float | None = 60.0, seed: int = 0, log=print) -> tuple[Towers, list]:
    """Train on the train queries, keep the weights with the best vali recall@100. From the second epoch
    each pair also brings one hard negative of its query, mined with the previous epoch's towers."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    towers = build_towers(corpus)
    params = list(towers.query.parameters()) + list(towers.doc.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-5)
    train_queries = corpus.queries_of("train")
    q_idx, d_idx, weights = training_pairs(corpus, train_queries)
    relevant_train = d_idx.reshape(train_queries.size, -1)
    row_of_query = np.full(corpus.n_queries, -1, np.int64)
    row_of_query[train_queries] = np.arange(train_queries.size)
    hard = None
    vali = corpus.queries_of("vali")[:300]
    attributes = torch.from_numpy(corpus.query_attributes)
    doc_features = torch.from_numpy(corpus.doc_features)
    start, history, best = time.perf_counter(), [], (-1.0, None)
    for epoch in range(epochs):
        towers.query.train()
        towers.doc.train()
        order = rng.permutation(q_idx.size)
        total = 0.0
        for i in range(0, order.size, batch):
            rows = order[i:i + batch]
            extra = rng.integers(0, corpus.n_docs, uniform_negatives)
            if hard is not None:
                mined = hard[row_of_query[q_idx[rows]], rng.integers(0, hard.shape[1], rows.size)]
                extra = np.concatenate([extra, mined[mined >= 0]])
            q = towers.query(attributes[q_idx[rows]])
            d = towers.doc(doc_features[np.concatenate([d_idx[rows], extra])])
            logits = q @ d.T
            target = torch.arange(rows.size)
            # Neither a document relevant to two queries of one batch, nor another positive of the same
            # query, is a negative.
            same = d_idx[rows][:, None] == np.concatenate([d_idx[rows], extra])[None, :]
            same[:, :rows.size] |= q_idx[rows][:, None] == q_idx[rows][None, :]
            same = torch.from_numpy(same)
            logits = logits.masked_fill(same & ~torch.eye(rows.size, logits.shape[1], dtype=torch.bool), -1e4)
            loss = (nn.functional.cross_entropy(logits, target, reduction="none")
                    * torch.from_numpy(weights[rows])).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * rows.size
        towers.query.eval()
        towers.doc.eval()
        recall = tower_recall(towers, corpus, vali, ks=(100,))["towers"]["recall@100"]
        history.append({"epoch": epoch + 1, "loss": round(total / order.size, 4), "vali_recall@100": recall,
                        "seconds": round(time.perf_counter() - start, 1)})
        log(f"  epoch {epoch + 1}: loss {history[-1]['loss']:.4f}, vali recall@100 {recall:.4f}")
        if recall > best[0]:
            best = (recall, {"query": _copy(towers.query), "doc": _copy(towers.doc)})
        if max_seconds and time.perf_counter() - start > max_seconds:
            break
        hard = mine_hard_negatives(towers, corpus, train_queries, relevant_train)
    towers.query.load_state_dict(best[1]["query"])
    towers.doc.load_state_dict(best[1]["doc"])
    return towers, history


def _copy(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def export_query_tower(tower: Tower, path: Path) -> Path:
    """The query tower as ONNX: `attributes [n, QUERY_ATTRIBUTES] -> embedding [n, EMBEDDING_DIM]`."""
    from export.onnx_export import export_dynamo

    width = int(tower.normalizer.mean.numel())
    return export_dynamo(tower, (torch.randn(3, width),), path, input_names=["attributes"], output_names=["embedding"],
                         dynamic_shapes=({0: torch.export.Dim("queries", min=1, max=1 << 16)},))


def query_tower_parity(tower: Tower, path: Path, attributes: np.ndarray) -> float:
    """Max |ONNX Runtime - torch| over the given attribute rows."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = session.run(["embedding"], {"attributes": attributes.astype(np.float32)})[0]
    return float(np.abs(onnx_out - embed(tower, attributes.astype(np.float32))).max())


def save_towers(towers: Towers, corpus: Corpus, directory: Path, report: dict) -> dict:
    """Weights, query_tower.onnx (checked for parity), doc_embeddings.npy and towers.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    for name, tower in (("query", towers.query), ("doc", towers.doc)):
        save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(directory / f"{name}_tower.safetensors"))
    onnx_path = export_query_tower(towers.query, directory / QUERY_TOWER_FILE)
    parity = query_tower_parity(towers.query, onnx_path, corpus.query_attributes[corpus.queries_of("test")])
    embeddings = embed(towers.doc, corpus.doc_features)
    np.save(directory / EMBEDDINGS_FILE, embeddings)
    report = {**report, "query_tower_parity_max_abs_diff": parity, "embedding_dim": EMBEDDING_DIM,
              "corpus": corpus.describe(), "environment": collect_environment()}
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the two-tower retrieval model on the two-stage corpus.")
    add_corpus_options(parser)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="training time bound; 0: none")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: all usable cores")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    directory = two_stage_dir()
    corpus = load_or_make(directory, args.docs, args.queries, seed=args.seed)
    print(f"corpus: {corpus.n_docs} documents, {corpus.n_queries} queries ({RELEVANT_PER_QUERY} relevant each)")
    started = time.perf_counter()
    towers, history = train_towers(corpus, epochs=args.epochs, max_seconds=args.max_seconds or None, seed=args.seed)
    recall = tower_recall(towers, corpus, corpus.queries_of("test"))
    report = save_towers(towers, corpus, directory, {"recall_test": recall, "history": history,
                                                     "train_seconds": round(time.perf_counter() - started, 1)})
    print(json.dumps({"recall_test": recall, "parity": report["query_tower_parity_max_abs_diff"]}, indent=2))
    print(f"wrote {directory}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
