"""Online experiments on live traffic: an A/B split between arms, or team-draft interleaving of two.

Why in the service: a new model is tested on the traffic it will serve. Each arm is a (model,
variant) pair the server loads beside the others; a request is assigned by a hash of its user (the
`X-Rankserve-User` header) or, without one, of its query id, so a user stays in one arm for the
whole experiment, and every answer names its arm. In `interleave` mode every request is scored by
the first two arms and answered with their team-draft interleaving (serve/interleaving.py); each
result names the team that placed it, and the client credits clicks from that.

Assignment: XXH3-64 of `<salt>:<unit>` mapped to [0, 1) against the arms' cumulative weights
(`assign`). A new salt reshuffles users between experiments; weights change the split without
moving most users (those below the old and new boundaries stay put).

Usage::

    config = ExperimentConfig(arms=[Arm(name="control", variant="onnx-int8-dynamic"),
                                    Arm(name="attention", model="attention-listmle", variant="onnx-fp32")])
    arm = assign("user-17", config)     # the same Arm for user-17 every time
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

USER_HEADER = "x-rankserve-user"
Mode = Literal["ab", "interleave"]


class Arm(BaseModel):
    """One arm: a model's variant, and its share of the traffic (A/B mode)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="the arm's label in answers and metrics")
    model: str | None = Field(None, description="model name in the manifest; None: the server's model")
    variant: str = Field(min_length=1, description="a variant of that model (artifacts/variants/<model>/manifest.json)")
    weight: float = Field(1.0, gt=0, description="A/B share, relative to the other arms' weights")


class ExperimentConfig(BaseModel):
    """The arms and how traffic meets them."""

    model_config = ConfigDict(extra="forbid")

    arms: list[Arm] = Field(min_length=2, max_length=8)
    mode: Mode = Field("ab", description="ab: each request to one arm by weight; interleave: every request "
                                         "gets the team-draft interleaving of the first two arms")
    salt: str = Field("rankserve", max_length=64, description="assignment salt: a new one reshuffles users")

    @model_validator(mode="after")
    def _distinct_names(self) -> ExperimentConfig:
        names = [arm.name for arm in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"arms: names must be distinct, got {names}")
        if self.mode == "interleave" and len(self.arms) != 2:
            raise ValueError(f"arms: interleave mode takes exactly two arms, got {len(self.arms)}")
        return self


def unit_fraction(unit: str, salt: str) -> float:
    """Where `unit` falls in [0, 1): XXH3-64 of `<salt>:<unit>` over 2**64."""
    return xxhash.xxh3_64_intdigest(f"{salt}:{unit}".encode("utf-8", "surrogatepass")) / 2**64


def assign(unit: str | int, config: ExperimentConfig) -> Arm:
    """The arm of `unit` (a user id, or a query id): deterministic, split by the arms' weights."""
    point = unit_fraction(str(unit), config.salt) * sum(arm.weight for arm in config.arms)
    for arm in config.arms:
        point -= arm.weight
        if point < 0:
            return arm
    return config.arms[-1]  # rounding at the very top


@dataclass(frozen=True)
class RunningExperiment:
    """An experiment in force in one process: its config, one scoring backend per arm (by name), and
    the feature count every arm's model takes (checked equal when it was set)."""

    config: ExperimentConfig
    backends: dict[str, Any]  # serve.scoring.ScoringBackend per arm name
    n_features: int


def load_arms(experiment: ExperimentConfig, *, model: str | None, manifest_path: str | None, threads: int,
              inline_max_docs: int) -> RunningExperiment:
    """A scorer per arm in this process, each behind a LocalBackend (blocking: loads the models).
    `model` is the server's, for arms that name none. RequestError(422, "arms") if the arms' models
    take different feature counts: one body cannot feed them all."""
    from export.runtime import load_scorer
    from serve.schemas import RequestError
    from serve.scoring import LocalBackend

    scorers = {arm.name: load_scorer(arm.variant, arm.model or model, threads=threads, manifest_path=manifest_path)
               for arm in experiment.arms}
    widths = {name: scorer.n_features for name, scorer in scorers.items()}
    if len(set(widths.values())) != 1:
        raise RequestError(422, "arms", f"the arms' models take different feature counts: {widths}")
    return RunningExperiment(experiment, {name: LocalBackend(scorer, inline_max_docs) for name, scorer in scorers.items()},
                             next(iter(widths.values())))
