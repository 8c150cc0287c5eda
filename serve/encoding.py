"""Request body parsing: JSON (standard and compact), msgpack with float32 bytes, feature-store ids.

Parsing is itself an optimization: a 1000-document JSON body with 136 features is about 2.7 MB,
and the `json` module plus pydantic spend far longer on it than int8 inference does. The fast path
reads the raw bytes with orjson and builds the numpy matrix directly; msgpack skips float parsing
altogether (`np.frombuffer`). Only when the fast path fails do the pydantic models in
serve/schemas.py run, to name the field and the rule in the 4xx. `mode="naive"` is what a team
writes first (the `json` module, then pydantic over the Python objects: exactly FastAPI's default
body parsing) and is what the baseline server uses for JSON.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
import numpy as np
import orjson
from pydantic import ValidationError

from serve.schemas import (
    MODELS_BY_KIND,
    MsgpackRankRequest,
    RequestError,
    body_kind,
    validation_to_request_error,
)

JSON_TYPES = frozenset({"application/json", ""})  # no Content-Type at all: read as JSON
MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack", "application/vnd.msgpack"})
ParseMode = Literal["fast", "naive"]


@dataclass
class ParsedRequest:
    """One /rank request after parsing: ids plus a float32 matrix (None in feature-store mode)."""

    query_id: str | int
    doc_ids: list[str | int]
    features: np.ndarray | None
    encoding: str  # json | compact | msgpack | feature-store

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def docs_field(self) -> str:
        return "documents" if self.encoding == "json" else "doc_ids"

    def id_field(self, row: int) -> str:
        return f"documents[{row}].id" if self.encoding == "json" else f"doc_ids[{row}]"

    def features_field(self, row: int) -> str:
        if self.encoding == "json":
            return f"documents[{row}].features"
        if self.encoding == "msgpack":
            return f"features[row {row}]"
        return f"features[{row}]"


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def parse_body(
    body: bytes, content_type: str | None, *, mode: ParseMode = "fast", n_features: int | None = None
) -> ParsedRequest:
    """Parse a /rank body. Raises RequestError: 400 malformed, 415 unknown type, 422 invalid field.

    n_features (the model's) only sharpens the message for rows of unequal length.
    """
    media = media_type(content_type)
    if media in MSGPACK_TYPES:
        return _parse_msgpack(body)
    if media not in JSON_TYPES and not media.endswith("+json"):
        raise RequestError(
            415, "Content-Type", f"unsupported media type {media!r}; use application/json or application/msgpack"
        )
    if not body:
        raise RequestError(400, "body", "empty body; expected a JSON object")
    if mode == "naive":
        return _parse_json_naive(body, n_features)
    return _parse_json_fast(body, n_features)


ID_TYPES = frozenset({str, int})  # exact types: a bool is not an id
# orjson's own limit; a /rank body is 4 levels deep at most.
MAX_JSON_DEPTH = 1024
TOO_DEEP = f"nested deeper than {MAX_JSON_DEPTH} levels"


def _json_loads(body: bytes) -> Any:
    """The json module's reading, with deep nesting (its RecursionError) a 400 rather than a 500."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, "body", f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "body", f"malformed JSON: {TOO_DEEP}") from None


def _parse_json_naive(body: bytes, n_features: int | None) -> ParsedRequest:
    return _from_validated(_json_loads(body), n_features)


def _parse_json_fast(body: bytes, n_features: int | None) -> ParsedRequest:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if "depth limit" in str(exc):
            raise RequestError(400, "body", f"malformed JSON: {TOO_DEEP}") from None
        # NaN and Infinity are not JSON, but Python's json module writes them: read such a body
        # leniently so that the answer names the offending feature rather than "malformed".
        return _from_validated(_json_loads(body), n_features)
    if not isinstance(obj, dict):
        raise RequestError(422, "body", "must be a JSON object")
    kind = body_kind(obj)
    # Booleans are not numbers (strict, as the schema says): numpy would read a `true` among numbers
    # as 1.0, so a body with a JSON literal true/false anywhere gets pydantic's strict diagnosis.
    if b"true" in body or b"false" in body:
        return _from_validated(obj, n_features)
    try:
        parsed = _extract_fast(obj, kind)
    except (KeyError, TypeError, ValueError, AttributeError):
        parsed = None
    if parsed is None:  # something is off: let pydantic say exactly what
        return _from_validated(obj, n_features)
    return parsed


def _extract_fast(obj: dict[str, Any], kind: str) -> ParsedRequest | None:
    """The happy path without pydantic; None when the body needs a full diagnosis."""
    if set(obj) - {"query_id", "documents", "doc_ids", "features"}:
        return None
    qid = obj["query_id"]
    if type(qid) not in (str, int):
        return None
    if kind == "json":
        docs = obj["documents"]
        if not isinstance(docs, list) or any(type(d) is not dict or len(d) != 2 for d in docs):
            return None
        ids = [d["id"] for d in docs]
        rows = [d["features"] for d in docs]
    else:
        ids = obj["doc_ids"]
        rows = obj.get("features")
        if not isinstance(ids, list):
            return None
    if not set(map(type, ids)) <= ID_TYPES:  # map(type): C-speed over 1000 ids, where a genexpr took 0.15 ms
        return None
    if kind == "feature-store":
        return ParsedRequest(qid, ids, None, kind)
    if not isinstance(rows, list):
        return None
    if not rows:
        return ParsedRequest(qid, ids, np.empty((0, 0), np.float32), kind)
    matrix = np.array(rows)  # dtype inferred: anything but numbers (or ragged rows) is caught below
    if matrix.ndim != 2 or matrix.dtype.kind not in "fiu":
        return None
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf: caught just below
        features = matrix.astype(np.float32)
    if not np.isfinite(features).all():
        return None
    return ParsedRequest(qid, ids, features, kind)


def _from_validated(obj: Any, n_features: int | None) -> ParsedRequest:
    """pydantic over the Python objects: the naive parser, and the diagnosis of a bad body."""
    if not isinstance(obj, dict):
        raise RequestError(422, "body", "must be a JSON object")
    kind = body_kind(obj)
    try:
        model = MODELS_BY_KIND[kind].model_validate(obj)
    except ValidationError as exc:
        raise validation_to_request_error(exc) from None
    if kind == "json":
        ids = [d.id for d in model.documents]
        rows = [d.features for d in model.documents]
    else:
        ids = list(model.doc_ids)
        rows = getattr(model, "features", None)
    parsed = ParsedRequest(model.query_id, ids, None, kind)
    _check_echoed_ids(parsed)
    if rows is not None:
        parsed.features = _rows_to_matrix(rows, parsed.features_field, n_features)
    return parsed


def _check_echoed_ids(parsed: ParsedRequest) -> None:
    """The ids the answer repeats must be writable by orjson (the answer, the cache key): the json
    module reads what orjson does not (it is the fallback for a body orjson refused, e.g. one with
    NaN, a byte order mark or in UTF-16), such as a lone surrogate (`"\\ud800"`) or an integer
    beyond 64 bits. Either is a 422 naming the id, not a 500 when the answer is written."""
    named = [("query_id", parsed.query_id), *((parsed.id_field(i), v) for i, v in enumerate(parsed.doc_ids))]
    for field, value in named:
        if isinstance(value, int) and not -(2**63) <= value < 2**64:
            raise RequestError(422, field, "an integer id must fit in 64 bits (or send it as a string)")
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                raise RequestError(422, field, "must be valid Unicode (a lone surrogate is not)") from None


def _rows_to_matrix(rows: list[list[float]], field: Callable[[int], str], n_features: int | None) -> np.ndarray:
    if not rows:
        return np.empty((0, 0), np.float32)
    expected = n_features if n_features is not None else len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != expected:
            raise RequestError(422, field(i), f"expected {expected} features, got {len(row)}")
    with np.errstate(over="ignore"):
        features = np.asarray(rows, dtype=np.float32)
    check_finite(features, field)
    return features


def check_finite(features: np.ndarray, field: Callable[[int], str]) -> None:
    """NaN, infinity, or a value beyond float32's range: 422 naming the first such feature."""
    finite = np.isfinite(features)
    if not finite.all():
        row, col = (int(v) for v in np.argwhere(~finite)[0])
        raise RequestError(
            422, f"{field(row)}[{col}]", "must be a finite float32 number (NaN and infinity are not allowed)"
        )


def _parse_msgpack(body: bytes) -> ParsedRequest:
    if not body:
        raise RequestError(400, "body", "empty body; expected a msgpack map")
    try:
        obj = msgpack.unpackb(body, raw=False)
    except msgpack.StackError:
        raise RequestError(400, "body", "malformed msgpack: nested too deep") from None
    except Exception as exc:  # msgpack raises several unrelated types for broken input
        raise RequestError(400, "body", f"malformed msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestError(422, "body", "must be a msgpack map")
    if "features" not in obj and "n_features" not in obj:
        try:
            model = MODELS_BY_KIND["feature-store"].model_validate(obj)
        except ValidationError as exc:
            raise validation_to_request_error(exc) from None
        return ParsedRequest(model.query_id, list(model.doc_ids), None, "feature-store")
    if (type(obj.get("query_id")) in ID_TYPES and type(obj.get("doc_ids")) is list
            and set(map(type, obj["doc_ids"])) <= ID_TYPES and type(obj.get("n_features")) is int
            and type(obj.get("features")) is bytes):
        # The happy path without pydantic (about 50 us of a 1000-document body's parse): the same
        # fields and exact types that MsgpackRankRequest accepts; anything else gets its diagnosis.
        req = MsgpackRankRequest.model_construct(**{k: obj[k] for k in ("query_id", "doc_ids", "n_features",
                                                                          "features")})
    else:
        try:
            req = MsgpackRankRequest.model_validate(obj)
        except ValidationError as exc:
            raise validation_to_request_error(exc) from None
    parsed = ParsedRequest(req.query_id, list(req.doc_ids), None, "msgpack")
    data = req.features or b""
    if req.n_features < 1:
        raise RequestError(422, "n_features", "must be >= 1")
    expected = len(req.doc_ids) * req.n_features * 4
    if len(data) != expected:
        raise RequestError(
            422,
            "features",
            f"expected {len(req.doc_ids)} docs x {req.n_features} features x 4 bytes = {expected} bytes "
            f"of little-endian float32, got {len(data)}",
        )
    # No documents: no bytes, and n_features is bounded by nothing (numpy refuses a huge dimension);
    # validate_request answers the 422 (at least one document).
    features = np.frombuffer(data, dtype="<f4").reshape(len(req.doc_ids), req.n_features if req.doc_ids else 0)
    check_finite(features, parsed.features_field)
    parsed.features = features.astype(np.float32, copy=False)
    return parsed


def encode_msgpack(query_id: str | int, doc_ids: list[str | int], features: np.ndarray) -> bytes:
    """The binary body for a list: what clients (and loadtest/payloads.py) send."""
    features = np.ascontiguousarray(features, dtype="<f4")
    return msgpack.packb(
        {
            "query_id": query_id,
            "doc_ids": list(doc_ids),
            "n_features": int(features.shape[1]),
            "features": features.tobytes(),
        },
        use_bin_type=True,
    )
