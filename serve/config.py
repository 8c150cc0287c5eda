"""ServiceConfig: every option of the ranking service in one validated object.

Everything a load test varies (variant, topology, batching and its limits, cache, replicas, threads,
ingress mode) is configuration, so a sweep changes a flag, never code. `serve/run.py`'s CLI, the
`app_builder(args)` used by `serve run serve/config.yaml`, the plain-uvicorn server and the baseline
server all build one.

Topologies of the Ray Serve app (serve/app.py):
- `colocated` (the default): one deployment parses, reads the cache and the feature store, and scores
  in the same replica. `replicas` / `autoscaling_max_replicas` scale it.
- `split`: an ingress deployment (`ingress_replicas`) calls a separate batched ranker deployment
  (`replicas`, `autoscaling_max_replicas`) through a handle; pays where a separate model stage does
  (a GPU ranker, the attention model at large lists).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from serve.drift import DriftSettings
from serve.experiment import ExperimentConfig
from serve.index_config import IndexConfig

DEFAULT_VARIANT = "onnx-int8-dynamic"
APP_NAME = "rankserve"
Topology = Literal["colocated", "split"]
# The ServiceConfig fields that name the model: a swap changes only these (see ranker_user_config).
MODEL_FIELDS = ("variant", "model", "manifest_path")


class ServiceConfig(BaseModel):
    """The service's options; field names match `serve/run.py`'s flags (dashes become underscores)."""

    model_config = ConfigDict(extra="forbid")

    # The model: one variant of one trained model, as listed in artifacts/variants/<model>/manifest.json.
    variant: str = DEFAULT_VARIANT
    model: str | None = Field(None, description="model name in the manifest; None: export.runtime.DEFAULT_MODEL")
    manifest_path: str | None = Field(None, description="explicit manifest.json (tests use a tmp one)")
    threads: int = Field(1, ge=1, description="ONNX Runtime intra-op threads per scoring replica")
    inference_workers: int = Field(
        1, ge=1, description="threads per scoring replica that run inference calls (ORT releases the GIL)"
    )
    inline_max_docs: int = Field(
        256, ge=0,
        description="lists of at most this many documents are scored on the event loop, not in the "
                    "inference threads: a short call costs less than the thread hop (see serve/scoring.py timed_score); 0: never",
    )

    # Dynamic batching (`@serve.batch` in each scoring replica), flushed on a budget of documents.
    batching: bool | None = Field(
        None,
        description="None: the topology's default, off when colocated (a batch waits up to batch_wait_ms "
                    "for company, a cost at low load), on when split (the ranker exists to batch)",
    )
    max_batch_docs: int = Field(4096, ge=1, description="flush a batch once it holds this many documents")
    batch_wait_ms: float = Field(2.0, ge=0, description="longest wait for a batch to fill")
    max_ongoing_requests: int | None = Field(
        None, ge=1,
        description="per scoring replica (colocated: the one deployment; split: the ranker); "
                    "None: derived (see colocated_ongoing_requests, ongoing_requests)",
    )

    # Result cache in Redis.
    cache: bool = True
    cache_ttl_s: float = Field(300.0, gt=0)
    redis_timeout_s: float = Field(0.05, gt=0, description="per Redis call; the cache fails open past it")
    redis_url: str | None = Field(None, description="None: $REDIS_URL or an embedded redis-server")
    feature_dataset: str = Field("synthetic", description="dataset name of the feature-store keys")

    # Topology, scale and ingress.
    topology: Topology = Field(
        "colocated",
        description="colocated: one deployment parses, caches and scores in-process; "
                    "split: ingress deployment + batched ranker deployment",
    )
    replicas: int = Field(1, ge=1, description="replicas of the scoring deployment (colocated: the one deployment; "
                                               "split: the ranker); with autoscaling, the minimum")
    max_replicas_per_node: int | None = Field(
        None, ge=1, description="at most this many scoring replicas per Ray node (None: Ray places them)")
    autoscaling_max_replicas: int | None = Field(
        None, ge=1, description="autoscale the scoring deployment between `replicas` and this (None: fixed replicas)"
    )
    ingress_replicas: int = Field(1, ge=1, description="split only: replicas of the ingress deployment")
    ingress_max_ongoing_requests: int = Field(
        256, ge=1, description="concurrent HTTP requests per ingress replica (colocated: per replica, at least)"
    )
    ingress: Literal["default", "haproxy"] = "default"
    app_name: str = Field(APP_NAME, description="Serve application name (several configs can share a cluster)")
    route_prefix: str = Field("/", description="the app's HTTP prefix: /rank is at <prefix>/rank")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    address: str | None = Field(None, description="existing Ray cluster (ray://... or auto); None: start one")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; None: the cores this process may use (its affinity)")
    metrics_export_port: int | None = Field(None, description="Ray's Prometheus export port (None: Ray picks)")

    # Admission control (serve/admission.py): past either bound, /rank answers a fast 503 with Retry-After.
    admission: bool = Field(True, description="admission control on /rank; off: every request is queued")
    admission_queue_ms: float | None = Field(
        2.0, gt=0,
        description="under a standing queue, refuse a request that already waited this long on the server's "
                    "event loop (None: no queue bound)")
    admission_standing_ms: float = Field(
        50.0, gt=0,
        description="a queue in which a request waited this long (after 20 in a row waited admission_queue_ms) "
                    "is standing: overload, and the bound drops to admission_queue_ms")
    admission_interval_ms: float = Field(
        100.0, gt=0,
        description="until the queue stands a burst may queue this long; a standing queue ends once no request "
                    "has waited admission_queue_ms for this long (Facebook's CoDel interval)")
    max_inflight: int | None = Field(
        None, ge=1,
        description="requests in flight per process (uvicorn) or replica (Ray); None: derived (see inflight_bound)")
    max_queued_requests: int | None = Field(
        None, ge=1,
        description="Ray Serve: requests queued for a deployment's replicas before Ray answers 503; "
                    "None: derived (see queued_requests)")

    # Two-stage search (serve/search.py): POST /search retrieves candidates from a vector index, then ranks them.
    search: bool = Field(False, description="serve POST /search (needs `python models/two_stage.py` and "
                                            "`python export/build_index.py`, and the store loaded)")
    search_index: IndexConfig = Field(default_factory=IndexConfig, description="the vector index and its parameters")
    search_model: str = Field("two-stage-mlp", description="the ranker of /search: a model in artifacts/variants")
    search_variant: str = Field(DEFAULT_VARIANT, description="its variant")
    search_dataset: str = Field("two_stage", description="feature-store dataset of the candidates' rows")
    search_max_candidates: int = Field(2000, ge=1, description="most candidates (K) one /search may ask for")

    # Online experiment (serve/experiment.py): plain uvicorn, or the colocated Ray app (each replica loads every arm).
    experiment: ExperimentConfig | None = Field(
        None, description="an A/B split between arms or team-draft interleaving of two; None: the model above answers")

    # Drift monitoring (serve/drift.py): a bounded sample of scored rows against the training split.
    drift: DriftSettings | None = Field(None, description="None: off; GET /drift and rankserve_drift_* need it")

    # Request limits and fallback.
    deadline_ms: float = Field(1000.0, gt=0, description="past it the answer is the degraded fallback")
    max_docs: int = Field(5000, ge=1, description="most documents in one request")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="larger bodies get 413")

    @model_validator(mode="after")
    def _topology_fits(self) -> ServiceConfig:
        if self.batching is None:
            self.batching = self.topology == "split"
        if self.topology == "colocated" and self.ingress_replicas != 1:
            raise ValueError("ingress_replicas: only for topology 'split' (colocated scales with replicas)")
        if self.experiment is not None and self.topology == "split":
            raise ValueError("experiment: the split topology's ranker serves one model; use colocated")
        if self.autoscaling_max_replicas is not None and self.autoscaling_max_replicas < self.replicas:
            raise ValueError(f"autoscaling_max_replicas: must be >= replicas ({self.replicas}), "
                             f"got {self.autoscaling_max_replicas}")
        return self

    @property
    def colocated_ongoing_requests(self) -> int:
        """`max_ongoing_requests` for a colocated replica: it is the HTTP ingress as well as the
        scorer, so at least `ingress_max_ongoing_requests` (parsing and cache lookups overlap with
        inference), and at least a full batch when batching (see ongoing_requests)."""
        if self.max_ongoing_requests is not None:
            return self.max_ongoing_requests
        return max(self.ingress_max_ongoing_requests, self.ongoing_requests)

    @property
    def ongoing_requests(self) -> int:
        """`max_ongoing_requests` for a ranker replica (split).

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

    @property
    def inflight_bound(self) -> int | None:
        """Admission's in-flight bound per process: `max_inflight`, or, derived, none for split's
        ingress (its batches need many requests in flight; Ray's max_ongoing_requests bounds it) and
        64 per inference thread otherwise. Requests waiting for Redis are in flight too: at ~1,000
        requests/s a cache call that times out (50 ms) holds ~50 of them, and a bound below that
        turns a Redis stall into 503s (measured: the fault suite's redis_pause, at 16). The bound
        is a backstop for long lists queued for the inference threads (~200 ms of 1000-document
        lists at ~3 ms each), not the SLO's guard: the queue-delay bound is."""
        if self.max_inflight is not None:
            return self.max_inflight
        return None if self.topology == "split" else 64 * self.inference_workers

    @property
    def queued_requests(self) -> int:
        """Ray's `max_queued_requests` per deployment: `max_queued_requests`, or as many as the
        deployment's replicas have in flight (a queue longer than one more round waits past the SLO)."""
        if self.max_queued_requests is not None:
            return self.max_queued_requests
        ongoing = self.colocated_ongoing_requests if self.topology == "colocated" else self.ongoing_requests
        return max(8, ongoing * self.replicas)

    @property
    def ingress_queued_requests(self) -> int:
        """Ray's `max_queued_requests` for split's ingress deployment: as many as its replicas have in flight."""
        return max(8, self.ingress_max_ongoing_requests * self.ingress_replicas)

    def ranker_user_config(self) -> dict[str, Any]:
        """What the scoring deployment (colocated, or split's ranker) gets as `user_config`: changing
        it reconfigures every replica in place (a model swap reaches them all)."""
        return {
            "variant": self.variant,
            "model": self.model,
            "manifest_path": self.manifest_path,
            "threads": self.threads,
            "inline_max_docs": self.inline_max_docs,
            "batching": self.batching,
            "max_batch_docs": self.max_batch_docs,
            "batch_wait_ms": self.batch_wait_ms,
            "experiment": self.experiment.model_dump() if self.experiment is not None else None,
        }

    def model_user_config(self) -> dict[str, Any]:
        """What split's ingress gets as `user_config`: the model it keys the cache on."""
        return {name: getattr(self, name) for name in MODEL_FIELDS}
