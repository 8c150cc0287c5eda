"""Prometheus metrics of the ranking service: requests, latencies, batch sizes, cache, degraded answers,
experiment arms.

Both servers keep the same prometheus_client counters in a private registry and serve them as
text on `GET /metrics` (one scrape target per ingress replica or baseline process). Inside Ray
Serve the same observations also go to `ray.serve.metrics`, which Ray exports with its own
metrics (replica queue lengths, `@serve.batch` sizes, proxy latencies) on the node's metrics
export port (`ray.init(_metrics_export_port=...)`, `--metrics-export-port` in serve/run.py).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS_MS = (0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 50, 75, 100, 150, 250, 500, 1000, 2500, 5000)
DOC_BUCKETS = (1, 10, 25, 50, 100, 200, 500, 1000, 2000, 4096, 8192, 16384)
REQUEST_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# The stages of a /rank answer's `timings_ms` (serve/ranking.py), declared once: the load generators' records and
# the sweep's report read the same names.
STAGES = ("read", "parse", "key", "cache", "features", "queue", "inference", "total")


class ServiceMetrics:
    """One object per process; `use_ray=True` mirrors every observation to ray.serve.metrics."""

    def __init__(self, *, use_ray: bool = False) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rankserve_requests", "POST /rank requests by status code and encoding", ["status", "encoding"], registry=r
        )
        self.latency = Histogram(
            "rankserve_request_latency_ms",
            "server-side time per /rank request by stage (ms)",
            ["stage"],
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        self.batch_docs = Histogram(
            "rankserve_batch_documents", "documents per inference batch", buckets=DOC_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "rankserve_batch_requests", "requests per inference batch", buckets=REQUEST_BUCKETS, registry=r
        )
        self.cache = Counter("rankserve_cache", "result cache lookups by result (hit, miss, error)", ["result"], registry=r)
        self.breaker_opens = Counter(
            "rankserve_cache_breaker_opens", "times the result cache's circuit breaker opened (serve/cache.py; "
            "refreshed at each scrape)", registry=r)
        self.breaker_open = Gauge(
            "rankserve_cache_breaker_open", "1 while the result cache's circuit breaker skips Redis (open or "
            "half-open), else 0 (refreshed at each scrape)", registry=r)
        self.degraded = Counter(
            "rankserve_degraded", "fallback answers by reason (error, deadline, feature_store, index)", ["reason"], registry=r
        )
        self.rejected = Counter(
            "rankserve_rejected", "requests refused by admission control (503) by bound (queue, inflight)",
            ["reason"], registry=r,
        )
        self.search_requests = Counter(
            "rankserve_search_requests", "POST /search requests by status code", ["status"], registry=r)
        self.search_latency = Histogram(
            "rankserve_search_latency_ms",
            "server-side time per /search request by stage (parse, embed, cache, retrieve, features, rank, total)",
            ["stage"], buckets=LATENCY_BUCKETS_MS, registry=r)
        self.arm_requests = Counter(
            "rankserve_arm_requests", "POST /rank requests of an experiment by arm (or 'interleaved') and status",
            ["arm", "status"], registry=r)
        self.arm_latency = Histogram(
            "rankserve_arm_latency_ms", "server-side time per answered experiment request by arm (ms)",
            ["arm"], buckets=LATENCY_BUCKETS_MS, registry=r)
        self.drift = {stat: Gauge(f"rankserve_drift_{stat}", f"feature drift against the training split: {text} "
                                  "(serve/drift.py; refreshed at each scrape)", ["feature"], registry=r)
                      for stat, text in (("psi", "PSI"), ("ks", "KS statistic"),
                                         ("out_of_range", "share outside the training range"),
                                         ("flagged", "1 if flagged"))}
        self._breaker_opens_seen = 0
        self._ray: dict[str, Any] = _ray_metrics() if use_ray else {}

    def observe_request(self, status: int, encoding: str, timings_ms: dict[str, float] | None) -> None:
        self.requests.labels(str(status), encoding).inc()
        if self._ray:
            self._ray["requests"].inc(1, tags={"status": str(status), "encoding": encoding})
        for stage, ms in (timings_ms or {}).items():
            self.latency.labels(stage).observe(ms)
            if self._ray:
                self._ray["latency"].observe(ms, tags={"stage": stage})

    def observe_arm(self, arm: str, status: int, total_ms: float | None) -> None:
        """One request of an experiment (serve/experiment.py): its arm, status and, if answered, time."""
        self.arm_requests.labels(arm, str(status)).inc()
        if total_ms is not None:
            self.arm_latency.labels(arm).observe(total_ms)
        if self._ray:
            self._ray["arm_requests"].inc(1, tags={"arm": arm, "status": str(status)})
            if total_ms is not None:
                self._ray["arm_latency"].observe(total_ms, tags={"arm": arm})

    def observe_drift(self, report: dict[str, Any]) -> None:
        """serve/drift.py's report into the per-feature gauges (Prometheus only: Ray's metrics skip it)."""
        for f in report["features"]:
            feature = str(f["feature"])
            for stat in ("psi", "ks", "out_of_range"):
                self.drift[stat].labels(feature).set(f[stat])
            self.drift["flagged"].labels(feature).set(int(f["flagged"]))

    def observe_breaker(self, opens: int, is_open: bool) -> None:
        """The cache's breaker (its own counts, serve/cache.py) into Prometheus at a scrape: a re-opened
        breaker is why hits stay away after Redis is back (Prometheus only, as the drift gauges)."""
        self.breaker_opens.inc(max(0, opens - self._breaker_opens_seen))
        self._breaker_opens_seen = max(opens, self._breaker_opens_seen)
        self.breaker_open.set(int(is_open))

    def observe_search(self, status: int, timings_ms: dict[str, float] | None) -> None:
        self.search_requests.labels(str(status)).inc()
        if self._ray:
            self._ray["search_requests"].inc(1, tags={"status": str(status)})
        for stage, ms in (timings_ms or {}).items():
            self.search_latency.labels(stage).observe(ms)
            if self._ray:
                self._ray["search_latency"].observe(ms, tags={"stage": stage})

    def observe_batch(self, n_docs: int, n_requests: int) -> None:
        self.batch_docs.observe(n_docs)
        self.batch_requests.observe(n_requests)
        if self._ray:
            self._ray["batch_docs"].observe(n_docs)
            self._ray["batch_requests"].observe(n_requests)

    def observe_cache(self, result: str) -> None:
        self.cache.labels(result).inc()
        if self._ray:
            self._ray["cache"].inc(1, tags={"result": result})

    def observe_degraded(self, reason: str) -> None:
        self.degraded.labels(reason).inc()
        if self._ray:
            self._ray["degraded"].inc(1, tags={"reason": reason})

    def observe_rejected(self, reason: str) -> None:
        """A 503 from admission control (serve/admission.py): counted as a request too."""
        self.rejected.labels(reason).inc()
        self.observe_request(503, "unknown", None)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def _ray_metrics() -> dict[str, Any]:
    """The same series in Ray's metrics system (exported with the `ray_` prefix by Ray)."""
    from ray.serve.metrics import Counter as RayCounter
    from ray.serve.metrics import Histogram as RayHistogram

    return {
        "requests": RayCounter(
            "rankserve_requests", description="POST /rank requests", tag_keys=("status", "encoding")
        ),
        "latency": RayHistogram(
            "rankserve_request_latency_ms",
            description="server-side time per /rank request by stage (ms)",
            boundaries=list(LATENCY_BUCKETS_MS),
            tag_keys=("stage",),
        ),
        "batch_docs": RayHistogram(
            "rankserve_batch_documents", description="documents per inference batch", boundaries=list(DOC_BUCKETS)
        ),
        "batch_requests": RayHistogram(
            "rankserve_batch_requests", description="requests per inference batch", boundaries=list(REQUEST_BUCKETS)
        ),
        "search_requests": RayCounter(
            "rankserve_search_requests", description="POST /search requests", tag_keys=("status",)),
        "search_latency": RayHistogram(
            "rankserve_search_latency_ms", description="server-side time per /search request by stage (ms)",
            boundaries=list(LATENCY_BUCKETS_MS), tag_keys=("stage",)),
        "arm_requests": RayCounter("rankserve_arm_requests", description="experiment requests by arm",
                                   tag_keys=("arm", "status")),
        "arm_latency": RayHistogram("rankserve_arm_latency_ms", description="experiment latency by arm (ms)",
                                    boundaries=list(LATENCY_BUCKETS_MS), tag_keys=("arm",)),
        "cache": RayCounter("rankserve_cache", description="result cache lookups", tag_keys=("result",)),
        "degraded": RayCounter("rankserve_degraded", description="fallback answers", tag_keys=("reason",)),
    }
