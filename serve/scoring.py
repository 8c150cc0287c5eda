"""Who scores a list: the backend interface every server's ranking core calls, and the in-process one.

`ScoringBackend` is what serve/ranking.py's `RankingCore` needs from a server: the model's identity
and an async score call. `LocalBackend` scores in this process (plain uvicorn, the baseline, and each
arm of an experiment); the Ray app's replicas (serve/app.py) and split's handle are the others.
`score_lists` is the one way every backend turns lists into scores (rows for a pointwise model, a
padded batch with a mask for a listwise one).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool


@dataclass
class ScoreOutcome:
    """What a backend returns for one list: its scores plus where the time went."""

    scores: np.ndarray
    model: dict[str, str]  # name, variant, version of the model that scored it
    queue_ms: float = 0.0
    inference_ms: float = 0.0
    batch_docs: int = 0  # set on one request per batch (batch_first) so batches are counted once
    batch_requests: int = 0
    batch_first: bool = False


class ScoringBackend(Protocol):
    """What RankingCore needs from a server: the model's identity and an async score call."""

    async def model_info(self) -> dict[str, Any]:
        """{"name", "variant", "version", "n_features"} of the model serving now."""
        ...

    async def score(self, features: np.ndarray) -> ScoreOutcome: ...

    # Optional: `score_inline(features) -> ScoreOutcome | None` scores a short list right away, on the
    # event loop (None: not this one, use `score`). RankingCore tries it first: no task, no timer.


def model_of(scorer: Any) -> dict[str, Any]:
    """What a loaded scorer is: {"name", "variant", "version", "n_features", "pointwise"}."""
    return {"name": scorer.model, "variant": scorer.variant, "version": scorer.version,
            "n_features": scorer.n_features, "pointwise": scorer.pointwise}


def model_identity(variant: str, model: str | None = None, manifest_path: str | None = None) -> dict[str, Any]:
    """The identity `load_scorer(variant, model, ...)` would give, read from the manifest only (no model
    loaded): {"name", "variant", "version", "n_features", "pointwise"}. Blocking (reads a file)."""
    from export.runtime import load_manifest

    manifest = load_manifest(model, manifest_path)
    entry = manifest["variants"].get(variant)
    if entry is None:
        raise KeyError(f"variant: {variant!r} is not in the manifest (has {sorted(manifest['variants'])})")
    m = manifest["model"]
    return {"name": m["name"], "variant": variant, "version": f"{m['version']}-{entry['sha256'][:12]}",
            "n_features": m["n_features"], "pointwise": m["pointwise"]}


class LocalBackend:
    """The scorer in this process, called once per request (no batching): plain uvicorn and the baseline.

    A list of at most `inline_max_docs` documents is scored on the event loop (`score_inline`); a
    longer one in Starlette's thread pool (what a FastAPI `def` endpoint does). `scorer` is replaced
    in one assignment by a model swap; a call already running keeps its own.
    """

    def __init__(self, scorer: Any, inline_max_docs: int = 0) -> None:
        self.scorer = scorer
        self.inline_max_docs = inline_max_docs

    async def model_info(self) -> dict[str, Any]:
        return model_of(self.scorer)

    async def probe(self) -> dict[str, Any]:
        """For /readyz: the model that answers now."""
        return model_of(self.scorer)

    def score_inline(self, features: np.ndarray) -> ScoreOutcome | None:
        """A list of at most `inline_max_docs` documents, scored now on the calling (event-loop) thread."""
        if len(features) > self.inline_max_docs:
            return None
        scorer = self.scorer
        return local_outcome(scorer, features, time.perf_counter(), *timed_score(scorer, [features]))

    async def score(self, features: np.ndarray) -> ScoreOutcome:
        outcome = self.score_inline(features)
        if outcome is not None:
            return outcome
        arrival, scorer = time.perf_counter(), self.scorer
        return local_outcome(scorer, features, arrival, *await run_in_threadpool(timed_score, scorer, [features]))


def name_of(scorer: Any) -> dict[str, str]:
    """The model that scored an answer, as every answer names it: {"name", "variant", "version"}."""
    return {"name": scorer.model, "variant": scorer.variant, "version": scorer.version}


def local_outcome(scorer: Any, features: np.ndarray, arrival: float, start: float, end: float,
                  scores: list[np.ndarray]) -> ScoreOutcome:
    """The outcome of one list scored alone (no batch) by `scorer`."""
    return ScoreOutcome(
        scores=scores[0],
        model=name_of(scorer),
        queue_ms=(start - arrival) * 1000,
        inference_ms=(end - start) * 1000,
        batch_docs=len(features),
        batch_requests=1,
        batch_first=True,
    )


def timed_score(scorer: Any, lists: Sequence[np.ndarray]) -> tuple[float, float, list[np.ndarray]]:
    """`score_lists` with its (start, end) perf_counter times: run inline or in an inference thread.

    Why short lists are scored inline (`inline_max_docs`): ONNX Runtime releases the GIL, but the
    thread that ran it must take the GIL back to return, and while the event loop is busy parsing
    other requests it waits for the interpreter's switch interval (5 ms) before the loop yields it.
    On a replica with one core, a loaded one, that wait was most of a 100-document request's
    latency, and the hop itself (a future, two context switches) costs more CPU than it saves:
    the loop cannot run anything else on that core while inference runs anyway.
    """
    start = time.perf_counter()
    scores = score_lists(scorer, lists)
    return start, time.perf_counter(), scores


def score_lists(scorer: Any, lists: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Score several lists in one call: concatenated rows for a pointwise model, a padded
    [B, L, F] batch with a mask for a listwise one. Used by every backend."""
    sizes = [len(x) for x in lists]
    if scorer.pointwise:
        rows = lists[0] if len(lists) == 1 else np.concatenate(lists)
        scores = np.asarray(scorer.score_documents(rows), dtype=np.float32).reshape(-1)
        return np.split(scores, np.cumsum(sizes)[:-1])
    n_features = lists[0].shape[1]
    padded = np.zeros((len(lists), max(sizes), n_features), dtype=np.float32)
    mask = np.zeros((len(lists), max(sizes)), dtype=bool)
    for i, x in enumerate(lists):
        padded[i, : len(x)] = x
        mask[i, : len(x)] = True
    scores = np.asarray(scorer.score_lists(padded, mask), dtype=np.float32)
    return [scores[i, :n] for i, n in enumerate(sizes)]
