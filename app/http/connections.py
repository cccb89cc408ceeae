"""The HTTP servers' connections (PORT, METRICS_PORT): how long a client may take to send a request's headers, and
how many connections may be open at once, so that connections which send nothing, or half a request, can neither
pile up nor keep a working client or a probe out.

Uvicorn bounds neither: its keep-alive timeout starts after an answer and stops at the next request's first byte,
so a client that sends half a request line holds its connection for ever; and its limit_concurrency counts idle
connections and answers 503 to every request, probes included, once they fill it. Requests in flight are bounded
apart, by MAX_CONCURRENCY (app.http.middleware.Gate).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
from collections.abc import Callable
from typing import Any, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import HttpParser, Settings

logger = logging.getLogger("app")
Awaited = Literal["headers", "body"]
Reading = Literal["idle", "headers", "body"]  # where the parser is in the client's request
MAX_HEADER_BYTES = 16 * 1024  # a request line and headers, at most: h11's own bound
# Open files a process needs besides its HTTP connections: the models, gRPC's connections, the workers' shared
# files, pipes.
OTHER_FILES = 1024


class ConnectionLimits:
    """The limits of one server's connections, and those of its connections that wait for their client, the
    longest-waiting first: the ones to close when the server is full. One per server: it counts that server's."""

    def __init__(self, max_connections: int, header_timeout_s: float, body_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.timeouts_s: dict[Awaited, float] = {"headers": header_timeout_s, "body": body_timeout_s}
        self.waiting: dict[LimitedConnection, None] = {}  # in the order they began to wait

    @classmethod
    def of(cls, settings: Settings) -> ConnectionLimits:
        return cls(settings.max_connections, settings.header_timeout_s, settings.body_timeout_s)

    def protocol(self, parser: HttpParser) -> Callable[..., asyncio.Protocol]:
        """uvicorn.Config's `http`: uvicorn's protocol with `parser` (HTTP_PARSER) within these limits."""
        return functools.partial(PROTOCOLS[parser], limits=self)

    def make_room(self) -> bool:
        """Closes the connection that has waited longest for its client, if one waits; whether one did."""
        longest = next(iter(self.waiting), None)
        if longest is None:
            return False
        longest.close()
        return True


class LimitedConnection(asyncio.Protocol):
    """The limits of a connection, whichever parser uvicorn's protocol uses (a mixin before it): closes a
    connection whose client it has waited for too long, HEADER_TIMEOUT_S for a request's headers (from the
    connection's opening, or from the previous answer), BODY_TIMEOUT_S for the rest of a body answered before it
    was read (which uvicorn reads and drops); and makes room for a connection beyond MAX_CONNECTIONS by closing the
    one that has waited longest, or when none waits, the new one. What the connection waits for, `_awaited`, is
    the parser's to say."""

    # uvicorn's protocols' own
    transport: asyncio.Transport
    connections: set[asyncio.Protocol]
    loop: asyncio.AbstractEventLoop

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.awaited: Awaited | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self.limits.make_room():
            self.close()
            return
        self._follow()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """The parser's refusal of what is not an HTTP request (a malformed request line, a method llhttp does not
        know, headers past MAX_HEADER_BYTES) as the service's JSON error, where uvicorn's protocols answer plain
        text; the connection closes, as it would there."""
        body = json.dumps({"error": {"code": "bad_request", "message": msg, "request_id": None}}).encode()
        head = f"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.transport.write(head.encode() + b"connection: close\r\n\r\n" + body)
        self.transport.close()

    def close(self) -> None:
        """Closes the connection without an answer: its client has sent no complete request to answer."""
        self._stop_waiting()
        self.connections.discard(self)  # counted out now: uvicorn hears of the close only on a later turn of the loop
        self.transport.close()

    def _awaited(self) -> Awaited | None:
        """What the connection waits for from its client, if it waits for the client (not for the app)."""
        raise NotImplementedError

    def _follow(self) -> None:
        """Starts the clock when the connection begins to wait for its client, and stops it when the wait ends: the
        clock runs on while the awaited part arrives byte by byte."""
        awaited = self._awaited()
        if awaited == self.awaited or self.transport.is_closing():
            return
        self._stop_waiting()
        if awaited is not None:
            self.awaited = awaited
            self.deadline = self.loop.call_later(self.limits.timeouts_s[awaited], self.close)
            self.limits.waiting[self] = None

    def _stop_waiting(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.awaited, self.deadline = None, None
        self.limits.waiting.pop(self, None)


class LimitedH11Protocol(LimitedConnection, H11Protocol):
    """Uvicorn's h11 protocol within the limits (h11 bounds a request's headers to 16 KiB itself)."""

    def _awaited(self) -> Awaited | None:
        theirs, ours = self.conn.their_state, self.conn.our_state
        if theirs is h11.IDLE:
            return "headers"
        if theirs is h11.SEND_BODY and ours is h11.DONE:
            return "body"
        return None


class LimitedHttpToolsProtocol(LimitedConnection, HttpToolsProtocol):
    """Uvicorn's httptools protocol within the limits, which follows where the parser is in the client's request,
    and answers 400 (and closes) to headers past MAX_HEADER_BYTES, as h11 does: llhttp has no such bound, and
    uvicorn's protocol would hold whatever headers a client sends within HEADER_TIMEOUT_S."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, limits=limits, **kwargs)
        self.reading: Reading = "idle"
        self.header_bytes = 0  # received since the request's headers began, while they were incomplete

    def data_received(self, data: bytes) -> None:
        if self.reading != "body":
            self.header_bytes += len(data)
        super().data_received(data)
        if self.reading != "body" and self.header_bytes > MAX_HEADER_BYTES and not self.transport.is_closing():
            self._stop_waiting()
            self.send_400_response(f"Request headers larger than {MAX_HEADER_BYTES} bytes.")

    def on_message_begin(self) -> None:
        self.reading = "headers"
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.reading, self.header_bytes = "body", 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.reading = "idle"
        super().on_message_complete()

    def _awaited(self) -> Awaited | None:
        answered = self.cycle is None or self.cycle.response_complete
        if self.reading != "body" and answered and not self.pipeline:
            return "headers"
        if self.reading == "body" and answered:
            return "body"
        return None


PROTOCOLS: dict[HttpParser, type[LimitedConnection]] = {
    "h11": LimitedH11Protocol,
    "httptools": LimitedHttpToolsProtocol,
}


def allow_open_files(settings: Settings) -> None:
    """Raises this process's soft limit on open files as far as its connections need, or as its hard limit allows
    (a container's soft limit is often 1024, fewer than MAX_CONNECTIONS), and warns when that is not enough."""
    ports = 1 if settings.metrics_port is None else 2
    wanted = ports * settings.max_connections + settings.max_concurrency + OTHER_FILES  # gRPC: MAX_CONCURRENCY calls
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if raised > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
    if raised < wanted:
        logger.warning(
            "the process may open %d files, fewer than MAX_CONNECTIONS=%d needs (%d): past them, new connections wait",
            raised,
            settings.max_connections,
            wanted,
        )
