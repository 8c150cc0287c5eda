"""Pre-encoded HTTP/1.1 POSTs over keep-alive connections, on uvloop with httptools' response parser.

Why not aiohttp (what the open-loop generator used before): every aiohttp request builds a request
object, header dicts, a response object, a stream reader and several futures, and its client parses
in Python on the default loop. On one core that capped the generator near 1,100 requests/s and added
about 1.5 ms to a 0.7 ms service (measured; results/loadgen/). Here a request is bytes prepared
before the run (request line, headers and body; only a query id's 12-byte nonce is spliced in), sent
with one `writelines`; the answer is parsed by llhttp (httptools, C) straight from the transport's
buffer into a per-connection body list. The per-request state lives on the connection object (no
future, no task, no closure per request), and the one callback is the generator's `on_answer`.

Plain HTTP/1.1 without pipelining: one request in flight per connection, as a browser or a service
mesh sends them, so `max_connections` bounds the requests in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import httptools

from loadtest.payloads import NONCE_WIDTH, Payload

clock = time.monotonic  # CLOCK_MONOTONIC: shared by every process of the machine (multi-process runs)


class PreparedRequest:
    """One POST as bytes, with the query id's nonce ready to be spliced in (a distinct request)."""

    __slots__ = ("whole", "prefix", "suffix", "n_docs")

    def __init__(self, payload: Payload, host: str, port: int, path: str = "/rank") -> None:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {payload.content_type}\r\n"
            f"Content-Length: {len(payload.body)}\r\nConnection: keep-alive\r\n\r\n"
        ).encode("latin-1")
        body = payload.body
        self.whole = head + body
        self.n_docs = payload.n_docs
        if payload.nonce_offset >= 0:
            self.prefix = head + body[: payload.nonce_offset]
            self.suffix = body[payload.nonce_offset + NONCE_WIDTH :]
        else:
            self.prefix = self.suffix = b""

    def parts(self, nonce: int | None) -> list[bytes]:
        """The bytes to write: the prepared request, or with the nonce set to `nonce`."""
        if nonce is None or not self.prefix:
            return [self.whole]
        return [self.prefix, b"%012d" % (nonce % 10**NONCE_WIDTH), self.suffix]


# on_answer(connection, status, body, error): error is None or why no answer came (status 0 then)
AnswerCallback = Callable[["Connection", int, bytes, "str | None"], None]


class Connection(asyncio.Protocol):
    """One keep-alive connection: at most one request in flight; its state lives here."""

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.body: list[bytes] = []
        self.busy = False
        self.scheduled = self.sent_at = 0.0
        self.n_docs = 0
        self.tag = 0  # the generator's own per-request value (e.g. its arrival index)

    # -- asyncio.Protocol ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.fail("malformed HTTP response")

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        if self.busy:
            self._finish(0, b"", "connection lost")

    # -- httptools callbacks --------------------------------------------------------------------------
    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        body = b"".join(self.body) if len(self.body) != 1 else self.body[0]
        self.body.clear()
        keep_alive = self.parser.should_keep_alive()
        if not keep_alive and self.transport is not None:
            self.transport.close()
        self._finish(status, body, None)
        if keep_alive:
            self.pool.release(self)

    # -- requests -------------------------------------------------------------------------------------
    def send(self, parts: list[bytes], scheduled: float, n_docs: int, tag: int, waited: bool = False) -> None:
        self.busy = True
        self.scheduled, self.n_docs, self.tag = scheduled, n_docs, tag
        self.sent_at = clock()
        self.pool.sent(self.sent_at, scheduled, waited)
        self.transport.writelines(parts)  # type: ignore[union-attr]

    def fail(self, reason: str) -> None:
        """Give up on the request in flight (timeout, bad response) and close the connection."""
        if self.busy:
            self._finish(0, b"", reason)
        if self.transport is not None:
            self.transport.close()

    def _finish(self, status: int, body: bytes, error: str | None) -> None:
        self.busy = False
        self.pool.on_answer(self, status, body, error)


class ConnectionPool:
    """Keep-alive connections to one loopback host: idle ones are reused, more are opened on demand.

    An arrival that finds no idle connection waits in a FIFO queue (`waited` counts it) while one more
    connection opens, up to `max_connections`. Sends more than `late_s` after their schedule are
    counted in `late` (with the largest lag in `max_lag_s`) when a connection was free: that lag is the
generator's own. A send that waited for a connection is counted in `late_after_wait` instead: the
service held every connection. One that the driver marks `woke_late` (its loop slept past the
wake-up time, using no CPU) is counted in `late_wakeups`: the machine's lag, not the generator's.
    """

    def __init__(self, host: str, port: int, on_answer: AnswerCallback, *, max_connections: int = 256,
                 late_s: float = 0.001, request_timeout_s: float = 30.0) -> None:
        self.host, self.port = host, port
        self.on_answer = on_answer
        self.max_connections = max_connections
        self.late_s = late_s
        self.request_timeout_s = request_timeout_s
        self.idle: list[Connection] = []
        self.live: set[Connection] = set()
        self.opening = 0
        self.queue: deque[tuple[list[bytes], float, int, int]] = deque()
        self.n_sent = self.late = self.late_wakeups = self.late_after_wait = self.waited = 0
        self.woke_late = False  # set by the driver: the next send's lag comes from a late wake-up
        self.connections_opened = self.connect_errors = 0
        self.max_lag_s = self.max_wakeup_lag_s = self.first_send = self.last_send = 0.0
        self._loop = asyncio.get_running_loop()

    # -- connections ----------------------------------------------------------------------------------
    async def open(self, n: int) -> None:
        """Open `n` connections before the run (so the first arrivals do not wait for a connect)."""
        await asyncio.gather(*(self._start_opening() for _ in range(min(n, self.max_connections))))

    def _start_opening(self) -> asyncio.Task:
        """Count the connection as opening now, not when its task first runs: arrivals submitted in
        one pass of the loop would otherwise each see room for one more and open past
        `max_connections` (a burst of 500 opened 500 where the bound was 8)."""
        self.opening += 1
        return self._loop.create_task(self._open_one())

    async def _open_one(self) -> None:
        try:
            _transport, conn = await self._loop.create_connection(lambda: Connection(self), self.host, self.port)
        except OSError:
            self.connect_errors += 1
            if self.queue and not self.live and not self.opening - 1:  # nothing will ever serve the queue
                while self.queue:
                    _parts, scheduled, n_docs, tag = self.queue.popleft()
                    stub = Connection(self)
                    stub.scheduled, stub.n_docs, stub.tag = scheduled, n_docs, tag
                    self.on_answer(stub, 0, b"", "connect failed")
            return
        finally:
            self.opening -= 1
        self.connections_opened += 1
        self.live.add(conn)
        self.release(conn)

    def forget(self, conn: Connection) -> None:
        self.live.discard(conn)
        if conn in self.idle:
            self.idle.remove(conn)
        if self.queue and len(self.live) + self.opening < self.max_connections:
            self._start_opening()

    def release(self, conn: Connection) -> None:
        """A connection is free: it takes the oldest waiting request, else it goes idle."""
        if self.queue:
            parts, scheduled, n_docs, tag = self.queue.popleft()
            conn.send(parts, scheduled, n_docs, tag, waited=True)
        else:
            self.idle.append(conn)

    # -- requests -------------------------------------------------------------------------------------
    def submit(self, parts: list[bytes], scheduled: float, n_docs: int, tag: int) -> None:
        """Send now on an idle connection, or queue the request until one is free."""
        if self.idle:
            self.idle.pop().send(parts, scheduled, n_docs, tag)
            return
        self.waited += 1
        self.queue.append((parts, scheduled, n_docs, tag))
        if len(self.live) + self.opening < self.max_connections:
            self._start_opening()

    def sent(self, now: float, scheduled: float, waited: bool) -> None:
        """Count a send; its lag is the generator's own only when it did not wait for a connection."""
        if not self.n_sent:
            self.first_send = now
        self.last_send = now
        self.n_sent += 1
        lag_s = now - scheduled
        if waited:
            self.late_after_wait += lag_s > self.late_s
            return
        if self.woke_late:  # the generator slept past its wake-up time: the machine's lag, not its cost
            self.late_wakeups += lag_s > self.late_s
            self.max_wakeup_lag_s = max(self.max_wakeup_lag_s, lag_s)
            return
        if lag_s > self.late_s:
            self.late += 1
        if lag_s > self.max_lag_s:
            self.max_lag_s = lag_s

    @property
    def in_flight(self) -> int:
        return sum(conn.busy for conn in self.live) + len(self.queue)

    def expire(self, now: float) -> None:
        """Fail requests older than the request timeout (bounded runs); call it now and then."""
        limit = now - self.request_timeout_s
        for conn in list(self.live):
            if conn.busy and conn.sent_at < limit:
                conn.fail("timeout")
        while self.queue and self.queue[0][1] < limit:
            _parts, scheduled, n_docs, tag = self.queue.popleft()
            stub = Connection(self)
            stub.scheduled, stub.n_docs, stub.tag = scheduled, n_docs, tag
            self.on_answer(stub, 0, b"", "timeout (never sent)")

    def close(self) -> None:
        for conn in list(self.live):
            if conn.transport is not None:
                conn.transport.close()
