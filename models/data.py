"""Learning-to-rank data: LETOR / LightGBM file loaders, a synthetic MSLR-shaped default, padding.

Every stage (training, evaluation, export, serving, load tests) reads queries through this module,
so a list of documents means the same thing everywhere: an `LTRSplit` holds the rows of each query
contiguously, and `PaddedBatch` is the one [queries, docs, features] layout models consume.

Real data is read with scikit-learn's svmlight reader (fast, well kept); our own code only locates
the offending line when the reader fails, because sklearn's message does not name it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.datasets import load_svmlight_file

SPLIT_NAMES = ("train", "vali", "test")
VALI_FRACTION_WHEN_MISSING = 0.2


class DataFormatError(ValueError):
    """A data file that cannot be read; the message names the file and the line."""

    def __init__(self, path: Path | str, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        where = f"{path}, line {line}" if line is not None else f"{path}"
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------------------------------
# Splits and datasets
# --------------------------------------------------------------------------------------------------


@dataclass
class LTRSplit:
    """One split: documents as rows, the rows of each query contiguous (in `qid` run order)."""

    name: str
    X: np.ndarray  # float32 [n_docs, F]
    y: np.ndarray  # float32 [n_docs]
    qid: np.ndarray  # int64 [n_docs]
    offsets: np.ndarray = field(init=False, repr=False)  # int64 [n_queries + 1]

    def __post_init__(self) -> None:
        self.X = np.ascontiguousarray(self.X, dtype=np.float32)
        self.y = np.asarray(self.y, dtype=np.float32).reshape(-1)
        self.qid = np.asarray(self.qid, dtype=np.int64).reshape(-1)
        if not (self.X.ndim == 2 and self.X.shape[0] == self.y.size == self.qid.size):
            raise ValueError(f"split {self.name}: X {self.X.shape}, y {self.y.shape}, qid {self.qid.shape} disagree")
        starts = np.flatnonzero(np.r_[True, self.qid[1:] != self.qid[:-1]]) if self.qid.size else np.zeros(0, int)
        if np.unique(self.qid[starts]).size != starts.size:
            raise ValueError(f"split {self.name}: the rows of a query must be contiguous")
        self.offsets = np.r_[starts, self.qid.size].astype(np.int64)

    @property
    def n_queries(self) -> int:
        return int(self.offsets.size - 1)

    @property
    def n_docs(self) -> int:
        return int(self.y.size)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def query(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.offsets[i], self.offsets[i + 1]
        return self.X[start:end], self.y[start:end]

    def subset(self, query_indices: Sequence[int] | np.ndarray, name: str | None = None) -> LTRSplit:
        """The given queries (in the given order) as a new split."""
        idx = np.asarray(query_indices, dtype=np.int64)
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in idx]) if idx.size \
            else np.zeros(0, np.int64)
        return LTRSplit(name or self.name, self.X[rows], self.y[rows], self.qid[rows])

    def summary(self) -> dict:
        lengths = self.lengths
        counts = np.bincount(np.clip(self.y, 0, None).astype(np.int64), minlength=5) if self.n_docs else []
        return {
            "queries": self.n_queries,
            "docs": self.n_docs,
            "docs_per_query": {"min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
                               "max": int(lengths.max())} if self.n_queries else None,
            "label_share": {str(g): round(float(c) / max(self.n_docs, 1), 3) for g, c in enumerate(counts)},
        }


@dataclass
class LTRDataset:
    """train / vali / test splits with disjoint queries and one feature width."""

    name: str
    source: str
    n_features: int
    train: LTRSplit
    vali: LTRSplit
    test: LTRSplit
    info: dict = field(default_factory=dict)  # generator facts (oracle NDCG, seed), file paths

    def splits(self) -> dict[str, LTRSplit]:
        return {"train": self.train, "vali": self.vali, "test": self.test}

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "n_features": self.n_features,
            "splits": {name: split.summary() for name, split in self.splits().items()},
            **self.info,
        }


# --------------------------------------------------------------------------------------------------
# File loaders
# --------------------------------------------------------------------------------------------------


def _check_svmlight_line(text: str) -> str | None:
    """Why one line of a LETOR/SVMlight file is malformed, or None. Only used to locate an error."""
    body = text.split("#", 1)[0].split()
    if not body:
        return None
    try:
        float(body[0])
    except ValueError:
        return f"label {body[0]!r} is not a number"
    last = 0
    for token in body[1:]:
        key, sep, value = token.partition(":")
        if not sep or not key or not value:
            return f"bad token {token!r} (expected index:value or qid:N)"
        if key == "qid":
            try:
                int(value)
            except ValueError:
                return f"bad token {token!r}: qid must be an integer"
            continue
        try:
            index, _ = int(key), float(value)
        except ValueError:
            return f"bad token {token!r}: index must be an integer and value a number"
        if index < 1:
            return f"bad token {token!r}: feature ids are 1-based"
        if index <= last:
            return f"bad token {token!r}: feature ids must be increasing within a line"
        last = index
    return None


def _locate_error(path: Path, sklearn_error: Exception) -> DataFormatError:
    with path.open("r", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            reason = _check_svmlight_line(text)
            if reason:
                return DataFormatError(path, number, reason)
    return DataFormatError(path, None, f"unreadable svmlight data ({sklearn_error})")


def _read_query_file(path: Path, n_rows: int, data_path: Path) -> np.ndarray:
    """Group sizes of a LightGBM `.query` file, checked against the data file's row count."""
    sizes: list[int] = []
    total = 0
    with path.open("r", errors="replace") as handle:
        for number, text in enumerate(handle, start=1):
            token = text.strip()
            if not token:
                continue
            try:
                size = int(token)
            except ValueError:
                raise DataFormatError(path, number, f"group size {token!r} is not an integer") from None
            if size < 1:
                raise DataFormatError(path, number, f"group size {size} must be at least 1")
            total += size
            if total > n_rows:
                raise DataFormatError(path, number, f"group sizes add up to {total} so far, more than the "
                                      f"{n_rows} rows of {data_path.name}")
            sizes.append(size)
    if total != n_rows:
        raise DataFormatError(path, len(sizes), f"group sizes add up to {total}, but {data_path.name} has "
                              f"{n_rows} rows")
    return np.asarray(sizes, dtype=np.int64)


def read_letor_file(path: Path | str, n_features: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X float32 dense [n, F], y float32, qid int64) of one LETOR (`qid:`) or LightGBM (`.query`) file.

    Feature ids are 1-based and may skip numbers; absent ones read as 0.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "no such file")
    try:
        X, y, qid = load_svmlight_file(str(path), n_features=n_features, query_id=True, zero_based=False,
                                       dtype=np.float32)
    except ValueError as error:
        raise _locate_error(path, error) from error
    query_path = path.with_name(path.name + ".query")
    if query_path.is_file():
        sizes = _read_query_file(query_path, X.shape[0], path)
        qid = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    elif qid.size != X.shape[0]:
        raise DataFormatError(path, 1, f"no qid: on the lines and no {query_path.name} beside the file")
    X = X.toarray() if n_features is None else X.toarray()[:, :n_features]
    return X.astype(np.float32, copy=False), y.astype(np.float32), qid.astype(np.int64)


def _group_contiguous(X: np.ndarray, y: np.ndarray, qid: np.ndarray) -> tuple[np.ndarray, ...]:
    """Make each query's rows contiguous (stable, in order of first appearance)."""
    _, first = np.unique(qid, return_index=True)
    rank = np.empty(first.size, np.int64)
    rank[np.argsort(first)] = np.arange(first.size)
    order = np.argsort(rank[np.unique(qid, return_inverse=True)[1]], kind="stable")
    return X[order], y[order], qid[order]


def load_folder(folder: Path | str, *, seed: int = 0) -> LTRDataset:
    """A dataset folder: train.txt, optional vali.txt, test.txt (the MSLR `Fold1/` layout)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--data {folder}: not a folder (want train.txt [vali.txt] test.txt)")
    files = {name: folder / f"{name}.txt" for name in SPLIT_NAMES}
    for name in ("train", "test"):
        if not files[name].is_file():
            raise FileNotFoundError(f"--data {folder}: {name}.txt is missing")
    raw = {name: read_letor_file(path) for name, path in files.items() if path.is_file()}
    width = max(X.shape[1] for X, _, _ in raw.values())
    splits = {}
    for name, (X, y, qid) in raw.items():
        if X.shape[1] < width:
            X = np.pad(X, ((0, 0), (0, width - X.shape[1])))
        splits[name] = LTRSplit(name, *_group_contiguous(X, y, qid))
    info: dict = {"files": {name: str(files[name]) for name in raw}}
    if "vali" not in splits:
        train = splits["train"]
        order = np.random.default_rng(seed).permutation(train.n_queries)
        n_vali = max(1, int(round(train.n_queries * VALI_FRACTION_WHEN_MISSING)))
        splits["vali"] = train.subset(np.sort(order[:n_vali]), name="vali")
        splits["train"] = train.subset(np.sort(order[n_vali:]), name="train")
        info["vali"] = f"no vali.txt: {n_vali} train queries split off with seed {seed}"
    return LTRDataset(folder.name, str(folder), width, splits["train"], splits["vali"], splits["test"], info)


# --------------------------------------------------------------------------------------------------
# Synthetic MSLR-shaped data
# --------------------------------------------------------------------------------------------------

SYNTHETIC_FEATURES = 136
SYNTHETIC_DEFAULT_QUERIES = 2100  # 1500 train / 300 vali / 300 test
SYNTHETIC_SPLIT_SHARES = (5 / 7, 1 / 7, 1 / 7)
LABEL_SHARES = (0.50, 0.30, 0.13, 0.05, 0.02)  # grades 0..4, skewed like MSLR-WEB10K
_HIDDEN_SEED = 20240611  # fixes the hidden relevance function and feature map; `seed` draws queries
_N_SIGNALS = 10
_N_DOC_FEATURES, _N_QUERY_FEATURES, _N_NOISE_FEATURES = 120, 8, 8
_LABEL_NOISE = 0.6


@dataclass(frozen=True)
class _FeatureMap:
    """How latent document signals become 136 observed features (fixed by `_HIDDEN_SEED`)."""

    loadings: np.ndarray  # [_N_DOC_FEATURES, _N_SIGNALS], sparse
    noise: np.ndarray  # [_N_DOC_FEATURES]
    kind: np.ndarray  # 0 lognormal, 1 softplus, 2 linear, 3 count
    scale: np.ndarray
    shift: np.ndarray
    permutation: np.ndarray  # observed column order


def _feature_map() -> _FeatureMap:
    rng = np.random.default_rng(_HIDDEN_SEED)
    loadings = np.zeros((_N_DOC_FEATURES, _N_SIGNALS))
    for j in range(_N_DOC_FEATURES):
        chosen = rng.choice(_N_SIGNALS, size=rng.integers(1, 4), replace=False)
        loadings[j, chosen] = rng.normal(0, 1, chosen.size)
        loadings[j] /= np.linalg.norm(loadings[j])
    return _FeatureMap(
        loadings=loadings,
        noise=rng.uniform(0.4, 1.2, _N_DOC_FEATURES),
        kind=rng.choice(4, size=_N_DOC_FEATURES, p=(0.4, 0.3, 0.2, 0.1)),
        scale=10.0 ** rng.uniform(-2, 4, _N_DOC_FEATURES),
        shift=rng.normal(0, 3, _N_DOC_FEATURES),
        permutation=rng.permutation(SYNTHETIC_FEATURES),
    )


def _relevance(z: np.ndarray, context: np.ndarray, intent: np.ndarray) -> np.ndarray:
    """The hidden utility of each document: nonlinear in its signals, partly relative to its query.

    `z` [n, S] are the document's latent signals, `context` [n, S] its query's centre (the mean of
    the query's documents), `intent` [n] a query-level switch. Terms 1-5 depend on a document
    *relative to the other documents of its list*: a pointwise scorer sees the centre only through
    noisy query-level features, a listwise (attention) ranker can estimate it from the list.
    """
    r = z - context
    gate = 1.0 / (1.0 + np.exp(-3.0 * intent))
    return (
        0.9 * z[:, 0]
        + 0.8 * np.tanh(1.5 * r[:, 1])
        + 0.5 * r[:, 2] * r[:, 3]
        - 0.6 * r[:, 4] ** 2
        + 0.9 * np.maximum(r[:, 5], 0.0)
        + gate * 1.0 * z[:, 6] + (1.0 - gate) * 1.0 * z[:, 7]
        + 0.4 * np.sin(2.0 * z[:, 8])
    )


def _transform(v: np.ndarray, fmap: _FeatureMap) -> np.ndarray:
    """Observed doc features from noisy linear views `v`: heavy tails and scales like MSLR's."""
    out = np.empty_like(v)
    for kind, transform in enumerate((
        lambda x: np.exp(0.7 * x),  # lognormal: TF, BM25-like, heavy right tail
        lambda x: np.logaddexp(0.0, 1.5 * x),  # softplus: non-negative, skewed
        lambda x: x,  # linear
        lambda x: np.floor(np.exp(0.8 * x) * 3.0),  # counts
    )):
        cols = fmap.kind == kind
        out[:, cols] = transform(v[:, cols])
    out = out * fmap.scale + np.where(fmap.kind == 2, fmap.shift * fmap.scale, 0.0)
    return out


def _ndcg10_by_query(utility: np.ndarray, y: np.ndarray, offsets: np.ndarray) -> float:
    from models.metrics import evaluate  # local import: metrics is optional while data is used alone

    return evaluate(offsets, utility, y)["ndcg@10"]


def make_synthetic(n_queries: int | None = None, *, seed: int = 0, mean_docs: float = 100.0) -> LTRDataset:
    """A deterministic MSLR-shaped dataset: 136 features, grades 0-4, 10 to ~400 documents a query.

    The hidden function and feature map are the same for every seed (one task); `seed` draws the
    queries. The oracle (true noiseless utility) NDCG@10 is in `describe()`.
    """
    n_queries = SYNTHETIC_DEFAULT_QUERIES if n_queries is None else int(n_queries)
    if n_queries < 3:
        raise ValueError(f"n_queries: need at least 3 (one per split), got {n_queries}")
    fmap = _feature_map()
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.round(rng.lognormal(math.log(mean_docs) - 0.18, 0.6, n_queries)), 10, 400).astype(np.int64)
    n_docs = int(lengths.sum())
    query_of_doc = np.repeat(np.arange(n_queries), lengths)

    context = rng.normal(0.0, 1.0, (n_queries, _N_SIGNALS))
    intent = rng.normal(0.0, 1.0, n_queries)
    offset = rng.normal(0.0, 0.5, n_queries)  # query difficulty: how many relevant docs it has
    z = context[query_of_doc] + rng.normal(0.0, 1.0, (n_docs, _N_SIGNALS))
    utility = _relevance(z, context[query_of_doc], intent[query_of_doc]) + offset[query_of_doc]
    noisy = utility + rng.normal(0.0, _LABEL_NOISE, n_docs)
    cuts = np.quantile(noisy, np.cumsum(LABEL_SHARES)[:-1])
    y = np.searchsorted(cuts, noisy).astype(np.float32)

    views = z @ fmap.loadings.T + rng.normal(0.0, 1.0, (n_docs, _N_DOC_FEATURES)) * fmap.noise
    doc_features = _transform(views, fmap)
    # Query-level features (constant within a query, like MSLR's query length / IDF): noisy views
    # of the query's context and its intent.
    query_view = np.column_stack([
        context[:, :_N_QUERY_FEATURES - 1] + rng.normal(0.0, 1.0, (n_queries, _N_QUERY_FEATURES - 1)),
        intent + rng.normal(0.0, 0.2, n_queries),
    ])
    noise_features = np.exp(rng.normal(0.0, 1.0, (n_docs, _N_NOISE_FEATURES))) * 10.0
    X = np.hstack([doc_features, query_view[query_of_doc], noise_features])[:, fmap.permutation]
    X = X.astype(np.float32)

    qid = np.arange(n_queries, dtype=np.int64)[query_of_doc] + 1
    n_train = int(round(n_queries * SYNTHETIC_SPLIT_SHARES[0]))
    n_vali = max(1, int(round(n_queries * SYNTHETIC_SPLIT_SHARES[1])))
    n_train = min(n_train, n_queries - n_vali - 1)
    full = LTRSplit("all", X, y, qid)
    bounds = {"train": (0, n_train), "vali": (n_train, n_train + n_vali), "test": (n_train + n_vali, n_queries)}
    splits = {name: full.subset(np.arange(a, b), name=name) for name, (a, b) in bounds.items()}
    oracle = {}
    for name, (a, b) in bounds.items():
        rows = slice(full.offsets[a], full.offsets[b])
        oracle[name] = round(_ndcg10_by_query(utility[rows], y[rows], full.offsets[a:b + 1] - full.offsets[a]), 4)
    info = {
        "seed": seed,
        "generator": "models.data.make_synthetic",
        "oracle_ndcg@10": oracle,
        "hidden_function": "nonlinear in 10 latent signals (tanh, products, sin, a query-intent gate) plus "
                           "terms relative to the query's centre; Gaussian label noise "
                           f"sd {_LABEL_NOISE}; grades by global quantiles {LABEL_SHARES}",
        "features": f"{_N_DOC_FEATURES} document features (lognormal, softplus, linear, count transforms "
                    f"of noisy mixes, scales 1e-2..1e4), {_N_QUERY_FEATURES} query-level features, "
                    f"{_N_NOISE_FEATURES} pure-noise features; columns shuffled",
    }
    return LTRDataset("synthetic", "synthetic", SYNTHETIC_FEATURES, splits["train"], splits["vali"],
                      splits["test"], info)


def load_dataset(spec: str | Path = "synthetic", *, seed: int = 0, n_queries: int | None = None) -> LTRDataset:
    """`"synthetic"` (the embedded default) or a folder with train.txt [vali.txt] test.txt."""
    if str(spec) == "synthetic":
        return make_synthetic(n_queries, seed=seed)
    dataset = load_folder(spec, seed=seed)
    if n_queries is not None:  # a quick look at a big dataset: the first queries of each split
        for name, split in dataset.splits().items():
            limit = max(1, int(round(n_queries * (SYNTHETIC_SPLIT_SHARES[0] if name == "train" else
                                                  SYNTHETIC_SPLIT_SHARES[1]))))
            setattr(dataset, name, split.subset(np.arange(min(limit, split.n_queries)), name=name))
    return dataset


# --------------------------------------------------------------------------------------------------
# Padded batches
# --------------------------------------------------------------------------------------------------


@dataclass
class PaddedBatch:
    """Queries padded to one length: padding rows are zeros with mask False."""

    features: np.ndarray  # float32 [B, L, F]
    labels: np.ndarray  # float32 [B, L]
    mask: np.ndarray  # bool [B, L]

    def to_torch(self, device: str | None = None):  # -> tuple[Tensor, Tensor, Tensor]
        import torch

        return (torch.from_numpy(self.features).to(device), torch.from_numpy(self.labels).to(device),
                torch.from_numpy(self.mask).to(device))


def pad_queries(split: LTRSplit, query_indices: Sequence[int] | np.ndarray, max_len: int | None = None) -> PaddedBatch:
    """The given queries as one padded batch; lists longer than `max_len` keep their first `max_len` docs."""
    idx = np.asarray(query_indices, dtype=np.int64)
    lengths = split.lengths[idx]
    if max_len is not None:
        lengths = np.minimum(lengths, max_len)
    width = int(lengths.max()) if idx.size else 0
    n_features = split.X.shape[1]
    features = np.zeros((idx.size, width, n_features), np.float32)
    labels = np.zeros((idx.size, width), np.float32)
    mask = np.zeros((idx.size, width), bool)
    for b, (q, n) in enumerate(zip(idx, lengths, strict=True)):
        start = split.offsets[q]
        features[b, :n] = split.X[start:start + n]
        labels[b, :n] = split.y[start:start + n]
        mask[b, :n] = True
    return PaddedBatch(features, labels, mask)


def batch_query_indices(split: LTRSplit, batch_size: int, *, shuffle: bool, seed: int = 0) -> list[np.ndarray]:
    """Query indices of each batch. Shuffled batches group queries of similar length (within chunks
    of 32 batches) so that padding stays small; unshuffled batches keep split order."""
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    order = np.arange(split.n_queries)
    if not shuffle:
        return [order[i:i + batch_size] for i in range(0, order.size, batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(order)
    chunk = batch_size * 32
    batches = []
    for i in range(0, order.size, chunk):
        part = order[i:i + chunk]
        part = part[np.argsort(split.lengths[part], kind="stable")]
        batches += [part[j:j + batch_size] for j in range(0, part.size, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def iterate_batches(
    split: LTRSplit, batch_size: int, *, shuffle: bool, seed: int = 0, max_len: int | None = None
) -> Iterator[PaddedBatch]:
    """Padded batches covering every query of the split once."""
    for indices in batch_query_indices(split, batch_size, shuffle=shuffle, seed=seed):
        yield pad_queries(split, indices, max_len=max_len)
