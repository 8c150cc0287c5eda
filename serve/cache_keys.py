"""Result-cache keys: what a cached answer depends on, hashed with a fast non-cryptographic digest.

Why a key holds what it holds:
- the model's name, variant and version: a new model never serves an old model's answer;
- a /rank answer: the request's own bytes (its media type and body), hashed before anything parses
  them, so a hit skips parsing and validation (0.2-0.6 ms of a 1000-document hit). That is sound
  because only a request that was parsed, validated and answered is ever stored: equal bytes are the
  same valid request. Any change to the query id, a document id, their order or a feature changes the
  bytes, hence the key. The rule that could refuse a stored request (`max_docs`) is in the key too.
  (Equal requests spelled differently, `1.0` and `1.00`, get two entries: the price of not parsing.)
- features read from the store (feature-store mode, /search): the store's dataset version, a counter
  every load bumps (serve/feature_store.py). The version is read in the same Redis round trip as the
  cached answer (`VersionedKey`, with the script in serve/cache.py), so a reloaded store retires
  every answer computed from the old rows. On a server with a feature store every /rank key holds it
  (the bytes do not say whether features came with them before parsing).

The digest is XXH3-128 (xxhash), chosen by measurement: `python serve/cache_keys.py` times every
candidate in `DIGESTS` over a 1000-document msgpack body (544 KB); the cache ladder's report
(loadtest/cache_ladder.py) records the same table beside its figures. A collision would need two
different requests with equal 128-bit hashes: no adversary can make a client's own cache serve
another client's answer that it could not request directly, so a cryptographic digest buys nothing.

Usage::

    from serve.cache_keys import rank_key, search_key
    key = rank_key(model, "application/msgpack", body, max_docs=5000, dataset=None)  # str: GET/SET it
    vkey = rank_key(model, "application/msgpack", body, max_docs=5000, dataset="synthetic")
    # a VersionedKey: cache.get_versioned(vkey) reads the version and the answer in one round trip
    vkey = search_key(model, "two_stage", settings, embedding_bytes)
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xxhash

KEY_PREFIX = "rankserve:result:v3"
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


def _key(model: dict[str, str] | Sequence[str], kind: str, parts: Parts, dataset: str | None) -> str | VersionedKey:
    head = f"{KEY_PREFIX}:{model_part(model)}:{kind}"
    if dataset is None:
        return f"{head}:{digest(parts)}"
    return VersionedKey(store_version_key(dataset), f"{head}:store-{dataset}@", f":{digest(parts)}")


def rank_key(model: dict[str, str] | Sequence[str], media_type: str, body: bytes | memoryview, *, max_docs: int,
             dataset: str | None) -> str | VersionedKey:
    """The key of a /rank answer: the model, the body's media type and bytes, `max_docs`, and (a
    server with a feature store, `dataset` set) the store's version."""
    return _key(model, f"rank-max{max_docs}", [media_type.encode(), b"\n", body], dataset)


def search_key(model: dict[str, str] | Sequence[str], dataset: str, *parts: bytes) -> VersionedKey:
    """The key of an answer ranked over features from the store `dataset` (/search): `parts` (the
    request's embedding and settings) plus the dataset's version."""
    key = _key(model, "search", parts, dataset)
    assert isinstance(key, VersionedKey)
    return key


def time_digests(n_docs: int = 1000, n_features: int = 136, repeats: int = 200) -> dict[str, float | None]:
    """Median microseconds of each digest in DIGESTS over one request's key input (a msgpack body of
    n_docs ids and an n_docs x n_features float32 matrix); None where the package is not installed."""
    from serve.encoding import encode_msgpack

    rng = np.random.default_rng(0)
    features = rng.standard_normal((n_docs, n_features)).astype("<f4")
    parts = [b"application/msgpack", b"\n", encode_msgpack("q-1", [f"d-{i}" for i in range(n_docs)], features)]
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
