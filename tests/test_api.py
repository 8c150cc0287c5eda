"""The /rank API on the FastAPI app without Ray: shapes, scores, every bad input, fallback, metrics.

Runs the baseline app (serve/baseline.py) in-process with a real ONNX Runtime scorer of the test
model; the ranking core it runs is the one the Ray ingress runs (serve/ranking.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import orjson
import pytest
import redis
from fastapi.testclient import TestClient
from serving_artifacts import build_test_artifacts

from export.runtime import load_scorer
from serve.baseline import create_app
from serve.config import ServiceConfig
from serve.encoding import encode_msgpack
from serve.feature_store import feature_key, meta_key
from serve.metrics import STAGES
from serve.redis_server import free_port


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


@pytest.fixture(scope="module")
def scorer(manifest: Path):
    return load_scorer("onnx-fp32", manifest_path=manifest)


@pytest.fixture(scope="module")
def client(scorer) -> Iterator[TestClient]:
    config = ServiceConfig(variant="onnx-fp32", max_docs=50, max_body_bytes=200_000, cache=False)
    with TestClient(create_app(config, scorer=scorer)) as c:
        yield c


def make_list(n_docs: int, n_features: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"doc-{i}" for i in range(n_docs)], rng.normal(size=(n_docs, n_features)).astype(np.float32)


def standard(ids, X, qid="q1") -> dict:
    return {"query_id": qid, "documents": [{"id": i, "features": r} for i, r in zip(ids, X.tolist(), strict=True)]}


def test_rank_returns_offline_scores_best_first(client: TestClient, scorer) -> None:
    ids, X = make_list(20, scorer.n_features)
    resp = client.post("/rank", json=standard(ids, X))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    offline = scorer.score_documents(X)
    served = {r["id"]: r["score"] for r in body["results"]}
    np.testing.assert_allclose([served[i] for i in ids], offline, atol=1e-5)
    assert [r["id"] for r in body["results"]] == [ids[i] for i in np.argsort(-offline, kind="stable")]
    assert body["model"] == {"name": scorer.model, "variant": "onnx-fp32", "version": scorer.version}
    assert body["query_id"] == "q1" and body["cached"] is False and body["degraded"] is False
    assert set(body["timings_ms"]) == set(STAGES)
    assert body["timings_ms"]["total"] >= body["timings_ms"]["inference"] > 0


def test_compact_and_msgpack_mean_the_same(client: TestClient, scorer) -> None:
    ids, X = make_list(30, scorer.n_features, seed=1)
    expected = client.post("/rank", json=standard(ids, X)).json()["results"]
    compact = client.post("/rank", json={"query_id": "q1", "doc_ids": ids, "features": X.tolist()})
    binary = client.post("/rank", content=encode_msgpack("q1", ids, X), headers={"content-type": "application/msgpack"})
    for resp in (compact, binary):
        assert resp.status_code == 200, resp.text
        assert resp.json()["results"] == expected


def post_raw(client: TestClient, body: bytes, ctype: str = "application/json"):
    return client.post("/rank", content=body, headers={"content-type": ctype})


BAD_CASES = {
    "wrong feature count": (lambda F: orjson.dumps(standard(["a"], np.ones((1, F - 1), np.float32))), 422, "documents[0].features"),
    "nan": (lambda F: json.dumps(standard(["a"], np.full((1, F), np.nan))).encode(), 422, "documents[0].features[0]"),
    "infinity": (lambda F: json.dumps({"query_id": "q", "doc_ids": ["a"], "features": [[float("inf")] * F]}).encode(),
                 422, "features[0][0]"),
    "empty list": (lambda F: orjson.dumps({"query_id": "q", "documents": []}), 422, "documents"),
    "duplicate ids": (lambda F: orjson.dumps(standard(["a", "a"], np.ones((2, F), np.float32))), 422, "documents[1].id"),
    "too many documents": (lambda F: orjson.dumps({"query_id": "q", "doc_ids": [str(i) for i in range(51)],
                                                   "features": [[0.0] * F] * 51}), 422, "doc_ids"),
    "wrong type": (lambda F: orjson.dumps({"query_id": "q", "documents": [{"id": "a", "features": ["x"] * F}]}),
                   422, "documents[0].features[0]"),
    "malformed body": (lambda F: b'{"query_id": "q", "documents": [{"id": "a"', 400, "body"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_gets_4xx_naming_field_and_rule(client: TestClient, scorer, case: str) -> None:
    make_body, status, field = BAD_CASES[case]
    resp = post_raw(client, make_body(scorer.n_features))
    assert resp.status_code == status, resp.text
    detail = resp.json()
    assert detail["field"] == field and detail["rule"] and detail["detail"].startswith(field)


def test_unknown_content_type_is_415(client: TestClient) -> None:
    resp = post_raw(client, b"query_id=q", "application/x-www-form-urlencoded")
    assert resp.status_code == 415 and resp.json()["field"] == "Content-Type"


def test_body_over_limit_is_413_by_header_and_by_bytes_read(client: TestClient, scorer) -> None:
    big = orjson.dumps({"query_id": "q", "doc_ids": ["a"], "features": [[0.0] * 60_000]})
    assert post_raw(client, big).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies to the bytes read
        for _ in range(30):
            yield b" " * 10_000

    resp = client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert resp.status_code == 413, resp.text


class Failing:
    """A scorer that raises (or stalls): the fallback must answer instead of a 500."""

    def __init__(self, inner, stall_s: float = 0.0) -> None:
        self.inner, self.stall_s = inner, stall_s
        self.model, self.variant, self.version = inner.model, inner.variant, inner.version
        self.n_features, self.pointwise = inner.n_features, True

    def score_documents(self, X: np.ndarray) -> np.ndarray:
        if self.stall_s:
            time.sleep(self.stall_s)
            return self.inner.score_documents(X)
        raise RuntimeError("injected inference failure")


@pytest.mark.parametrize(("stall_s", "reason"), [(0.0, "error"), (0.5, "deadline")])
def test_inference_failure_or_deadline_answers_degraded(scorer, stall_s: float, reason: str) -> None:
    config = ServiceConfig(variant="onnx-fp32", deadline_ms=100, cache=False)
    with TestClient(create_app(config, scorer=Failing(scorer, stall_s))) as c:
        ids, X = make_list(5, scorer.n_features)
        resp = c.post("/rank", json=standard(ids, X))
        assert resp.status_code == 200
        body = resp.json()
        assert body["degraded"] is True
        assert body["results"] == [{"id": i, "score": None} for i in ids]  # the request's own order
        metrics = c.get("/metrics").text
        assert f'rankserve_degraded_total{{reason="{reason}"}} 1.0' in metrics


def test_redis_down_answers_uncached_and_metrics_show_the_open_breaker(scorer) -> None:
    """A cache whose Redis is gone fails open; after 3 failed calls the breaker opens, and /metrics says so
    (a breaker that re-opened is why hits stay away after Redis is back)."""
    config = ServiceConfig(variant="onnx-fp32", cache=True, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with TestClient(create_app(config, scorer=scorer)) as c:
        metrics = c.get("/metrics").text
        assert "rankserve_cache_breaker_opens_total 0.0" in metrics and "rankserve_cache_breaker_open 0.0" in metrics
        ids, X = make_list(5, scorer.n_features)
        for i in range(3):
            resp = c.post("/rank", json=standard(ids, X, qid=f"down-{i}"))
            assert resp.status_code == 200 and resp.json()["cached"] is False and resp.json()["degraded"] is False
        metrics = c.get("/metrics").text
        assert "rankserve_cache_breaker_opens_total 1.0" in metrics and "rankserve_cache_breaker_open 1.0" in metrics
        assert "rankserve_cache_breaker_opens_total 1.0" in c.get("/metrics").text  # counted once, not per scrape


def test_health_readiness_metrics_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["model_loaded"] is True and ready.json()["redis"] == "disabled"
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and "rankserve_requests_total" in metrics.text
    assert "rankserve_request_latency_ms_bucket" in metrics.text
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/rank"]["post"]["requestBody"]["content"]
    refs = [s["$ref"].rsplit("/", 1)[1] for s in body["application/json"]["schema"]["oneOf"]]
    assert refs == ["RankRequest", "CompactRankRequest", "FeatureStoreRankRequest"]
    for name in [*refs, "MsgpackRankRequest", "Document", "RankResponse"]:
        assert name in schema["components"]["schemas"], name


def test_feature_store_mode_reads_redis(scorer, redis_url: str) -> None:
    ids, X = make_list(6, scorer.n_features, seed=3)
    dataset = f"apitest-{time.time_ns()}"
    client = redis.Redis.from_url(redis_url)
    client.mset({feature_key(dataset, i): row.astype("<f4").tobytes() for i, row in zip(ids, X, strict=True)})
    config = ServiceConfig(variant="onnx-fp32", redis_url=redis_url, feature_dataset=dataset, cache=False)
    with TestClient(create_app(config, scorer=scorer)) as c:
        # No record of the dataset (what `load` writes last): the store is empty or loading, the
        # server's state, so the answer is degraded, not a 422 blaming the client's ids.
        loading = c.post("/rank", json={"query_id": "fs", "doc_ids": [*ids, "nope"]})
        assert loading.status_code == 200 and loading.json()["degraded"] is True
        client.hset(meta_key(dataset), mapping={"n_features": scorer.n_features})
        resp = c.post("/rank", json={"query_id": "fs", "doc_ids": ids})
        assert resp.status_code == 200, resp.text
        served = {r["id"]: r["score"] for r in resp.json()["results"]}
        np.testing.assert_allclose([served[i] for i in ids], scorer.score_documents(X), atol=1e-5)
        msg = c.post("/rank", content=msgpack.packb({"query_id": "fs", "doc_ids": ids}),
                     headers={"content-type": "application/msgpack"})
        assert msg.json()["results"] == resp.json()["results"]
        unknown = c.post("/rank", json={"query_id": "fs", "doc_ids": [*ids, "nope"]})
        assert unknown.status_code == 422 and unknown.json()["field"] == "doc_ids"
        assert "nope" in unknown.json()["rule"]
    client.close()


def test_config_yaml_builds_the_app() -> None:
    """serve/config.yaml's args are ServiceConfig fields and app_builder turns them into an app."""
    import yaml

    from serve.app import app_builder

    spec = yaml.safe_load((Path(__file__).parent.parent / "serve" / "config.yaml").read_text())
    (app,) = spec["applications"]
    assert app["import_path"] == "serve.app:app_builder"
    ServiceConfig(**app["args"])  # extra="forbid": a typo in the yaml fails here
    assert app_builder(app["args"]) is not None


def test_hostile_json_gets_a_4xx_naming_the_field(client: TestClient) -> None:
    """Nesting past the parser's depth (once a 500) and booleans among the features (once read as 1.0)."""
    deep = b'{"query_id": "q", "doc_ids": ["a"], "features": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"
    resp = client.post("/rank", content=deep, headers={"content-type": "application/json"})
    assert resp.status_code == 400 and resp.json()["field"] == "body" and "nested" in resp.json()["rule"]
    n = client.get("/readyz").json()["model"]["n_features"]
    features = ", ".join(["0.5"] * (n - 1) + ["true"])
    resp = client.post("/rank", content=f'{{"query_id": "q", "doc_ids": ["a"], "features": [[{features}]]}}',
                       headers={"content-type": "application/json"})
    assert resp.status_code == 422 and resp.json()["field"] == f"features[0][{n - 1}]", resp.text
