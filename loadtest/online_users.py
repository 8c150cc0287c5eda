"""Simulated users who search, look at the result page and click: the online experiments' traffic.

Why in loadtest/: like the load generators, this drives the running service over HTTP with prepared
bodies; what it adds is what a user does with the answer. A user (a stable id, sent as the
`X-Rankserve-User` header, so the service's A/B split keeps them in one arm) issues a query of the
test split, the service ranks its documents, and the user clicks on the first page by a click model
(loadtest/click_models.py) driven by the documents' true grades. Every impression is logged with
its arm, the page shown, the teams of an interleaved page and the clicks: the log is what the
experiment's statistics (loadtest/online_stats.py) and retraining read.

    queries = TestQueries.from_split(load_dataset("synthetic").test)
    with httpx.Client(base_url=url) as client:
        log = simulate(client, queries, ClickModel("cascade"), impressions=2000, users=500, seed=0)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson

from loadtest.click_models import ClickModel
from models.data import LTRSplit
from serve.encoding import encode_msgpack
from serve.experiment import USER_HEADER
from serve.interleaving import credit


@dataclass(frozen=True)
class TestQuery:
    """One query of the test split as a request body, with each document's true grade."""

    index: int
    body: bytes  # msgpack: query id, document ids d0..dN, float32 features
    grades: dict[str, float]


@dataclass
class TestQueries:
    queries: list[TestQuery]

    @classmethod
    def from_split(cls, split: LTRSplit, max_docs: int | None = None,
                   transform: Callable[[np.ndarray], np.ndarray] | None = None) -> TestQueries:
        """Every query of `split` (its first `max_docs` documents); `transform` changes the features
        sent (the drift scenario's shift), never the grades."""
        out = []
        for i in range(split.n_queries):
            X, y = split.query(i)
            if max_docs:
                X, y = X[:max_docs], y[:max_docs]
            if transform is not None:
                X = transform(X.copy())
            ids = [f"d{j}" for j in range(len(y))]
            out.append(TestQuery(i, encode_msgpack(f"q{i}", ids, X), dict(zip(ids, y.tolist(), strict=True))))
        return cls(out)


@dataclass
class Impression:
    """One result page a user saw, and what they clicked (positions on the page, 0-based)."""

    user: str
    query: int
    arm: str | None
    shown: list[str]
    grades: list[float]
    clicks: list[int]
    teams: list[str] | None = None  # interleaved pages: the team ("a" or "b") that placed each result
    arms: dict[str, str] | None = None  # interleaved pages: which arm is team a and which team b
    degraded: bool = False
    status: int = 200

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class ImpressionLog:
    impressions: list[Impression] = field(default_factory=list)
    failures: int = 0  # errors and degraded answers: counted, never clicked on

    def save(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(i.to_json() + "\n" for i in self.impressions))
        return path

    @classmethod
    def load(cls, path: Path) -> ImpressionLog:
        rows = [Impression(**json.loads(line)) for line in path.read_text().splitlines() if line]
        return cls(rows, sum(1 for r in rows if r.status != 200 or r.degraded))

    def __iter__(self) -> Iterator[Impression]:
        return iter(self.impressions)

    def interleaving_outcomes(self) -> np.ndarray:
        """Per answered interleaved impression: +1 team b won its clicks, -1 team a, 0 a tie
        (serve/interleaving.py's credit)."""
        winners = (credit(i.teams, i.clicks).winner for i in self if i.teams is not None and i.status == 200
                   and not i.degraded)
        return np.array([{"a": -1, "b": 1, "tie": 0}[w] for w in winners], dtype=int)


class SimulatedUser:
    """A user: searches for a query and clicks on the page by the click model."""

    def __init__(self, user_id: str, click_model: ClickModel, rng: np.random.Generator) -> None:
        self.user_id, self.click_model, self.rng = user_id, click_model, rng

    def search(self, client: httpx.Client, query: TestQuery) -> Impression:
        resp = client.post("/rank", content=query.body,
                           headers={"content-type": "application/msgpack", USER_HEADER: self.user_id})
        if resp.status_code != 200:
            return Impression(self.user_id, query.index, None, [], [], [], status=resp.status_code)
        answer = orjson.loads(resp.content)
        page = answer["results"][: self.click_model.depth]
        shown = [r["id"] for r in page]
        grades = [query.grades[d] for d in shown]
        interleaved = answer.get("interleaving")
        if answer["degraded"]:
            return Impression(self.user_id, query.index, answer.get("arm"), shown, grades, [], degraded=True)
        return Impression(self.user_id, query.index, answer.get("arm"), shown, grades,
                          self.click_model.clicks(grades, self.rng),
                          teams=[r["team"] for r in page] if interleaved else None, arms=interleaved)


def simulate(client: httpx.Client, queries: TestQueries, click_model: ClickModel, *, impressions: int,
             users: int, seed: int = 0) -> ImpressionLog:
    """`impressions` searches by `users` users (each search: a uniformly drawn user and query)."""
    rng = np.random.default_rng(seed)
    people = [SimulatedUser(f"user-{seed}-{i}", click_model, rng) for i in range(users)]
    log = ImpressionLog()
    for _ in range(impressions):
        user = people[int(rng.integers(users))]
        impression = user.search(client, queries.queries[int(rng.integers(len(queries.queries)))])
        log.impressions.append(impression)
        log.failures += impression.status != 200 or impression.degraded
    return log
