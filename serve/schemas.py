"""Request and response models of `POST /rank`, and the error every bad request turns into.

The models serve three purposes: they document the API in OpenAPI, they are the baseline's naive
parser (pydantic over the `json` module's output, what a team writes first), and they diagnose a
body that the fast path (orjson straight into numpy, serve/encoding.py) could not read, so that
every 4xx names the field and the rule.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

DocId = StrictStr | StrictInt
QueryId = StrictStr | StrictInt
# Strict: ints are fine, bools and numeric strings are not; NaN and infinity are rejected.
Feature = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # a model or variant name


class RequestError(Exception):
    """A client mistake: answered with `status` and a message naming the field and the rule."""

    def __init__(self, status: int, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.status = status
        self.field = field
        self.rule = rule

    def to_dict(self) -> dict[str, Any]:
        return {"detail": f"{self.field}: {self.rule}", "field": self.field, "rule": self.rule}


class Document(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: DocId
    features: list[Feature]


class RankRequest(BaseModel):
    """The standard JSON body: one object per document."""

    model_config = ConfigDict(extra="forbid")
    query_id: QueryId
    documents: list[Document]


class CompactRankRequest(BaseModel):
    """The compact JSON body: ids plus a row-major features matrix (no per-document objects)."""

    model_config = ConfigDict(extra="forbid")
    query_id: QueryId
    doc_ids: list[DocId]
    features: list[list[Feature]]


class FeatureStoreRankRequest(BaseModel):
    """Ids only: the features are read from the Redis feature store with one MGET."""

    model_config = ConfigDict(extra="forbid")
    query_id: QueryId
    doc_ids: list[DocId]


class MsgpackRankRequest(BaseModel):
    """`application/msgpack`: features are little-endian float32 bytes, row-major n_docs x n_features."""

    query_id: QueryId
    doc_ids: list[DocId]
    n_features: int
    features: bytes | None = None


class ModelInfo(BaseModel):
    name: str
    variant: str
    version: str


class ScoredDocument(BaseModel):
    id: DocId
    score: float | None = Field(description="null in a degraded (fallback) answer")
    team: Literal["a", "b"] | None = Field(None, description="interleaving: the arm's team that placed it")


class Timings(BaseModel):
    read: float = Field(0.0, description="receiving the request body")
    parse: float
    key: float = Field(0.0, description="building the result-cache key (the digest)")
    cache: float = Field(description="the result cache's Redis round trip")
    features: float = Field(0.0, description="feature-store mode: the MGET of the documents' features")
    queue: float
    inference: float
    total: float


class RankResponse(BaseModel):
    query_id: QueryId
    model: ModelInfo
    results: list[ScoredDocument] = Field(description="best first")
    cached: bool
    degraded: bool = Field(description="true: the fallback ordering (the request's own order), scores null")
    timings_ms: Timings
    arm: str | None = Field(None, description="an experiment's arm that answered ('interleaved': both); "
                                              "absent without an experiment")
    interleaving: dict[str, str] | None = Field(None, description="interleaving: the arm of team a and of team b")


class Readiness(BaseModel):
    model_loaded: bool
    redis: str = Field(description="up | down | disabled")
    model: ModelInfo | None = Field(None, description="the model that scores now (null until one is loaded)")
    replica: str | None = Field(None, description="the Ray Serve replica that answered (null outside Ray)")


class ModelSwap(BaseModel):
    """`POST /admin/model`: serve another variant (or model) without stopping traffic."""

    model_config = ConfigDict(extra="forbid")
    # Names, not paths: a model name becomes a folder under artifacts/variants, so no separators, no
    # leading dot (no "../.."), and a length a file system takes.
    variant: str = Field(pattern=NAME_PATTERN, max_length=128)
    model: str | None = Field(None, pattern=NAME_PATTERN, max_length=128)


def body_kind(obj: dict[str, Any]) -> str:
    """Which JSON body this is: 'json' (documents), 'compact' (doc_ids + features) or 'feature-store'."""
    if "documents" in obj:
        if "doc_ids" in obj or "features" in obj:
            raise RequestError(422, "body", "use either 'documents' or 'doc_ids' (+ 'features'), not both")
        return "json"
    if "doc_ids" in obj:
        return "compact" if "features" in obj else "feature-store"
    raise RequestError(422, "documents", "field required (or 'doc_ids' for the compact and feature-store forms)")


MODELS_BY_KIND: dict[str, type[BaseModel]] = {
    "json": RankRequest,
    "compact": CompactRankRequest,
    "feature-store": FeatureStoreRankRequest,
}


def format_loc(loc: tuple[Any, ...]) -> str:
    """pydantic's loc ('documents', 3, 'features', 7) as 'documents[3].features[7]'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool"):  # union member tags add nothing for a reader
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_to_request_error(exc: ValidationError) -> RequestError:
    """The first pydantic error as a 422 that names the field and the rule."""
    err = exc.errors(include_url=False)[0]
    rule = err["msg"]
    if err["type"] == "finite_number":
        rule = "must be a finite number (NaN and infinity are not allowed)"
    return RequestError(422, format_loc(tuple(err["loc"])), rule)


def search_openapi_extra() -> dict[str, Any]:
    """OpenAPI request body of /search (read as raw bytes too: JSON or msgpack)."""
    from serve.search import SearchRequest

    schema = {"$ref": f"#/components/schemas/{SearchRequest.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema},
                                                          "application/msgpack": {"schema": schema}}}}


def rank_openapi_extra() -> dict[str, Any]:
    """OpenAPI request body of /rank: the handler reads raw bytes, so FastAPI cannot infer it."""
    ref = "#/components/schemas/{}"
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {
                        "oneOf": [
                            {"$ref": ref.format(m.__name__)}
                            for m in (RankRequest, CompactRankRequest, FeatureStoreRankRequest)
                        ]
                    }
                },
                "application/msgpack": {"schema": {"$ref": ref.format("MsgpackRankRequest")}},
            },
        }
    }


def install_openapi(app: FastAPI) -> None:
    """Add the request models to the app's OpenAPI components (referenced by rank_openapi_extra)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes, description=app.description)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        from serve.search import SearchRequest  # serve.search imports this module

        for model in (RankRequest, CompactRankRequest, FeatureStoreRankRequest, MsgpackRankRequest, SearchRequest):
            js = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(js.pop("$defs", {}))
            components[model.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
