"""The two-stage ranker: trained on the candidates the retriever returns, built and gated like every ranker.

Why train on retrieved candidates: at serving time the ranker only ever sees the top K of the vector
index, so its training lists are each train query's top `TRAIN_CANDIDATES` by the towers (the
near misses it must tell apart), plus `RANDOM_CANDIDATES` documents drawn from the whole corpus, so
that scoring every document of the corpus (the offline ceiling of docs/two_stage.md) meets no
input unlike its training data. Features come from models/candidate_features.py, the code the
service runs; labels are the corpus's hidden grades.

    python models/two_stage.py [--docs 100000] [--queries 3000] [--max-seconds 60]

trains the towers first when artifacts/two_stage/ has none for this corpus (models/two_tower.py),
then the ranker (`models/train.py`'s loop, the MLP with its default loss, as checkpoint
`two-stage-mlp`), then exports and gates its variants (`export/quantize.py`: onnx-fp32 and
onnx-int8-dynamic) to artifacts/variants/two-stage-mlp/.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.candidate_features import RANKER_FEATURES, candidate_features, store_rows  # noqa: E402
from models.corpus import DOC_VIEWS, SPLIT_NAMES, Corpus, add_corpus_options, load_or_make, top_k  # noqa: E402
from models.data import LTRDataset, LTRSplit  # noqa: E402
from models.paths import FALLBACK_FILE, two_stage_dir  # noqa: E402

MODEL_NAME = "two-stage-mlp"
TRAIN_CANDIDATES = 300
RANDOM_CANDIDATES = 50
VARIANTS = ["onnx-fp32", "onnx-int8-dynamic"]
FALLBACK_DOCS = 1000


class TwoStageArtifacts:
    """What the towers' run left in artifacts/two_stage/: query embeddings (through the exported
    query tower, as the service computes them), document embeddings, the feature-store rows."""

    def __init__(self, corpus: Corpus, directory: Path | None = None) -> None:
        from models.paths import DOC_EMBEDDINGS_FILE, QUERY_TOWER_FILE
        from models.two_tower import REPORT_FILE

        self.directory = directory or two_stage_dir()
        report = self.directory / REPORT_FILE
        if not report.is_file():
            raise FileNotFoundError(f"{report}: no towers; run `python models/two_tower.py` first")
        fingerprint = json.loads(report.read_text())["corpus"]["fingerprint"]
        if fingerprint != corpus.fingerprint():
            raise ValueError(f"{report}: towers of another corpus ({fingerprint}); retrain them for this one")
        self.corpus = corpus
        self.doc_embeddings = np.load(self.directory / DOC_EMBEDDINGS_FILE)
        self.rows = store_rows(corpus.doc_features, self.doc_embeddings)
        self.query_tower = self.directory / QUERY_TOWER_FILE
        self._session = None

    def query_embeddings(self, queries: np.ndarray) -> np.ndarray:
        import onnxruntime as ort

        if self._session is None:
            self._session = ort.InferenceSession(str(self.query_tower), providers=["CPUExecutionProvider"])
        return self._session.run(["embedding"], {"attributes": self.corpus.query_attributes[queries]})[0]


def candidate_lists(artifacts: TwoStageArtifacts, queries: np.ndarray, n_candidates: int, n_random: int,
                    seed: int) -> list[np.ndarray]:
    """Per query: the towers' exact top `n_candidates`, then `n_random` other documents."""
    emb = artifacts.query_embeddings(queries)
    lists = []
    for start in range(0, queries.size, 64):
        top = top_k(emb[start:start + 64] @ artifacts.doc_embeddings.T, n_candidates)
        for offset, found in enumerate(top):
            rng = np.random.default_rng((seed, int(queries[start + offset])))
            extra = rng.choice(artifacts.corpus.n_docs, n_random + n_candidates, replace=False)
            lists.append(np.concatenate([found, extra[~np.isin(extra, found)][:n_random]]))
    return lists


def ranker_split(artifacts: TwoStageArtifacts, name: str, n_candidates: int = TRAIN_CANDIDATES,
                 n_random: int = RANDOM_CANDIDATES, seed: int = 0) -> LTRSplit:
    """The LTR split of one query split: each query's candidates as a list, with their hidden grades."""
    corpus = artifacts.corpus
    queries = corpus.queries_of(name)
    lists = candidate_lists(artifacts, queries, n_candidates, n_random, seed)
    relevant, grades = corpus.relevant(queries)
    emb = artifacts.query_embeddings(queries)
    X, y, qid = [], [], []
    for i, docs in enumerate(lists):
        X.append(candidate_features(emb[i], artifacts.rows[docs]))
        label = dict(zip(relevant[i].tolist(), grades[i].tolist(), strict=True))
        y.append(np.array([label.get(d, 0.0) for d in docs.tolist()], np.float32))
        qid.append(np.full(docs.size, queries[i] + 1, np.int64))
    return LTRSplit(name, np.concatenate(X), np.concatenate(y), np.concatenate(qid))


def ranker_dataset(artifacts: TwoStageArtifacts, seed: int = 0) -> LTRDataset:
    splits = {name: ranker_split(artifacts, name, seed=seed) for name in SPLIT_NAMES}
    return LTRDataset("two_stage", "models.two_stage", RANKER_FEATURES, splits["train"], splits["vali"],
                      splits["test"], {"corpus": artifacts.corpus.describe(),
                                       "candidates": f"towers' top {TRAIN_CANDIDATES} + {RANDOM_CANDIDATES} random"})


def train_ranker(artifacts: TwoStageArtifacts, *, max_seconds: float = 60.0, seed: int = 0):
    """Train, save as `MODEL_NAME`, build and gate VARIANTS; returns the manifest."""
    from export.quantize import quantize
    from models.train import TrainArgs, train

    dataset = ranker_dataset(artifacts, seed=seed)
    result = train(TrainArgs(data="two_stage", arch="mlp", name=MODEL_NAME, seed=seed, max_seconds=max_seconds,
                             max_len=None, quiet=not sys.stdout.isatty()), dataset=dataset)
    print(f"ranker {MODEL_NAME}: test NDCG@10 within candidate lists {result.card['metrics']['test']['ndcg@10']:.4f}")
    return quantize(result.checkpoint_dir, dataset=dataset, variants=VARIANTS, skip_bench=True)


def save_fallback(corpus: Corpus, n: int = FALLBACK_DOCS) -> Path:
    """The degraded answer's documents (the index cannot answer): the most popular ones, as a
    production service falls back to a popular list; popularity is a static feature (DOC_VIEWS)."""
    path = two_stage_dir() / FALLBACK_FILE
    np.save(path, np.argsort(-corpus.doc_features[:, DOC_VIEWS], kind="stable")[:n].astype(np.int64))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the two-stage ranker (and the towers if missing).")
    add_corpus_options(parser)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="ranker training time bound")
    parser.add_argument("--tower-seconds", type=float, default=60.0, help="towers' time bound, if trained now")
    parser.add_argument("--retrain-towers", action="store_true", help="train the towers even if present")
    args = parser.parse_args(argv)
    corpus = load_or_make(two_stage_dir(), args.docs, args.queries, seed=args.seed)
    try:
        if args.retrain_towers:
            raise FileNotFoundError("--retrain-towers")
        artifacts = TwoStageArtifacts(corpus)
    except (FileNotFoundError, ValueError) as why:
        from models import two_tower

        print(f"training the towers ({why})")
        two_tower.main(["--docs", str(args.docs), "--queries", str(args.queries), "--seed", str(args.seed),
                        "--max-seconds", str(args.tower_seconds)])
        artifacts = TwoStageArtifacts(corpus)
    train_ranker(artifacts, max_seconds=args.max_seconds, seed=args.seed)
    save_fallback(corpus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
