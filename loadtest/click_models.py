"""Simulated users' clicks: the cascade and position-based click models over graded relevance labels.

Why simulated: there are no real users here, and the standard way to evaluate online methods offline
is to drive them with a click model whose parameters are known (Hofmann, Whiteson and de Rijke,
"Fidelity, soundness, and efficiency of interleaved comparison methods", TOIS 2013; Chuklin,
Markov and de Rijke, "Click Models for Web Search", 2015). The labels are the test split's ground
truth (0-4); a document's attractiveness grows with its grade:

    attractiveness(g) = noise + (1 - noise) * (2**g - 1) / (2**max_grade - 1)

so `noise` is the click probability of an irrelevant document once it is looked at.

- `pbm` (position-based): position i (0-based) is examined with probability (1 / (i + 1)) **
  position_bias, independently; an examined document is clicked with its attractiveness.
- `cascade` (dependent click model): the user reads top-down; a document is clicked with its
  attractiveness, and after a click the user stops with probability stop * attractiveness (a
  satisfying document ends the search more often), else reads on.

Both look at the first `depth` results only (a result page). This module is pure logic; the user
who sends requests and logs impressions is loadtest/online_users.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ClickModelName = Literal["cascade", "pbm"]


@dataclass(frozen=True)
class ClickModel:
    """A click model's parameters; `clicks` simulates one impression."""

    kind: ClickModelName = "cascade"
    noise: float = 0.05
    position_bias: float = 1.0
    stop: float = 0.7
    depth: int = 10
    max_grade: int = 4

    def __post_init__(self) -> None:
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise: must be in [0, 1), got {self.noise}")
        if self.position_bias < 0:
            raise ValueError(f"position_bias: must be >= 0, got {self.position_bias}")
        if not 0 <= self.stop <= 1:
            raise ValueError(f"stop: must be in [0, 1], got {self.stop}")
        if self.depth < 1:
            raise ValueError(f"depth: must be >= 1, got {self.depth}")

    def attractiveness(self, grades: Sequence[float] | np.ndarray) -> np.ndarray:
        g = np.clip(np.asarray(grades, dtype=np.float64), 0, self.max_grade)
        return self.noise + (1 - self.noise) * (2.0**g - 1) / (2.0**self.max_grade - 1)

    def examination(self, n: int) -> np.ndarray:
        """pbm: the probability that each of the first n positions is looked at."""
        return (1.0 / np.arange(1, n + 1)) ** self.position_bias

    def clicks(self, grades: Sequence[float] | np.ndarray, rng: np.random.Generator) -> list[int]:
        """Clicked positions (0-based) of one impression whose documents have these grades, in the
        order shown."""
        attract = self.attractiveness(np.asarray(grades)[: self.depth])
        if self.kind == "pbm":
            examined = rng.random(attract.size) < self.examination(attract.size)
            return np.flatnonzero(examined & (rng.random(attract.size) < attract)).tolist()
        clicked: list[int] = []
        for i, a in enumerate(attract):
            if rng.random() < a:
                clicked.append(i)
                if rng.random() < self.stop * a:
                    break
        return clicked


# name -> (one-line description, the model with its defaults)
CLICK_MODELS: dict[str, tuple[str, Callable[[], ClickModel]]] = {
    "cascade": ("reads top-down, stops after a satisfying click (dependent click model)",
                lambda: ClickModel("cascade")),
    "pbm": ("each position looked at with probability 1/rank, independently (position-based model)",
            lambda: ClickModel("pbm")),
}
