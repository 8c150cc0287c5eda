"""ServiceConfig: every option of the ranking service in one validated object.

Everything a load test varies (variant, batching and its limits, cache, replicas, threads, ingress
mode) is configuration, so a sweep changes a flag, never code. `serve/run.py`'s CLI, the
`app_builder(args)` used by `serve run serve/config.yaml`, and the baseline server all build one.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_VARIANT = "onnx-int8-dynamic"
APP_NAME = "rankserve"


class ServiceConfig(BaseModel):
    """The service's options; field names match `serve/run.py`'s flags (dashes become underscores)."""

    model_config = ConfigDict(extra="forbid")

    # The model: one variant of one trained model, as listed in artifacts/variants/<model>/manifest.json.
    variant: str = DEFAULT_VARIANT
    model: str | None = Field(None, description="model name in the manifest; None: export.runtime.DEFAULT_MODEL")
    manifest_path: str | None = Field(None, description="explicit manifest.json (tests use a tmp one)")
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per ranker replica")
    inference_workers: int = Field(
        1, ge=1, description="threads per replica that run inference calls (ORT releases the GIL)"
    )

    # Dynamic batching, flushed on a budget of documents rather than requests.
    batching: bool = True
    max_batch_docs: int = Field(4096, ge=1, description="flush a batch once it holds this many documents")
    batch_wait_ms: float = Field(2.0, ge=0, description="longest wait for a batch to fill")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="per ranker replica; None: derived from the batch size (see ongoing_requests)"
    )

    # Result cache in Redis.
    cache: bool = True
    cache_ttl_s: float = Field(300.0, gt=0)
    redis_timeout_s: float = Field(0.05, gt=0, description="per Redis call; the cache fails open past it")
    redis_url: str | None = Field(None, description="None: $REDIS_URL or an embedded redis-server")
    feature_dataset: str = Field("synthetic", description="dataset name of the feature-store keys")

    # Scale and ingress.
    replicas: int = Field(1, ge=1, description="ranker replicas")
    ingress_replicas: int = Field(1, ge=1)
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="concurrent requests per ingress replica")
    ingress: Literal["default", "haproxy"] = "default"
    app_name: str = Field(APP_NAME, description="Serve application name (several configs can share a cluster)")
    route_prefix: str = Field("/", description="the app's HTTP prefix: /rank is at <prefix>/rank")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    address: str | None = Field(None, description="existing Ray cluster (ray://... or auto); None: start one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; None: os.cpu_count()")
    metrics_export_port: int | None = Field(None, description="Ray's Prometheus export port (None: Ray picks)")

    # Request limits and fallback.
    deadline_ms: float = Field(1000.0, gt=0, description="past it the answer is the degraded fallback")
    max_docs: int = Field(5000, ge=1, description="most documents in one request")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="larger bodies get 413")

    @property
    def ongoing_requests(self) -> int:
        """`max_ongoing_requests` for a ranker replica.

        `@serve.batch` never fills while max_ongoing_requests is below the number of requests a
        batch can hold, so when batching it is at least a full batch of small lists (16 documents
        each) plus one more in flight; without batching a few concurrent calls keep the
        inference thread(s) busy.
        """
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        if not self.batching:
            return max(4, 2 * self.inference_workers)
        return max(8, 2 * math.ceil(self.max_batch_docs / 16))

    def ranker_user_config(self) -> dict[str, Any]:
        """What the ranker deployment gets as `user_config`: changing it reconfigures in place."""
        return {
            "variant": self.variant,
            "model": self.model,
            "manifest_path": self.manifest_path,
            "threads": self.threads,
            "batching": self.batching,
            "max_batch_docs": self.max_batch_docs,
            "batch_wait_ms": self.batch_wait_ms,
        }
