"""The result cache in front of the ranker: Redis, fail-open, behind a circuit breaker.

Why: a repeated ranking request (same model, same query, same documents and features) costs one
Redis round trip instead of parsing plus inference. A cache must never make the service worse, so
every Redis call has short timeouts and no retries (redis-py's defaults block 4 to 5 s per call when
Redis is down), any Redis error reads as a miss, and after `failure_threshold` consecutive failures
a circuit breaker skips Redis entirely for `open_s` seconds before letting one probe through.

What is stored: the answer's `results` as ready JSON bytes, spliced into the response on a hit
(`orjson.Fragment`), so a hit neither parses nor re-serializes them (serve/ranking.py
`cached_value`). Keys: serve/cache_keys.py.

Usage::

    from serve.cache import AsyncResultCache, ResultCache
    from serve.cache_keys import rank_key

    cache = ResultCache(url, ttl_s=300, timeout_s=0.05)       # sync; AsyncResultCache for async def
    key = rank_key(model, "application/msgpack", body, max_docs=5000, dataset=None)
    value = cache.get(key)              # bytes, or None on a miss, an error or an open breaker
    cache.set(key, value)               # True if stored
    # with a feature store: the store's version is read in the same round trip as the answer
    value, key = cache.get_versioned(rank_key(model, media, body, max_docs=5000, dataset="synthetic"))
    # key None: Redis did not say which version the store is at (do not store)
    cache.stats()  # {"hits", "misses", "errors", "sets", "bypassed", "breaker_opens", "breaker_open"}

    acache = AsyncResultCache(url)      # same options; use from one event loop
    body = await acache.get(key); await acache.set(key, value); await acache.aclose()
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from serve.cache_keys import VersionedKey

DEFAULT_TTL_S = 300.0
DEFAULT_TIMEOUT_S = 0.05
DEFAULT_OPEN_S = 5.0  # how long an open breaker skips Redis before one probe
# Everything a dead, slow or confused Redis raises: redis-py wraps socket errors in RedisError, and
# TimeoutError/OSError cover anything that slips through (asyncio timeouts included).
REDIS_FAILURES: tuple[type[BaseException], ...] = (redis.RedisError, OSError, TimeoutError)
# One round trip for a feature-store answer: read the dataset's version, then the answer keyed on it.
# (A script, not two GETs: the key depends on the version, so a pipeline cannot carry both.)
VERSIONED_GET = """
local v = redis.call('GET', KEYS[1]) or '0'
return {v, redis.call('GET', ARGV[1] .. v .. ARGV[2])}
"""


class CircuitBreaker:
    """Closed -> open after `failure_threshold` consecutive failures -> half-open after `open_s`.

    Half-open lets one probe through at a time: its success closes the breaker, its failure opens
    it again for another `open_s`. A probe that never reports (its task was cancelled) frees the
    slot after `open_s`. Thread-safe; the clock is injectable for tests.
    """

    CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"

    def __init__(
        self, failure_threshold: int = 3, open_s: float = DEFAULT_OPEN_S, clock: Callable[[], float] = time.monotonic
    ):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probe_started: float | None = None
        self.opens = 0

    @property
    def state(self) -> str:
        with self._lock:
            return self._state()

    def _state(self) -> str:
        if self._opened_at is None:
            return self.CLOSED
        if self._clock() - self._opened_at < self.open_s:
            return self.OPEN
        return self.HALF_OPEN

    def allow(self) -> bool:
        """Whether a call may go to Redis now (claims the single probe slot when half-open)."""
        with self._lock:
            state = self._state()
            if state == self.CLOSED:
                return True
            now = self._clock()
            if state == self.HALF_OPEN and (self._probe_started is None or now - self._probe_started >= self.open_s):
                self._probe_started = now
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None
            self._probe_started = None

    def record_failure(self) -> None:
        with self._lock:
            self._failures += 1
            was_probe, self._probe_started = self._probe_started is not None, None
            if was_probe or (self._opened_at is None and self._failures >= self.failure_threshold):
                self._opened_at = self._clock()
                self.opens += 1


class _CacheBase:
    """Counters, breaker and options shared by the sync and async caches (no I/O here)."""

    def __init__(
        self,
        url: str,
        ttl_s: float = DEFAULT_TTL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        *,
        connect_timeout_s: float | None = None,
        failure_threshold: int = 3,
        open_s: float = DEFAULT_OPEN_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        if ttl_s <= 0:
            raise ValueError("ttl_s must be > 0")
        self.url = url
        self.ttl_ms = max(1, round(ttl_s * 1000))
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self.breaker = CircuitBreaker(failure_threshold, open_s, clock)
        self._counter_lock = threading.Lock()
        self._counts = {"hits": 0, "misses": 0, "errors": 0, "sets": 0, "bypassed": 0}
        self.last_error: str | None = None

    def _client_options(self) -> dict[str, Any]:
        return {
            "socket_timeout": self.timeout_s,
            "socket_connect_timeout": self.connect_timeout_s,
            "retry_on_timeout": False,
            "health_check_interval": 0,
        }

    def _count(self, name: str) -> None:
        with self._counter_lock:
            self._counts[name] += 1

    def _failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._count("errors")
        self.breaker.record_failure()

    def _got(self, value: bytes | None) -> bytes | None:
        self.breaker.record_success()
        self._count("hits" if value is not None else "misses")
        return value

    @property
    def hits(self) -> int:
        return self._counts["hits"]

    @property
    def misses(self) -> int:
        return self._counts["misses"]

    @property
    def errors(self) -> int:
        return self._counts["errors"]

    def stats(self) -> dict[str, int]:
        """Plain counters for Prometheus: hits, misses, errors (failed Redis calls), sets, bypassed
        (calls skipped while the breaker was open), breaker_opens, and breaker_open (0 or 1 now)."""
        with self._counter_lock:
            counts = dict(self._counts)
        counts["breaker_opens"] = self.breaker.opens
        counts["breaker_open"] = int(self.breaker.state != CircuitBreaker.CLOSED)
        return counts


class ResultCache(_CacheBase):
    """Synchronous fail-open cache: `get` never raises and never blocks longer than the timeouts."""

    def __init__(self, url: str, ttl_s: float = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any):
        super().__init__(url, ttl_s, timeout_s, **kwargs)
        self.client = redis.Redis.from_url(url, retry=Retry(NoBackoff(), 0), **self._client_options())
        self._versioned_get = self.client.register_script(VERSIONED_GET)

    def get(self, key: str) -> bytes | None:
        if not self.breaker.allow():
            self._count("bypassed")
            return None
        try:
            value = self.client.get(key)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return None
        return self._got(value)

    def get_versioned(self, vkey: VersionedKey) -> tuple[bytes | None, str | None]:
        """(the answer or None, the key to store a new answer under, or None when Redis did not say
        which version the store is at)."""
        if not self.breaker.allow():
            self._count("bypassed")
            return None, None
        try:
            version, value = self._versioned_get(keys=[vkey.version_key], args=[vkey.head, vkey.tail])
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return None, None
        return self._got(value), vkey.at(version)

    def set(self, key: str, value: bytes) -> bool:
        if not self.breaker.allow():
            self._count("bypassed")
            return False
        try:
            self.client.set(key, value, px=self.ttl_ms)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return False
        self.breaker.record_success()
        self._count("sets")
        return True

    def ping(self) -> bool:
        """Whether Redis answers now (for /readyz); does not touch the breaker or counters."""
        try:
            return bool(self.client.ping())
        except REDIS_FAILURES:
            return False

    def close(self) -> None:
        self.client.close()


class AsyncResultCache(_CacheBase):
    """The same cache over `redis.asyncio`, for `async def` handlers (a blocking call would stall the
    replica's event loop). Its connections belong to the event loop that first uses them."""

    def __init__(self, url: str, ttl_s: float = DEFAULT_TTL_S, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs: Any):
        super().__init__(url, ttl_s, timeout_s, **kwargs)
        self.client = redis.asyncio.Redis.from_url(url, retry=AsyncRetry(NoBackoff(), 0), **self._client_options())
        self._versioned_get = self.client.register_script(VERSIONED_GET)

    async def get(self, key: str) -> bytes | None:
        if not self.breaker.allow():
            self._count("bypassed")
            return None
        try:
            value = await self.client.get(key)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return None
        return self._got(value)

    async def get_versioned(self, vkey: VersionedKey) -> tuple[bytes | None, str | None]:
        """As ResultCache.get_versioned."""
        if not self.breaker.allow():
            self._count("bypassed")
            return None, None
        try:
            version, value = await self._versioned_get(keys=[vkey.version_key], args=[vkey.head, vkey.tail])
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return None, None
        return self._got(value), vkey.at(version)

    async def set(self, key: str, value: bytes) -> bool:
        if not self.breaker.allow():
            self._count("bypassed")
            return False
        try:
            await self.client.set(key, value, px=self.ttl_ms)
        except REDIS_FAILURES as exc:
            self._failed(exc)
            return False
        self.breaker.record_success()
        self._count("sets")
        return True

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except REDIS_FAILURES:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()
