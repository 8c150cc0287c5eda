"""Payload files: real feature vectors in every request format, a file round trip, Zipf popularity."""

from __future__ import annotations

from pathlib import Path

import msgpack
import numpy as np
import orjson
import pytest

from loadtest.payloads import (
    ENCODINGS,
    PayloadSet,
    ZipfSampler,
    build_payloads,
    zipf_head_share,
    zipf_probabilities,
)
from models.data import load_dataset

DATASET_QUERIES = 60  # a small synthetic dataset keeps the test fast; features are the same kind


@pytest.fixture(scope="module")
def test_split():
    return load_dataset("synthetic", n_queries=DATASET_QUERIES).test


def _decode(body: bytes, encoding: str) -> dict:
    return msgpack.unpackb(body, raw=False) if encoding == "msgpack" else orjson.loads(body)


def _rows_and_features(doc: dict, encoding: str) -> tuple[list[int], np.ndarray | None]:
    if encoding == "json":
        ids = [d["id"] for d in doc["documents"]]
        X = np.asarray([d["features"] for d in doc["documents"]], dtype=np.float32)
    elif encoding == "compact":
        ids, X = doc["doc_ids"], np.asarray(doc["features"], dtype=np.float32)
    elif encoding == "msgpack":
        ids = doc["doc_ids"]
        X = np.frombuffer(doc["features"], dtype="<f4").reshape(len(ids), doc["n_features"])
    else:
        ids, X = doc["doc_ids"], None
    return [int(i.split("-")[1]) for i in ids], X


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_bodies_carry_real_feature_vectors(encoding: str, test_split) -> None:
    ps = build_payloads([10, 250], encoding, n_queries=3, seed=0, dataset_n_queries=DATASET_QUERIES)
    assert len(ps) == 6 and ps.sizes == [10, 250] and ps.encoding == encoding
    for p in ps.payloads:
        doc = _decode(p.body, encoding)
        assert doc["query_id"] == p.query_id
        rows, X = _rows_and_features(doc, encoding)
        assert len(rows) == p.n_docs == len(set(rows))  # distinct documents
        if X is not None:
            np.testing.assert_array_equal(X, test_split.X[rows])  # exactly the dataset's rows


def test_payload_file_round_trip(tmp_path: Path) -> None:
    ps = build_payloads([10, 100], "msgpack", n_queries=4, seed=3, dataset_n_queries=DATASET_QUERIES)
    path = ps.save(tmp_path / "sub" / "p.msgpack")
    back = PayloadSet.load(path)
    assert back.payloads == ps.payloads
    assert back.encoding == "msgpack" and back.meta == ps.meta
    assert back.by_size()[100][0].n_docs == 100


def test_same_seed_same_payloads() -> None:
    a = build_payloads(20, "compact", n_queries=5, seed=7, dataset_n_queries=DATASET_QUERIES)
    b = build_payloads(20, "compact", n_queries=5, seed=7, dataset_n_queries=DATASET_QUERIES)
    c = build_payloads(20, "compact", n_queries=5, seed=8, dataset_n_queries=DATASET_QUERIES)
    assert a.payloads == b.payloads and a.payloads != c.payloads


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_nonce_makes_a_distinct_valid_request(encoding: str) -> None:
    p = build_payloads(10, encoding, n_queries=1, seed=0, dataset_n_queries=DATASET_QUERIES).payloads[0]
    original, changed = _decode(p.body, encoding), _decode(p.with_nonce(123456), encoding)
    assert changed["query_id"] != original["query_id"] and changed["query_id"].endswith("000000123456")
    changed["query_id"] = original["query_id"]
    assert changed == original  # only the query id differs


def test_bad_arguments_and_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="encoding"):
        build_payloads(10, "xml", n_queries=1)
    with pytest.raises(ValueError, match="n_docs"):
        build_payloads([0], "json", n_queries=1)
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(msgpack.packb({"hello": 1}))
    with pytest.raises(ValueError, match="not a rankserve payload file"):
        PayloadSet.load(bad)


def test_zipf_head_share_matches_sampling() -> None:
    n, s, k = 1000, 1.1, 10
    expected = zipf_head_share(n, s, k)
    assert expected == pytest.approx(sum(1 / i**s for i in range(1, k + 1)) / sum(1 / i**s for i in range(1, n + 1)))
    draws = ZipfSampler(n, s, seed=0).sample_many(200_000)
    assert draws.min() >= 0 and draws.max() < n
    share = float(np.mean(draws < k))
    assert share == pytest.approx(expected, abs=0.005)  # binomial sd ~0.001
    single = [ZipfSampler(n, s, seed=1).sample() for _ in range(3)]
    assert all(0 <= d < n for d in single)


def test_zipf_skew_sets_popularity() -> None:
    assert np.allclose(zipf_probabilities(50, 0.0), 1 / 50)  # s = 0: uniform, few repeats
    assert zipf_head_share(10_000, 2.0, 1) > 0.6 > zipf_head_share(10_000, 1.0, 1)
    with pytest.raises(ValueError, match="exponent"):
        zipf_probabilities(10, -1.0)
