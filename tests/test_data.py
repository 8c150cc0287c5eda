"""Data loading, synthetic generation, splits and padding (models/data.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.data import (
    DataFormatError,
    LTRSplit,
    iterate_batches,
    load_dataset,
    make_synthetic,
    pad_queries,
    read_letor_file,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def small_synthetic():
    return make_synthetic(60, seed=3)


# ---------------------------------------------------------------- real-file layouts


def test_letor_folder_reads_sparse_one_based_features_with_qid():
    dataset = load_dataset(FIXTURES / "letor")
    assert dataset.n_features == 10  # the largest feature id in any split
    train = dataset.train
    assert train.X.dtype == np.float32 and train.X.shape == (6, 10)
    assert train.n_queries == 3 and list(train.offsets) == [0, 3, 5, 6]
    assert list(train.qid) == [10, 10, 10, 11, 11, 12]
    np.testing.assert_array_equal(train.y, [2, 0, 1, 0, 4, 3])
    # "2 qid:10 1:0.5 2:1.25 7:3 # docid = a1": ids are 1-based, gaps read as 0, comment ignored.
    np.testing.assert_array_equal(train.X[0], [0.5, 1.25, 0, 0, 0, 0, 3, 0, 0, 0])
    assert train.X[2, 9] == 1000.0
    assert dataset.vali.n_queries == 2 and dataset.test.n_queries == 2
    assert dataset.test.X.shape[1] == dataset.vali.X.shape[1] == 10  # padded to one width
    X, y = train.query(1)
    np.testing.assert_array_equal(y, [0, 4])
    assert X.shape == (2, 10)


def test_lightgbm_folder_takes_groups_from_query_file_and_splits_vali_off_train():
    dataset = load_dataset(FIXTURES / "lightgbm", seed=0)
    assert dataset.n_features == 4
    assert dataset.train.n_queries + dataset.vali.n_queries == 4
    assert dataset.vali.n_queries == 1  # 20 % of 4 queries, rounded
    assert dataset.train.n_docs + dataset.vali.n_docs == 8
    assert list(dataset.test.lengths) == [2, 1]
    np.testing.assert_array_equal(dataset.test.X[2], [0, 0, 0, 4])
    assert "vali" in dataset.describe()


def test_read_letor_file_with_query_file(tmp_path):
    (tmp_path / "d.txt").write_text("1 1:1\n0 2:1\n1 3:1\n")
    (tmp_path / "d.txt.query").write_text("1\n2\n")
    X, y, qid = read_letor_file(tmp_path / "d.txt")
    assert X.shape == (3, 3) and list(np.diff(np.r_[0, np.flatnonzero(np.diff(qid)) + 1, 3])) == [1, 2]


# ---------------------------------------------------------------- malformed input


def _error(path: Path) -> DataFormatError:
    with pytest.raises(DataFormatError) as info:
        read_letor_file(path)
    return info.value


def test_bad_token_names_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("1 qid:1 1:0.5 2:1\n0 qid:1 1:0.25\n2 qid:1 1:0.5 garbage 3:1\n")
    error = _error(path)
    assert "train.txt, line 3" in str(error) and "garbage" in str(error)
    assert error.line == 3


def test_bad_value_names_file_and_line(tmp_path):
    path = tmp_path / "vali.txt"
    path.write_text("1 qid:1 1:0.5\n0 qid:1 1:abc\n")
    assert "vali.txt, line 2" in str(_error(path))


def test_non_numeric_label_names_file_and_line(tmp_path):
    path = tmp_path / "test.txt"
    path.write_text("1 qid:1 1:0.5\nrelevant qid:1 1:0.5\n")
    error = _error(path)
    assert "test.txt, line 2" in str(error) and "label" in str(error)


def test_group_sizes_exceeding_rows_name_query_file_and_line(tmp_path):
    (tmp_path / "train.txt").write_text("1 1:1\n0 1:2\n1 1:3\n")
    (tmp_path / "train.txt.query").write_text("2\n2\n")
    error = _error(tmp_path / "train.txt")
    assert "train.txt.query, line 2" in str(error) and "3 rows" in str(error)


def test_group_sizes_short_of_rows_name_query_file(tmp_path):
    (tmp_path / "train.txt").write_text("1 1:1\n0 1:2\n1 1:3\n")
    (tmp_path / "train.txt.query").write_text("1\n1\n")
    error = _error(tmp_path / "train.txt")
    assert "train.txt.query, line 2" in str(error) and "add up to 2" in str(error)


def test_non_integer_group_size_names_line(tmp_path):
    (tmp_path / "train.txt").write_text("1 1:1\n0 1:2\n")
    (tmp_path / "train.txt.query").write_text("1\none\n")
    assert "train.txt.query, line 2" in str(_error(tmp_path / "train.txt"))


def test_file_without_qid_or_query_file_is_rejected(tmp_path):
    (tmp_path / "train.txt").write_text("1 1:1\n0 1:2\n")
    assert "qid" in str(_error(tmp_path / "train.txt"))


def test_missing_folder_files_are_reported(tmp_path):
    (tmp_path / "train.txt").write_text("1 qid:1 1:1\n")
    with pytest.raises(FileNotFoundError, match="test.txt"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------- synthetic data and splits


def test_synthetic_is_deterministic_for_a_seed(small_synthetic):
    again = make_synthetic(60, seed=3)
    other = make_synthetic(60, seed=4)
    for name in ("train", "vali", "test"):
        a, b = small_synthetic.splits()[name], again.splits()[name]
        np.testing.assert_array_equal(a.X, b.X)
        np.testing.assert_array_equal(a.y, b.y)
        np.testing.assert_array_equal(a.qid, b.qid)
    assert not np.array_equal(small_synthetic.train.X[:50], other.train.X[:50])


def test_synthetic_is_mslr_shaped():
    dataset = make_synthetic(200, seed=0)
    assert dataset.n_features == 136 and dataset.train.X.dtype == np.float32
    y = np.concatenate([s.y for s in dataset.splits().values()])
    shares = np.bincount(y.astype(int), minlength=5) / y.size
    assert set(np.unique(y)) <= {0, 1, 2, 3, 4}
    assert shares[0] > 0.4 and shares[0] > shares[1] > shares[2] > shares[3] > shares[4] > 0
    lengths = np.concatenate([s.lengths for s in dataset.splits().values()])
    assert lengths.min() >= 10 and lengths.max() <= 400 and 60 < lengths.mean() < 140
    spans = dataset.train.X.max(axis=0) - dataset.train.X.min(axis=0)
    assert spans.max() / max(spans.min(), 1e-9) > 1e3  # scales differ: normalization matters
    oracle = dataset.describe()["oracle_ndcg@10"]
    assert 0.5 < oracle["test"] < 1.0


def test_splits_share_no_query(small_synthetic):
    qids = {name: set(split.qid.tolist()) for name, split in small_synthetic.splits().items()}
    assert not qids["train"] & qids["vali"] and not qids["train"] & qids["test"] and not qids["vali"] & qids["test"]
    folder = load_dataset(FIXTURES / "lightgbm", seed=1)
    rows = {name: {tuple(r) for r in s.X.tolist()} for name, s in folder.splits().items() if name != "test"}
    assert not rows["train"] & rows["vali"]


def test_subset_keeps_queries_whole(small_synthetic):
    train = small_synthetic.train
    part = train.subset([2, 0])
    assert part.n_queries == 2 and part.n_docs == train.lengths[2] + train.lengths[0]
    np.testing.assert_array_equal(part.query(0)[0], train.query(2)[0])


def test_split_rejects_non_contiguous_queries():
    with pytest.raises(ValueError, match="contiguous"):
        LTRSplit("x", np.zeros((3, 2)), np.zeros(3), np.array([1, 2, 1]))


# ---------------------------------------------------------------- padding


def test_pad_queries_pads_with_zeros_and_mask(small_synthetic):
    split = small_synthetic.test
    indices = np.argsort(split.lengths)[:3]
    batch = pad_queries(split, indices)
    width = int(split.lengths[indices].max())
    assert batch.features.shape == (3, width, 136) and batch.labels.shape == batch.mask.shape == (3, width)
    assert batch.features.dtype == np.float32 and batch.mask.dtype == bool
    for b, q in enumerate(indices):
        n = split.lengths[q]
        X, y = split.query(q)
        np.testing.assert_array_equal(batch.features[b, :n], X)
        np.testing.assert_array_equal(batch.labels[b, :n], y)
        assert batch.mask[b, :n].all() and not batch.mask[b, n:].any()
        assert not batch.features[b, n:].any() and not batch.labels[b, n:].any()
    features, labels, mask = batch.to_torch()
    assert tuple(features.shape) == batch.features.shape and str(mask.dtype) == "torch.bool"


def test_pad_queries_truncates_to_max_len(small_synthetic):
    batch = pad_queries(small_synthetic.train, [0, 1], max_len=5)
    assert batch.features.shape[1] == 5 and batch.mask.all()


@pytest.mark.parametrize("shuffle", [False, True])
def test_iterate_batches_covers_every_query_once(small_synthetic, shuffle):
    split = small_synthetic.train
    seen = 0
    docs = 0
    for batch in iterate_batches(split, 7, shuffle=shuffle, seed=1):
        assert batch.features.shape[0] <= 7
        seen += batch.features.shape[0]
        docs += int(batch.mask.sum())
    assert seen == split.n_queries and docs == split.n_docs
