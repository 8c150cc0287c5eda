"""What a sweep run prepares around its services: payload files, Redis, the feature store, warm-up.

Why apart from the services: these are built once per run (or per entry) and shared by every
service configuration, so that each entry is measured on the same payloads, the same Redis and a
cold result cache, and none pays a lazy path in its first measured trial.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from loadtest.sweep_config import Sweep
from models.paths import REPO_ROOT

RESULT_CACHE_PATTERN = "rankserve:result:*"  # serve/cache_keys.py KEY_PREFIX (every version)


def payload_path(run_dir: Path, encoding: str, n_docs: int) -> Path:
    return run_dir / "payloads" / f"{encoding}-{n_docs}.payloads"


def build_payload_files(sweep: Sweep, run_dir: Path) -> dict[tuple[str, int], Path]:
    """One payload file per (encoding, list size) the sweep uses, built before any service starts.

    One `build_payloads` call per encoding covers every list size (the dataset is read once per
    call); its payloads are then split into one file per list size.
    """
    from loadtest.payloads import PayloadSet, build_payloads

    wanted: dict[str, set[int]] = {}
    for entry in sweep.entries:
        wanted.setdefault(entry.service.encoding, set()).update(sweep.sizes_of(entry))
    files: dict[tuple[str, int], Path] = {}
    for encoding, sizes in wanted.items():
        missing = sorted(n for n in sizes if not payload_path(run_dir, encoding, n).exists())
        if missing:
            built = build_payloads(missing, encoding, sweep.n_queries, sweep.seed)
            for n_docs, items in built.by_size().items():
                PayloadSet(payloads=items, encoding=encoding, meta={**built.meta, "sizes": [n_docs]}) \
                    .save(payload_path(run_dir, encoding, n_docs))
        files.update({(encoding, n): payload_path(run_dir, encoding, n) for n in sizes})
    return files


@contextlib.contextmanager
def redis_for(sweep: Sweep) -> Iterator[str | None]:
    """One Redis for the whole run when an entry needs it (cache or feature store); REDIS_URL wins."""
    needed = any(e.service.cache or e.service.encoding == "feature-store" for e in sweep.entries)
    if not needed:
        yield None
        return
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from serve.redis_server import start_embedded_redis

    with start_embedded_redis() as redis:
        yield redis.url


def load_feature_store(redis_url: str, log_path: Path, timeout_s: float = 300) -> None:
    """Load the dataset's features into Redis for the feature-store encoding (serve/feature_store.py)."""
    command = [sys.executable, str(REPO_ROOT / "serve" / "feature_store.py"), "load", "--data", "synthetic"]
    env = {**os.environ, "REDIS_URL": redis_url}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                       timeout=timeout_s, check=True)


def clear_result_cache(redis_url: str, max_keys: int = 1_000_000) -> int:
    """Forget cached results, so every cache entry starts cold and warms up on its own traffic."""
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    deleted, batch = 0, []
    for key in client.scan_iter(match=RESULT_CACHE_PATTERN, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            deleted += client.delete(*batch)
            batch = []
        if deleted + len(batch) >= max_keys:
            break
    if batch:
        deleted += client.delete(*batch)
    client.close()
    return deleted


def warm_up(url: str, payload_file: Path, duration_s: float, max_requests: int = 500) -> int:
    """Send requests one at a time for `duration_s` (bounded in count) so that lazy paths are paid for."""
    if duration_s <= 0:
        return 0
    import httpx

    from loadtest.payloads import PayloadSet

    payload_set = PayloadSet.load(payload_file)
    items = list(payload_set.payloads)
    sent, deadline = 0, time.monotonic() + duration_s
    with httpx.Client(timeout=30.0) as client:
        while sent < max_requests and time.monotonic() < deadline:
            payload = items[sent % len(items)]
            with contextlib.suppress(httpx.HTTPError):
                client.post(f"{url}/rank", content=payload.body, headers={"Content-Type": payload.content_type})
            sent += 1
    return sent
