"""HL7 v2 over MLLP: the ``type: mllp`` source.

One asyncio server, one task per connection, one message at a time per
connection (MLLP is request/answer: a sender waits for the ACK of a message
before it sends the next, and answering in order keeps that true for senders
that pipeline). For every frame:

1. read the MSH from the bytes (``engine.hl7.message.read_header``, no full parse);
2. check charset, accepted versions / processing ids and, when configured,
   validate with hl7apy in a worker thread;
3. build the AA/CA *before* submitting, so intake stores the exact bytes a
   duplicate will get back;
4. ``await ctx.intake.submit(...)``: returns once message and deliveries are
   committed (group commit);
5. answer from the outcome. Nothing positive is sent before step 4 returns.

Any failure in 1-4 becomes an AE/AR (CE/CR) with an ERR segment; no exception
text or traceback ever reaches the peer, and one bad connection never affects
the others. See docs/notes/issue-2-mllp.md for the acknowledgment decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any, Literal

import structlog
from pydantic import Field

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.hl7.ack import ack_code, build_ack, should_send
from engine.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_PROCESSING_ID,
    UNSUPPORTED_VERSION_ID,
    Header,
    HL7Error,
    read_header,
)
from engine.hl7.mllp import Frame, FrameParser, Oversized, Restarted, Unframed, frame
from engine.registry import component
from engine.security.tls import TLSConfig, report_handshake_failure, server_context, start_tls_server

log = structlog.get_logger()

READ_CHUNK = 64 * 1024


class MLLPSourceConfig(ComponentConfig):
    """Receive HL7 v2 messages over MLLP (TCP or TLS) and acknowledge them once stored."""

    type: Literal["mllp"]
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 only on purpose")
    port: int = Field(2575, ge=0, le=65535, description="TCP port (2575 is the IANA port for HL7 MLLP)")
    ack: Literal["after_store"] = Field(
        "after_store", description="when to acknowledge: after_store = AA/CA once the message and its "
        "deliveries are committed (the only mode: an ACK is a promise not to lose the message)")
    max_frame_bytes: int = Field(10 * 1024 * 1024, ge=1024,
                                 description="largest message accepted; larger ones get AR/CR with ERR 207")
    idle_timeout: float = Field(300.0, gt=0, description="seconds without data before a connection is closed")
    tls: TLSConfig | None = Field(None, description="TLS for the listener (cert, key; ca for mutual TLS)")
    validate_: Literal["none", "structure", "strict"] = Field(
        "none", alias="validate",
        description="hl7apy validation at intake: structure = segments and required fields, strict = "
        "also data types and lengths; failures are answered AE/CE (AR/CR for unknown type or version)")
    accept_versions: list[str] = Field(default_factory=list,
                                       description="MSH-12 versions accepted (empty: any); others get AR 203")
    accept_processing_ids: list[str] = Field(
        default_factory=list, description="MSH-11 processing ids accepted, e.g. [P] (empty: any); others AR 202")
    max_connections: int = Field(256, ge=1, description="concurrent connections; more are closed at once")

    model_config = {**ComponentConfig.model_config, "populate_by_name": True}


class MLLPListener:
    """The running server. ``address`` is the bound (host, port): tests use port 0."""

    def __init__(self, config: MLLPSourceConfig, ctx: ComponentContext) -> None:
        if ctx.intake is None:
            raise ValueError("the mllp source needs the engine intake")
        self.config = config
        self.ctx = ctx
        self.channel = ctx.channel
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._ssl = server_context(config.tls) if config.tls is not None else None
        self._address: tuple[str, int] = (config.host, config.port)
        self._versions = frozenset(config.accept_versions)
        self._pids = frozenset(p.upper() for p in config.accept_processing_ids)

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    async def start(self) -> None:
        if self._ssl is not None:
            self._server = await start_tls_server(
                self._on_connection, self.config.host, self.config.port, self._ssl, limit=READ_CHUNK,
                handshake_timeout=min(self.config.idle_timeout, 60.0), on_failure=self._tls_failed)
        else:
            self._server = await asyncio.start_server(
                self._on_connection, self.config.host, self.config.port, limit=READ_CHUNK, reuse_address=True)
        sock = self._server.sockets[0]
        self._address = sock.getsockname()[:2]

    async def stop(self) -> None:
        """Stop accepting, then end connections. A message being committed finishes first:
        its task is waiting on intake, which the runtime stops only after the listeners."""
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=10)
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass

    def _tls_failed(self, peername: Any, error: BaseException) -> None:
        report_handshake_failure(self.ctx.audit, "mllp", self.channel, peername, error)

    # -- connection --------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peername = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        if len(self._conns) >= self.config.max_connections:
            log.warning("mllp.too_many_connections", channel=self.channel, peer=peer)
            writer.close()
            return
        self._conns.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        log.info("mllp.connected", channel=self.channel, peer=peer)
        parser = FrameParser(self.config.max_frame_bytes)
        reason = "closed"
        count = 0
        try:
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(READ_CHUNK), self.config.idle_timeout)
                except TimeoutError:
                    reason = "idle_timeout"
                    break
                if not data:
                    reason = "peer_closed" if not parser.in_frame else "peer_closed_mid_frame"
                    break
                close = False
                for ev in parser.feed(data):
                    if isinstance(ev, Frame):
                        count += 1
                        answer = await self._handle(ev.payload, peer)
                    elif isinstance(ev, Oversized):
                        answer = self._oversized(ev, peer)
                    elif isinstance(ev, Restarted):
                        log.warning("mllp.frame_restarted", channel=self.channel, peer=peer,
                                    dropped_bytes=ev.dropped)
                        continue
                    else:  # Unframed: not MLLP, no ACK can be framed sensibly
                        assert isinstance(ev, Unframed)
                        log.warning("mllp.unframed_data", channel=self.channel, peer=peer,
                                    bytes=ev.sample_size)
                        reason = "unframed_data"
                        close = True
                        break
                    if answer is not None:
                        writer.write(frame(answer))
                        await writer.drain()
                if close:
                    break
        except asyncio.CancelledError:
            reason = "shutdown"
        except (ConnectionError, OSError) as e:
            reason = type(e).__name__
        except Exception:  # the boundary: one connection's bug must not reach the others
            log.exception("mllp.connection_error", channel=self.channel, peer=peer)
            reason = "internal_error"
        finally:
            self._conns.discard(task)
            log.info("mllp.disconnected", channel=self.channel, peer=peer, reason=reason, messages=count)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2)

    # -- one message ---------------------------------------------------------------
    async def _handle(self, payload: bytes, peer: str) -> bytes | None:
        """Everything about one frame; returns the ACK bytes to send (None: MSH-15 says none)."""
        t0 = time.perf_counter()
        header: Header | None = None
        try:
            header = read_header(payload)
            self._check(header, payload)
            if self.config.validate_ != "none":
                await asyncio.to_thread(validate, header, payload, self.config.validate_)
        except HL7Error as e:
            return self._refuse(e.header or header, e, peer)
        except Exception:
            log.exception("mllp.check_failed", channel=self.channel, peer=peer)
            err = HL7Error(APPLICATION_INTERNAL_ERROR, "message could not be checked")
            return self._refuse(header, err, peer)

        enhanced = header.enhanced_mode
        ok_ack = build_ack(header, ack_code(enhanced=enhanced, ok=True))
        env = Envelope(channel=self.channel, kind="hl7v2", payload=payload, headers=header.as_headers(),
                       peer=peer)
        dedupe_key = f"{header.sending_application}|{header.sending_facility}|{header.control_id}"
        assert self.ctx.intake is not None
        try:
            outcome = await self.ctx.intake.submit(env, dedupe_key=dedupe_key, response=ok_ack)
        except Exception:
            log.exception("mllp.submit_failed", channel=self.channel, peer=peer)
            return self._refuse(header, HL7Error(APPLICATION_INTERNAL_ERROR, "message could not be stored"),
                                peer)
        if outcome.status == "accepted":
            log.info("hl7.accepted", channel=self.channel, message_id=outcome.message_id,
                     msh_10=header.control_id, message_type=header.message_code, peer=peer,
                     routes=len(outcome.routes), ms=round((time.perf_counter() - t0) * 1000, 2))
            return ok_ack if should_send(header, "CA" if enhanced else "AA") else None
        if outcome.status == "duplicate":
            log.info("hl7.duplicate", channel=self.channel, message_id=outcome.message_id,
                     msh_10=header.control_id, message_type=header.message_code, peer=peer)
            if not should_send(header, "CA" if enhanced else "AA"):
                return None
            return outcome.response or ok_ack
        # rejected / error: not stored, the sender must keep the message and may retry.
        shutting_down = "shutting down" in (outcome.error or "")
        text = "receiver is shutting down, resend later" if shutting_down else "message could not be stored"
        if outcome.status == "rejected":
            text = "message rejected by the engine"
        return self._refuse(header, HL7Error(APPLICATION_INTERNAL_ERROR, text), peer,
                            internal=outcome.error or outcome.status)

    def _check(self, header: Header, payload: bytes) -> None:
        """Receiver checks of HL7 v2.5 2.9.2.1 that need no parse: charset, version, processing id."""
        header.decode(payload)  # the whole message must be valid in its MSH-18 charset
        if self._versions and header.version not in self._versions:
            raise HL7Error(UNSUPPORTED_VERSION_ID, f"MSH-12 version {header.version[:16]!r} is not accepted",
                           location="MSH^1^12", header=header)
        if self._pids and header.processing_id.upper() not in self._pids:
            raise HL7Error(UNSUPPORTED_PROCESSING_ID,
                           f"MSH-11 processing id {header.processing_id[:8]!r} is not accepted",
                           location="MSH^1^11", header=header)

    def _refuse(self, header: Header | None, err: HL7Error, peer: str, internal: str | None = None) -> bytes | None:
        enhanced = header is not None and header.enhanced_mode
        # No readable MSH: not even an HL7 message, a reject (AR) rather than a content error.
        code = ack_code(enhanced=enhanced, ok=False, error=err) if header is not None else "AR"
        log.warning("hl7.refused", channel=self.channel, peer=peer, ack=code, err_code=err.code,
                    msh_10=header.control_id if header is not None else None,
                    message_type=header.message_code if header is not None else None,
                    internal=internal)
        # PHI-bearing detail (validator messages may quote values) only at debug.
        log.debug("hl7.refused_detail", channel=self.channel, detail=err.text)
        if not should_send(header, code):
            return None
        return build_ack(header, code, error=err)

    def _oversized(self, ev: Oversized, peer: str) -> bytes | None:
        try:
            header: Header | None = read_header(ev.prefix, require=False)
        except HL7Error:
            header = None
        err = HL7Error(APPLICATION_INTERNAL_ERROR,
                       f"message exceeds the receiver's limit of {self.config.max_frame_bytes} bytes")
        return self._refuse(header, err, peer, internal=f"oversized:{ev.size}")


# -- validation -------------------------------------------------------------------------
def validate(header: Header, payload: bytes, level: str) -> None:
    """Validate with hl7apy; raise ``HL7Error`` with the 0357 code that fits the failure.

    Runs in a worker thread (hl7apy is pure Python and slow) and only when the
    channel asks for it: the default path to the ACK never waits on a full parse.
    """
    from hl7apy import exceptions as hx
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    text = header.decode(payload).replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    vl = VALIDATION_LEVEL.STRICT if level == "strict" else VALIDATION_LEVEL.TOLERANT
    try:
        msg = parse_message(text, validation_level=vl, find_groups=True)
        msg.validate()
    except hx.UnsupportedVersion:
        raise HL7Error(UNSUPPORTED_VERSION_ID, f"version {header.version[:16]!r} is not supported",
                       location="MSH^1^12", header=header) from None
    except hx.ValidationError as e:
        what = str(e)
        child = what.rsplit(" ", 1)[-1]
        if "Missing required child" in what and "_" in child.split(".")[-1] and \
                child.split(".")[-1].split("_")[-1].isdigit():
            seg, _, fld = child.split(".")[-1].partition("_")
            raise HL7Error(REQUIRED_FIELD_MISSING, f"required field {seg}-{fld} is missing",
                           location=f"{seg}^1^{fld}", header=header) from None
        if "Missing required child" in what:
            raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"required segment or group {child} is missing",
                           header=header) from None
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"structure not valid: {what[:200]}", header=header) from None
    except (hx.ChildNotFound, hx.ChildNotValid, hx.InvalidName, hx.MaxChildLimitReached) as e:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"structure not valid: {str(e)[:200]}", header=header) from None
    except (hx.OperationNotAllowed, AttributeError):
        # hl7apy could not find the message structure for MSH-9.
        code = UNSUPPORTED_EVENT_CODE if header.trigger_event and not header.message_structure \
            else UNSUPPORTED_MESSAGE_TYPE
        raise HL7Error(code, f"message type {header.message_code[:20]!r} is not known for version "
                       f"{header.version[:16]} (set MSH-9.3 to its structure)", location="MSH^1^9",
                       header=header) from None
    except (hx.HL7apyException, ValueError) as e:
        raise HL7Error(DATA_TYPE_ERROR, f"data type error: {str(e)[:200]}", header=header) from None


@component("source", "mllp", config=MLLPSourceConfig)
def build(config: MLLPSourceConfig, ctx: ComponentContext) -> Any:
    """HL7 v2 MLLP listener: stores each message, then answers AA/CA (or AE/AR, CE/CR with ERR)."""
    return MLLPListener(config, ctx)
