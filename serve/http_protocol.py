"""Plain uvicorn's HTTP protocol as rankserve runs it: uvicorn's httptools protocol with two changes.

1. Early refusal: past admission's bounds a request is refused in the protocol, before any ASGI work.
   Why: at 3x the capacity most requests are refused, and a refusal through the ASGI app (a scope, a
   task, the middleware, two `send` calls) cost the server's core 0.137 ms, against 0.042 ms for a
   bare uvloop + httptools responder answering the same 100-document msgpack bodies (closed loop of
   4, AVX2 machine, 2026-11-30). Refusals then took most of the core, and a backlog built at an
   overload's onset drained slowly. Here the decision is taken as soon as a request's headers are
   parsed, by the same `AdmissionControl` instance the ASGI middleware uses (one queue, one in-flight
   count), and the 503 is written as prepared bytes; the body that follows is discarded by uvicorn
   as for any answered request. A request let through here is decided again by the middleware when
   its task runs (its wait then includes the requests scored before it in the same pass). Pipelined
   requests behind an unanswered one, and anything but `POST .../rank`, take the ASGI path, where
   the middleware decides as before.
2. Whole bodies: the body is handed to the app once it is complete, or once BODY_HIGH_WATER bytes
   wait. Why: uvicorn pauses reading and wakes the app every 64 KB; a 1000-document msgpack body
   (544 KB) then took 0.22-0.24 ms to receive on the server, against 0.09-0.11 ms handed over
   whole (the cache ladder's hit rows, `timings_ms.read`, AVX2 machine, 2026-12-01), and a cache
   hit's whole handling besides it is under 0.1 ms. /rank reads every body whole anyway (up to
   `max_body_bytes`), so this buffers nothing the app would not; the bound keeps what a
   connection can park in memory small for routes that never read their body.

Ray Serve's replicas run Ray's own uvicorn set-up, so they keep uvicorn's protocol (and admission in
the middleware only).
"""

from __future__ import annotations

from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve.admission import ADMITTED_PATHS


class _NoEvent:
    def set(self) -> None:
        pass


class RefusedCycle:
    """Stands in for uvicorn's request cycle once a request was refused: its answer is complete, so
    the protocol drops the rest of the body and starts the next request as usual."""

    response_complete = True
    disconnected = False
    more_body = False
    keep_alive = True
    message_event = _NoEvent()


REFUSED = RefusedCycle()
BODY_HIGH_WATER = 1024 * 1024  # covers a 1000-document msgpack body (544 KB) in one hand-over


def http_protocol(app: Any) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol that asks `app.state.admission` (published by the middleware once
    Starlette has built its stack) before creating the request's ASGI task, and hands bodies over whole."""

    class RankserveHttpToolsProtocol(HttpToolsProtocol):
        def on_headers_complete(self) -> None:
            gate = getattr(app.state, "admission", None)
            if (gate is not None and not self.pipeline and (self.cycle is None or self.cycle.response_complete)
                    and self.parser.get_method() == b"POST" and not self.parser.should_upgrade()
                    and httptools.parse_url(self.url).path.decode("latin-1").endswith(ADMITTED_PATHS)):
                refusal = gate.refuse_before_asgi()
                if refusal is not None:
                    self.cycle = REFUSED  # type: ignore[assignment]
                    self.transport.write(refusal)
                    if self.parser.should_keep_alive():
                        self.on_response_complete()
                    else:
                        self.transport.close()
                    return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            """uvicorn's, with the app woken at BODY_HIGH_WATER rather than 64 KB (on_message_complete
            wakes it at the end, as before)."""
            cycle = self.cycle
            if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
                return
            cycle.body += body
            if len(cycle.body) > BODY_HIGH_WATER:
                self.flow.pause_reading()
                cycle.message_event.set()

    return RankserveHttpToolsProtocol
