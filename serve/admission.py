"""Admission control: past a bound, `POST /rank` gets a fast 503 with `Retry-After` instead of a queue.

Why: an overloaded server that admits everything queues every request until it passes the deadline,
so every answer is late (or degraded) and the backlog outlives the overload. Refusing the excess at
once keeps the admitted requests within the SLO and tells clients when to come back.

Two bounds, checked per process (a plain-uvicorn server, or one Ray replica) before the request is
routed (plain uvicorn decides earlier still, in its HTTP protocol: serve/http_protocol.py):

- **queue delay**: how long this request may have waited before its handler ran. A short list is
  scored on the event loop itself (serve/ranking.py), so under overload the requests read in one pass
  of the loop run one after another, and the requests that arrived meanwhile wait in the kernel's
  socket buffers until the next pass reads them. A `call_soon` marker ends each pass (it runs after
  every callback already queued), which needs no hook into the server and works on any asyncio loop.
  A request's wait is counted from the start of the previous pass (when the poll that preceded it
  ran, the earliest it can have arrived unread), or from the start of its own pass when the loop sat
  idle in between (off the CPU for `IDLE_GAP_S`: nothing was waiting). Counting only the time inside
  the pass, as this module first did, missed the kernel's queue: passes grew to tens of milliseconds
  while each looked short (results/reliability/, the overload row at e843682).
  The bound adapts, after Facebook's CoDel-style admission ("Fail at scale", ACM Queue 2015): a burst
  may queue up to `admission_interval_ms`; once the queue stands (overload) the bound drops to
  `admission_queue_ms`. Refusals then keep each pass short, so short waits come back while the
  overload lasts: the bound is raised again only when the loop goes idle or no request has waited
  `admission_queue_ms` for a whole interval, not at the first short wait (which made the bound swing
  between the two values every interval and let the queue grow to the burst bound each time).
  Standing, here, is a queue that grows: a request waited `admission_standing_ms` (50 ms), after
  MIN_STANDING_REQUESTS in a row waited `admission_queue_ms`. Facebook's rule (no short wait for an
  interval) also calls a steady closed loop standing: 8 clients sending back to back keep a queue of
  7 ms, well inside the SLO, and were refused into a storm of instant retries (311 ok answers/s where
  the server serves 1,100; plain uvicorn, 2026-11-30). An overload's queue grows without bound and
  passes 50 ms within milliseconds at 3x the capacity.
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
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

RETRY_AFTER_S = 1
# A loop that spent this long off the CPU between two passes sat idle in its poll: the queue was empty.
# Under a standing queue the next pass starts soon after the last one's end (reading sockets between).
IDLE_GAP_S = 0.005
# A queue stands only once this many requests in a row waited admission_queue_ms or more (as well as
# for a whole interval): at a low rate (a Ray replica at 100 requests/s sees 10 in an interval) a
# hiccup of the loop, or a neighbour starting on the same core, made a few requests wait and was
# taken for an overload: 15-205 refusals at half the capacity while a replica was replaced
# (results/reliability/, replica_kill_haproxy).
MIN_STANDING_REQUESTS = 20
ADMITTED_PATHS = ("/rank", "/search")  # what admission guards; health, metrics and admin always answer

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds (ServiceConfig's admission fields); None turns a bound off."""

    queue_ms: float | None = None  # the queue-delay bound under a standing queue
    interval_ms: float = 100.0  # a burst's bound, and how long a standing queue must be gone to end
    max_inflight: int | None = None
    standing_ms: float = 50.0  # a wait this long (after MIN_STANDING_REQUESTS long ones in a row): standing


class Overloaded(Exception):
    """A stage behind this process refused the request (split's ranker deployment at its
    `max_queued_requests`): answered like an admission refusal, 503 with Retry-After."""


class AdmissionControl:
    """Pure ASGI middleware (no Starlette request objects: a refusal must stay cheap).

    `limits()` returns the `AdmissionLimits`; it is read at the first request, because a Ray
    replica's settings exist only once the replica is up. `on_reject(reason)` counts a refusal in
    the service's metrics. `clock` is wall time and `cpu_clock` the loop thread's CPU time (idle
    detection: a gap between passes spent off the CPU); tests replace both. `publish(gate)` hands
    this instance to whoever decides before the ASGI app (plain uvicorn's protocol).
    """

    def __init__(self, app: Any, *, limits: Callable[[], AdmissionLimits], on_reject: Callable[[str], None],
                 clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.thread_time,
                 publish: Callable[[AdmissionControl], None] | None = None) -> None:
        self.app = app
        self._limits = limits
        self._on_reject = on_reject
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._queue_s: float | None = None
        self._interval_s = 0.0
        self._standing_s = 0.0
        self._max_inflight: int | None = None
        self._configured = False
        self.inflight = 0
        self._in_pass = False  # a pass of the loop is running (its end marker is queued)
        self._pass_start = 0.0  # the start of the current pass, or of the last one between passes
        self._pass_end = 0.0
        self._pass_end_cpu = 0.0
        self._origin = 0.0  # the earliest arrival of a request read in the current pass
        self.standing = False  # overload: the bound is admission_queue_ms
        self._long_wait_at = 0.0  # the last wait of admission_queue_ms or more
        self._long_waits = 0  # long waits in a row
        if publish is not None:  # where the HTTP protocol finds this gate (serve/http_protocol.py)
            publish(self)

    def _end_pass(self) -> None:
        self._in_pass = False
        self._pass_end = self._clock()
        self._pass_end_cpu = self._cpu_clock()

    def queue_delay_s(self, now: float) -> float:
        """How long this request may have waited: since the start of the previous pass, or of this
        pass when the loop sat idle before it."""
        if not self._in_pass:
            gap = now - self._pass_end
            idle = gap - (self._cpu_clock() - self._pass_end_cpu) > IDLE_GAP_S
            self._origin = now if idle else self._pass_start
            if idle:  # nothing stood in the queue
                self.standing = False
                self._long_waits = 0
            self._in_pass, self._pass_start = True, now
            asyncio.get_running_loop().call_soon(self._end_pass)
        return now - self._origin

    def _update_standing(self, now: float, waited: float) -> None:
        """Standing once a wait passed `standing_ms` after MIN_STANDING_REQUESTS long ones in a row;
        not standing once none was long for an interval."""
        assert self._queue_s is not None
        if waited < self._queue_s:
            self._long_waits = 0
        else:
            self._long_wait_at = now
            self._long_waits += 1
        if not self.standing and waited > self._standing_s and self._long_waits >= MIN_STANDING_REQUESTS:
            self.standing = True
        elif self.standing and now - self._long_wait_at > self._interval_s:
            self.standing = False

    def refusal(self, now: float) -> str | None:
        """Why this request is refused now ("queue", "inflight"), or None to admit it."""
        if not self._configured:
            limits = self._limits()
            self._queue_s = None if limits.queue_ms is None else limits.queue_ms / 1000
            self._interval_s = limits.interval_ms / 1000
            self._max_inflight = limits.max_inflight
            self._standing_s = limits.standing_ms / 1000
            self._configured = True
            self._long_wait_at = self._origin = self._pass_end = self._pass_start = now
            self._pass_end_cpu = self._cpu_clock()
        if self._queue_s is None and self._max_inflight is None:
            return None
        if self._queue_s is not None:
            waited = self.queue_delay_s(now)
            self._update_standing(now, waited)
            if waited > (self._queue_s if self.standing else self._interval_s):
                return "queue"
        if self._max_inflight is not None and self.inflight >= self._max_inflight:
            return "inflight"
        return None

    def refuse_before_asgi(self) -> bytes | None:
        """The same decision taken by the HTTP protocol as soon as a request's headers are read
        (serve/http_protocol.py): the whole 503 response as bytes to write, or None. A request it
        lets through is decided again by the middleware when its task runs, after the requests read
        before it in the same pass of the loop: only then is its wait known."""
        reason = self.refusal(self._clock())
        if reason is None:
            return None
        self._on_reject(reason)
        return overloaded_response(reason)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].endswith(ADMITTED_PATHS):
            await self.app(scope, receive, send)
            return
        reason = self.refusal(self._clock())
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


def _overloaded_body(reason: str) -> bytes:
    return orjson.dumps({"detail": f"overloaded: {RULES[reason]}", "field": "load", "rule": RULES[reason]})


@functools.cache
def overloaded_response(reason: str) -> bytes:
    """The 503 of `send_overloaded` as a whole HTTP/1.1 response (written by the protocol itself)."""
    body = _overloaded_body(reason)
    return (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(body)).encode() + b"\r\nretry-after: " + str(RETRY_AFTER_S).encode() + b"\r\n\r\n" + body)


async def send_overloaded(send: Send, reason: str) -> None:
    """503 with Retry-After and the project's error shape (field and rule). The request body is not
    read: the connection stays usable, since the server discards an unread body."""
    body = _overloaded_body(reason)
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
    p.add_argument("--admission-standing-ms", type=float, default=defaults.admission_standing_ms,
                   help="a queue in which a request waited this long is standing (overload)")
    p.add_argument("--admission-interval-ms", type=float, default=defaults.admission_interval_ms,
                   help="until the queue stands a burst may queue this long; a standing queue ends once no request "
                        "has waited --admission-queue-ms for this long")
    p.add_argument("--max-inflight", type=int, default=None,
                   help="requests in flight per process / replica (default: 64 per inference thread)")
    if ray:
        p.add_argument("--max-queued-requests", type=int, default=None,
                       help="requests Ray queues for the replicas before answering 503 "
                            "(default: the replicas' max_ongoing_requests in all)")
