"""The embedded Redis: loopback, no persistence, allkeys-lru under maxmemory, restartable, stoppable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from models.paths import REPO_ROOT
from serve.redis_server import EmbeddedRedis, find_redis_server, redis_url_or_embedded, start_embedded_redis


def test_binary_found() -> None:
    assert Path(find_redis_server()).exists()


def test_config_lru_maxmemory_no_persistence(redis_client: redis.Redis) -> None:
    config = redis_client.config_get("*")
    assert config["maxmemory-policy"] == "allkeys-lru"
    assert int(config["maxmemory"]) == 256 * 1024 * 1024
    assert config["save"] == ""
    assert config["appendonly"] == "no"
    assert config["bind"] == "127.0.0.1"


def test_url_is_loopback(redis_server: EmbeddedRedis) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


def test_stop_then_start_on_same_port(disposable_redis: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(disposable_redis.url, socket_timeout=1, socket_connect_timeout=1)
    client.set("k", b"v")
    port = disposable_redis.port
    disposable_redis.stop()
    assert not disposable_redis.running
    with pytest.raises(redis.ConnectionError):
        client.ping()
    disposable_redis.start()
    assert disposable_redis.port == port
    assert client.ping()
    assert client.get("k") is None  # no persistence: a restart starts empty
    client.close()


def test_context_manager_stops_the_process() -> None:
    with start_embedded_redis(maxmemory="16mb") as server:
        proc = server._proc
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None
    assert not server.running


def test_redis_url_or_embedded_honours_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6399/0")
    assert redis_url_or_embedded() == ("redis://127.0.0.1:6399/0", None)
    monkeypatch.delenv("REDIS_URL")
    url, handle = redis_url_or_embedded(maxmemory="16mb")
    try:
        assert handle is not None and url == handle.url
        assert redis.Redis.from_url(url).ping()
    finally:
        handle.close()


def test_cli_prints_url_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "serve" / "redis_server.py"), "--maxmemory", "16mb"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "REDIS_URL": ""},
    )
    try:
        line = proc.stdout.readline().strip()  # the CLI's first line, printed once PING answers
        assert line.startswith("REDIS_URL=redis://127.0.0.1:")
        url = line.split("=", 1)[1]
        assert redis.Redis.from_url(url, socket_timeout=2).ping()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
