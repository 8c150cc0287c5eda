"""Two-stage retrieval then ranking (issue 11): the corpus and its splits, the towers' export, retrieval
against brute force, and POST /search on a real index, a real Redis and a real uvicorn server.

The artifacts are built once per session by the project's own commands (`models/two_stage.py`,
`export/build_index.py`) on a small corpus, with RANKSERVE_ARTIFACTS pointing at a tmp folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import numpy as np
import pytest
from loadtest_rank_app import wait_for_line

from models.candidate_features import DOC_FEATURES, RANKER_FEATURES, candidate_features, store_rows
from models.corpus import GRADE_COUNTS, RELEVANT_PER_QUERY, SPLIT_NAMES, Corpus, make_corpus, top_k
from models.paths import REPO_ROOT
from serve.index_config import IndexConfig
from serve.redis_server import free_port

N_DOCS, N_QUERIES = 3000, 120
BUILD_TIMEOUT_S = 600
VARIANT = "onnx-fp32"  # a one-epoch model's int8 variant may fail the accuracy gate; fp32 always passes


# --------------------------------------------------------------------------------------------------
# The corpus: deterministic, split by query, no leakage
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return make_corpus(2000, 60, seed=3)


def test_corpus_is_deterministic_for_a_seed(corpus: Corpus) -> None:
    again = make_corpus(2000, 60, seed=3)
    assert again.fingerprint() == corpus.fingerprint()
    np.testing.assert_array_equal(again.relevant([0, 5])[0], corpus.relevant([0, 5])[0])
    assert make_corpus(2000, 60, seed=4).fingerprint() != corpus.fingerprint()


def test_splits_partition_the_queries_and_share_none(corpus: Corpus) -> None:
    parts = [set(corpus.queries_of(name).tolist()) for name in SPLIT_NAMES]
    assert all(parts) and sum(len(p) for p in parts) == corpus.n_queries
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    # no query reappears under another split with the same attributes (a copy would leak its labels)
    rows = {name: {r.tobytes() for r in corpus.query_attributes[corpus.queries_of(name)]} for name in SPLIT_NAMES}
    assert not (rows["train"] & rows["test"] or rows["train"] & rows["vali"] or rows["vali"] & rows["test"])


def test_relevant_set_is_the_top_of_the_noisy_utility_with_its_grades(corpus: Corpus) -> None:
    queries = np.array([1, 7, 30])
    ids, grades = corpus.relevant(queries)
    assert ids.shape == grades.shape == (3, RELEVANT_PER_QUERY)
    utility = corpus.noisy_utility(queries)
    for row in range(3):
        assert np.unique(ids[row]).size == RELEVANT_PER_QUERY
        others = np.setdiff1d(np.arange(corpus.n_docs), ids[row])
        assert utility[row, ids[row]].min() > utility[row, others].max()
        assert [int((grades[row] == g).sum()) for g in (4, 3, 2, 1)] == list(GRADE_COUNTS)
        assert np.all(np.diff(utility[row, ids[row]]) <= 0)  # best first


def test_top_k_agrees_with_a_full_sort() -> None:
    scores = np.random.default_rng(0).normal(size=(4, 500)).astype(np.float32)
    np.testing.assert_array_equal(top_k(scores, 17), np.argsort(-scores, axis=1, kind="stable")[:, :17])


def test_towers_train_on_train_queries_only(corpus: Corpus) -> None:
    from models.two_tower import training_pairs

    train = corpus.queries_of("train")
    q, d, w = training_pairs(corpus, train)
    assert set(np.unique(q).tolist()) == set(train.tolist())
    assert q.size == d.size == w.size == train.size * RELEVANT_PER_QUERY


def test_candidate_features_are_the_dot_product_cosine_and_the_stored_row() -> None:
    rng = np.random.default_rng(1)
    q, emb = rng.normal(size=16).astype(np.float32), rng.normal(size=(5, 16)).astype(np.float32)
    static = rng.normal(size=(5, DOC_FEATURES)).astype(np.float32)
    X = candidate_features(q, store_rows(static, emb))
    assert X.shape == (5, RANKER_FEATURES)
    np.testing.assert_allclose(X[:, 0], emb @ q, rtol=1e-5)
    np.testing.assert_allclose(X[:, 1], emb @ q / np.linalg.norm(emb, axis=1) / np.linalg.norm(q), rtol=1e-5)
    np.testing.assert_array_equal(X[:, -DOC_FEATURES:], static)
    with pytest.raises(ValueError, match="rows"):
        candidate_features(q[:8], store_rows(static, emb))


def test_ndcg10_against_a_hand_worked_example() -> None:
    from loadtest.two_stage_quality import IDEAL_DCG10, ndcg10

    relevant = np.arange(100)
    grades = np.repeat(np.arange(4, 0, -1, dtype=np.float32), GRADE_COUNTS)
    assert ndcg10(relevant[:10], relevant, grades) == pytest.approx(1.0)
    # one grade-4 document at rank 1, nothing relevant after it: (2^4 - 1) / log2(2) over the ideal
    assert ndcg10(np.array([0, *range(1000, 1009)]), relevant, grades) == pytest.approx(15.0 / IDEAL_DCG10)


# --------------------------------------------------------------------------------------------------
# Built artifacts: towers, ranker, indexes (a small corpus, the project's own commands)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def two_stage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.getbasetemp() / "two-stage-artifacts"
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(root)}
    if not (root / "two_stage" / "index" / "faiss-flat.index").exists():
        for command in (
            ["models/two_stage.py", "--docs", str(N_DOCS), "--queries", str(N_QUERIES), "--max-seconds", "4",
             "--tower-seconds", "4"],
            ["export/build_index.py", "--kind", "hnsw", "--hnsw-m", "16"],
            ["export/build_index.py", "--kind", "flat"],
        ):
            done = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, env=env, timeout=BUILD_TIMEOUT_S,
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return root


def _corpus_of(root: Path) -> Corpus:
    return Corpus.load(root / "two_stage" / f"corpus-{N_DOCS}x{N_QUERIES}-s0.npz")


def _query_embeddings(root: Path, attributes: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(root / "two_stage" / "query_tower.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["embedding"], {"attributes": attributes.astype(np.float32)})[0]


def test_query_tower_export_matches_torch(two_stage_root: Path) -> None:
    from safetensors.torch import load_file

    from models.two_tower import build_towers, query_tower_parity

    corpus = _corpus_of(two_stage_root)
    tower = build_towers(corpus).query
    tower.load_state_dict(load_file(str(two_stage_root / "two_stage" / "query_tower.safetensors")))
    tower.eval()
    attributes = corpus.query_attributes[corpus.queries_of("test")]
    assert query_tower_parity(tower, two_stage_root / "two_stage" / "query_tower.onnx", attributes) < 1e-4


def test_retrieval_recall_against_brute_force(two_stage_root: Path) -> None:
    from serve.vector_index import exact_search, open_index, recall_at_k

    corpus = _corpus_of(two_stage_root)
    docs = np.load(two_stage_root / "two_stage" / "doc_embeddings.npy")
    queries = _query_embeddings(two_stage_root, corpus.query_attributes[corpus.queries_of("test")])
    _, exact = exact_search(docs, queries, 50)
    index_dir = two_stage_root / "two_stage" / "index"
    flat, hnsw = open_index(IndexConfig(kind="flat"), index_dir), open_index(IndexConfig(kind="hnsw", hnsw_m=16), index_dir)
    try:
        np.testing.assert_array_equal(np.sort(flat.search(queries, 50)[1], axis=1), np.sort(exact, axis=1))
        found_scores, found = hnsw.search(queries, 50)
        assert recall_at_k(found, exact) >= 0.95
        # the MIPS augmentation keeps the inner products: scores are the exact q . d of the ids found
        np.testing.assert_allclose(found_scores[0], docs[found[0]] @ queries[0], rtol=1e-4, atol=1e-4)
    finally:
        flat.close()
        hnsw.close()


def test_ranker_lists_hold_only_their_own_split(two_stage_root: Path) -> None:
    from models.two_stage import TwoStageArtifacts, ranker_split

    corpus = _corpus_of(two_stage_root)
    artifacts = TwoStageArtifacts(corpus, two_stage_root / "two_stage")
    for name in ("vali", "test"):
        split = ranker_split(artifacts, name, n_candidates=30, n_random=5)
        assert set((np.unique(split.qid) - 1).tolist()) == set(corpus.queries_of(name).tolist())


def test_slow_rows_get_the_budget_their_slo_steps_need() -> None:
    """A count-based SLO step at a low rate is long: the full ladder stretches a slow row's budget to
    3 steps at 30% of its one-at-a-time rate; fast rows and the quick profile keep theirs."""
    from loadtest.runner import SLO_PROFILES
    from loadtest.two_stage import PROFILES, row_budget
    from loadtest.two_stage_report import search_budget

    full, quick = PROFILES["full"], PROFILES["quick"]
    assert full.min_steps == 3 and row_budget(full, 3.8) == full.row_budget_s  # 79/s: 28 s a step
    low = 0.3 * 1000.0 / 12.3  # K = 1000: 12.3 ms a request alone
    assert row_budget(full, 12.3) == pytest.approx(3 * (SLO_PROFILES["full"]["min_queries"] / low + 3.0))
    assert row_budget(quick, 12.3) == quick.row_budget_s
    text = search_budget(full.model_dump(), [{"budget_s": 90.0}, {"budget_s": row_budget(full, 12.3)}])
    assert text.startswith("Each row's search had 90 to 255 s") and "3 steps" in text
    assert search_budget(quick.model_dump(), [{}]) == "Each row's search had 10 s."


def test_findings_name_the_fastest_row_only_when_a_rate_was_measured() -> None:
    from loadtest.two_stage_report import findings

    def row(k: int, ndcg: float, rate: float | None) -> dict:
        return {"backend": "faiss", "index": f"hnsw-{k}", "k_candidates": k, "ndcg10": ndcg, "ndcg10_ceiling": 0.5,
                "index_config": {"kind": "hnsw"}, "ann_recall_at_k": 0.97, "slo": {"max_rate_per_s": rate}}

    served = findings([row(100, 0.48, 200.0), row(300, 0.49, 90.0)])[0]
    assert "highest throughput under the SLO is `hnsw-100` at K = 100" in served
    offline = findings([row(100, 0.48, None), row(300, 0.49, None)])[0]
    assert "highest NDCG@10 (no rate met the SLO, or none was measured) is `hnsw-300`" in offline


# --------------------------------------------------------------------------------------------------
# POST /search on a real server, index and Redis
# --------------------------------------------------------------------------------------------------


def _start_server(root: Path, redis_url: str, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(root), "REDIS_URL": redis_url}
    proc = subprocess.Popen(
        [sys.executable, "serve/uvicorn_server.py", "--port", str(port), "--model", "two-stage-mlp", "--variant", VARIANT,
         "--search", "--search-variant", VARIANT,
         *args], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        wait_for_line(proc, "READY", lines, 90)
    except BaseException:
        proc.kill()
        raise
    return proc, f"http://127.0.0.1:{port}"


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()


def _load_store(root: Path, redis_url: str) -> None:
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(root), "REDIS_URL": redis_url}
    subprocess.run([sys.executable, "serve/feature_store.py", "load", "--data", "two_stage"], cwd=REPO_ROOT,
                   env=env, check=True, timeout=120, capture_output=True)


@pytest.fixture(scope="module")
def search_server(two_stage_root: Path, redis_server) -> Iterator[str]:
    _load_store(two_stage_root, redis_server.url)
    proc, url = _start_server(two_stage_root, redis_server.url, "--search-index", "kind=hnsw,hnsw_m=16", "--cache")
    yield url
    _stop(proc)


def test_search_answers_what_the_offline_pipeline_ranks(two_stage_root: Path, search_server: str) -> None:
    from serve.search_pipeline import SearchPipeline, top_results

    corpus = _corpus_of(two_stage_root)
    query = corpus.queries_of("test")[3]
    attributes = corpus.query_attributes[query]
    body = {"query_id": f"q-{os.getpid()}", "query": {"attributes": attributes.tolist()}, "k": 10, "candidates": 200}
    first = httpx.post(f"{search_server}/search", json=body, timeout=30).json()
    assert (first["degraded"], first["cached"], first["candidates"], len(first["results"])) == (False, False, 200, 10)
    assert set(first["timings_ms"]) >= {"parse", "embed", "cache", "retrieve", "features", "rank", "total"}

    pipeline = SearchPipeline.load(IndexConfig(kind="hnsw", hnsw_m=16), variant=VARIANT, model="two-stage-mlp",
                                   directory=two_stage_root / "two_stage",
                                   manifest_path=two_stage_root / "variants" / "two-stage-mlp" / "manifest.json")
    try:
        embedding = pipeline.embed(attributes[None, :])[0]
        ids, _ = pipeline.retrieve(embedding, 200)
        rows = store_rows(corpus.doc_features, np.load(two_stage_root / "two_stage" / "doc_embeddings.npy"))[ids]
        offline = top_results(ids, pipeline.rank(embedding, rows), 10)
    finally:
        pipeline.close()
    assert [r["id"] for r in first["results"]] == [r["id"] for r in offline]
    np.testing.assert_allclose([r["score"] for r in first["results"]], [r["score"] for r in offline], atol=1e-5)

    second = httpx.post(f"{search_server}/search", json=body, timeout=30).json()
    assert second["cached"] and second["results"] == first["results"]
    by_embedding = httpx.post(f"{search_server}/search", content=msgpack.packb(
        {"query_embedding": embedding.tolist(), "k": 10, "candidates": 200}),
        headers={"Content-Type": "application/msgpack"}, timeout=30).json()
    assert [r["id"] for r in by_embedding["results"]] == [r["id"] for r in first["results"]]
    metrics = httpx.get(f"{search_server}/metrics", timeout=10).text
    assert 'rankserve_search_latency_ms_count{stage="retrieve"}' in metrics


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"query": {"attributes": [0.5] * 3}}, 422, "query.attributes"),
    ({"query_embedding": [0.1] * 5}, 422, "query_embedding"),
    ({"k": 10}, 422, "query"),
    ({"query_embedding": [0.1] * 32, "query": {"attributes": [0.5] * 24}}, 422, "query"),
    ({"query_embedding": [0.1] * 32, "k": 50, "candidates": 10}, 422, "candidates"),
    ({"query_embedding": [0.1] * 32, "candidates": 100_000}, 422, "candidates"),
    ({"query_embedding": [0.1] * 32, "k": 0}, 422, "k"),
    ({"query_embedding": [0.1] * 32, "k": "ten"}, 422, "k"),
    ({"query_embedding": [0.1] * 32, "shards": 3}, 422, "shards"),
    ({"query": {"attributes": [0.5] * 24, "lang": "en"}}, 422, "query.lang"),
    ([1, 2, 3], 422, "body"),
])
def test_bad_input_gets_a_4xx_naming_the_field(search_server: str, body: object, status: int, field: str) -> None:
    response = httpx.post(f"{search_server}/search", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert response.json()["field"] == field


def test_unreadable_bodies_are_refused(search_server: str) -> None:
    nan = b'{"query_embedding": [NaN' + b", 0.1" * 31 + b"]}"
    for content, content_type, status in ((b"{not json", "application/json", 400), (b"\xc1", "application/msgpack", 400),
                                          (b"{}", "text/plain", 415), (nan, "application/json", 400)):
        response = httpx.post(f"{search_server}/search", content=content, headers={"Content-Type": content_type})
        assert response.status_code == status, (content, response.text)


def test_degraded_answer_while_the_index_is_unavailable_then_served_once_it_is(
        two_stage_root: Path, redis_url: str, search_server: str) -> None:
    index_dir = two_stage_root / "two_stage" / "index"
    for leftover in index_dir.glob("faiss-ivf_flat*"):
        leftover.unlink()
    proc, url = _start_server(two_stage_root, redis_url, "--search-index", "kind=ivf_flat,nlist=16")
    try:
        body = {"query_embedding": [0.1] * 32, "k": 5, "candidates": 50}
        degraded = httpx.post(f"{url}/search", json=body, timeout=30)
        assert degraded.status_code == 200 and degraded.json()["degraded"] is True
        fallback = np.load(two_stage_root / "two_stage" / "fallback_ids.npy")[:5].tolist()
        assert degraded.json()["results"] == [{"id": i, "score": None} for i in fallback]
        assert 'rankserve_degraded_total{reason="index"}' in httpx.get(f"{url}/metrics").text
        assert httpx.post(f"{url}/rank", json={}).status_code != 500  # /rank is not taken down with it

        env = {**os.environ, "RANKSERVE_ARTIFACTS": str(two_stage_root)}
        subprocess.run([sys.executable, "export/build_index.py", "--kind", "ivf_flat", "--nlist", "16"],
                       cwd=REPO_ROOT, env=env, check=True, timeout=120, capture_output=True)
        answers = []
        for _ in range(40):  # the service retries opening every 5 s: bounded, about 10 s
            answers.append(httpx.post(f"{url}/search", json=body, timeout=30).json())
            if not answers[-1]["degraded"]:
                break
            import time

            time.sleep(0.25)
        assert not answers[-1]["degraded"] and len(answers[-1]["results"]) == 5
    finally:
        _stop(proc)


def test_degraded_answer_in_retrieval_order_when_the_store_is_down(two_stage_root: Path, disposable_redis) -> None:
    _load_store(two_stage_root, disposable_redis.url)
    proc, url = _start_server(two_stage_root, disposable_redis.url, "--search-index", "kind=flat")
    try:
        body = {"query_embedding": [0.1] * 32, "k": 5, "candidates": 50}
        served = httpx.post(f"{url}/search", json=body, timeout=30).json()
        assert served["degraded"] is False
        disposable_redis.stop()
        down = httpx.post(f"{url}/search", json=body, timeout=30).json()
        assert down["degraded"] is True and all(r["score"] is None for r in down["results"])
        docs = np.load(two_stage_root / "two_stage" / "doc_embeddings.npy")
        expected = np.argsort(-(docs @ np.full(32, 0.1, np.float32)), kind="stable")[:5].tolist()
        assert [r["id"] for r in down["results"]] == expected
    finally:
        _stop(proc)


@pytest.mark.slow
def test_search_on_ray_serve_answers_as_uvicorn_does(two_stage_root: Path, redis_server, search_server: str) -> None:
    """`serve/run.py --search` (Ray Serve, colocated, a local Ray of its own): the same /search answer as
    plain uvicorn for the same query, its stage timings, and a bad body's 4xx naming the field."""
    import signal

    corpus = _corpus_of(two_stage_root)
    attributes = corpus.query_attributes[corpus.queries_of("test")[5]]
    body = {"query_id": f"ray-{os.getpid()}", "query": {"attributes": attributes.tolist()}, "k": 10, "candidates": 200}
    expected = httpx.post(f"{search_server}/search", json=body, timeout=30).json()
    port = free_port()
    env = {**os.environ, "RANKSERVE_ARTIFACTS": str(two_stage_root), "REDIS_URL": redis_server.url,
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "serve/run.py", "--port", str(port), "--model", "two-stage-mlp", "--variant", VARIANT,
         "--search", "--search-variant", VARIANT, "--search-index", "kind=hnsw,hnsw_m=16", "--no-cache",
         "--num-cpus", "2"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        assert wait_for_line(proc, "READY ", lines, timeout_s=240) == f"READY http://127.0.0.1:{port}", lines
        url = f"http://127.0.0.1:{port}"
        served = httpx.post(f"{url}/search", json=body, timeout=60).json()
        assert (served["degraded"], served["cached"], served["candidates"]) == (False, False, 200)
        assert [r["id"] for r in served["results"]] == [r["id"] for r in expected["results"]]
        np.testing.assert_allclose([r["score"] for r in served["results"]],
                                   [r["score"] for r in expected["results"]], atol=1e-5)
        assert set(served["timings_ms"]) >= {"embed", "retrieve", "features", "rank", "total"}
        bad = httpx.post(f"{url}/search", json={"query_embedding": [0.1] * 32, "k": 0}, timeout=30)
        assert bad.status_code == 422 and bad.json()["field"] == "k", bad.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, lines[-30:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
