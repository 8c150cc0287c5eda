"""Online experiments in the service (serve/experiment.py through serve/ranking.py): an A/B split by user,
team-draft interleaving, set and ended through the admin API with the real app and real scorers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_artifacts import build_test_artifacts

from export.runtime import load_scorer
from serve.config import ServiceConfig
from serve.encoding import encode_msgpack
from serve.experiment import USER_HEADER, Arm, ExperimentConfig, assign
from serve.interleaving import seeded_coin, team_draft
from serve.ranking import ranked_results
from serve.security import ADMIN_TOKEN_ENV
from serve.uvicorn_server import create_app, parse_args

TOKEN = "experiment-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
ARMS = [Arm(name="fp32", variant="onnx-fp32"), Arm(name="int8", variant="onnx-int8-dynamic")]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


@pytest.fixture
def client(manifest: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=False, batching=False)
    with TestClient(create_app(config)) as c:
        yield c


def a_list(n_features: int, n_docs: int = 30, seed: int = 0) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(seed)
    return [f"d{i}" for i in range(n_docs)], rng.normal(size=(n_docs, n_features)).astype(np.float32)


def rank(client: TestClient, ids: list[str], X: np.ndarray, user: str | None = None, query_id: str = "q") -> dict:
    headers = {"content-type": "application/msgpack", **({USER_HEADER: user} if user else {})}
    resp = client.post("/rank", content=encode_msgpack(query_id, ids, X), headers=headers)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_ab_split_by_user_names_the_arm_and_scores_with_its_model(client: TestClient, manifest: Path) -> None:
    scorers = {arm.name: load_scorer(arm.variant, manifest_path=manifest) for arm in ARMS}
    ids, X = a_list(scorers["fp32"].n_features)
    assert "arm" not in rank(client, ids, X)  # no experiment yet
    config = ExperimentConfig(arms=ARMS, salt="t1")
    assert client.put("/admin/experiment", json=config.model_dump()).status_code == 401  # no token
    put = client.put("/admin/experiment", json=config.model_dump(), headers=ADMIN)
    assert put.status_code == 200, put.text
    assert put.json()["experiment"]["arms"][0]["name"] == "fp32"
    seen = set()
    for i in range(40):
        user = f"user-{i}"
        answers = [rank(client, ids, X, user) for _ in range(2)]
        expected = assign(user, config)
        assert answers[0]["arm"] == answers[1]["arm"] == expected.name  # a user stays in one arm
        assert answers[0]["model"]["variant"] == expected.variant
        served = {r["id"]: r["score"] for r in answers[0]["results"]}
        np.testing.assert_allclose([served[d] for d in ids], scorers[expected.name].score_documents(X), atol=1e-5)
        seen.add(expected.name)
    assert seen == {"fp32", "int8"}
    metrics = client.get("/metrics").text
    assert 'rankserve_arm_requests_total{arm="fp32",status="200"}' in metrics
    assert 'rankserve_arm_latency_ms_count{arm="int8"}' in metrics
    assert client.get("/admin/experiment", headers=ADMIN).json()["experiment"]["salt"] == "t1"
    assert client.delete("/admin/experiment", headers=ADMIN).status_code == 200
    assert rank(client, ids, X, "user-1").get("arm") is None
    assert client.get("/admin/experiment", headers=ADMIN).json() == {"experiment": None}


def test_without_the_user_header_the_query_id_decides(client: TestClient, manifest: Path) -> None:
    config = ExperimentConfig(arms=ARMS, salt="by-query")
    assert client.put("/admin/experiment", json=config.model_dump(), headers=ADMIN).status_code == 200
    ids, X = a_list(load_scorer("onnx-fp32", manifest_path=manifest).n_features)
    arms = {q: rank(client, ids, X, query_id=q)["arm"] for q in (f"q{i}" for i in range(20))}
    assert arms == {q: assign(q, config).name for q in arms}


def test_interleaving_merges_both_arms_by_team_draft(client: TestClient, manifest: Path) -> None:
    scorers = [load_scorer(arm.variant, manifest_path=manifest) for arm in ARMS]
    ids, X = a_list(scorers[0].n_features, n_docs=40, seed=3)
    config = ExperimentConfig(arms=ARMS, mode="interleave", salt="il")
    assert client.put("/admin/experiment", json=config.model_dump(), headers=ADMIN).status_code == 200
    answer = rank(client, ids, X, "user-7", query_id="q-il")
    assert answer["arm"] == "interleaved" and answer["interleaving"] == {"a": "fp32", "b": "int8"}
    rankings = [[r["id"] for r in ranked_results(ids, s.score_documents(X))] for s in scorers]
    merged, teams = team_draft(rankings[0], rankings[1], seeded_coin("il:user-7:q-il"))
    assert [r["id"] for r in answer["results"]] == merged
    assert [r["team"] for r in answer["results"]] == teams
    assert rank(client, ids, X, "user-7", query_id="q-il")["results"] == answer["results"]  # reproducible
    assert answer["cached"] is False and answer["timings_ms"]["inference"] > 0


def test_bad_arms_get_a_422_naming_the_field_and_the_server_keeps_answering(client: TestClient,
                                                                            manifest: Path) -> None:
    bad = {"arms": [{"name": "a", "variant": "onnx-fp32"}, {"name": "b", "variant": "no-such-variant"}]}
    resp = client.put("/admin/experiment", json=bad, headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["field"] == "arms[1].variant"
    resp = client.put("/admin/experiment", json={"arms": [{"name": "a", "variant": "onnx-fp32"}]}, headers=ADMIN)
    assert resp.status_code == 422 and resp.json()["field"] == "arms"
    ids, X = a_list(load_scorer("onnx-fp32", manifest_path=manifest).n_features)
    assert rank(client, ids, X, "user-1").get("arm") is None  # no experiment was started


def test_experiment_from_a_file_on_the_command_line(tmp_path: Path, manifest: Path) -> None:
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps(ExperimentConfig(arms=ARMS, salt="cli").model_dump()))
    config, _ = parse_args(["--experiment", str(path), "--variant", "onnx-fp32", "--manifest-path", str(manifest)])
    assert config.experiment is not None and config.experiment.salt == "cli"
    with TestClient(create_app(config)) as c:
        ids, X = a_list(load_scorer("onnx-fp32", manifest_path=manifest).n_features)
        assert rank(c, ids, X, "u1")["arm"] == assign("u1", config.experiment).name


def test_ab_arms_with_the_cache_never_share_answers(manifest: Path, redis_url: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache key holds the answering arm's model: the same body from users of two arms is two entries."""
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    config = ServiceConfig(variant="onnx-fp32", manifest_path=str(manifest), cache=True, redis_url=redis_url,
                           experiment=ExperimentConfig(arms=ARMS, salt=f"cache-{time.time_ns()}"))
    users = {}
    for i in range(100):
        users.setdefault(assign(f"u{i}", config.experiment).name, f"u{i}")
    with TestClient(create_app(config)) as c:
        ids, X = a_list(load_scorer("onnx-fp32", manifest_path=manifest).n_features, seed=9)
        query = f"cache-{time.time_ns()}"
        first = {arm: rank(c, ids, X, user, query) for arm, user in users.items()}
        second = {arm: rank(c, ids, X, user, query) for arm, user in users.items()}
    for arm in users:
        assert (first[arm]["cached"], second[arm]["cached"]) == (False, True)
        assert first[arm]["model"] == second[arm]["model"] and second[arm]["arm"] == arm
    assert first["fp32"]["model"]["variant"] != first["int8"]["model"]["variant"]
