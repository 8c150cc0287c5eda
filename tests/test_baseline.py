"""The baseline server: torch eager, naive JSON parsing, same API; and its CLI on a real port.

The optimized plain-uvicorn server (fast parser, cache) is tests/test_uvicorn_server.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serving_artifacts import build_test_artifacts

from export.runtime import load_scorer
from serve.baseline import create_app, parse_args
from serve.config import ServiceConfig


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_artifacts(tmp_path_factory.getbasetemp() / "serve-artifacts")


def make_list(n_docs: int, n_features: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(range(100, 100 + n_docs)), rng.normal(size=(n_docs, n_features)).astype(np.float32)


def test_defaults_are_the_naive_setup() -> None:
    config, parse_mode = parse_args([])
    assert (config.variant, config.port, config.batching, config.cache) == ("torch-eager", 8001, False, False)
    assert parse_mode == "naive"
    for flag in (["--cache"], ["--parse", "fast"]):  # those are serve/uvicorn_server.py's
        with pytest.raises(SystemExit):
            parse_args(flag)


def test_torch_eager_baseline_serves_offline_scores(manifest: Path) -> None:
    scorer = load_scorer("torch-eager", manifest_path=manifest)
    ids, X = make_list(50, scorer.n_features, seed=7)
    app = create_app(ServiceConfig(variant="torch-eager", manifest_path=str(manifest), cache=False, batching=False))
    assert app.state.core.parse_mode == "naive"
    with TestClient(app) as client:
        resp = client.post("/rank", json={"query_id": 9, "documents": [{"id": i, "features": r}
                                                                        for i, r in zip(ids, X.tolist(), strict=True)]})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["query_id"] == 9 and body["model"]["variant"] == "torch-eager"
    served = {r["id"]: r["score"] for r in body["results"]}  # int ids stay ints
    np.testing.assert_allclose([served[i] for i in ids], scorer.score_documents(X), atol=1e-5)
