"""Admission control: past a bound, `POST /rank` gets a fast 503 with `Retry-After` instead of a queue.

Why: an overloaded server that admits everything queues every request until it passes the deadline,
so every answer is late (or degraded) and the backlog outlives the overload. Refusing the excess at
once keeps the admitted requests within the SLO and tells clients when to come back.

Two bounds, checked per process (a plain-uvicorn server, or one Ray replica) before the request is
routed, so a refusal costs a few tens of microseconds:

- **queue delay**: how long this request already waited on the event loop before its handler ran.
  A short list is scored on the loop itself (serve/ranking.py), so under overload the requests read
  in one pass of the loop run one after another and the last ones wait for all the others: that
  wait is the queue. It is measured as the time since the first request of the current pass
  started (a `call_soon` marker ends the pass: it runs after every callback already queued), which
  needs no hook into the server and works on any asyncio loop. The bound adapts, as in Facebook's
  CoDel-style admission ("Fail at scale", ACM Queue 2015): while the loop keeps catching up (within
  the last `admission_interval_ms` a pass held one request or was shorter than `admission_queue_ms`,
  or the loop went idle between passes), a burst may
  queue up to `admission_interval_ms`; once it has not caught up for that long, the queue is
  standing (overload) and the bound drops to `admission_queue_ms`. Passes then stay short, so the
  refused requests are answered within a few milliseconds and the admitted ones keep their latency.
- **in flight** (`max_inflight`): requests admitted and not yet answered. Long lists wait for the
  inference threads (or split's ranker deployment) off the loop, where the loop sees no delay; the
  count bounds that queue.

Ray Serve's own bounds (`max_ongoing_requests`, `max_queued_requests`, serve/app.py) apply before a
request reaches a replica; these apply inside it. Refusals count in `rankserve_rejected{reason}` and
in `rankserve_requests{status="503"}`. Hand-written rather than a library: Starlette and uvicorn
offer only a connection-count limit (uvicorn's `limit_concurrency` also counts idle keep-alive
connections, and answers without Retry-After or metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

RETRY_AFTER_S = 1
# A pass that starts this long after the previous one ended found the loop idle: the queue was empty.
# Under a standing queue the next pass starts soon after the last one's end (reading sockets between).
IDLE_GAP_S = 0.005
ADMITTED_PATHS = ("/rank",)  # what admission guards; health, metrics and admin always answer

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds (ServiceConfig's admission fields); None turns a bound off."""

    queue_ms: float | None = None  # the queue-delay bound under a standing queue
    interval_ms: float = 100.0  # how long the loop may go without catching up, and a burst's bound
    max_inflight: int | None = None


class Overloaded(Exception):
    """A stage behind this process refused the request (split's ranker deployment at its
    `max_queued_requests`): answered like an admission refusal, 503 with Retry-After."""


class AdmissionControl:
    """Pure ASGI middleware (no Starlette request objects: a refusal must stay cheap).

    `limits()` returns the `AdmissionLimits`; it is read at the first request, because a Ray
    replica's settings exist only once the replica is up. `on_reject(reason)` counts a refusal in
    the service's metrics.
    """

    def __init__(self, app: Any, *, limits: Callable[[], AdmissionLimits], on_reject: Callable[[str], None]) -> None:
        self.app = app
        self._limits = limits
        self._on_reject = on_reject
        self._queue_s: float | None = None
        self._interval_s = 0.0
        self._max_inflight: int | None = None
        self._configured = False
        self.inflight = 0
        self._pass_start: float | None = None
        self._pass_end = 0.0
        self._pass_requests = 0
        self._caught_up_at = time.perf_counter()

    def _end_pass(self) -> None:
        """The marker: a pass with one request (nobody waited) or a short one means the loop caught up."""
        now = time.perf_counter()
        if self._pass_start is not None and self._queue_s is not None and (
                self._pass_requests == 1 or now - self._pass_start < self._queue_s):
            self._caught_up_at = now
        self._pass_start = None
        self._pass_end = now

    def overloaded(self, now: float) -> bool:
        """The loop has not caught up for a whole interval: a standing queue, not a burst."""
        return now - self._caught_up_at > self._interval_s

    def queue_delay_s(self, now: float) -> float:
        """How long the current pass of the event loop has run before this request: its wait."""
        if self._pass_start is None:
            if now - self._pass_end > IDLE_GAP_S:  # the loop was idle since the last pass: no queue stood
                self._caught_up_at = now
            self._pass_start = now
            self._pass_requests = 1
            asyncio.get_running_loop().call_soon(self._end_pass)
            return 0.0
        self._pass_requests += 1
        return now - self._pass_start

    def refusal(self, now: float) -> str | None:
        """Why this request is refused now ("queue", "inflight"), or None to admit it."""
        if not self._configured:
            limits = self._limits()
            self._queue_s = None if limits.queue_ms is None else limits.queue_ms / 1000
            self._interval_s = limits.interval_ms / 1000
            self._max_inflight = limits.max_inflight
            self._configured = True
            self._caught_up_at = now
        if self._queue_s is None and self._max_inflight is None:
            return None
        waited = self.queue_delay_s(now)
        if self._queue_s is not None and waited > (self._queue_s if self.overloaded(now) else self._interval_s):
            return "queue"
        if self._max_inflight is not None and self.inflight >= self._max_inflight:
            return "inflight"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(ADMITTED_PATHS):
            await self.app(scope, receive, send)
            return
        reason = self.refusal(time.perf_counter())
        if reason is not None:
            self._on_reject(reason)
            await send_overloaded(send, reason)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


RULES = {
    "queue": "the server's queue is past its bound (admission_queue_ms, admission_interval_ms): retry after "
             "Retry-After seconds",
    "inflight": "the server is at its in-flight bound (max_inflight): retry after Retry-After seconds",
    "ranker_queue": "the ranker deployment's queue is full (max_queued_requests): retry after Retry-After seconds",
}


async def send_overloaded(send: Send, reason: str) -> None:
    """503 with Retry-After and the project's error shape (field and rule). The request body is not
    read: the connection stays usable, since the server discards an unread body."""
    body = orjson.dumps({"detail": f"overloaded: {RULES[reason]}", "field": "load", "rule": RULES[reason]})
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"retry-after", str(RETRY_AFTER_S).encode())]})
    await send({"type": "http.response.body", "body": body})


def add_admission_options(p: argparse.ArgumentParser, *, ray: bool = False) -> None:
    """The admission flags of serve/run.py and serve/uvicorn_server.py (ServiceConfig fields)."""
    from serve.config import ServiceConfig

    defaults = ServiceConfig()
    p.add_argument("--admission", action=argparse.BooleanOptionalAction, default=defaults.admission,
                   help="admission control on /rank: a fast 503 with Retry-After past the bounds below")
    p.add_argument("--admission-queue-ms", type=float, default=defaults.admission_queue_ms,
                   help="under a standing queue, refuse a request that already waited this long on the event loop")
    p.add_argument("--admission-interval-ms", type=float, default=defaults.admission_interval_ms,
                   help="a queue that has not drained for this long is standing (overload); a burst may queue "
                        "this long")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="requests in flight per process / replica (default: 64 per inference thread)")
    if ray:
        p.add_argument("--max-queued-requests", type=int, default=None,
                       help="requests Ray queues for the replicas before answering 503 "
                            "(default: the replicas' max_ongoing_requests in all)")
