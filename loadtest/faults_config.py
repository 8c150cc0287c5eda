"""The fault suite's scenario files (loadtest/faults/*.yaml): pydantic models, so a typo names its field.

Why the service is a `ServiceSpec` (loadtest/sweep_config.py, which extends serve's ServiceConfig):
a scenario starts its service exactly as the sweep does (loadtest/services.py), with the same fields
and the same per-server checks, so a fault figure and a sweep figure describe the same service. The
fault is one small model per kind (a discriminated union on `kind`): a scenario can only set what its
fault has. Acceptance thresholds are optional; a scenario without any is recorded, not judged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loadtest.sweep_config import ServiceSpec, load_yaml_model

FAULTS_DIR = Path(__file__).resolve().parent / "faults"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------
# Faults: one model per kind. Times are seconds into the load's schedule.
# ----------------------------------------------------------------------------------------------
class RedisKill(_Strict):
    """SIGKILL redis-server, then start it again on the same port (and data folder)."""

    kind: Literal["redis_kill"]
    at_s: float = Field(gt=0)
    restart_after_s: float = Field(gt=0)


class RedisPause(_Strict):
    """SIGSTOP redis-server (it holds its connections but answers nothing), then SIGCONT."""

    kind: Literal["redis_pause"]
    at_s: float = Field(gt=0)
    resume_after_s: float = Field(gt=0)


class ReplicaKill(_Strict):
    """SIGKILL one Ray Serve replica process of `deployment` (found by its process title)."""

    kind: Literal["replica_kill"]
    at_s: float = Field(gt=0)
    deployment: str = "RankingService"
    observe_s: float = Field(10.0, gt=0, description="the 'during' window after the kill")


class ModelSwap(_Strict):
    """POST /admin/model {"variant": ...} (with the admin token) under load."""

    kind: Literal["model_swap"]
    at_s: float = Field(gt=0)
    variant: str
    observe_s: float = Field(2.0, gt=0, description="the 'during' window lasts this long after the swap's answer")
    timeout_s: float = Field(120.0, gt=0)


class Overload(_Strict):
    """`factor` x the measured capacity for `duration_s`: the generator's schedule adds what the base lacks (`--surge`)."""

    kind: Literal["overload"]
    at_s: float = Field(gt=0)
    duration_s: float = Field(gt=0)
    factor: float = Field(3.0, gt=1)


class NoFault(_Strict):
    """No fault (the soak): 'before' is the warm-up, 'during' the rest of the run."""

    kind: Literal["none"]
    at_s: float = Field(gt=0, description="end of the warm-up")


Fault = Annotated[RedisKill | RedisPause | ReplicaKill | ModelSwap | Overload | NoFault, Field(discriminator="kind")]


# ----------------------------------------------------------------------------------------------
# What surrounds the fault: Redis, payloads, load, capacity, recovery, acceptance.
# ----------------------------------------------------------------------------------------------
class RedisSpec(_Strict):
    """The scenario's own redis-server (cache and feature store), started on the service's cores."""

    persistence: Literal["none", "aof"] = Field(
        "none", description="aof: append-only file, fsync every second: what survives a SIGKILL")
    maxmemory: str = "256mb"
    reload_store: bool = Field(False, description="feature store: load it again after a restart (no persistence)")


class PayloadSpec(_Strict):
    n_docs: int = Field(100, ge=1)
    n_queries: int = Field(64, ge=1)


class LoadSpec(_Strict):
    """Open-loop Poisson load: a fixed rate, or a fraction of the capacity measured first."""

    rate_per_s: float | None = Field(None, gt=0)
    capacity_fraction: float | None = Field(None, gt=0)
    duration_s: float = Field(gt=0)
    zipf_s: float | None = Field(None, gt=0, description="repeat traffic (Zipf popularity): cache hits")
    max_in_flight: int = Field(256, ge=1)
    request_timeout_s: float = Field(30.0, gt=0)
    expected_latency_ms: float = Field(5.0, gt=0)

    @model_validator(mode="after")
    def _one_rate(self) -> LoadSpec:
        if (self.rate_per_s is None) == (self.capacity_fraction is None):
            raise ValueError("give exactly one of rate_per_s and capacity_fraction")
        return self


class CapacitySpec(_Strict):
    """How the capacity is measured: a closed loop of `users` connections for about `duration_s`.

    `generator`: `locust` (Locust's users), or `openloop`, the project's generator (loadtest/openloop.py)
    holding `users` connections busy back to back. Locust costs far more per request than the
    service's fast path: on plain uvicorn it measured 597-751 ok answers/s where the project's
    generator got 1,083 (8 connections, AVX2 machine, 2026-11-30), so a "3x capacity" overload built
    on Locust's figure was 1.65x the real one. Ray's default proxy is slow enough for either.
    """

    users: int = Field(8, ge=1)
    duration_s: float = Field(5.0, gt=0)
    generator: Literal["locust", "openloop"] = "locust"
    # Measure it on a separate start of the service with admission control off (when the service has
    # it on): what the service can serve, not what a closed loop gets past the refusals (a closed loop
    # of 2-3 connections on plain uvicorn with admission on got 856-980 ok/s, one of 7 without it
    # 1,265; Locust's 8 users on Ray behind HAProxy got 391-523 refusals; 2026-11-30).
    without_admission: bool = True


class RecoverySpec(_Strict):
    """Recovered (loadtest/faults_timeline.recovery_time): the first window of `window_s` (sliding by
    `step_s`) after the fault's end from which every window for `hold_s` more seconds is healthy: at
    least `min_samples` arrivals, a failed fraction at most `failed_factor` x the 'before' phase's
    (none when none failed before), and p99 <= max(p99_factor x the 'before' p99, 'before' p99 +
    p99_slack_ms)."""

    window_s: float = Field(1.0, gt=0)
    step_s: float = Field(0.1, gt=0)
    hold_s: float = Field(1.0, ge=0)
    p99_factor: float = Field(2.0, ge=1)
    p99_slack_ms: float = Field(2.0, ge=0)
    failed_factor: float = Field(2.0, ge=0)
    min_samples: int = Field(10, ge=1)
    after_skip_s: float = Field(2.0, ge=0, description="'after' starts this long after the fault's end")


class Acceptance(_Strict):
    """Thresholds; each one set becomes a PASS/FAIL check. 'failed' = errors + degraded + rejected."""

    max_failed: int | None = Field(None, ge=0)
    max_failed_fraction: float | None = Field(None, ge=0, le=1)
    max_errors: int | None = Field(None, ge=0, description="HTTP errors other than 503, transport, timeouts")
    max_during_p99_ratio: float | None = Field(None, gt=0, description="p99 during / p99 before")
    max_recovery_s: float | None = Field(None, ge=0)
    cache_hits_back_s: float | None = Field(None, ge=0, description="first cache hit after the restart")
    max_rejected_p99_ms: float | None = Field(None, gt=0)
    max_admitted_p99_ms: float | None = Field(None, gt=0, description="ok answers while the fault lasts")
    max_latency_ms: float | None = Field(None, gt=0, description="every answer, whatever its outcome: no hang")
    max_rss_growth: float | None = Field(None, gt=0, description="per process, after the warm-up")
    degraded_during: bool = Field(False, description="the answers during the fault are degraded, not errors")
    alive_after: bool = Field(True, description="the service's process alive and /readyz 200 after the run")
    data_kept: bool = Field(False, description="the feature store's keys are there after the restart")


class Scenario(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    description: str = ""
    service: ServiceSpec
    payload: PayloadSpec = Field(default_factory=PayloadSpec)
    load: LoadSpec
    fault: Fault
    redis: RedisSpec = Field(default_factory=RedisSpec)
    capacity: CapacitySpec = Field(default_factory=CapacitySpec)
    recovery: RecoverySpec = Field(default_factory=RecoverySpec)
    acceptance: Acceptance = Field(default_factory=Acceptance)
    rss_every_s: float = Field(2.0, gt=0, description="RSS of every service process, sampled this often")
    warmup_s: float = Field(2.0, ge=0, description="one-at-a-time requests before the load")

    @model_validator(mode="after")
    def _fits(self) -> Scenario:
        fault, load = self.fault, self.load
        end = fault.at_s + {"redis_kill": getattr(fault, "restart_after_s", 0.0),
                            "redis_pause": getattr(fault, "resume_after_s", 0.0),
                            "overload": getattr(fault, "duration_s", 0.0)}.get(fault.kind, 0.0)
        if end >= load.duration_s:
            raise ValueError(f"fault: ends at {end:g} s, not before the load's end ({load.duration_s:g} s)")
        if fault.kind == "replica_kill" and self.service.server != "ray":
            raise ValueError("fault.kind replica_kill: needs service.server 'ray'")
        if fault.kind in ("redis_kill", "redis_pause") and not (self.service.cache
                                                             or self.service.encoding == "feature-store"):
            raise ValueError(f"fault.kind {fault.kind}: the service uses no Redis (cache off, not feature-store)")
        if fault.kind == "overload" and load.capacity_fraction is None:
            raise ValueError("fault.kind overload: set load.capacity_fraction (the base load, of the capacity)")
        if self.acceptance.data_kept and self.service.encoding != "feature-store":
            raise ValueError("acceptance.data_kept: only for a feature-store scenario")
        return self

    @property
    def needs_capacity(self) -> bool:
        return self.load.capacity_fraction is not None


class Profile(_Strict):
    """A whole scenario file."""

    name: str
    description: str = ""
    seed: int = 0
    start_timeout_s: float = Field(240.0, gt=0)
    stop_timeout_s: float = Field(30.0, gt=0)
    scenarios: list[Scenario] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> Profile:
        names = [s.name for s in self.scenarios]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"scenarios: duplicate names {duplicates}")
        return self


class FaultFileError(ValueError):
    """A scenario file that cannot be used; the message names the file and the field."""


def load_profile(path: Path | str) -> Profile:
    return load_yaml_model(path, Profile, FaultFileError, "fault file")
