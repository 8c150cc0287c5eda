"""The Ray Serve app for real: one module-scoped local Ray, a real Redis, the test model's variants.

Four apps share the Ray instance:
- `/b`: colocated (the default topology), `@serve.batch` in the replica with a long batch window so
  that concurrent requests really share batches, cache on;
- `/u`: colocated, unbatched, no cache;
- `/s`: split (2 ingress replicas + a batched ranker deployment), the same long window, cache on;
- `/r2`: colocated with 2 replicas, cache on: a model swap must reach both, and the cache must never
  answer with the old model once the swap is done.
The CLI test joins the same cluster with `serve/run.py --address`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from loadtest_rank_app import wait_for_line
from serving_artifacts import build_test_artifacts

from export.runtime import load_scorer
from models.paths import REPO_ROOT
from serve import uvicorn_server
from serve.baseline import create_app
from serve.config import ServiceConfig
from serve.encoding import encode_msgpack
from serve.metrics import STAGES
from serve.redis_server import EmbeddedRedis, free_port, start_embedded_redis
from serve.security import ADMIN_TOKEN_ENV

pytestmark = pytest.mark.slow
MAX_BODY = 1_000_000
ADMIN_TOKEN = "ray-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}  # POST /admin/* needs it


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


@pytest.fixture(scope="module")
def cache_redis() -> Iterator[EmbeddedRedis]:
    """A private Redis this module may stop and restart (the fail-open test)."""
    with start_embedded_redis(maxmemory="32mb") as server:
        yield server


@pytest.fixture(scope="module")
def service(manifest: Path, cache_redis: EmbeddedRedis) -> Iterator[dict]:
    import ray
    from ray import serve

    from serve.app import build_app

    port = free_port()
    # Replicas read the admin token from their own environment: set before ray.init, the raylet and
    # every worker it starts inherit it (serve/security.py).
    env = pytest.MonkeyPatch()
    env.setenv(ADMIN_TOKEN_ENV, ADMIN_TOKEN)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        common = {"manifest_path": str(manifest), "redis_url": cache_redis.url, "port": port, "variant": "onnx-fp32",
                  "max_docs": 200, "max_body_bytes": MAX_BODY}
        batched = ServiceConfig(batching=True, batch_wait_ms=100, app_name="rs-batched", route_prefix="/b", **common)
        unbatched = ServiceConfig(batching=False, cache=False, app_name="rs-unbatched", route_prefix="/u", **common)
        split = ServiceConfig(topology="split", ingress_replicas=2, batch_wait_ms=100, app_name="rs-split",
                              route_prefix="/s", **common)
        two = ServiceConfig(replicas=2, app_name="rs-two", route_prefix="/r2", **common)
        assert batched.topology == unbatched.topology == two.topology == "colocated" and split.batching is True
        for config in (batched, unbatched, split, two):
            serve.run(build_app(config), name=config.app_name, route_prefix=config.route_prefix)
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "gcs": ray.get_runtime_context().gcs_address}
    finally:
        serve.shutdown()
        ray.shutdown()
        env.undo()


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def scorer(manifest: Path):
    return load_scorer("onnx-fp32", manifest_path=manifest)


def make_list(n_docs: int, n_features: int, seed: int) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"doc-{seed}-{i}" for i in range(n_docs)], rng.normal(size=(n_docs, n_features)).astype(np.float32)


def compact(qid: str, ids: list[str], X: np.ndarray) -> dict:
    return {"query_id": qid, "doc_ids": ids, "features": X.tolist()}


def unique_qid(name: str) -> str:
    return f"{name}-{time.time_ns()}"


@pytest.mark.parametrize("prefix", ["b", "s"])  # colocated (the default), split
def test_served_scores_equal_offline_scores(service: dict, http: httpx.Client, scorer, prefix: str) -> None:
    ids, X = make_list(40, scorer.n_features, seed=1)
    resp = http.post(f"{service['url']}/{prefix}/rank",
                     json={"query_id": unique_qid("offline"),
                           "documents": [{"id": i, "features": r} for i, r in zip(ids, X.tolist(), strict=True)]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    served = {r["id"]: r["score"] for r in body["results"]}
    np.testing.assert_allclose([served[i] for i in ids], scorer.score_documents(X), atol=1e-5)
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["model"] == {"name": scorer.model, "variant": "onnx-fp32", "version": scorer.version}
    assert body["degraded"] is False and body["cached"] is False
    assert set(body["timings_ms"]) == set(STAGES)


@pytest.mark.parametrize("prefix", ["b", "s"])
def test_repeat_is_a_cache_hit_with_the_same_ranking(service: dict, http: httpx.Client, scorer, prefix: str) -> None:
    ids, X = make_list(25, scorer.n_features, seed=2)
    qid = unique_qid("repeat")
    as_json = json.dumps(compact(qid, ids, X)).encode()
    as_msgpack = encode_msgpack(qid, ids, X)
    answers = [http.post(f"{service['url']}/{prefix}/rank", content=body, headers={"content-type": ctype}).json()
               for body, ctype in [(as_json, "application/json"), (as_json, "application/json"),
                                   (as_msgpack, "application/msgpack"), (as_msgpack, "application/msgpack")]]
    # keyed on the body's bytes: the same request in another encoding is its own entry
    assert [a["cached"] for a in answers] == [False, True, False, True]
    assert all(a["results"] == answers[0]["results"] and a["model"] == answers[0]["model"] for a in answers)
    assert _any_replicas_metrics(http, f"{service['url']}/{prefix}",
                                 lambda metrics: 'rankserve_cache_total{result="hit"}' in metrics)


@pytest.mark.parametrize(
    ("make_body", "ctype", "status", "field"),
    [
        (lambda F: json.dumps(compact("q", ["a"], np.ones((1, F - 1)))), "application/json", 422, "features[0]"),
        (lambda F: json.dumps(compact("q", ["a", "b"], np.full((2, F), np.nan))), "application/json", 422, "features[0][0]"),
        (lambda F: json.dumps(compact("q", ["a", "a"], np.ones((2, F)))), "application/json", 422, "doc_ids[1]"),
        (lambda F: json.dumps({"query_id": "q", "documents": []}), "application/json", 422, "documents"),
        (lambda F: json.dumps(compact("q", [str(i) for i in range(201)], np.ones((201, F)))), "application/json", 422, "doc_ids"),
        (lambda F: '{"query_id": "q", "doc_ids": [', "application/json", 400, "body"),
        (lambda F: "q=1", "text/plain", 415, "Content-Type"),
        (lambda F: json.dumps(compact("q", ["a"], np.ones((1, MAX_BODY // 4)))), "application/json", 413, "body"),
        (lambda F: encode_msgpack("q", ["a"], np.ones((1, F - 1))), "application/msgpack", 422, "n_features"),
    ],
)
@pytest.mark.parametrize("prefix", ["b", "s"])
def test_bad_input_gets_4xx_from_ray_serve(service: dict, http: httpx.Client, scorer, make_body, ctype, status, field,
                                           prefix: str) -> None:
    resp = http.post(f"{service['url']}/{prefix}/rank", content=make_body(scorer.n_features),
                     headers={"content-type": ctype})
    assert resp.status_code == status, resp.text
    assert resp.json()["field"] == field


@pytest.mark.parametrize("prefix", ["b", "s"])  # @serve.batch in the colocated replica; split's ranker
def test_batched_and_unbatched_scores_agree(service: dict, http: httpx.Client, scorer, prefix: str) -> None:
    lists = [make_list(5 + 7 * k, scorer.n_features, seed=100 + k) for k in range(8)]
    qids = [unique_qid(f"batch{prefix}{k}") for k in range(8)]

    def post(prefix: str, k: int) -> dict:
        resp = http.post(f"{service['url']}/{prefix}/rank", json=compact(qids[k], *lists[k]))
        assert resp.status_code == 200, resp.text
        return resp.json()

    with ThreadPoolExecutor(8) as pool:  # concurrent: they share batches inside the 100 ms window
        batched = list(pool.map(lambda k: post(prefix, k), range(8)))
    unbatched = [post("u", k) for k in range(8)]
    for b, u in zip(batched, unbatched, strict=True):
        assert b["degraded"] is False and b["cached"] is False
        assert [r["id"] for r in b["results"]] == [r["id"] for r in u["results"]]
        np.testing.assert_allclose([r["score"] for r in b["results"]], [r["score"] for r in u["results"]], atol=1e-6)

    def shared_a_batch(metrics: str) -> bool:
        return _sample(metrics, 'rankserve_batch_requests_bucket{le="1.0"}') < _sample(
            metrics, "rankserve_batch_requests_count")

    assert _any_replicas_metrics(http, f"{service['url']}/{prefix}", shared_a_batch), \
        "no batch held more than one request"


def _any_replicas_metrics(http: httpx.Client, url: str, holds, tries: int = 30) -> bool:
    """Whether some replica's /metrics satisfies `holds` (each replica serves its own: ask a few times)."""
    return any(holds(http.get(f"{url}/metrics").text) for _ in range(tries))


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_redis_down_keeps_answering_and_recovers(service: dict, http: httpx.Client, scorer,
                                                 cache_redis: EmbeddedRedis) -> None:
    ids, X = make_list(10, scorer.n_features, seed=3)
    qid = unique_qid("redis-down")
    url = f"{service['url']}/b"
    cache_redis.stop()
    try:
        for _ in range(3):
            resp = http.post(f"{url}/rank", json=compact(qid, ids, X))
            assert resp.status_code == 200 and resp.json()["degraded"] is False and resp.json()["cached"] is False
        ready = http.get(f"{url}/readyz")
        assert ready.status_code == 200 and ready.json()["redis"] == "down"
        assert 'rankserve_cache_total{result="error"}' in http.get(f"{url}/metrics").text
    finally:
        cache_redis.start()
    deadline = time.monotonic() + 30  # the circuit breaker lets a probe through after a few seconds
    cached = False
    while time.monotonic() < deadline and not cached:
        resp = http.post(f"{url}/rank", json=compact(qid, ids, X))
        assert resp.status_code == 200
        cached = resp.json()["cached"]
        time.sleep(0.5)
    assert cached, "the cache did not recover after Redis came back"
    assert http.get(f"{url}/readyz").json()["redis"] == "up"


def test_baseline_and_ray_serve_rank_alike(service: dict, http: httpx.Client, manifest: Path, scorer) -> None:
    baseline_scorer = load_scorer("torch-eager", manifest_path=manifest)
    ids, X = make_list(60, scorer.n_features, seed=4)
    body = {"query_id": unique_qid("baseline"),
            "documents": [{"id": i, "features": r} for i, r in zip(ids, X.tolist(), strict=True)]}
    with TestClient(create_app(ServiceConfig(variant="torch-eager", cache=False), scorer=baseline_scorer)) as client:
        base = client.post("/rank", json=body).json()
    ray_answer = http.post(f"{service['url']}/u/rank", json=body).json()
    assert [r["id"] for r in base["results"]] == [r["id"] for r in ray_answer["results"]]
    np.testing.assert_allclose([r["score"] for r in base["results"]], [r["score"] for r in ray_answer["results"]],
                               atol=1e-5)
    assert base["model"]["name"] == ray_answer["model"]["name"]


def _replicas_seen(http: httpx.Client, url: str, want: int, tries: int = 200) -> dict[str, dict]:
    """GET /readyz until `want` distinct replicas answered (bounded): {replica id: the model it serves}."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        ready = http.get(f"{url}/readyz")
        assert ready.status_code == 200, ready.text
        seen[ready.json()["replica"]] = ready.json()["model"]
        if len(seen) >= want:
            break
    assert len(seen) == want, f"only replicas {sorted(seen)} answered /readyz"
    return seen


def test_model_swap_reaches_every_replica_and_the_cache_never_answers_with_the_old_model(
        service: dict, http: httpx.Client, scorer) -> None:
    """Colocated, 2 replicas, cache on: a swap on one replica reaches both, under traffic."""
    url = f"{service['url']}/r2"
    assert {m["variant"] for m in _replicas_seen(http, url, 2).values()} == {"onnx-fp32"}
    ids, X = make_list(20, scorer.n_features, seed=5)
    qid = unique_qid("swap")
    before = http.post(f"{url}/rank", json=compact(qid, ids, X)).json()
    assert before["model"]["variant"] == "onnx-fp32"
    assert http.post(f"{url}/rank", json=compact(qid, ids, X)).json()["cached"] is True  # in Redis for both

    stop = threading.Event()
    answers: list[tuple[int, dict]] = []

    def traffic() -> None:  # bounded: stops when the swap is done, or after 120 requests
        with httpx.Client(timeout=60) as client:
            for n in range(120):
                if stop.is_set():
                    break
                other_ids, other_X = make_list(8, scorer.n_features, seed=1000 + n)
                r = client.post(f"{url}/rank", json=compact(unique_qid("traffic"), other_ids, other_X))
                answers.append((r.status_code, r.json()))

    refused = http.post(f"{url}/admin/model", json={"variant": "onnx-fp32-opt"})  # no token: nothing changes
    assert refused.status_code == 401 and refused.json()["field"] == "authorization", refused.text
    assert http.post(f"{url}/admin/model", json={"variant": "onnx-fp32-opt"},
                     headers={"Authorization": "Bearer wrong"}).status_code == 403
    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        swap = http.post(f"{url}/admin/model", json={"variant": "onnx-fp32-opt"}, headers=ADMIN, timeout=180)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert swap.status_code == 200, swap.text
    new_model = swap.json()["model"]
    assert new_model["variant"] == "onnx-fp32-opt" and new_model["version"] != before["model"]["version"]
    assert answers and all(status == 200 and not a["degraded"] for status, a in answers)
    assert {a["model"]["variant"] for _, a in answers} <= {"onnx-fp32", "onnx-fp32-opt"}

    # Every replica serves the new model now, and no answer is the old model's (cached or not).
    assert all(m["version"] == new_model["version"] for m in _replicas_seen(http, url, 2).values())
    after = [http.post(f"{url}/rank", json=compact(qid, ids, X)).json() for _ in range(12)]
    assert all(a["model"]["version"] == new_model["version"] for a in after)
    assert after[0]["cached"] is False  # the new version never serves the old one's answer
    for a in after:
        np.testing.assert_allclose([r["score"] for r in a["results"]], [r["score"] for r in before["results"]],
                                   atol=1e-5)

    bad = http.post(f"{url}/admin/model", json={"variant": "no-such-variant"}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["field"] == "variant"
    back = http.post(f"{url}/admin/model", json={"variant": "onnx-fp32"}, headers=ADMIN, timeout=180)
    assert back.status_code == 200
    assert all(m["version"] == before["model"]["version"] for m in _replicas_seen(http, url, 2).values())
    again = http.post(f"{url}/rank", json=compact(qid, ids, X)).json()
    assert again["cached"] is True and again["model"] == before["model"]


def test_split_swap_keys_the_cache_on_the_new_model(service: dict, http: httpx.Client, scorer) -> None:
    """Split, 2 ingress replicas: each keys the cache on the model in its user_config, which the swap
    changes on every replica, so none answers with the old model's cached answer."""
    url = f"{service['url']}/s"
    _replicas_seen(http, url, 2)
    ids, X = make_list(15, scorer.n_features, seed=7)
    qid = unique_qid("split-swap")
    before = http.post(f"{url}/rank", json=compact(qid, ids, X)).json()
    assert http.post(f"{url}/rank", json=compact(qid, ids, X)).json()["cached"] is True
    try:
        swap = http.post(f"{url}/admin/model", json={"variant": "onnx-fp32-opt"}, headers=ADMIN, timeout=180)
        assert swap.status_code == 200, swap.text
        new_model = {k: swap.json()["model"][k] for k in ("name", "variant", "version")}
        assert new_model["version"] != before["model"]["version"]
        after = [http.post(f"{url}/rank", json=compact(qid, ids, X)).json() for _ in range(12)]
        assert after[0]["cached"] is False and any(a["cached"] for a in after[1:])
        assert all(a["model"] == new_model for a in after)
        assert http.get(f"{url}/readyz").json()["model"]["variant"] == "onnx-fp32-opt"
    finally:
        back = http.post(f"{url}/admin/model", json={"variant": "onnx-fp32"}, headers=ADMIN, timeout=180)
    assert back.status_code == 200
    assert http.post(f"{url}/rank", json=compact(qid, ids, X)).json()["model"] == before["model"]


def test_an_experiment_reaches_the_colocated_replicas_and_ends(service: dict, http: httpx.Client, scorer) -> None:
    """PUT /admin/experiment on the Ray app redeploys it: each replica loads every arm, answers name
    their arm by the user's hash; split refuses (its ranker serves one model); DELETE ends it."""
    from serve.experiment import USER_HEADER, ExperimentConfig, assign

    url = f"{service['url']}/u"
    body = {"arms": [{"name": "fp32", "variant": "onnx-fp32"}, {"name": "opt", "variant": "onnx-fp32-opt"}],
            "salt": "ray"}
    assert http.put(f"{url}/admin/experiment", json=body).status_code == 401
    put = http.put(f"{url}/admin/experiment", json=body, headers=ADMIN, timeout=180)
    assert put.status_code == 200, put.text
    config = ExperimentConfig(**body)
    ids, X = make_list(10, scorer.n_features, seed=21)
    seen = set()
    for i in range(12):
        user = f"user-{i}"
        answer = http.post(f"{url}/rank", content=encode_msgpack(unique_qid("exp"), ids, X),
                           headers={"content-type": "application/msgpack", USER_HEADER: user}).json()
        arm = assign(user, config)
        assert answer["arm"] == arm.name and answer["model"]["variant"] == arm.variant
        seen.add(arm.name)
    assert seen == {"fp32", "opt"}
    refused = http.put(f"{service['url']}/s/admin/experiment", json=body, headers=ADMIN, timeout=60)
    assert refused.status_code == 409 and refused.json()["field"] == "experiment"
    assert http.delete(f"{url}/admin/experiment", headers=ADMIN, timeout=180).status_code == 200
    answer = http.post(f"{url}/rank", json=compact(unique_qid("exp"), ids, X), headers={USER_HEADER: "user-1"}).json()
    assert "arm" not in answer and answer["model"]["variant"] == "onnx-fp32"


def test_uvicorn_and_ray_serve_the_same_routes(service: dict, http: httpx.Client, scorer) -> None:
    """One FastAPI app, built once: the same paths and methods on Ray (both topologies) and plain uvicorn."""

    def routes(schema: dict) -> dict[str, list[str]]:
        return {path: sorted(ops) for path, ops in schema["paths"].items()}

    config = ServiceConfig(variant="onnx-fp32", cache=False)
    with TestClient(uvicorn_server.create_app(config, scorer=scorer)) as client:
        plain = routes(client.get("/openapi.json").json())
    with TestClient(create_app(config, scorer=scorer)) as client:
        baseline = routes(client.get("/openapi.json").json())
    assert plain == baseline
    assert {"/rank", "/healthz", "/readyz", "/metrics", "/admin/model"} <= set(plain)
    for prefix in ("b", "s"):
        resp = http.get(f"{service['url']}/{prefix}/openapi.json")
        assert resp.status_code == 200, resp.text
        assert routes(resp.json()) == plain, prefix
    ready = http.get(f"{service['url']}/b/readyz").json()
    assert ready["model_loaded"] is True and ready["redis"] == "up" and ready["replica"]


def test_cli_joins_cluster_prints_ready_and_stops_cleanly(service: dict, http: httpx.Client, manifest: Path,
                                                          cache_redis: EmbeddedRedis,
                                                          scorer) -> None:
    cmd = [sys.executable, "serve/run.py", "--address", service["gcs"], "--variant", "onnx-fp32",
           "--manifest-path", str(manifest), "--app-name", "rs-cli", "--route-prefix", "/cli",
           "--port", str(service["port"]), "--no-cache", "--no-batching"]
    # Redis from $REDIS_URL, as the sweep gives it (then serve/run.py embeds none)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": cache_redis.url})
    lines: list[str] = []
    try:
        ready = wait_for_line(proc, "READY ", lines, timeout_s=240)
        assert ready == f"READY {service['url']}/cli", lines
        ids, X = make_list(5, scorer.n_features, seed=6)
        resp = http.post(f"{service['url']}/cli/rank", json=compact("cli", ids, X))
        assert resp.status_code == 200 and resp.json()["model"]["variant"] == "onnx-fp32"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert http.get(f"{service['url']}/cli/healthz").status_code == 404  # its app is gone
    assert http.get(f"{service['url']}/b/healthz").status_code == 200  # the cluster's other apps are not
