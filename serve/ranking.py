"""The ranking core shared by every server: the Ray Serve app (both topologies), plain uvicorn, the baseline.

One request goes: read the body under a size limit -> cache lookup on the body's own bytes (a hit
answers here, unparsed: serve/cache_keys.py says why that is sound) -> parse (serve/encoding.py) ->
validate against the model -> (feature store) -> score under a deadline -> sort best first -> cache
store. Every server calls `RankingCore.handle` with its own `ScoringBackend` (a scorer in the same
process: `LocalBackend` on uvicorn, the colocated replica itself on Ray; or a handle to split's
batched ranker deployment), so validation, error messages, fallback and timings are the same code.

Fallback (documented in docs/serving.md): if scoring raises, passes `deadline_ms`, or feature-store
mode cannot read features because Redis is down, the answer is still 200 with the documents in the
request's own order, every score null, and `degraded: true`; `rankserve_degraded` counts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from starlette.requests import ClientDisconnect, Request

from serve.admission import RULES, Overloaded
from serve.cache_keys import rank_key
from serve.encoding import JSON_TYPES, MSGPACK_TYPES, ParsedRequest, ParseMode, media_type, parse_body
from serve.experiment import USER_HEADER, RunningExperiment, assign
from serve.interleaving import seeded_coin, team_draft
from serve.metrics import STAGES, ServiceMetrics
from serve.schemas import RequestError
from serve.scoring import ScoreOutcome, ScoringBackend

logger = logging.getLogger(__name__)


def validate_request(req: ParsedRequest, n_features: int, max_docs: int) -> None:
    """The rules a parsed request must meet; RequestError(422) names the field and the rule."""
    n = req.n_docs
    if n == 0:
        raise RequestError(422, req.docs_field, "must hold at least one document")
    if n > max_docs:
        raise RequestError(422, req.docs_field, f"at most {max_docs} documents per request (got {n})")
    if len(set(req.doc_ids)) != n:
        seen: dict[Any, int] = {}
        for i, doc_id in enumerate(req.doc_ids):
            if doc_id in seen:
                raise RequestError(
                    422, req.id_field(i), f"duplicate document id {doc_id!r} (also at position {seen[doc_id]})"
                )
            seen[doc_id] = i
    if req.features is None:
        return
    rows, width = req.features.shape
    if rows != n:
        raise RequestError(422, "features", f"expected one row per document id ({n}), got {rows} rows")
    if width != n_features:
        where = "n_features" if req.encoding == "msgpack" else req.features_field(0)
        raise RequestError(422, where, f"expected {n_features} features per document, got {width}")


def ranked_results(doc_ids: Sequence[Any], scores: np.ndarray) -> list[dict[str, Any]]:
    """Documents best first; ties keep the request's order (a stable sort)."""
    order = np.argsort(-scores, kind="stable")
    values = scores.tolist()
    return [{"id": doc_ids[i], "score": values[i]} for i in order.tolist()]


def fallback_results(doc_ids: Sequence[Any]) -> list[dict[str, Any]]:
    """The degraded answer: the request's own order, no scores."""
    return [{"id": doc_id, "score": None} for doc_id in doc_ids]


def cached_value(query_id: str | int, encoding: str, results: bytes) -> bytes:
    """What the cache stores for a /rank answer: a header line (the query id, which a hit cannot parse
    from the body, and the body's encoding, for metrics), then the results' JSON, spliced as is."""
    return orjson.dumps([query_id, encoding]) + b"\n" + results


def rank_answer(query_id: Any, model: dict[str, str], results: Any, timings: dict[str, float], start: float, *,
            cached: bool = False, degraded: bool = False) -> dict[str, Any]:
    """A /rank answer; `results` a list, or ready JSON bytes (orjson.Fragment) scored now or cached."""
    timings["total"] = (time.perf_counter() - start) * 1000
    return {"query_id": query_id, "model": model, "results": results, "cached": cached, "degraded": degraded,
            "timings_ms": timings}


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The raw body, refusing (413) anything over max_bytes: by Content-Length before reading,
    and by the bytes actually read (a missing or lying Content-Length)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise RequestError(400, "Content-Length", f"not an integer: {declared!r}") from None
        if size > max_bytes:
            raise RequestError(413, "body", f"{size} bytes is over the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise RequestError(413, "body", f"more than the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "body", "client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def read_request_body(request: Request, max_bytes: int) -> bytes:
    """A /rank or /search body: its media type checked (415), then read whole within `max_bytes` (413)."""
    check_content_type(request.headers.get("content-type"))
    return await read_body(request, max_bytes)


def check_content_type(content_type: str | None) -> None:
    media = media_type(content_type)
    if media in MSGPACK_TYPES or media in JSON_TYPES or media.endswith("+json"):
        return
    raise RequestError(
        415, "Content-Type", f"unsupported media type {media!r}; use application/json or application/msgpack"
    )


@dataclass
class RankingCore:
    """The /rank request path, independent of the server around it."""

    backend: ScoringBackend
    metrics: ServiceMetrics
    cache: Any = None  # serve.cache.AsyncResultCache, or None when the cache is off
    feature_store: Any = None  # serve.feature_store.AsyncFeatureStore, or None
    feature_dataset: str = "synthetic"
    max_docs: int = 5000
    max_body_bytes: int = 64 * 1024 * 1024
    deadline_ms: float = 1000.0
    parse_mode: ParseMode = "fast"
    experiment: RunningExperiment | None = None  # an A/B split or interleaving in force (serve/experiment.py)
    drift: Any = None  # serve.drift.DriftMonitor: samples the rows scored here, or None
    _pending: set[asyncio.Task[Any]] = field(default_factory=set)

    async def handle_request(self, request: Request) -> tuple[int, dict[str, Any]]:
        """Read and answer one HTTP request: (status, response or error dict)."""
        start = time.perf_counter()
        try:
            body = await read_request_body(request, self.max_body_bytes)
        except RequestError as exc:
            self.metrics.observe_request(exc.status, "unknown", None)
            return exc.status, exc.to_dict()
        return await self.handle(body, request.headers.get("content-type"), start=start,
                                 read_ms=(time.perf_counter() - start) * 1000, user=request.headers.get(USER_HEADER))

    async def handle(self, body: bytes, content_type: str | None, *, start: float | None = None,
                     read_ms: float = 0.0, user: str | None = None) -> tuple[int, dict[str, Any]]:
        """Answer one request body: (status, response or error dict). `read_ms`: the time spent
        receiving the body (a 1000-document msgpack body is 544 KB), reported as its own stage.
        `user`: the X-Rankserve-User header, which assigns the request to an experiment's arm."""
        start = time.perf_counter() if start is None else start
        timings = dict.fromkeys(STAGES, 0.0)
        timings["read"] = read_ms
        experiment = self.experiment
        if experiment is None:
            return await self._answer_with(self.backend, body, content_type, timings, start)
        return await self._answer_experiment(experiment, body, content_type, user, timings, start)

    async def _answer_with(self, backend: ScoringBackend, body: bytes, content_type: str | None,
                      timings: dict[str, float], start: float,
                      parsed: ParsedRequest | None = None) -> tuple[int, dict[str, Any]]:
        """The answer of `backend`'s model: from the cache, looked up on the body's bytes before
        parsing (after, when the caller had to parse first: `parsed`), or scored now."""
        try:
            info = await backend.model_info()
        except Exception as exc:  # the ranker is not up (yet): the server's state, not the client's mistake
            logger.warning("model info unavailable: %s", exc)
            self.metrics.observe_request(503, "unknown", None)
            return 503, {"detail": "model: not loaded yet, retry later", "field": "model", "rule": "must be loaded"}
        model = {k: info[k] for k in ("name", "variant", "version")}
        encoding = parsed.encoding if parsed is not None else "unknown"
        key: str | None = None
        try:
            if self.cache is not None:  # before parsing: a hit is answered from the body's bytes alone
                key, hit = await self._cache_lookup(body, content_type, model, timings)
                if hit is not None:
                    self.metrics.observe_cache("hit")
                    header, results = hit.split(b"\n", 1)
                    query_id, encoding = orjson.loads(header)
                    response = rank_answer(query_id, model, orjson.Fragment(results), timings, start, cached=True)
                    self.metrics.observe_request(200, encoding, timings)
                    return 200, response
            if parsed is None:
                parsed = self._parse(body, content_type, info["n_features"], timings)
            encoding = parsed.encoding
            status, response = await self._rank(backend, parsed, model, info["n_features"], key, timings, start)
        except RequestError as exc:
            self.metrics.observe_request(exc.status, encoding, None)
            return exc.status, exc.to_dict()
        self.metrics.observe_request(status, encoding, response["timings_ms"])
        return status, response

    def _parse(self, body: bytes, content_type: str | None, n_features: int,
               timings: dict[str, float]) -> ParsedRequest:
        """Parse and validate (RequestError: 4xx naming the field), timed as the `parse` stage."""
        t = time.perf_counter()
        parsed = parse_body(body, content_type, mode=self.parse_mode, n_features=n_features)
        validate_request(parsed, n_features, self.max_docs)
        timings["parse"] = (time.perf_counter() - t) * 1000
        return parsed

    async def _answer_experiment(self, experiment: RunningExperiment, body: bytes, content_type: str | None,
                                 user: str | None, timings: dict[str, float],
                                 start: float) -> tuple[int, dict[str, Any]]:
        """An experiment's answer: the arm of the user (or, without the header, of the query id,
        which needs the body parsed first), or the interleaving of the two arms; it names its arm."""
        parsed = None
        if user is None or experiment.config.mode == "interleave":
            try:
                parsed = self._parse(body, content_type, experiment.n_features, timings)
            except RequestError as exc:
                self.metrics.observe_request(exc.status, "unknown", None)
                return exc.status, exc.to_dict()
        unit = user if user is not None else parsed.query_id  # type: ignore[union-attr]
        if experiment.config.mode == "interleave":
            assert parsed is not None
            label = "interleaved"
            status, response = await self._interleave(experiment, parsed, unit, timings, start)
        else:
            label = assign(unit, experiment.config).name
            status, response = await self._answer_with(experiment.backends[label], body, content_type, timings, start,
                                                  parsed)
        if status == 200:
            response["arm"] = label
        self.metrics.observe_arm(label, status, timings["total"] if status == 200 else None)
        return status, response

    async def _interleave(self, experiment: RunningExperiment, req: ParsedRequest, unit: str | int,
                          timings: dict[str, float], start: float) -> tuple[int, dict[str, Any]]:
        """Both arms score the list; the answer is their team-draft interleaving, each result with the
        team ("a": the first arm, "b": the second) that placed it. Never cached."""
        arm_a, arm_b = experiment.config.arms
        backends = [experiment.backends[arm_a.name], experiment.backends[arm_b.name]]
        infos = [await backend.model_info() for backend in backends]
        model = {k: infos[0][k] for k in ("name", "variant", "version")}
        names = {"a": arm_a.name, "b": arm_b.name}

        def answer(results: Any, *, degraded: bool) -> tuple[int, dict[str, Any]]:
            response = rank_answer(req.query_id, model, results, timings, start, degraded=degraded)
            response["interleaving"] = names
            return 200, response

        try:
            features = await self._features_of(req, experiment.n_features, timings)
            if features is None:
                return answer(fallback_results(req.doc_ids), degraded=True)
            outcomes = []
            for backend in backends:
                outcome = await self._score(backend, req, features)
                if outcome is None:
                    return answer(fallback_results(req.doc_ids), degraded=True)
                outcomes.append(outcome)
                timings["queue"] += outcome.queue_ms
                timings["inference"] += outcome.inference_ms
        except RequestError as exc:
            self.metrics.observe_request(exc.status, req.encoding, None)
            return exc.status, exc.to_dict()
        if self.drift is not None:
            self.drift.observe(features)
        rankings = [ranked_results(req.doc_ids, o.scores) for o in outcomes]
        scores = [{r["id"]: r["score"] for r in ranking} for ranking in rankings]
        merged, teams = team_draft([r["id"] for r in rankings[0]], [r["id"] for r in rankings[1]],
                                   seeded_coin(f"{experiment.config.salt}:{unit}:{req.query_id}"))
        results = [{"id": d, "score": scores[team == "b"][d], "team": team} for d, team in zip(merged, teams,
                                                                                                strict=True)]
        status, response = answer(results, degraded=False)
        self.metrics.observe_request(status, req.encoding, timings)
        return status, response

    async def _features_of(self, req: ParsedRequest, n_features: int,
                           timings: dict[str, float]) -> np.ndarray | None:
        """The request's features: from the body, or (feature-store mode) one MGET; None: degraded
        (the store is down or holds rows of another width), counted."""
        if req.features is not None:
            return req.features
        t = time.perf_counter()
        features = await self._read_features(req)
        timings["features"] = (time.perf_counter() - t) * 1000
        if features is not None and features.shape != (req.n_docs, n_features):
            # The store holds another dataset than the model was trained on: our mistake, not the client's.
            logger.error("feature store rows have shape %s, the model expects %d features: degraded answer",
                         features.shape, n_features)
            features = None
        if features is None:
            self.metrics.observe_degraded("feature_store")
        return features

    async def _score(self, backend: ScoringBackend, req: ParsedRequest, features: np.ndarray) -> ScoreOutcome | None:
        """`backend`'s scores under the deadline; None: degraded (an inference error or the deadline),
        counted. A short list is scored right away (no task, no timer: it takes well under a
        millisecond) and cannot be cut off; one that still overran the deadline is degraded too.
        Overload behind this stage is the client's 503 (RequestError)."""
        try:
            score_inline = getattr(backend, "score_inline", None)
            outcome = score_inline(features) if score_inline is not None else None
            if outcome is None:
                outcome = await asyncio.wait_for(backend.score(features), self.deadline_ms / 1000)
            elif outcome.queue_ms + outcome.inference_ms > self.deadline_ms:
                raise TimeoutError
        except Overloaded as exc:  # a stage behind this one sheds load: the client should retry later
            self.metrics.rejected.labels(str(exc)).inc()
            raise RequestError(503, "load", RULES[str(exc)]) from None
        except (asyncio.TimeoutError, TimeoutError):
            logger.warning("query %r passed the %.0f ms deadline: degraded answer", req.query_id, self.deadline_ms)
            self.metrics.observe_degraded("deadline")
            return None
        except Exception:  # any inference failure: answer the fallback rather than a 500
            logger.exception("inference failed for query %r: degraded answer", req.query_id)
            self.metrics.observe_degraded("error")
            return None
        return outcome

    async def _rank(self, backend: ScoringBackend, req: ParsedRequest, model: dict[str, str], n_features: int,
                    key: str | None, timings: dict[str, float], start: float) -> tuple[int, dict[str, Any]]:
        """Score a parsed, valid request that missed the cache; store a good answer under `key`."""

        def answer(results: Any, *, degraded: bool) -> tuple[int, dict[str, Any]]:
            return 200, rank_answer(req.query_id, model, results, timings, start, degraded=degraded)

        features = await self._features_of(req, n_features, timings)
        if features is None:
            return answer(fallback_results(req.doc_ids), degraded=True)
        outcome = await self._score(backend, req, features)
        if outcome is None:
            return answer(fallback_results(req.doc_ids), degraded=True)
        if self.drift is not None:
            self.drift.observe(features)
        scored_by = outcome.model  # the version that actually scored it (a swap may be under way)
        timings["queue"] = outcome.queue_ms
        timings["inference"] = outcome.inference_ms
        if outcome.batch_first:
            self.metrics.observe_batch(outcome.batch_docs, outcome.batch_requests)
        # Serialized once: the same bytes go into this answer and into the cache, so a hit returns
        # exactly the bytes of the miss that stored it.
        results = orjson.dumps(ranked_results(req.doc_ids, outcome.scores))
        # Stored under the key looked up, unless a swap happened meanwhile (another model scored it:
        # not stored, rather than a second lookup on the request path).
        if self.cache is not None and key is not None and scored_by == model:
            self._background(self.cache.set(key, cached_value(req.query_id, req.encoding, results)))
        model = scored_by
        return answer(orjson.Fragment(results), degraded=False)

    async def _cache_lookup(self, body: bytes, content_type: str | None, model: dict[str, str],
                            timings: dict[str, float]) -> tuple[str | None, bytes | None]:
        """(the key to store this answer under, the cached value or None). With a feature store the
        key holds the store's version, read in the same round trip as the answer. A Redis error or an
        open breaker counts as an error, not a miss."""
        failures_before = _cache_failures(self.cache)
        t = time.perf_counter()
        dataset = self.feature_dataset if self.feature_store is not None else None
        vkey = rank_key(model, media_type(content_type), body, max_docs=self.max_docs, dataset=dataset)
        t_get = time.perf_counter()
        if isinstance(vkey, str):
            key: str | None = vkey
            hit = await self.cache.get(vkey)
        else:
            hit, key = await self.cache.get_versioned(vkey)
        end = time.perf_counter()
        timings["key"] = (t_get - t) * 1000
        timings["cache"] = (end - t_get) * 1000
        if hit is None:
            self.metrics.observe_cache("error" if _cache_failures(self.cache) > failures_before else "miss")
        return key, hit

    async def _read_features(self, req: ParsedRequest) -> np.ndarray | None:
        """Feature-store mode: one MGET. Unknown ids are the client's mistake (422); a Redis that
        does not answer gives None (the caller answers degraded)."""
        from serve.feature_store import FeatureStoreError, FeatureStoreUnavailableError

        if self.feature_store is None:
            raise RequestError(422, "features", "required: this server has no feature store configured")
        try:
            return await self.feature_store.get_features(self.feature_dataset, req.doc_ids)
        except FeatureStoreUnavailableError:
            logger.warning("feature store unavailable: degraded answer for %r", req.query_id)
            return None
        except FeatureStoreError as exc:
            message = str(exc)
            rule = message.split(": ", 1)[1] if message.startswith("doc_ids: ") else message
            raise RequestError(422, "doc_ids", rule) from None

    def _background(self, coro: Any) -> None:
        in_background(self._pending, coro)


def in_background(pending: set[asyncio.Task[Any]], coro: Any) -> None:
    """Cache writes leave the request path; keep a reference in `pending` so the task is not collected."""
    task = asyncio.ensure_future(coro)
    pending.add(task)
    task.add_done_callback(pending.discard)


def _cache_failures(cache: Any) -> int:
    """Failed or skipped (open circuit breaker) Redis calls so far: a miss that was really an error."""
    stats = cache.stats()
    return stats["errors"] + stats["bypassed"]


def dumps(payload: dict[str, Any]) -> bytes:
    """Responses are serialized with orjson (numpy-aware), not the json module."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
