"""The result cache against a real Redis: keys, TTL, fail-open, circuit breaker, counters."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
import redis

from serve.cache import AsyncResultCache, CircuitBreaker, ResultCache
from serve.cache_keys import VersionedKey, rank_key, search_key
from serve.encoding import encode_msgpack
from serve.feature_store import store_version, write_rows
from serve.redis_server import EmbeddedRedis

IDS = ["d1", "d2", "d3"]
FEATURES = [[1.0, 2.5, -3.0], [0.0, 4.0, 5.0], [7.0, 8.0, 9.0]]


def body_key(model: tuple[str, str, str], query_id: str, ids: list, features: object, *, max_docs: int = 5000,
             media: str = "application/msgpack") -> str:
    """The key of a msgpack /rank body of these ids and features, on a server without a feature store."""
    body = encode_msgpack(query_id, list(ids), np.asarray(features, dtype=np.float32))
    key = rank_key(model, media, body, max_docs=max_docs, dataset=None)
    assert isinstance(key, str)
    return key


def store_key(model: tuple[str, str, str], query_id: str, ids: list, dataset: str) -> VersionedKey:
    """The key of a feature-store /rank body (ids only, JSON) on a server with the store `dataset`."""
    body = f'{{"query_id": "{query_id}", "doc_ids": {list(ids)!r}}}'.replace("'", '"').encode()
    key = rank_key(model, "application/json", body, max_docs=5000, dataset=dataset)
    assert isinstance(key, VersionedKey)
    return key


def unique_key() -> str:
    return body_key(("mlp-lambdarank", "onnx-fp32", "abc123"), f"q-{uuid.uuid4()}", IDS, np.array(FEATURES))


def wait_until(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


# ---- keys (pure logic) ------------------------------------------------------------------------


def test_key_is_the_request_bytes_with_its_media_type_and_rules() -> None:
    """A /rank key hashes the body as sent (no parsing): the same bytes, the same key; the same request
    spelled otherwise, or under another media type or document limit, another key."""
    a = body_key(("m", "v", "1"), "q1", IDS, FEATURES)
    assert a == body_key(("m", "v", "1"), "q1", list(IDS), np.array(FEATURES, dtype=np.float64))  # same bytes
    assert a.startswith("rankserve:result:v3:m:v:1:rank-max5000:")
    assert body_key(("m", "v", "1"), "q1", IDS, FEATURES, max_docs=10) != a
    assert body_key(("m", "v", "1"), "q1", IDS, FEATURES, media="application/x-msgpack") != a
    spelled = [rank_key(("m", "v", "1"), "application/json", b, max_docs=5000, dataset=None)
               for b in (b'{"query_id": "q1", "doc_ids": [1]}', b'{"query_id":"q1","doc_ids":[1]}')]
    assert spelled[0] != spelled[1]


def test_key_changes_with_order_features_ids_and_model() -> None:
    base = body_key(("m", "v", "1"), "q1", IDS, FEATURES)
    assert body_key(("m", "v", "1"), "q1", IDS[::-1], FEATURES[::-1]) != base  # order matters
    assert body_key(("m", "v", "1"), "q1", IDS, [[1.0, 2.5, -3.0], [0.0, 4.0, 5.0], [7.0, 8.0, 9.5]]) != base
    assert body_key(("m", "v", "1"), "q2", IDS, FEATURES) != base
    assert body_key(("m", "v", "2"), "q1", IDS, FEATURES) != base
    assert body_key(("m", "v2", "1"), "q1", IDS, FEATURES) != base
    assert body_key(("m2", "v", "1"), "q1", IDS, FEATURES) != base
    assert store_key(("m", "v", "1"), "q1", [1, 2], "ds").at(1) != store_key(("m", "v", "1"), "q1", ["1", "2"], "ds").at(1)
    assert body_key(("m", "v", "1"), "q1", IDS[:2] + ["d4"], FEATURES) != base  # any document id
    # the same numbers with another shape are another request
    flat = np.array(FEATURES, dtype=np.float32).reshape(1, 9)
    assert body_key(("m", "v", "1"), "q1", IDS, flat) != base


# ---- the breaker (pure logic, fake clock) -----------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_threshold_then_half_open_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, open_s=5.0, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open" and breaker.opens == 1
    assert not breaker.allow()
    clock.now = 5.0
    assert breaker.state == "half-open"
    assert breaker.allow()  # the one probe
    assert not breaker.allow()  # nobody else while it runs
    breaker.record_failure()  # a failed probe opens again at once
    assert breaker.state == "open" and breaker.opens == 2
    clock.now = 10.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.allow()


def test_breaker_success_resets_the_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, open_s=1.0, clock=FakeClock())
    breaker.record_failure()
    breaker.record_success()
    breaker.record_failure()
    assert breaker.state == "closed"


# ---- against the shared Redis -----------------------------------------------------------------


def test_round_trip_and_counters(redis_url: str) -> None:
    cache = ResultCache(redis_url, ttl_s=60)
    key = unique_key()
    assert cache.get(key) is None
    assert cache.set(key, b'{"results": []}')
    assert cache.get(key) == b'{"results": []}'
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["errors"], stats["sets"]) == (1, 1, 0, 1)
    assert stats["breaker_open"] == 0 and stats["breaker_opens"] == 0
    cache.close()


def test_ttl_is_set_and_entries_expire(redis_url: str, redis_client: redis.Redis) -> None:
    cache = ResultCache(redis_url, ttl_s=1)
    key = unique_key()
    cache.set(key, b"x")
    assert 0 < redis_client.pttl(key) <= 1000
    assert wait_until(lambda: redis_client.exists(key) == 0, timeout_s=5)
    assert cache.get(key) is None


def test_new_model_version_never_reads_old_answer(redis_url: str) -> None:
    cache = ResultCache(redis_url, ttl_s=60)
    query = f"q-{uuid.uuid4()}"
    cache.set(body_key(("m", "onnx-fp32", "v1"), query, IDS, FEATURES), b"old")
    assert cache.get(body_key(("m", "onnx-fp32", "v2"), query, IDS, FEATURES)) is None
    assert cache.get(body_key(("m", "onnx-int8-dynamic", "v1"), query, IDS, FEATURES)) is None
    assert cache.get(body_key(("m", "onnx-fp32", "v1"), query, IDS, FEATURES)) == b"old"


def test_store_keys_change_with_the_model_the_ids_their_order_and_the_store_version() -> None:
    base = store_key(("m", "v", "1"), "q1", IDS, "ds")
    assert base.version_key == "rankserve:features-version:ds"
    assert base.at(3) == base.at(b"3") != base.at(4)
    for other in (store_key(("m", "v", "2"), "q1", IDS, "ds"), store_key(("m", "v2", "1"), "q1", IDS, "ds"),
                  store_key(("m", "v", "1"), "q1", IDS[::-1], "ds"), store_key(("m", "v", "1"), "q2", IDS, "ds"),
                  store_key(("m", "v", "1"), "q1", IDS, "ds2")):
        assert other.at(3) != base.at(3)
    search = search_key(("m", "v", "1"), "ds", b"settings", b"embedding")
    assert search.version_key == base.version_key and search.at(3) != base.at(3)
    assert search_key(("m", "v", "1"), "ds", b"settings", b"other").at(3) != search.at(3)


def test_reloading_the_store_changes_the_key_and_retires_old_answers(redis_url: str) -> None:
    """Feature-store mode: the key holds the dataset's version, read with the answer in one round trip;
    a load bumps it, so an answer computed from the old rows is never read again."""
    client = redis.Redis.from_url(redis_url)
    dataset = f"cache-store-{uuid.uuid4().hex[:8]}"
    rows = np.array(FEATURES, dtype="<f4")
    write_rows(client, dataset, IDS, rows, chunk_size=2)
    cache = ResultCache(redis_url, ttl_s=60)
    vkey = store_key(("m", "v", "1"), "q1", IDS, dataset)
    miss, key = cache.get_versioned(vkey)
    assert miss is None and key == vkey.at(store_version(client, dataset)) == vkey.at(2)
    assert cache.set(key, b"computed from the first rows")
    assert cache.get_versioned(vkey) == (b"computed from the first rows", key)
    write_rows(client, dataset, IDS, rows + 1, chunk_size=2)  # the store is reloaded
    after, new_key = cache.get_versioned(vkey)
    assert after is None and new_key != key and new_key == vkey.at(4)
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2
    cache.close()
    client.close()


def test_a_store_key_with_redis_down_is_a_miss_with_no_key(disposable_redis: EmbeddedRedis) -> None:
    cache = ResultCache(disposable_redis.url, ttl_s=60, timeout_s=0.05)
    disposable_redis.stop()
    assert cache.get_versioned(store_key(("m", "v", "1"), "q1", IDS, "ds")) == (None, None)
    assert cache.stats()["errors"] == 1
    cache.close()


def test_async_round_trip(redis_url: str) -> None:
    async def scenario() -> tuple[bytes | None, bytes | None, dict]:
        cache = AsyncResultCache(redis_url, ttl_s=60)
        key = unique_key()
        miss = await cache.get(key)
        await cache.set(key, b"value")
        hit = await cache.get(key)
        stats = cache.stats()
        await cache.aclose()
        return miss, hit, stats

    miss, hit, stats = asyncio.run(scenario())
    assert miss is None and hit == b"value"
    assert (stats["hits"], stats["misses"], stats["errors"]) == (1, 1, 0)


# ---- fail open --------------------------------------------------------------------------------


def test_fail_open_breaker_and_recovery(disposable_redis: EmbeddedRedis) -> None:
    cache = ResultCache(disposable_redis.url, ttl_s=60, timeout_s=0.05, failure_threshold=3, open_s=0.3)
    key = unique_key()
    assert cache.set(key, b"v") and cache.get(key) == b"v"

    disposable_redis.stop()
    for _ in range(3):
        assert cache.get(key) is None
    stats = cache.stats()
    assert stats["errors"] == 3 and stats["breaker_opens"] == 1 and stats["breaker_open"] == 1
    assert cache.get(key) is None and not cache.set(key, b"v")  # skipped: the breaker is open
    assert cache.stats()["bypassed"] == 2 and cache.stats()["errors"] == 3
    # after the open interval one probe goes through, fails, and opens the breaker again
    assert wait_until(lambda: cache.breaker.state == "half-open")
    assert cache.get(key) is None
    assert cache.stats()["errors"] == 4 and cache.stats()["breaker_opens"] == 2

    disposable_redis.start()
    assert wait_until(lambda: cache.set(key, b"back"))  # the half-open probe succeeds
    assert cache.breaker.state == "closed"
    assert cache.get(key) == b"back"
    assert cache.stats()["breaker_open"] == 0
    cache.close()


def test_async_fail_open(disposable_redis: EmbeddedRedis) -> None:
    async def scenario() -> tuple[list, dict, bytes | None]:
        cache = AsyncResultCache(disposable_redis.url, ttl_s=60, failure_threshold=2, open_s=0.2)
        key = unique_key()
        await cache.set(key, b"v")
        disposable_redis.stop()
        down = [await cache.get(key) for _ in range(3)]
        stats = cache.stats()
        disposable_redis.start()
        recovered = None
        for _ in range(250):  # bounded: about 5 s
            if await cache.set(key, b"again"):
                recovered = await cache.get(key)
                break
            await asyncio.sleep(0.02)
        await cache.aclose()
        return down, stats, recovered

    down, stats, recovered = asyncio.run(scenario())
    assert down == [None, None, None]
    assert stats["errors"] == 2 and stats["bypassed"] == 1 and stats["breaker_opens"] == 1
    assert recovered == b"again"


class SilentServer:
    """A TCP server that accepts connections and never answers: a hung Redis. Counts connections."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.05)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.accepted: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=2)
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def test_hung_redis_times_out_once_without_retries(silent_server: SilentServer) -> None:
    cache = ResultCache(silent_server.url, ttl_s=60, timeout_s=0.05, failure_threshold=5)
    assert cache.get(unique_key()) is None
    stats = cache.stats()
    assert stats["errors"] == 1 and stats["misses"] == 0 and stats["breaker_open"] == 0
    assert "Timeout" in (cache.last_error or "")
    # A retry would have reconnected (redis-py drops a connection that timed out) before get returned.
    assert wait_until(lambda: len(silent_server.accepted) >= 1)
    assert not wait_until(lambda: len(silent_server.accepted) >= 2, timeout_s=0.3)
    cache.close()


def test_clients_have_short_timeouts_and_no_retries() -> None:
    url = "redis://127.0.0.1:1/0"  # never connected: the options are read, not used
    sync_cache, async_cache = ResultCache(url, timeout_s=0.03), AsyncResultCache(url, timeout_s=0.03)
    for client in (sync_cache.client, async_cache.client):
        assert client.get_retry().get_retries() == 0
        options = client.connection_pool.connection_kwargs
        assert options["socket_timeout"] == 0.03 and options["socket_connect_timeout"] == 0.03


def test_ping_reports_down(disposable_redis: EmbeddedRedis) -> None:
    cache = ResultCache(disposable_redis.url)
    assert cache.ping()
    disposable_redis.stop()
    assert not cache.ping()
    assert cache.stats()["errors"] == 0  # readiness checks do not count as cache errors
    cache.close()
