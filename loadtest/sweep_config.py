"""The sweep file (loadtest/sweeps/*.yaml): pydantic models, so that a typo is an error naming the field.

Why the service spec extends `serve.config.ServiceConfig`: every option a sweep varies (variant,
batching and its limits, cache, replicas, threads, ingress, port ...) is already declared, typed and
bounded there, and serve/run.py's flags are its field names. A sweep entry's `service:` stays one flat
mapping: ServiceConfig's fields plus the sweep's own (`server`, `encoding`, `device`). Each server
kind (loadtest.services) takes only some of the fields and runs with its own values for a few (the
baseline server never batches); a field the kind does not take is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from loadtest.services import SERVICES, ServerKind
from serve.config import ServiceConfig

M = TypeVar("M", bound=BaseModel)

SWEEPS_DIR = Path(__file__).resolve().parent / "sweeps"

# The names of export.variants.VARIANTS (not imported: it loads torch and onnx); tests keep them equal.
VARIANT_NAMES = ("torch-eager", "onnx-fp32", "onnx-fp32-opt", "onnx-int8-dynamic", "onnx-int8-static", "onnx-fp16",
                 "torch-bf16")
Encoding = Literal["json", "compact", "msgpack", "feature-store"]
Scenario = Literal["steady", "ramp", "spike", "cache-mix", "list-mix"]
SWEEP_ONLY_FIELDS = ("server", "encoding", "device")
GPU_REFUSED = ("GPU serving entries are not supported by serve/ yet: none of serve/run.py, serve/baseline.py "
               "and serve/uvicorn_server.py accepts an execution-provider option, so a GPU entry could only "
               "measure the CPU under a GPU label")


class ServiceSpec(ServiceConfig):
    """One service configuration: ServiceConfig's fields, the server kind, the request encoding."""

    # baseline: serve/baseline.py as a team writes it first; uvicorn: serve/uvicorn_server.py, the Ray
    # deployment's FastAPI app on plain uvicorn, to isolate Ray's cost; ray: serve/run.py.
    server: ServerKind = "ray"
    encoding: Encoding = "json"  # of the payloads sent to it (loadtest.payloads)
    device: Literal["cpu", "gpu"] = "cpu"

    @model_validator(mode="before")
    @classmethod
    def _kind_defaults(cls, data: Any) -> Any:
        """Fill in the server kind's own values; `null` means the default (older run folders have it)."""
        if not isinstance(data, dict):
            return data
        kind = SERVICES.get(data.get("server", "ray"))
        fields = ServiceConfig.model_fields
        given = {name: value for name, value in data.items()
                 if not (value is None and name in fields and fields[name].default is not None)}
        return {**kind.defaults, **given} if kind is not None else given

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, variant: str) -> str:
        if variant not in VARIANT_NAMES:
            raise ValueError(f"{variant!r} is not a variant (known: {', '.join(VARIANT_NAMES)})")
        return variant

    @field_validator("device")
    @classmethod
    def _no_gpu(cls, device: str) -> str:
        if device == "gpu":
            raise ValueError(GPU_REFUSED)
        return device

    @model_validator(mode="after")
    def _only_the_kinds_options(self) -> ServiceSpec:
        kind = SERVICES[self.server]
        wrong = sorted(name for name in ServiceConfig.model_fields
                       if name not in kind.options and getattr(self, name) != kind.default_of(name))
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not for server {self.server!r}")
        return self

    @model_serializer(mode="wrap")
    def _kind_fields_only(self, handler: Any) -> dict[str, Any]:
        """The sweep's fields, then the ones this kind takes or sets: what reloads to the same spec."""
        data = handler(self)
        kind = SERVICES[self.server]
        shown = [*SWEEP_ONLY_FIELDS, *(n for n in ServiceConfig.model_fields if n in kind.options or n in kind.defaults)]
        return {name: data[name] for name in shown}


class Entry(BaseModel):
    """One optimization: a service configuration and the scenarios to run against it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
    description: str = ""
    base: str | None = None  # the earlier entry this one adds an optimization to (the ladder)
    group: Literal["ladder", "isolated"] = "ladder"
    service: ServiceSpec = Field(default_factory=ServiceSpec)
    scenarios: list[Scenario] = Field(default_factory=lambda: ["steady"], min_length=1)
    list_sizes: list[int] | None = None  # default: the sweep's
    slo_search: bool = False  # run max_throughput_under_slo at the sweep's slo.list_sizes


class SloSpec(BaseModel):
    """The objective for the maximum-throughput search (loadtest.runner.max_throughput_under_slo).

    `min_duration_s`, `min_queries` and `confidence` default to the profile's (runner.SLO_PROFILES);
    `min_queries` must be enough for a p99 at `confidence` (MLPerf's early-stopping rule).
    """

    model_config = ConfigDict(extra="forbid")

    p99_ms: float = Field(50.0, gt=0)
    list_sizes: list[int] = Field(default_factory=lambda: [100], min_length=1)
    profile: Literal["quick", "full"] = "full"
    min_duration_s: float | None = Field(None, gt=0, description="a step lasts at least this long")
    min_queries: int | None = Field(None, ge=1, description="a step has at least this many arrivals")
    confidence: float | None = Field(None, gt=0, lt=1, description="of a step's p99, by early stopping")
    # The search starts at this fraction of the entry's closed-loop requests/s at that list size
    # (a good first guess, so few steps are needed), doubles until the objective fails, then bisects.
    start_fraction: float = Field(0.5, gt=0)
    tolerance: float = Field(0.05, gt=0, lt=1)
    max_steps: int = Field(12, ge=1)
    time_budget_s: float = Field(600.0, gt=0)

    def resolved(self) -> dict[str, float]:
        """min_duration_s, min_queries and confidence, the profile's where not set here."""
        from loadtest.runner import SLO_PROFILES

        profile = SLO_PROFILES[self.profile]
        return {
            "min_duration_s": self.min_duration_s if self.min_duration_s is not None else profile["min_duration_s"],
            "min_queries": self.min_queries if self.min_queries is not None else int(profile["min_queries"]),
            "confidence": self.confidence if self.confidence is not None else profile["confidence"],
        }

    @model_validator(mode="after")
    def _enough_queries_for_a_p99(self) -> SloSpec:
        from loadtest.records import samples_for

        values = self.resolved()
        needed = samples_for(values["confidence"])
        if values["min_queries"] < needed:
            raise ValueError(
                f"min_queries: {values['min_queries']} arrivals per step cannot show a p99 at "
                f"{values['confidence']:.0%} confidence (MLPerf's early-stopping rule needs {needed} with no miss)"
            )
        return self


class Sweep(BaseModel):
    """A whole sweep file (loadtest/sweeps/*.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    trials: int = Field(3, ge=1)
    trial_duration_s: float = Field(4.0, gt=0)
    warmup_s: float = Field(2.0, ge=0)
    users: int = Field(8, ge=1)
    # The per-request cost: `probe_trials` more closed-loop trials at `probe_users` users (1: one
    # connection, one request at a time) per entry and list size; the report's "p50 @1 conn" column.
    probe_users: int = Field(1, ge=1)
    probe_trials: int = Field(1, ge=0)
    zipf_s: float = Field(1.1, gt=0)
    list_sizes: list[int] = Field(default_factory=lambda: [100, 1000], min_length=1)
    n_queries: int = Field(64, ge=1)
    seed: int = 0
    start_timeout_s: float = Field(180.0, gt=0)
    stop_timeout_s: float = Field(30.0, gt=0)
    baseline: str | None = None  # the entry speedups are relative to; default: the first baseline server
    slo: SloSpec = Field(default_factory=SloSpec)
    entries: list[Entry] = Field(min_length=1)

    @field_validator("list_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int]) -> list[int]:
        if any(n < 1 for n in sizes):
            raise ValueError("list sizes must be >= 1")
        return sizes

    @model_validator(mode="before")
    @classmethod
    def _resolve_bases(cls, data: Any) -> Any:
        """An entry with `base: NAME` starts from that earlier entry's service and overrides fields."""
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            return data
        services: dict[str, dict] = {}
        resolved = []
        for index, raw in enumerate(data["entries"]):
            if not isinstance(raw, dict):
                resolved.append(raw)
                continue
            raw = dict(raw)
            own = raw.get("service") or {}
            if not isinstance(own, dict):
                resolved.append(raw)
                continue
            base = raw.get("base")
            if base is not None:
                if base not in services:
                    raise ValueError(f"entries[{index}].base: {base!r} is not an earlier entry's name")
                own = {**services[base], **own}
            raw["service"] = own
            services[str(raw.get("name"))] = own
            resolved.append(raw)
        return {**data, "entries": resolved}

    @model_validator(mode="after")
    def _check_names(self) -> Sweep:
        names = [e.name for e in self.entries]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"entries: duplicate names {duplicates}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline: {self.baseline!r} is not an entry name")
        return self

    def baseline_entry(self) -> str | None:
        if self.baseline:
            return self.baseline
        return next((e.name for e in self.entries if e.service.server == "baseline"), None)

    def sizes_of(self, entry: Entry) -> list[int]:
        return entry.list_sizes or self.list_sizes


class SweepFileError(ValueError):
    """A sweep file that cannot be used; the message names the file and the field."""


def load_yaml_model(path: Path | str, model: type[M], error: type[ValueError], what: str) -> M:
    """Read a YAML file into `model`; `error` names the file and every invalid field (sweep and
    fault files alike)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as problem:
        raise error(f"{path}: not valid YAML: {problem}") from problem
    try:
        return model.model_validate(data)
    except ValidationError as invalid:
        lines = []
        for problem in invalid.errors():
            where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
            lines.append(f"  {where}: {problem['msg']}")
        raise error(f"{path}: invalid {what}\n" + "\n".join(lines)) from invalid


def load_sweep(path: Path | str) -> Sweep:
    """Read and validate a sweep YAML file."""
    return load_yaml_model(path, Sweep, SweepFileError, "sweep file")
