"""Request body parsing: every encoding means the same request, and every bad body names its field."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import orjson
import pytest

from serve.encoding import encode_msgpack, parse_body
from serve.ranking import fallback_results, ranked_results, validate_request
from serve.schemas import RequestError

F = 5
RNG = np.random.default_rng(0)
X = RNG.normal(size=(4, F)).astype(np.float32)
IDS: list[str | int] = ["a", "b", 7, "d"]


def standard_body(ids=IDS, features=X) -> bytes:
    rows = features.tolist() if isinstance(features, np.ndarray) else features
    return orjson.dumps({"query_id": "q1", "documents": [{"id": i, "features": r} for i, r in zip(ids, rows, strict=True)]})


def compact_body(ids=IDS, features=X) -> bytes:
    rows = features.tolist() if isinstance(features, np.ndarray) else features
    return orjson.dumps({"query_id": "q1", "doc_ids": ids, "features": rows})


@pytest.mark.parametrize("mode", ["fast", "naive"])
def test_all_encodings_mean_the_same_request(mode: str) -> None:
    for body, ctype, encoding in [
        (standard_body(), "application/json", "json"),
        (compact_body(), "application/json; charset=utf-8", "compact"),
        (encode_msgpack("q1", IDS, X), "application/msgpack", "msgpack"),
    ]:
        req = parse_body(body, ctype, mode=mode)
        assert req.encoding == encoding
        assert req.query_id == "q1" and req.doc_ids == IDS
        assert req.features.dtype == np.float32
        np.testing.assert_array_equal(req.features, X)
        validate_request(req, F, max_docs=10)


def test_feature_store_body_has_no_features() -> None:
    req = parse_body(orjson.dumps({"query_id": 3, "doc_ids": ["test-0", "test-1"]}), "application/json")
    assert req.encoding == "feature-store" and req.features is None and req.query_id == 3
    req = parse_body(msgpack.packb({"query_id": "q", "doc_ids": ["test-0"]}), "application/msgpack")
    assert req.encoding == "feature-store"


def errors_of(body: bytes, ctype: str = "application/json", n_features: int = F, max_docs: int = 10) -> list[RequestError]:
    """The error in both parse modes (fast and naive must agree on status and field)."""
    out = []
    for mode in ("fast", "naive"):
        with pytest.raises(RequestError) as info:
            validate_request(parse_body(body, ctype, mode=mode, n_features=n_features), n_features, max_docs)
        out.append(info.value)
    assert out[0].status == out[1].status and out[0].field == out[1].field, (out[0], out[1])
    return out


@pytest.mark.parametrize(
    ("body", "status", "field", "rule_part"),
    [
        (standard_body(features=X[:, :4]), 422, "documents[0].features", "expected 5 features"),
        (compact_body(features=[r[:4] if i == 2 else r for i, r in enumerate(X.tolist())]), 422, "features[2]", "expected 5"),
        (json.dumps({"query_id": "q", "documents": [{"id": "a", "features": [1, 2, float("nan"), 4, 5]}]}).encode(),
         422, "documents[0].features[2]", "finite"),
        (json.dumps({"query_id": "q", "doc_ids": ["a"], "features": [[1, 2, 3, 4, float("inf")]]}).encode(),
         422, "features[0][4]", "finite"),
        (b'{"query_id": "q", "doc_ids": ["a"], "features": [[1, 2, 3, 4, 1e39]]}', 422, "features[0][4]", "finite"),
        (orjson.dumps({"query_id": "q", "documents": []}), 422, "documents", "at least one"),
        (standard_body(ids=["a", "b", "a", "d"]), 422, "documents[2].id", "duplicate"),
        (compact_body(ids=["a", "b", "c", "b"]), 422, "doc_ids[3]", "duplicate"),
        (standard_body(features=[["x"] * F] + X[1:].tolist()), 422, "documents[0].features[0]", "valid number"),
        (standard_body(ids=["a", None, "c", "d"]), 422, "documents[1].id", ""),
        (orjson.dumps({"query_id": "q", "documents": [{"id": "a", "features": "12345"}]}), 422, "documents[0].features", "list"),
        (orjson.dumps({"query_id": ["q"], "doc_ids": ["a"], "features": [[1] * F]}), 422, "query_id", ""),
        (orjson.dumps({"documents": [{"id": "a", "features": [1] * F}]}), 422, "query_id", "required"),
        (orjson.dumps({"query_id": "q"}), 422, "documents", "required"),
        (orjson.dumps({"query_id": "q", "doc_ids": ["a"], "features": [[1] * F], "extra": 1}), 422, "extra", "not permitted"),
        (orjson.dumps([1, 2]), 422, "body", "object"),
        (b'{"query_id": "q", "documents": [', 400, "body", "malformed"),
        # Hostile input: nesting past the parser's depth is a 400, not a 500; booleans are not numbers.
        (b'{"query_id": "q", "doc_ids": ["a"], "features": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
         400, "body", "nested deeper than 1024 levels"),
        (b'{"query_id": "q", "doc_ids": ["a"], "features": [[1, 2, true, 4, 5]]}', 422, "features[0][2]", "number"),
        (b'{"query_id": "q", "documents": [{"id": "a", "features": [1, 2, 3, false, 5]}]}', 422,
         "documents[0].features[3]", "number"),
        # What orjson refuses and the json module (its fallback) reads: an id the answer could not be
        # written with (a lone surrogate; an integer over 64 bits in a UTF-16 or BOM body) is a 422, not a 500.
        (b'{"query_id": "\\ud800", "doc_ids": ["a"], "features": [[1, 2, 3, 4, 5]]}', 422, "query_id", "lone surrogate"),
        (b'{"query_id": "q", "documents": [{"id": "a\xed\xa0\x80", "features": [1, 2, 3, 4, 5]}]}', 422,
         "documents[0].id", "lone surrogate"),
        ('{"query_id": "q", "doc_ids": ["a", 18446744073709551616], "features": [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]}'
         .encode("utf-16"), 422, "doc_ids[1]", "64 bits"),
        (b'\xef\xbb\xbf{"query_id": -9223372036854775809, "doc_ids": ["a"], "features": [[1, 2, 3, 4, 5]]}', 422,
         "query_id", "64 bits"),
        (orjson.dumps({"query_id": "q", "doc_ids": [f"d{i}" for i in range(11)], "features": [[1] * F] * 11}),
         422, "doc_ids", "at most 10"),
        (orjson.dumps({"query_id": "q", "doc_ids": ["a", "b"], "features": [[1] * F]}), 422, "features", "one row per"),
    ],
)
def test_bad_json_names_field_and_rule(body: bytes, status: int, field: str, rule_part: str) -> None:
    for err in errors_of(body):
        assert err.status == status
        assert err.field == field, err
        assert rule_part in err.rule, err
        assert err.to_dict()["detail"].startswith(field)


def test_bad_msgpack_bodies() -> None:
    def err(body: bytes) -> RequestError:
        with pytest.raises(RequestError) as info:
            validate_request(parse_body(body, "application/msgpack"), F, 10)
        return info.value

    short = msgpack.packb({"query_id": "q", "doc_ids": ["a", "b"], "n_features": F, "features": X[:1].tobytes()})
    assert (err(short).status, err(short).field) == (422, "features")
    wrong_f = encode_msgpack("q", ["a"], X[:1, :4])
    assert (err(wrong_f).status, err(wrong_f).field) == (422, "n_features")
    nan = X[:2].copy()
    nan[1, 3] = np.nan
    assert err(encode_msgpack("q", ["a", "b"], nan)).field == "features[row 1][3]"
    assert err(b"\xc1\xc1garbage").status == 400
    assert err(msgpack.packb([1, 2])).status == 422
    no_docs = msgpack.packb({"query_id": "q", "doc_ids": [], "n_features": 2**64 - 1, "features": b""})
    assert (err(no_docs).status, err(no_docs).field) == (422, "doc_ids")  # a 500 once (numpy's reshape)
    too_deep = err(b"\x91" * 100_000 + b"\xc0")  # arrays nested 100,000 levels deep
    assert (too_deep.status, too_deep.field) == (400, "body") and "nested too deep" in too_deep.rule


def test_unknown_content_type_is_415() -> None:
    with pytest.raises(RequestError) as info:
        parse_body(standard_body(), "text/plain")
    assert info.value.status == 415 and info.value.field == "Content-Type"


def test_ranked_results_best_first_stable_and_fallback_keeps_order() -> None:
    scores = np.array([0.5, 2.0, 0.5, -1.0], dtype=np.float32)
    ranked = ranked_results(IDS, scores)
    assert [r["id"] for r in ranked] == ["b", "a", 7, "d"]  # tie a/7 keeps request order
    assert ranked[0]["score"] == 2.0
    assert fallback_results(IDS) == [{"id": i, "score": None} for i in IDS]
