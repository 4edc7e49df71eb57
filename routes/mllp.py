"""The ``type: mllp`` destination: send HL7 v2 over MLLP and insist on a positive ACK.

One persistent connection per route (MLLP peers expect long-lived connections
and a handshake per message would cost a TLS setup each time), one message in
flight at a time on it, reconnect on any failure. A delivery counts as done only
on AA or CA whose MSA-2 equals the MSH-10 we sent; everything else raises
``DeliveryError`` so the queue retries with backoff and dead-letters at the limit.

Every failure is retryable unless listed in ``permanent_codes``: an AR means
"rejected for reasons unrelated to content" (HL7 v2.5 2.9.2.3), often a peer
that is down or overloaded, exactly what retries are for; an AE usually needs
a fix upstream, but an operator decides that per peer, not the engine.

Every wait has a deadline: the TCP connect and TLS handshake ``connect_timeout``,
writing the message and reading its ACK together ``timeout`` (a receiver that stops
reading blocks the write, not only the ACK). A connection that failed or timed out
is aborted, never reused: an ACK arriving late on it would otherwise be read as the
answer to the next message.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any, Literal

import structlog
from pydantic import Field

from engine.components import ComponentConfig, DeliveryError
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.hl7.ack import read_ack
from engine.hl7.message import HL7Error, read_header
from engine.hl7.mllp import Frame, FrameParser, Oversized, Unframed, frame
from engine.registry import component
from engine.security.tls import TLSConfig, client_context

log = structlog.get_logger()

MAX_ACK_BYTES = 1024 * 1024


class MLLPDestinationConfig(ComponentConfig):
    """Send HL7 v2 messages to an MLLP receiver and wait for its ACK."""

    type: Literal["mllp"]
    host: str = Field(..., description="receiver host name or address")
    port: int = Field(..., ge=1, le=65535, description="receiver TCP port")
    tls: TLSConfig | None = Field(None, description="TLS to the receiver (ca to verify it; cert/key for mTLS)")
    timeout: float = Field(30.0, gt=0, description="seconds to send one message and receive its ACK (a "
                           "receiver that stops reading counts against it); then the connection is closed and "
                           "the delivery retried")
    connect_timeout: float = Field(10.0, gt=0, description="seconds for the TCP connection and TLS handshake")
    permanent_codes: list[Literal["AE", "AR", "CE", "CR"]] = Field(
        default_factory=list,
        description="ACK codes that dead-letter at once instead of being retried (default: retry all)")


class MLLPSender:
    """A persistent MLLP client with ACK checking; reconnects on the next send after a failure."""

    def __init__(self, config: MLLPDestinationConfig, ctx: ComponentContext | None = None) -> None:
        self.config = config
        self.ctx = ctx
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser: FrameParser | None = None
        self._lock = asyncio.Lock()
        self._ssl = client_context(config.tls) if config.tls is not None else None
        self._permanent = frozenset(config.permanent_codes)

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    @property
    def deadline(self) -> float:
        """Seconds one ``send`` may take in all (engine.pipeline enforces it as a backstop)."""
        return self.config.connect_timeout + self.config.timeout

    async def _connect(self, limit: float) -> None:
        cfg = self.config
        server_hostname = None
        if self._ssl is not None:
            server_hostname = (cfg.tls.server_name if cfg.tls is not None and cfg.tls.server_name else cfg.host)
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(cfg.host, cfg.port, ssl=self._ssl, server_hostname=server_hostname,
                                        limit=MAX_ACK_BYTES),
                max(min(cfg.connect_timeout, limit), 0.001))
        except TimeoutError:
            raise DeliveryError(f"connect to {cfg.host}:{cfg.port} timed out") from None
        except OSError as e:
            raise DeliveryError(f"connect to {cfg.host}:{cfg.port} failed: {type(e).__name__}") from None
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._parser = FrameParser(MAX_ACK_BYTES)
        log.info("mllp.sender_connected", host=cfg.host, port=cfg.port)

    async def _drop(self, *, abort: bool = True) -> None:
        """Forget the connection. ``abort`` (after any failure): reset it at once (RST), discarding
        unsent bytes; a plain close would leave the kernel trying to deliver them, and then a FIN,
        to a receiver that does not read, and the receiver would never learn the connection ended."""
        w, self._writer, self._reader, self._parser = self._writer, None, None, None
        if w is None:
            return
        if abort:
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()
        else:
            w.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(w.wait_closed(), 2)
        if not abort and not w.transport.is_closing():
            w.transport.abort()

    async def send(self, envelope: Envelope) -> str | None:
        """Deliver one message; returns the peer's ACK code (AA/CA) or raises ``DeliveryError``."""
        if envelope.kind != "hl7v2":
            raise DeliveryError(f"mllp destination cannot send {envelope.kind}", permanent=True)
        control_id = control_id_of(envelope)
        async with self._lock:
            loop = asyncio.get_running_loop()
            start = loop.time()
            reused = self.connected
            for attempt in (1, 2):
                if not self.connected:
                    await self._connect(self.deadline - (loop.time() - start))
                try:
                    left = self.deadline - (loop.time() - start)
                    return await self._exchange(envelope.payload, control_id, left)
                except _StaleConnection:
                    await self._drop()
                    # A reused connection the peer had closed: nothing was answered, send once more
                    # on a fresh one. At-least-once is the contract; the peer dedupes on MSH-10.
                    if not reused or attempt == 2:
                        raise DeliveryError("connection closed by the receiver before an ACK") from None
                    reused = False
                except BaseException:  # DeliveryError, timeout, cancellation: never reuse this connection
                    await self._drop()
                    raise
        raise DeliveryError("not delivered")  # unreachable; keeps type checkers honest

    async def write_only(self, envelope: Envelope) -> str:
        """Send one frame and expect no answer (for messages that ask for none, e.g. an ACK)."""
        async with self._lock:
            for attempt in (1, 2):
                if not self.connected:
                    await self._connect(self.config.connect_timeout)
                try:
                    await self._write(frame(envelope.payload), self.config.timeout)
                    return "written"
                except _StaleConnection:
                    await self._drop()
                    if attempt == 2:
                        raise DeliveryError("connection lost while sending") from None
                except BaseException:
                    await self._drop()
                    raise
        raise DeliveryError("not delivered")  # unreachable

    async def _write(self, data: bytes, limit: float) -> None:
        """Write one frame; the receiver must take it within ``limit`` seconds."""
        assert self._writer is not None
        try:
            self._writer.write(data)
            await asyncio.wait_for(self._writer.drain(), max(limit, 0.001))
        except TimeoutError:
            raise DeliveryError(f"receiver did not take the message within {self.config.timeout:g}s") from None
        except (ConnectionError, OSError):
            raise _StaleConnection() from None

    async def _exchange(self, payload: bytes, control_id: str, limit: float) -> str:
        """Send one message and read its ACK, both within ``limit`` seconds."""
        assert self._writer is not None and self._reader is not None and self._parser is not None
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(cfg.timeout, limit)
        await self._write(frame(payload), deadline - loop.time())
        got_bytes = False
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise DeliveryError(f"no ACK within {cfg.timeout:g}s")
            try:
                data = await asyncio.wait_for(self._reader.read(65536), remaining)
            except TimeoutError:
                raise DeliveryError(f"no ACK within {cfg.timeout:g}s") from None
            except (ConnectionError, OSError):
                if got_bytes:
                    raise DeliveryError("connection lost while reading the ACK") from None
                raise _StaleConnection() from None
            if not data:
                if got_bytes:
                    raise DeliveryError("connection closed in the middle of the ACK")
                raise _StaleConnection()
            got_bytes = True
            for ev in self._parser.feed(data):
                if isinstance(ev, Frame):
                    return self._check_ack(ev.payload, control_id)
                if isinstance(ev, Oversized | Unframed):
                    raise DeliveryError("receiver answered with something that is not an MLLP ACK")

    def _check_ack(self, payload: bytes, control_id: str) -> str:
        try:
            ack = read_ack(payload)
        except HL7Error as e:
            raise DeliveryError(f"malformed ACK ({e.code} {e.code_text})") from None
        if ack.control_id != control_id:
            raise DeliveryError("ACK MSA-2 does not match the MSH-10 sent")
        if ack.ok:
            return ack.code
        # Only the code and the 0357 number: the peer's text may quote patient data.
        detail = f"receiver answered {ack.code}" + (f" (ERR {ack.error_code})" if ack.error_code else "")
        raise DeliveryError(detail, permanent=ack.code in self._permanent)

    async def close(self) -> None:
        async with self._lock:
            await self._drop(abort=False)


def control_id_of(envelope: Envelope) -> str:
    """MSH-10 of the message to send, what the ACK's MSA-2 must echo.

    The listener read the header when it took the message and wrote MSH-10 into the envelope
    headers (``Header.as_headers``, as ``engine.store.message_terms`` uses them): a message
    delivered as it was stored (no lineage: not changed by a transform, not produced by
    another route) is taken at its word, not read again. A transformed or derived message,
    or one without that header, is read: a transform may change MSH-10 without updating the
    headers (hl7_map does update them; a custom transform need not). A payload that is not
    HL7 v2 is a permanent failure (sending it again cannot help).
    """
    payload = envelope.payload
    if not envelope.lineage and payload[:3] == b"MSH":
        control_id = envelope.headers.get("MSH-10")
        if isinstance(control_id, str) and control_id:
            return control_id
    try:
        return read_header(payload, require=False).control_id
    except HL7Error as e:
        raise DeliveryError(f"payload is not HL7 v2: {e.code}", permanent=True) from None


class _StaleConnection(Exception):
    """The connection was closed before any byte of an answer came back."""


@component("destination", "mllp", config=MLLPDestinationConfig, kinds=("hl7v2",))
def build(config: MLLPDestinationConfig, ctx: ComponentContext) -> Any:
    """Deliver HL7 v2 over MLLP; success only on AA/CA acknowledging the same MSH-10."""
    return MLLPSender(config, ctx)
