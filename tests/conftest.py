"""Shared fixtures: a real embedded Redis for the whole session, and a private one to stop/restart.

`redis_server` (session) yields an `EmbeddedRedis` (`.url`, `.port`, `.stop()`, `.start()`); tests
share it, so use unique keys. A test that stops Redis (fail-open) should take `disposable_redis`, a
private server of its own, or restart the shared one in a `finally`.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from loadtest_rank_app import running_rank_app

from serve.redis_server import EmbeddedRedis, start_embedded_redis


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with start_embedded_redis(maxmemory="256mb") as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> str:
    """The shared server's URL, restarted first if an earlier test left it stopped."""
    return redis_server.start().url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def disposable_redis() -> Iterator[EmbeddedRedis]:
    """A private server this test may stop and restart (on the same port) at will."""
    with start_embedded_redis(maxmemory="32mb") as server:
        yield server


@pytest.fixture(scope="session")
def rank_url() -> Iterator[str]:
    """A small real /rank server with the service's response shape (tests/loadtest_rank_app.py)."""
    with running_rank_app() as url:
        yield url
