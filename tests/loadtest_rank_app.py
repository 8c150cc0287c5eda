"""A minimal real /rank server for the load-test tests: the service's API shape, no model.

It runs on uvicorn in a subprocess on 127.0.0.1 (a real HTTP server, so Locust and the open-loop
generator are exercised for real), validates the four request formats of docs/ARCHITECTURE.md, scores
documents by the sum of their features, and keeps an in-memory result cache keyed by the body so that
`cached` behaves like the real service's cache. `running_rank_app()` starts and stops it.

`--degraded F` (`running_rank_app(degraded=F)`) answers a random fraction F of the requests (1: every
one) with the service's degraded fallback: HTTP 200, the request's own order, every score null,
`degraded: true`, never cached; as the real service does when its model fails or passes its deadline.

Run by hand: `python tests/loadtest_rank_app.py --port 8011 [--degraded 0.5]`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import Response

app = FastAPI()
_cache: dict[str, bytes] = {}
degraded_fraction = 0.0  # of the answers; set from --degraded at startup
_degraded_rng = random.Random(0)


def _features_from(body: dict) -> tuple[list, np.ndarray | None]:
    if "documents" in body:
        docs = body["documents"]
        if not isinstance(docs, list) or not docs:
            raise HTTPException(422, "documents: must be a non-empty list")
        ids = [d["id"] for d in docs]
        return ids, np.asarray([d["features"] for d in docs], dtype=np.float32)
    ids = body.get("doc_ids")
    if not isinstance(ids, list) or not ids:
        raise HTTPException(422, "doc_ids: must be a non-empty list")
    if "features" not in body:
        return ids, None  # feature store: scored as zeros here
    feats = body["features"]
    if isinstance(feats, bytes):
        X = np.frombuffer(feats, dtype="<f4").reshape(len(ids), int(body["n_features"]))
    else:
        X = np.asarray(feats, dtype=np.float32)
    if X.shape[0] != len(ids):
        raise HTTPException(422, "features: one row per doc id")
    return ids, X


@app.post("/rank")
async def rank(request: Request) -> Response:
    t0 = time.perf_counter()
    raw = await request.body()
    try:
        if request.headers.get("content-type", "").startswith("application/msgpack"):
            body = msgpack.unpackb(raw, raw=False)
        else:
            body = orjson.loads(raw)
    except Exception as e:
        raise HTTPException(400, f"body: not valid ({e})") from e
    if not isinstance(body, dict) or not isinstance(body.get("query_id"), str):
        raise HTTPException(422, "query_id: required string")
    ids, X = _features_from(body)
    t1 = time.perf_counter()
    if degraded_fraction > 0 and _degraded_rng.random() < degraded_fraction:
        return _degraded_answer(body["query_id"], ids, (time.perf_counter() - t0) * 1e3)
    key = hashlib.sha256(raw).hexdigest()
    cached = key in _cache
    t2 = time.perf_counter()
    if cached:
        results = orjson.loads(_cache[key])
    else:
        scores = X.sum(axis=1) if X is not None else np.zeros(len(ids), dtype=np.float32)
        order = np.argsort(-scores, kind="stable")
        results = [{"id": ids[i], "score": float(scores[i])} for i in order]
        _cache[key] = orjson.dumps(results)
    t3 = time.perf_counter()
    timings = {
        "read": 0.0,
        "parse": (t1 - t0) * 1e3,
        "key": 0.0,
        "cache": (t2 - t1) * 1e3,
        "features": 0.0,
        "queue": 0.0,
        "inference": 0.0 if cached else (t3 - t2) * 1e3,
        "total": (t3 - t0) * 1e3,
    }
    out = {
        "query_id": body["query_id"],
        "model": {"name": "stub", "variant": "sum", "version": "0"},
        "results": results,
        "cached": cached,
        "degraded": False,
        "timings_ms": timings,
    }
    return Response(orjson.dumps(out), media_type="application/json")


def _degraded_answer(query_id: str, ids: list, elapsed_ms: float) -> Response:
    """The service's fallback: the request's own order, no scores (serve/ranking.py's fallback_results)."""
    out = {
        "query_id": query_id,
        "model": {"name": "stub", "variant": "sum", "version": "0"},
        "results": [{"id": i, "score": None} for i in ids],
        "cached": False,
        "degraded": True,
        "timings_ms": {"read": 0.0, "parse": elapsed_ms, "key": 0.0, "cache": 0.0, "features": 0.0, "queue": 0.0,
                       "inference": 0.0, "total": elapsed_ms},
    }
    return Response(orjson.dumps(out), media_type="application/json")


@app.get("/readyz")
async def readyz() -> dict:
    return {"model_loaded": True, "redis": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def wait_for_line(proc: subprocess.Popen, prefix: str, lines: list[str], timeout_s: float) -> str:
    """Read the process's output (in a thread, so the wait is bounded) until a line starts with prefix."""
    found: list[str] = []

    def reader() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip())
            if line.startswith(prefix) and not found:
                found.append(line.strip())

    threading.Thread(target=reader, daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not found and proc.poll() is None:
        time.sleep(0.2)
    assert found, f"no {prefix!r} line within {timeout_s:.0f} s; output: {lines[-30:]}"
    return found[0]


@contextlib.contextmanager
def running_server(args: list[str], port: int, timeout_s: float = 60.0, cwd: Path | None = None, *,
                   log_path: Path | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python ARGS` (a server listening on `port`); yield its base URL once /readyz answers; stop it.
    The output goes to `log_path` (for the test to read) or a temporary file, never to an undrained pipe;
    `env` replaces the inherited environment."""
    log = log_path.open("wb") if log_path is not None else tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout_s, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


@contextlib.contextmanager
def running_rank_app(timeout_s: float = 60.0, *, degraded: float = 0.0) -> Iterator[str]:
    """Start this app on a free loopback port in a subprocess; yield its base URL; stop it.

    `degraded`: the fraction of requests answered with the degraded fallback (0: none, 1: every one).
    """
    port = free_port()
    args = [str(Path(__file__).resolve()), "--port", str(port), "--degraded", str(degraded)]
    with running_server(args, port, timeout_s) as url:
        yield url


if __name__ == "__main__":
    import uvicorn

    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8011)
    ap.add_argument("--degraded", type=float, default=0.0, help="fraction of answers that are degraded (0..1)")
    args = ap.parse_args()
    if not 0.0 <= args.degraded <= 1.0:
        ap.error(f"--degraded must be in 0..1, got {args.degraded}")
    degraded_fraction = args.degraded
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
