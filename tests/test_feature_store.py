"""The feature store against a real Redis: load, one-MGET reads equal to the dataset, missing ids."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid

import numpy as np
import pytest
import redis

from models.data import LTRSplit, load_dataset
from models.paths import REPO_ROOT
from serve.feature_store import (
    AsyncFeatureStore,
    FeatureStore,
    FeatureStoreError,
    FeatureStoreUnavailableError,
    MissingFeaturesError,
    doc_ids_of,
    feature_key,
    load_features,
    load_split,
)
from serve.redis_server import free_port

SCRIPT = str(REPO_ROOT / "serve" / "feature_store.py")


@pytest.fixture(scope="module")
def test_split() -> LTRSplit:
    return load_dataset("synthetic", n_queries=14).test


@pytest.fixture
def loaded(redis_url: str, test_split: LTRSplit) -> str:
    """A fresh dataset name with the test split loaded (small chunks, so several pipelines run)."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    assert load_split(redis_url, name, test_split, chunk_size=64) == test_split.n_docs
    return name


def mget_and_get_calls(client: redis.Redis) -> tuple[int, int]:
    stats = client.info("commandstats")
    return stats.get("cmdstat_mget", {}).get("calls", 0), stats.get("cmdstat_get", {}).get("calls", 0)


def test_read_equals_dataset_rows_with_one_mget(
    redis_url: str, redis_client: redis.Redis, loaded: str, test_split: LTRSplit
) -> None:
    assert test_split.n_docs > 64
    ids = doc_ids_of(test_split)
    store = FeatureStore(redis_url)
    mget_before, get_before = mget_and_get_calls(redis_client)
    features = store.get_features(loaded, ids)
    mget_after, get_after = mget_and_get_calls(redis_client)
    assert (mget_after - mget_before, get_after - get_before) == (1, 0)
    assert features.dtype == np.float32 and features.shape == test_split.X.shape
    np.testing.assert_array_equal(features, test_split.X)
    features[0, 0] = 1.0  # writable, so torch.from_numpy takes it without a warning
    store.close()


def test_rows_follow_request_order_and_values_are_little_endian(
    redis_url: str, redis_client: redis.Redis, loaded: str, test_split: LTRSplit
) -> None:
    rows = [5, 0, 17, 5]
    features = FeatureStore(redis_url).get_features(loaded, [f"test-{r}" for r in rows])
    np.testing.assert_array_equal(features, test_split.X[rows])
    raw = redis_client.get(feature_key(loaded, "test-17"))
    np.testing.assert_array_equal(np.frombuffer(raw, dtype="<f4"), test_split.X[17])


def test_missing_ids_raise_with_the_first_few(redis_url: str, loaded: str) -> None:
    store = FeatureStore(redis_url)
    wanted = ["test-0", "nope-1", "test-1"] + [f"gone-{i}" for i in range(20)]
    with pytest.raises(MissingFeaturesError) as caught:
        store.get_features(loaded, wanted)
    error = caught.value
    assert isinstance(error, ValueError)
    assert error.n_missing == 21 and error.missing[:2] == ["nope-1", "gone-0"] and len(error.missing) == 10
    assert "doc_ids" in str(error) and "'nope-1'" in str(error) and "11 more" in str(error)
    # A dataset the store has no record of (never loaded, or Redis restarted empty) is the server's
    # state, not the client's mistake: unavailable (the service answers degraded), not a 4xx.
    with pytest.raises(FeatureStoreUnavailableError, match="not loaded"):
        store.get_features("no-such-dataset", ["test-0"])


def test_empty_request_is_bad_input(redis_url: str) -> None:
    with pytest.raises(FeatureStoreError, match="doc_ids"):
        FeatureStore(redis_url).get_features("synthetic", [])


def test_async_reader_equals_sync(redis_url: str, loaded: str, test_split: LTRSplit) -> None:
    async def read() -> np.ndarray:
        store = AsyncFeatureStore(redis_url)
        try:
            with pytest.raises(MissingFeaturesError):
                await store.get_features(loaded, ["test-0", "missing"])
            return await store.get_features(loaded, ["test-3", "test-1"])
        finally:
            await store.aclose()

    np.testing.assert_array_equal(asyncio.run(read()), test_split.X[[3, 1]])


def test_down_redis_is_unavailable_not_missing() -> None:
    store = FeatureStore(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)
    with pytest.raises(FeatureStoreUnavailableError):
        store.get_features("synthetic", ["test-0"])


def test_load_features_records_meta(redis_url: str) -> None:
    name = f"t-{uuid.uuid4().hex[:8]}"
    summary = load_features(redis_url, "synthetic", ("vali", "test"), name=name, n_queries=14)
    dataset = load_dataset("synthetic", n_queries=14)
    assert summary["docs"] == {"vali": dataset.vali.n_docs, "test": dataset.test.n_docs}
    assert summary["evicted_keys"] == 0
    store = FeatureStore(redis_url)
    assert store.describe(name)["n_features"] == str(dataset.n_features)
    np.testing.assert_array_equal(store.get_features(name, ["vali-2"]), dataset.vali.X[[2]])


def test_cli_load_then_get(redis_url: str, test_split: LTRSplit) -> None:
    name = f"cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "REDIS_URL": ""}
    load = subprocess.run(
        [sys.executable, SCRIPT, "load", "--data", "synthetic", "--n-queries", "14", "--name", name,
         "--redis-url", redis_url],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert load.returncode == 0, load.stderr
    assert f"{{'test': {test_split.n_docs}}}" in load.stdout
    np.testing.assert_array_equal(FeatureStore(redis_url).get_features(name, ["test-4"]), test_split.X[[4]])
    get = subprocess.run(
        [sys.executable, SCRIPT, "get", "--dataset", name, "--redis-url", redis_url, "test-4", "missing-9"],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert get.returncode != 0 and "'missing-9'" in get.stderr


def test_cli_without_redis_url_says_how() -> None:
    result = subprocess.run(
        [sys.executable, SCRIPT, "load", "--data", "synthetic"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "REDIS_URL": ""},
    )
    assert result.returncode != 0 and "--redis-url" in result.stderr
