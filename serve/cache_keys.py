"""Result-cache keys: what a cached answer depends on, hashed with a fast non-cryptographic digest.

Why a key holds what it holds:
- the model's name, variant and version: a new model never serves an old model's answer;
- features sent in the body: a digest of the query id, the document ids in order and the features
  (little-endian float32 bytes with their shape), so any feature change changes the key;
- features read from the store (feature-store mode, /search): no features to hash, only the ids,
  plus the store's dataset version, a counter every load bumps (serve/feature_store.py). The
  version is read in the same Redis round trip as the cached answer (`VersionedKey`, with the
  script in serve/cache.py), so a reloaded store retires every answer computed from the old rows.

The digest is XXH3-128 (xxhash), chosen by measurement: `python serve/cache_keys.py` times every
candidate in `DIGESTS` over a 1000-document feature matrix (544 KB); the cache ladder's report
(loadtest/cache_ladder.py) records the same table beside its figures. A collision would need two
different requests with equal 128-bit hashes: no adversary can make a client's own cache serve
another client's answer that it could not request directly, so a cryptographic digest buys nothing.

Usage::

    from serve.cache_keys import body_key, store_key
    key = body_key(model, query_id, doc_ids, features)          # str: GET/SET it
    vkey = store_key(model, query_id, doc_ids, "synthetic")     # VersionedKey: cache.get_versioned(vkey)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import xxhash

KEY_PREFIX = "rankserve:result:v2"
STORE_VERSION_PREFIX = "rankserve:features-version"


def store_version_key(dataset: str) -> str:
    """The counter a feature-store load bumps (serve/feature_store.py `write_rows`)."""
    return f"{STORE_VERSION_PREFIX}:{dataset}"


Parts = Sequence[bytes | memoryview]


def _streaming(new: Callable[[], Any]) -> Callable[[Parts], str]:
    """A digest over byte parts from a hasher constructor with `update` and `hexdigest` (hashlib,
    xxhash and blake3 all have that interface)."""
    def digest(parts: Parts) -> str:
        h = new()
        for part in parts:
            h.update(part)
        return h.hexdigest()
    return digest


def _blake3() -> Callable[[Parts], str] | None:
    try:
        import blake3  # dev extra: measured as the alternative, not used to key
    except ImportError:
        return None
    return _streaming(blake3.blake3)


# name -> (one-line description, digest over byte parts). The first is the one keys use.
DIGESTS: dict[str, tuple[str, Callable[[Parts], str] | None]] = {
    "xxh3_128": ("xxhash XXH3, 128-bit: non-cryptographic, made for hashing large buffers",
                 _streaming(xxhash.xxh3_128)),
    "blake3": ("BLAKE3 (cryptographic, SIMD tree hash; the `blake3` package)", _blake3()),
    "blake2b": ("BLAKE2b (hashlib)", _streaming(hashlib.blake2b)),
    "sha256": ("SHA-256 (hashlib): the key's digest before issue 14", _streaming(hashlib.sha256)),
}
digest = DIGESTS["xxh3_128"][1]


def model_part(model: dict[str, str] | Sequence[str]) -> str:
    """`<name>:<variant>:<version>` of the model that scores (a dict as answers name it, or a tuple)."""
    name, variant, version = (model["name"], model["variant"], model["version"]) if isinstance(model, dict) else model
    return f"{name}:{variant}:{version}"


def ids_bytes(query_id: str | int, doc_ids: Sequence[Any]) -> bytes:
    """The query id and document ids in order, in their JSON form ("1" and 1 differ, as in answers)."""
    return orjson.dumps([query_id, list(doc_ids)], option=orjson.OPT_SERIALIZE_NUMPY)


def feature_parts(features: np.ndarray) -> list[bytes | memoryview]:
    """The features as little-endian float32 with their shape: 1.0 and 1.00 hash the same. No copy
    when they already are (a msgpack body's matrix): the digest reads the array's own buffer."""
    array = np.ascontiguousarray(features, dtype="<f4")
    return [repr(array.shape).encode(), array.reshape(-1).view(np.uint8).data]


def body_key(model: dict[str, str] | Sequence[str], query_id: str | int, doc_ids: Sequence[Any],
             features: np.ndarray) -> str:
    """The key of a /rank answer whose features came in the body."""
    return f"{KEY_PREFIX}:{model_part(model)}:{digest([ids_bytes(query_id, doc_ids), *feature_parts(features)])}"


@dataclass(frozen=True)
class VersionedKey:
    """A key that holds the feature store's dataset version, known only once Redis is asked:
    `head + <version> + tail`, the version read from `version_key` in the same round trip."""

    version_key: str
    head: str
    tail: str

    def at(self, version: bytes | str | int) -> str:
        if isinstance(version, bytes):
            version = version.decode()
        return f"{self.head}{version}{self.tail}"


def store_key(model: dict[str, str] | Sequence[str], query_id: str | int, doc_ids: Sequence[Any],
              dataset: str, *extra: bytes) -> VersionedKey:
    """The key of an answer whose features come from the store `dataset`: ids (and `extra` bytes,
    e.g. a /search request's embedding and settings) plus the dataset's version."""
    hashed = digest([ids_bytes(query_id, doc_ids), *extra])
    return VersionedKey(store_version_key(dataset), f"{KEY_PREFIX}:{model_part(model)}:store-{dataset}@",
                        f":{hashed}")


def time_digests(n_docs: int = 1000, n_features: int = 136, repeats: int = 200) -> dict[str, float | None]:
    """Median microseconds of each digest in DIGESTS over one request's key input (ids and a float32
    feature matrix of n_docs x n_features); None where the package is not installed."""
    rng = np.random.default_rng(0)
    features = rng.standard_normal((n_docs, n_features)).astype("<f4")
    parts = [ids_bytes("q-1", [f"d-{i}" for i in range(n_docs)]), *feature_parts(features)]
    timings: dict[str, float | None] = {}
    for name, (_description, fn) in DIGESTS.items():
        if fn is None:
            timings[name] = None
            continue
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(parts)
            samples.append(time.perf_counter() - t)
        timings[name] = float(np.median(samples) * 1e6)
    return timings


if __name__ == "__main__":
    for docs in (100, 1000):
        for name, us in time_digests(docs).items():
            print(f"{docs:>5} docs  {name:<10} {'not installed' if us is None else f'{us:8.1f} us'}")
