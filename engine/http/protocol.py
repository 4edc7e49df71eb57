"""HTTP/1.1 limits and timeouts of every medrelay HTTP server, on uvicorn's h11 protocol.

uvicorn bounds the size of a request head (h11's ``max_incomplete_event_size``) and
closes a keep-alive connection that stays idle after a response, but it never times
out a connection that has sent nothing yet, nor one that sends its headers or its body
a byte at a time (slowloris), it has no cap on connections (``limit_concurrency``
accepts them all and answers 503 per request), and it answers a malformed head with
plain text. This subclass adds, for plain and TLS connections alike (FHIR, DICOMweb,
HTTP sources and the console all serve through it):

- ``idle_timeout``: from accept (TLS: from the end of the handshake) and after each
  response until the first byte of the next request;
- ``header_timeout``: from the first byte of a request until its head is complete
  (408);
- ``body_timeout``: from the end of the head until the end of the body (408); when
  the response went out before the body was read (401, 413), the rest of the body
  is drained for at most LINGER seconds and the connection closed, so the client
  reads the answer instead of a reset;
- ``max_connections``: connections over the cap get 503 (TLS: closed before the
  handshake, which is where the CPU goes);
- ``max_connections_per_client``: the same, for the connections of one client address (the
  one a trusted balancer's PROXY header announces, else the peer's), so one client holding
  half-sent requests cannot take every place under ``max_connections`` from the others;
- head, header count and URL limits answered 431 / 414 / 400.

Every answer given here, outside a request cycle, has the body of ``HttpLimits.error_body``:
the FHIR listener gives an OperationOutcome, the console JSON ``{"error", "detail"}``,
DICOMweb the plain text its own handlers answer with. Log events are named after
``HttpLimits.kind`` ("fhir.timeout", "console.connection_refused", ...).

A large response still draining is not idle while the peer keeps reading some of it
within each ``idle_timeout``; a peer that stops reading is aborted (a plain ``close``
waits for the write buffer to drain, forever if the peer never reads).
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import struct
import termios
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h11
import structlog
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.security.client_slots import ClientSlots, client_host
from engine.security.refusal_log import RefusalLog

log = structlog.get_logger()
LINGER = 2.0
RETRY_AFTER = "5"


ErrorBody = Callable[[int, str, str], tuple[str, bytes]]
"""(status, code, text) -> (Content-Type, body). ``code`` is a FHIR IssueType code (timeout,
invalid, too-long, transient), a short machine word the other formats reuse."""


def json_error_body(status: int, code: str, text: str) -> tuple[str, bytes]:
    """``{"error": code, "detail": text}``: the console's and admin API's error shape."""
    return "application/json", json.dumps({"error": code, "detail": text}).encode()


def text_error_body(status: int, code: str, text: str) -> tuple[str, bytes]:
    """Plain text, as the DICOMweb handlers answer their own errors."""
    return "text/plain; charset=utf-8", (text + "\n").encode()


@dataclass(frozen=True)
class HttpLimits:
    """The per-server numbers (from a source's or the console's config), the name its log
    events carry (``kind``) and the body of its protocol-level answers (``error_body``)."""

    max_header_bytes: int
    max_header_count: int
    max_url_bytes: int
    idle_timeout: float
    header_timeout: float
    body_timeout: float
    max_connections: int
    channel: str
    kind: str = "http"
    error_body: ErrorBody = json_error_body
    max_connections_per_client: int | None = None  # None: only max_connections

    @classmethod
    def of(cls, config: Any, channel: str, **extra: Any) -> HttpLimits:
        """The limits from a config with fields of the same names (FHIR, DICOMweb, the console)."""
        return cls(max_header_bytes=config.max_header_bytes, max_header_count=config.max_header_count,
                   max_url_bytes=config.max_url_bytes, idle_timeout=config.idle_timeout,
                   header_timeout=config.header_timeout, body_timeout=config.body_timeout,
                   max_connections=config.max_connections,
                   max_connections_per_client=config.max_connections_per_client, channel=channel, **extra)


def client_key(announced: tuple[str, int] | None, transport: asyncio.BaseTransport) -> str:
    """The address a connection is counted on: the client a trusted balancer announced, else
    the connecting peer (an IPv4-mapped IPv6 address as its IPv4 form, one client either way)."""
    return client_host(announced if announced is not None else transport.get_extra_info("peername"))


def admit(limits: HttpLimits, open_now: int, slots: ClientSlots, client: str, refusals: RefusalLog) -> bool:
    """Whether a new connection from ``client`` gets in: under ``max_connections`` with
    ``open_now`` open, and under ``max_connections_per_client`` for its address (which it then
    holds). A refusal is logged (throttled)."""
    if open_now >= limits.max_connections:
        _refused(limits, refusals, "max_connections", client, limits.max_connections)
        return False
    if not slots.take(client):
        _refused(limits, refusals, "max_connections_per_client", client, slots.limit or 0)
        return False
    return True


def _refused(limits: HttpLimits, refusals: RefusalLog, reason: str, client: str, limit: int) -> None:
    """``<kind>.connection_refused``, once per (reason, client) every 10 s with the count."""
    event = f"{limits.kind}.connection_refused"
    refusals.line((event, reason, client), event, channel=limits.channel, reason=reason, limit=limit, client=client)


def raw_response(status: int, reason: str, code: str, text: str, headers: dict[str, str] | None = None, *,
                 error_body: ErrorBody = json_error_body) -> bytes:
    """A complete ``Connection: close`` response with ``error_body``'s body, for the protocol
    level, where there is no request cycle (or no longer one) to answer through."""
    content_type, body = error_body(status, code, text)
    lines = [f"HTTP/1.1 {status} {reason}", f"Content-Type: {content_type}",
             f"Content-Length: {len(body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _kernel_unsent(transport: asyncio.BaseTransport) -> int:
    """Bytes in the socket's send queue (Linux TIOCOUTQ): the transport's own buffer shrinks
    only in steps of a third of SO_SNDBUF, so a peer reading slowly would look stalled."""
    sock = transport.get_extra_info("socket")
    request = getattr(termios, "TIOCOUTQ", None)
    if sock is None or request is None:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return 0


class _Connection(h11.Connection):
    """h11's connection with a hook on every event it parses (limits and timers)."""

    def __init__(self, owner: GuardedH11Protocol, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.owner = owner
        self.error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return self.owner.on_event(super().next_event())
        except h11.RemoteProtocolError as e:
            self.error = e
            raise


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits above; ``limits`` is set by ``protocol_class``."""

    limits: HttpLimits
    pending: set[Any]  # TLS connections accepted and still in their handshake (they count too)
    slots: ClientSlots  # connections per client address
    refusals: RefusalLog

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None, *,
                 admitted: bool = False) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.conn = _Connection(self, self.limits.max_header_bytes)
        self.admitted = admitted  # TLS: the cap was checked at accept, before the handshake
        self.header_timer: asyncio.TimerHandle | None = None
        self.body_timer: asyncio.TimerHandle | None = None
        self.unsent = 1 << 62  # write buffer at the last idle check (a response still draining)
        self.announced: tuple[str, int] | None = None  # a trusted balancer's PROXY header: the client
        self.slot: str | None = None  # the client address whose place this connection holds

    def hold(self, client: str) -> None:
        """Take over the place the TLS wrapper took at accept for ``client``."""
        self.slot = client

    def release(self) -> None:
        """Give the client's place back (once: lost, refused, or a handshake that failed)."""
        if self.slot is not None:
            self.slots.give_back(self.slot)
            self.slot = None

    # -- connection cap and idle timer ----------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        over = False
        if not self.admitted:
            client = client_key(self.announced, transport)
            over = not admit(self.limits, len(self.connections) + len(self.pending), self.slots, client,
                             self.refusals)
            if not over:
                self.slot = client
        super().connection_made(transport)
        if self.announced is not None:
            self.client = self.announced  # the request scope's client (logs, audit rows)
        if over:
            # out of the count at once: a burst of refused connections, each still closing, must
            # not push the next client (at another address) over max_connections
            self.connections.discard(self)
            transport.write(raw_response(503, "Service Unavailable", "transient",
                                         "too many connections; retry later", {"Retry-After": RETRY_AFTER},
                                         error_body=self.limits.error_body))
            transport.close()
            return
        self.timeout_keep_alive_task = self.loop.call_later(self.limits.idle_timeout, self.timeout_keep_alive_handler)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        self.release()
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:
        if self.transport.is_closing():
            # lost without our connection_lost (TLS: between the handshake and connection_made):
            # it must not hold a place under max_connections for ever
            self.connections.discard(self)
            self.release()
            return
        pending = self.transport.get_write_buffer_size()
        if pending and (pending := pending + _kernel_unsent(self.transport)) < self.unsent:
            self.unsent = pending  # still delivering a large response, and the peer reads: not idle
            self.timeout_keep_alive_task = self.loop.call_later(self.limits.idle_timeout,
                                                                self.timeout_keep_alive_handler)
            return
        self._close()  # idle, or a peer that stopped reading what we sent (aborted)

    # -- request head and body timers -----------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.header_timer = self.loop.call_later(self.limits.header_timeout, self._header_timed_out)
        super().data_received(data)

    def on_event(self, event: Any) -> Any:
        if isinstance(event, h11.Request):
            self._cancel(header=True)
            if len(event.headers) > self.limits.max_header_count:
                raise h11.RemoteProtocolError("too many header fields", error_status_hint=431)
            # h11 bounds only a head that is still incomplete; one that came in a single read is whole
            size = len(event.method) + len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > self.limits.max_header_bytes:
                raise h11.RemoteProtocolError("request head too large", error_status_hint=431)
            if len(event.target) > self.limits.max_url_bytes:
                raise h11.RemoteProtocolError("request target too long", error_status_hint=414)
            self.body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)
        elif isinstance(event, h11.EndOfMessage):
            self._cancel(body=True)
        return event

    def _header_timed_out(self) -> None:
        self.header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._timed_out("headers")
            self._refuse(408, "Request Timeout", f"request headers not received within "
                                                 f"{self.limits.header_timeout:g} s")

    def _body_timed_out(self) -> None:
        self.body_timer = None
        if self.transport.is_closing():
            return
        self._timed_out("body")
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the handler reading the body sees a disconnect, not more bytes
            cycle.message_event.set()
            self._refuse(408, "Request Timeout", f"request body not received within {self.limits.body_timeout:g} s")
        else:
            self._close()

    def on_response_complete(self) -> None:
        self.unsent = 1 << 62
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # answered before the body was read (401, 413, 415): drain a little, then close
            self._cancel(body=True)
            self.body_timer = self.loop.call_later(min(LINGER, self.limits.body_timeout), self._close)

    # -- protocol errors --------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        error = self.conn.error if isinstance(self.conn, _Connection) else None
        status = getattr(error, "error_status_hint", 400)
        if status == 431:
            self._refuse(431, "Request Header Fields Too Large", "request head larger than "
                         f"{self.limits.max_header_bytes} bytes or more than {self.limits.max_header_count} fields")
        elif status == 414:
            self._refuse(414, "URI Too Long", f"request URL longer than {self.limits.max_url_bytes} bytes")
        else:
            self._refuse(400, "Bad Request", "malformed HTTP/1.1 request")

    # -- helpers ------------------------------------------------------------------
    def _refuse(self, status: int, reason: str, text: str) -> None:
        self._cancel_timers()
        code = {408: "timeout", 400: "invalid"}.get(status, "too-long")
        self.transport.write(raw_response(status, reason, code, text, error_body=self.limits.error_body))
        self._close(flush=True)

    def _close(self, *, flush: bool = False) -> None:
        """Close now; wait for the write buffer only briefly (a peer that never reads must not
        keep the connection open through a full send buffer)."""
        self._cancel_timers()
        if self.transport.is_closing():
            return
        if flush and self.transport.get_write_buffer_size():
            self.transport.close()
            self.loop.call_later(LINGER, self.transport.abort)
        elif self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def _cancel(self, *, header: bool = False, body: bool = False) -> None:
        if header and self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None
        if body and self.body_timer is not None:
            self.body_timer.cancel()
            self.body_timer = None

    def _cancel_timers(self) -> None:
        self._cancel(header=True, body=True)
        self._unset_keepalive_if_required()

    def _timed_out(self, stage: str) -> None:
        """``<kind>.timeout``: a peer can time out as many connections as it opens (throttled)."""
        event = f"{self.limits.kind}.timeout"
        self.refusals.line((event, stage, client_host(self.client)), event, "info", channel=self.limits.channel,
                           stage=stage, peer=self._peer())

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "?"


def protocol_class(limits: HttpLimits) -> type[GuardedH11Protocol]:
    """A GuardedH11Protocol bound to one server's limits (uvicorn instantiates the class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"limits": limits, "pending": set(), "slots": ClientSlots(limits.max_connections_per_client),
                 "refusals": RefusalLog()})
