"""The plain-uvicorn server (serve/uvicorn_server.py): the Ray app's FastAPI app, fast parser, optional
cache, a model swap in-process; and its CLI on a real port, as the sweep starts it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from loadtest_rank_app import wait_for_line
from serving_artifacts import build_test_artifacts

from export.runtime import load_scorer
from models.paths import REPO_ROOT
from serve.config import ServiceConfig
from serve.encoding import encode_msgpack
from serve.feature_store import meta_key, write_rows
from serve.http_protocol import BODY_HIGH_WATER
from serve.redis_server import free_port
from serve.security import ADMIN_TOKEN_ENV
from serve.uvicorn_server import create_app, parse_args


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


def make_list(n_docs: int, n_features: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(range(100, 100 + n_docs)), rng.normal(size=(n_docs, n_features)).astype(np.float32)


def test_defaults_are_the_ray_apps_parser_without_cache() -> None:
    config, parse_mode = parse_args([])
    assert (config.variant, config.port, config.batching, config.cache) == ("onnx-int8-dynamic", 8002, False, False)
    assert parse_mode == "fast"
    config, parse_mode = parse_args(["--cache", "--parse", "naive", "--redis-url", "redis://127.0.0.1:1/0"])
    assert config.cache is True and parse_mode == "naive"


def test_parses_fast_and_caches_in_redis(manifest: Path, redis_url: str) -> None:
    """`--cache`: the Ray app's parser and result cache on plain uvicorn, to isolate Ray's cost."""
    scorer = load_scorer("onnx-fp32", manifest_path=manifest)
    ids, X = make_list(30, scorer.n_features, seed=11)
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=True, redis_url=redis_url,
                           batching=False)
    app = create_app(config)
    assert app.state.core.parse_mode == "fast"
    body = {"query_id": f"uvicorn-cache-{time.time_ns()}", "doc_ids": ids, "features": X.tolist()}
    with TestClient(app) as client:
        first, second = (client.post("/rank", json=body).json() for _ in range(2))
    assert (first["cached"], second["cached"]) == (False, True)
    assert [r["id"] for r in first["results"]] == [r["id"] for r in second["results"]]
    served = {r["id"]: r["score"] for r in first["results"]}
    np.testing.assert_allclose([served[i] for i in ids], scorer.score_documents(X), atol=1e-5)


def results_bytes(content: bytes) -> bytes:
    """The `results` member of an answer, as the bytes the server sent."""
    start = content.index(b'"results":')
    return content[start: content.index(b',"cached":', start)]


def test_a_hit_returns_the_bytes_scores_and_order_of_the_miss_that_stored_it(manifest: Path, redis_url: str) -> None:
    """The hit path splices the stored results into the answer: the same bytes, hence the same order
    and scores, with a key digest and one GET in `timings_ms`, no inference."""
    scorer = load_scorer("onnx-fp32", manifest_path=manifest)
    ids, X = make_list(200, scorer.n_features, seed=13)
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=True, redis_url=redis_url)
    body = encode_msgpack(f"hit-bytes-{time.time_ns()}", ids, X)
    with TestClient(create_app(config)) as client:
        miss, hit = (client.post("/rank", content=body, headers={"content-type": "application/msgpack"})
                     for _ in range(2))
    assert (miss.json()["cached"], hit.json()["cached"]) == (False, True)
    assert results_bytes(hit.content) == results_bytes(miss.content)
    assert hit.json()["results"] == miss.json()["results"]
    scores = [r["score"] for r in hit.json()["results"]]
    assert scores == sorted(scores, reverse=True)
    assert hit.json()["query_id"] == miss.json()["query_id"]
    timings = hit.json()["timings_ms"]
    # answered from the body's bytes: no parsing, no inference
    assert timings["parse"] == timings["inference"] == 0.0 and timings["key"] > 0 and timings["cache"] > 0


def test_only_valid_answered_requests_are_stored_and_a_hit_echoes_the_query_id(manifest: Path,
                                                                                redis_url: str) -> None:
    """A hit is answered before parsing, so the cache must hold nothing but answers to valid requests:
    an invalid body is refused every time (never stored), and a hit gives back the request's own
    query id, an integer as an integer."""
    scorer = load_scorer("onnx-fp32", manifest_path=manifest)
    ids, X = make_list(5, scorer.n_features, seed=15)
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=True, redis_url=redis_url)
    query_id = time.time_ns()
    duplicate = {"query_id": query_id, "doc_ids": [ids[0], *ids[:-1]], "features": X.tolist()}
    good = {"query_id": query_id, "doc_ids": ids, "features": X.tolist()}
    with TestClient(create_app(config)) as client:
        refused = [client.post("/rank", json=duplicate) for _ in range(2)]
        assert [r.status_code for r in refused] == [422, 422]
        assert refused[1].json()["field"] == "doc_ids[1]"
        answers = [client.post("/rank", json=good).json() for _ in range(2)]
        stats = client.app.state.core.cache.stats()
    assert [a["cached"] for a in answers] == [False, True]
    assert answers[1]["query_id"] == query_id and answers[1]["results"] == answers[0]["results"]
    assert stats["sets"] == 1  # the valid request only


def test_feature_store_mode_hits_skip_the_store_and_a_reload_retires_them(manifest: Path, redis_url: str) -> None:
    """Feature-store mode keys on the ids and the store's version: a hit reads no features (no MGET),
    and after the rows are reloaded the same request is scored again, from the new rows."""
    scorer = load_scorer("onnx-fp32", manifest_path=manifest)
    ids, X = make_list(40, scorer.n_features, seed=14)
    dataset = f"uvicorn-fs-{time.time_ns()}"
    store = redis.Redis.from_url(redis_url)
    write_rows(store, dataset, ids, X.astype("<f4"), chunk_size=16)
    store.hset(meta_key(dataset), mapping={"n_features": scorer.n_features})
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=True, redis_url=redis_url,
                           feature_dataset=dataset)
    body = {"query_id": "fs-cache", "doc_ids": ids}
    with TestClient(create_app(config)) as client:
        first = client.post("/rank", json=body).json()
        mgets = store.info("commandstats").get("cmdstat_mget", {}).get("calls", 0)
        second = client.post("/rank", json=body).json()
        assert store.info("commandstats").get("cmdstat_mget", {}).get("calls", 0) == mgets  # no feature read
        assert (first["cached"], second["cached"]) == (False, True) and first["results"] == second["results"]
        assert second["timings_ms"]["features"] == 0.0 and first["timings_ms"]["features"] > 0
        X2 = X[::-1].copy()  # other rows under the same ids
        write_rows(store, dataset, ids, X2.astype("<f4"), chunk_size=16)
        third = client.post("/rank", json=body).json()
    assert third["cached"] is False
    served = {r["id"]: r["score"] for r in third["results"]}
    np.testing.assert_allclose([served[i] for i in ids], scorer.score_documents(X2), atol=1e-5)
    store.close()


def test_cache_without_redis_is_refused_with_the_field_named(manifest: Path) -> None:
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=True, batching=False)
    with pytest.raises(ValueError, match="cache"):
        create_app(config)


def test_model_swap_in_process_and_the_cache_keys_on_the_new_model(manifest: Path, redis_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "uvicorn-admin-token")  # read when the app is built
    admin = {"Authorization": "Bearer uvicorn-admin-token"}
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=True, redis_url=redis_url)
    scorer = load_scorer("onnx-fp32", manifest_path=manifest)
    ids, X = make_list(10, scorer.n_features, seed=12)
    body = {"query_id": f"uvicorn-swap-{time.time_ns()}", "doc_ids": ids, "features": X.tolist()}
    with TestClient(create_app(config)) as client:
        before = [client.post("/rank", json=body).json() for _ in range(2)]
        assert [b["cached"] for b in before] == [False, True]
        assert client.post("/admin/model", json={"variant": "onnx-fp32-opt"}).status_code == 401  # no token
        swap = client.post("/admin/model", json={"variant": "onnx-fp32-opt"}, headers=admin)
        assert swap.status_code == 200, swap.text
        assert swap.json()["model"]["variant"] == "onnx-fp32-opt"
        after = client.post("/rank", json=body).json()
        assert after["cached"] is False and after["model"]["variant"] == "onnx-fp32-opt"
        assert after["model"]["version"] != before[0]["model"]["version"]
        assert client.get("/readyz").json()["model"]["variant"] == "onnx-fp32-opt"
        bad = client.post("/admin/model", json={"variant": "no-such-variant"}, headers=admin)
        assert bad.status_code == 422 and bad.json()["field"] == "variant", bad.text
        assert client.post("/rank", json=body).json()["model"]["variant"] == "onnx-fp32-opt"


@pytest.mark.parametrize("script", ["serve/uvicorn_server.py", "serve/baseline.py"])
def test_cli_serves_and_stops_on_sigterm(manifest: Path, script: str) -> None:
    """Both plain-uvicorn servers (the reference and the naive baseline) serve an ONNX variant and stop."""
    port = free_port()
    cmd = [sys.executable, script, "--port", str(port), "--variant", "onnx-int8-dynamic",
           "--manifest-path", str(manifest)]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    try:
        wait_for_line(proc, "READY", lines, timeout_s=120)
        assert f"READY http://127.0.0.1:{port}" in lines, lines
        scorer = load_scorer("onnx-int8-dynamic", manifest_path=manifest)
        ids, X = make_list(12, scorer.n_features, seed=8)
        with httpx.Client(timeout=30) as client:
            resp = client.post(f"http://127.0.0.1:{port}/rank", json={"query_id": "q", "doc_ids": ids,
                                                                      "features": X.tolist()})
            assert resp.status_code == 200, resp.text
            assert resp.json()["model"]["variant"] == "onnx-int8-dynamic"
            served = {r["id"]: r["score"] for r in resp.json()["results"]}
            np.testing.assert_allclose([served[i] for i in ids], scorer.score_documents(X), atol=1e-5)
            assert client.get(f"http://127.0.0.1:{port}/readyz").json()["model_loaded"] is True
            # bodies over the protocol's hand-over mark arrive in pieces (serve/http_protocol.py)
            for n_docs, encoding in [(1000, "msgpack"), (2500, "json")]:
                big_ids, big_X = make_list(n_docs, scorer.n_features, seed=9)
                body, ctype = ((encode_msgpack("big", big_ids, big_X), "application/msgpack") if encoding == "msgpack"
                               else (json.dumps({"query_id": "big", "doc_ids": big_ids,
                                                 "features": big_X.tolist()}).encode(), "application/json"))
                assert (len(body) > BODY_HIGH_WATER) == (encoding == "json")
                resp = client.post(f"http://127.0.0.1:{port}/rank", content=body, headers={"content-type": ctype})
                assert resp.status_code == 200, resp.text[:300]
                assert sorted(r["id"] for r in resp.json()["results"]) == big_ids
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_short_lists_are_scored_on_the_event_loop_long_ones_in_the_thread_pool() -> None:
    """inline_max_docs: a list at most that long is scored by the event loop's thread; a longer one in
    a worker thread (a fake scorer records which thread ran it: pure dispatch logic)."""
    import asyncio
    import threading

    from serve.scoring import LocalBackend

    class ThreadRecordingScorer:
        model, variant, version, pointwise, n_features = "m", "v", "1", True, 3

        def __init__(self) -> None:
            self.threads: list[int] = []

        def score_documents(self, rows: np.ndarray) -> np.ndarray:
            self.threads.append(threading.get_ident())
            return rows.sum(axis=1)

    async def scored_by(backend: LocalBackend, n_docs: int) -> tuple[int, int]:
        out = await backend.score(np.ones((n_docs, 3), dtype=np.float32))
        assert out.scores.shape == (n_docs,)
        return backend.scorer.threads[-1], threading.get_ident()

    scorer = ThreadRecordingScorer()
    inline = LocalBackend(scorer, inline_max_docs=8)
    ran_on, loop_thread = asyncio.run(scored_by(inline, 8))
    assert ran_on == loop_thread
    ran_on, loop_thread = asyncio.run(scored_by(inline, 9))
    assert ran_on != loop_thread
    ran_on, loop_thread = asyncio.run(scored_by(LocalBackend(scorer), 1))  # default 0: always the pool
    assert ran_on != loop_thread


def test_the_baseline_keeps_the_thread_pool_and_uvicorn_scores_short_lists_inline() -> None:
    from serve import baseline

    assert baseline.parse_args([])[0].inline_max_docs == 0  # as a FastAPI `def` endpoint runs it
    assert parse_args([])[0].inline_max_docs == ServiceConfig().inline_max_docs > 0
    assert parse_args(["--inline-max-docs", "0"])[0].inline_max_docs == 0
