"""HL7 v2 over MLLP: the ``type: mllp`` source.

One asyncio server, one task per connection, one message at a time per
connection (MLLP is request/answer: a sender waits for the ACK of a message
before it sends the next, and answering in order keeps that true for senders
that pipeline). For every frame:

1. read the MSH from the bytes (``engine.hl7.message.read_header``, no full parse);
   a UTF-8 BOM or blank lines before MSH are cut off here, before anything is stored;
2. check charset, version (a real HL7 v2 version, then ``accept_versions``), processing
   id and MSH-15/16 and, when configured, validate with hl7apy: within size / segment /
   repetition limits, in a worker process with a time budget (listeners/hl7_validation.py);
3. build the AA/CA *before* submitting, so intake stores the exact bytes a
   duplicate will get back;
4. ``await ctx.intake.submit(...)``: returns once message and deliveries are
   committed (group commit);
5. answer from the outcome. Nothing positive is sent before step 4 returns.

Steps 1, 2 (but validation), 3 and 4 are ``listeners.hl7_receive.Hl7Receiver``'s, the same
code the file, http and database sources run; this module adds MLLP's framing, hl7apy
validation and MSH-15 (an ACK the sender asked not to get is not sent).

A frame that starts with FHS or BHS is an HL7 batch (v2.5 2.10.3): each of its messages
goes through 1-5 on its own and the frame is answered with one batch ACK listing the
messages in error (``_handle_batch``).

Any failure in 1-4 becomes an AE/AR (CE/CR) with an ERR segment; no exception
text or traceback ever reaches the peer, and one bad connection never affects
the others. A connection is closed when it is idle (no frame started for
``idle_timeout``), when a started frame does not end within ``frame_timeout`` or the
peer does not read its ACK that long, and at once past ``max_connections``. See
docs/notes/issue-2-mllp.md and issue-9-hl7.md for the decisions.
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
from engine.hl7.ack import build_ack, should_send
from engine.hl7.batch import build_batch_ack, is_batch, read_batch
from engine.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    Header,
    HL7Error,
    read_header,
)
from engine.hl7.mllp import Frame, FrameParser, Oversized, Restarted, Unframed, frame
from engine.registry import component
from engine.security import proxy_protocol
from engine.security.client_slots import ClientSlots, client_host
from engine.security.proxy_protocol import ProxyProtocolConfig
from engine.security.refusal_log import RefusalLog
from engine.security.tls import (
    PausedAccept,
    TLSConfig,
    report_handshake_failure,
    server_context,
    start_tls_server,
    upgrade,
)
from listeners.hl7_receive import Hl7Answer, Hl7Receiver, _Checked
from listeners.hl7_validation import ValidatorPool
from transforms.hl7_validate import Limits, check_limits

# asyncio's listen backlog is 100: under a burst of connections the kernel drops SYNs and a peer
# waits a second per retry before we can accept, count or refuse it (the DICOM listener's is 256 too).
BACKLOG = 256
log = structlog.get_logger()

READ_CHUNK = 64 * 1024
SMALL_FRAME = 64 * 1024  # an unfinished message this small is always read on (max_buffered_bytes)


class FrameBudget:
    """Bytes of unfinished frames one listener holds, over all its connections
    (``max_buffered_bytes``). ``max_frame_bytes`` bounds one connection; without this, 256
    connections each holding most of a 10 MiB frame were 2.5 GB. One event loop: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = asyncio.Event()

    def over(self) -> bool:
        return self.used > self.limit

    def move(self, held: int, now: int) -> int:
        """A connection's unfinished bytes went from ``held`` to ``now``; returns ``now``."""
        self.used += now - held
        if now < held:
            self._freed.set()
        return now

    async def below(self) -> None:
        while self.over():
            self._freed.clear()
            await self._freed.wait()
BATCH_SUBMIT = 256  # messages of a batch in flight to intake at once (bounded; they share commits)


class ValidationConfig(ComponentConfig):
    """Bounds on ``validate: structure|strict`` work, so one message cannot starve the others."""

    max_bytes: int = Field(1024 * 1024, ge=1024, description="largest message validated; larger ones "
                           "get AR/CE 207 without being parsed (hl7apy needs ~50x the message in memory)")
    max_segments: int = Field(1000, ge=1, description="most segments in a validated message (~1.5 ms "
                              "each in hl7apy); more: AR/CE 207")
    max_repetitions: int = Field(200, ge=1, description="most repetitions in any one field of a validated "
                                 "message; more: AR/CE 207 naming the field")
    timeout: float = Field(10.0, gt=0, description="seconds one message may take to validate; past it the "
                           "worker is killed and the message gets AR/CE 207")
    workers: int = Field(2, ge=1, le=32, description="validation worker processes of this listener (at most "
                         "this many messages are validated at once; others wait)")
    memory_mb: int = Field(1024, ge=0, description="address-space cap of each worker process in MiB "
                           "(0: none); a message needing more gets AR/CE 207")


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
    max_buffered_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024,
        description="bytes of unfinished messages held in memory across all connections; past it a "
        "connection holding more than 64 KiB of an unfinished message is not read from (TCP backpressure) "
        "until others finish, or its frame_timeout closes it; small messages are read as usual")
    idle_timeout: float = Field(300.0, gt=0, description="seconds a connection may stay open without starting "
                                "a message (blank bytes between frames do not count); then it is closed")
    frame_timeout: float = Field(60.0, gt=0, description="seconds from a message's start block to its end "
                                 "block, and for the peer to take its ACK; then the connection is closed")
    tls: TLSConfig | None = Field(None, description="TLS for the listener (cert, key; ca for mutual TLS)")
    validate_: Literal["none", "structure", "strict"] = Field(
        "none", alias="validate",
        description="hl7apy validation at intake: structure = segments and required fields, strict = "
        "also data types and lengths; failures are answered AE/CE (AR/CR for unknown type or version)")
    validation: ValidationConfig = Field(
        default_factory=ValidationConfig,
        description="bounds on validate: max_bytes, max_segments, max_repetitions (one field), timeout "
        "(s per message), workers, memory_mb (per worker); defaults and answers in conformance/hl7v2-profile.md")
    accept_versions: list[str] = Field(default_factory=list,
                                       description="MSH-12 versions accepted (empty: every HL7 v2 version, "
                                       "2.1 to 2.9.1); others get AR 203")
    accept_processing_ids: list[str] = Field(
        default_factory=list, description="MSH-11 processing ids accepted, e.g. [P] (empty: any); others AR 202")
    batch_ack: Literal["errors", "all"] = Field(
        "errors", description="the answer to an HL7 batch (FHS/BHS ... BTS/FTS, HL7 v2.5 2.10.3): errors = "
        "one batch holding the ACKs of the messages in error (empty when all were accepted), all = the "
        "ACK of every message")
    max_connections: int = Field(256, ge=1, description="concurrent connections; more are closed at once "
                                 "(and logged)")
    max_connections_per_client: int | None = Field(
        None, ge=1, description="concurrent connections from one client address (the one a trusted balancer's "
        "PROXY header announces, else the peer's); more are closed at once (and logged), so one sender cannot "
        "take every place of max_connections. null (the default): no per-client cap, as an upstream engine "
        "may open a connection per interface from one address; behind a balancer it needs the PROXY protocol")
    proxy_protocol: ProxyProtocolConfig | None = Field(
        None, description="behind a TCP load balancer (HAProxy send-proxy / send-proxy-v2, nginx proxy_protocol): "
        "trusted = the balancers' addresses/CIDRs, timeout = seconds for the header; "
        "their connections must start with a PROXY header (v1/v2), "
        "whose client address is logged and audited; others are served as usual (with tls: the header "
        "comes before the handshake)")

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
        self.hl7 = Hl7Receiver(ctx, accept_versions=config.accept_versions,
                               accept_processing_ids=config.accept_processing_ids)
        v = config.validation
        self._limits = Limits(max_bytes=v.max_bytes, max_segments=v.max_segments,
                              max_repetitions=v.max_repetitions)
        self._validator: ValidatorPool | None = None
        if config.validate_ != "none":
            self._validator = ValidatorPool(config.validate_, workers=v.workers, timeout=v.timeout,
                                            memory_mb=v.memory_mb, channel=ctx.channel)
        # every line a peer can multiply by connecting (connected, disconnected, refused): once per
        # client and reason every 10 s, with the count of the others (engine/security/refusal_log.py)
        self.lines = RefusalLog()
        self._clients = ClientSlots(config.max_connections_per_client)
        self._buffered = FrameBudget(config.max_buffered_bytes)
        self._proxy = proxy_protocol.Trust(config.proxy_protocol) if config.proxy_protocol is not None else None

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    async def start(self) -> None:
        if self._validator is not None:
            await self._validator.start()
        if self._ssl is not None and self._proxy is not None:  # the header first, then the handshake
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(lambda: PausedAccept(self._proxied_tls), self.config.host,
                                                    self.config.port, reuse_address=True, backlog=BACKLOG)
        elif self._ssl is not None:
            self._server = await start_tls_server(
                self._on_connection, self.config.host, self.config.port, self._ssl, limit=READ_CHUNK,
                handshake_timeout=min(self.config.frame_timeout, 60.0), on_failure=self._tls_failed,
                backlog=BACKLOG)
        else:
            self._server = await asyncio.start_server(
                self._on_connection, self.config.host, self.config.port, limit=READ_CHUNK, reuse_address=True,
                backlog=BACKLOG)
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
        if self._validator is not None:
            await self._validator.close()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 5)
            except TimeoutError:
                pass
        self.lines.flush()

    def _proxy_timeout(self) -> float:
        assert self._proxy is not None
        return min(self._proxy.config.timeout, self.config.frame_timeout, 60.0)

    async def _proxied_tls(self, transport: asyncio.Transport) -> None:
        """TLS with ``proxy_protocol``: a trusted balancer's header is read from the paused
        socket (``proxy_protocol.read_transport``), so the ClientHello after it is still there
        for the handshake; then the connection is served as any other."""
        assert self._proxy is not None and self._ssl is not None
        peername = transport.get_extra_info("peername") or ("?", 0)
        announced: tuple[str, int] | None = None
        if self._proxy.trusted(peername):
            try:
                header = await proxy_protocol.read_transport(transport, self._proxy_timeout())
            except proxy_protocol.ProxyError as e:
                log.warning("mllp.proxy_header_refused", channel=self.channel,
                            peer=f"{peername[0]}:{peername[1]}", detail=str(e))
                transport.abort()
                return
            announced = proxy_protocol.peer_of(header, peername)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        tls_transport = await upgrade(transport, protocol, self._ssl,
                                      handshake_timeout=min(self.config.frame_timeout, 60.0),
                                      on_failure=lambda peer, e: self._tls_failed(announced or peer, e))
        if tls_transport is not None:
            assert isinstance(tls_transport, asyncio.WriteTransport)
            await self._on_connection(reader, asyncio.StreamWriter(tls_transport, protocol, reader, loop),
                                      announced=announced)

    def _tls_failed(self, peername: Any, error: BaseException) -> None:
        report_handshake_failure(self.ctx.audit, "mllp", self.channel, peername, error)

    def _too_many(self, peer: str, client: str, *, per_client: bool = False) -> None:
        """A refused connection, logged throttled: a flood of them must not become a flood of
        log lines."""
        reason = "max_connections_per_client" if per_client else "max_connections"
        self.lines.line(("mllp.too_many_connections", reason, client), "mllp.too_many_connections",
                        channel=self.channel, peer=peer, reason=reason,
                        limit=self._clients.limit if per_client else self.config.max_connections)

    # -- connection --------------------------------------------------------------
    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                             announced: tuple[str, int] | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        peername = announced or writer.get_extra_info("peername") or ("?", 0)
        peer = f"{peername[0]}:{peername[1]}"
        if len(self._conns) >= self.config.max_connections:
            self._too_many(peer, client_host(peername))
            writer.transport.abort()  # at once: no lingering close handshake for a flood
            return
        self._conns.add(task)
        if self._proxy is not None and self._ssl is None and self._proxy.trusted(peername):
            try:
                header = await proxy_protocol.read_stream(reader, self._proxy_timeout())
            except proxy_protocol.ProxyError as e:
                log.warning("mllp.proxy_header_refused", channel=self.channel, peer=peer, detail=str(e))
                self._conns.discard(task)
                writer.transport.abort()  # nothing else read, nothing answered
                return
            announced = proxy_protocol.peer_of(header, peername)
            self.lines.line(("mllp.proxied", client_host(peername)), "mllp.proxied", "info", channel=self.channel,
                            balancer=peer, version=header.version)
            peer = f"{announced[0]}:{announced[1]}"
        client = client_host(announced or peername)
        if not self._clients.take(client):
            self._conns.discard(task)
            self._too_many(peer, client, per_client=True)
            writer.transport.abort()
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.lines.line(("mllp.connected", client), "mllp.connected", "info", channel=self.channel, peer=peer)
        parser = FrameParser(self.config.max_frame_bytes)
        reason = "closed"
        count = 0
        loop = asyncio.get_running_loop()
        idle, frame_limit = self.config.idle_timeout, self.config.frame_timeout
        # Outside a frame the connection may wait idle_timeout from its start or from the
        # last frame; blank bytes between frames do not move that. Inside a frame it has
        # frame_timeout from the start block, and idle_timeout between two reads.
        idle_deadline = loop.time() + idle
        frame_deadline = 0.0
        started = 0
        held = 0  # this connection's share of self._buffered
        restarts = dropped = 0  # restarts of the current frame, not logged yet
        try:
            while True:
                if parser.buffered > SMALL_FRAME and self._buffered.over():
                    try:  # the listener holds too much unfinished: wait for others, not past this frame
                        async with asyncio.timeout_at(frame_deadline):
                            await self._buffered.below()
                    except TimeoutError:
                        reason = "frame_timeout"
                        break
                deadline = min(frame_deadline, loop.time() + idle) if parser.in_frame else idle_deadline
                try:
                    async with asyncio.timeout_at(deadline):
                        data = await reader.read(READ_CHUNK)
                except TimeoutError:
                    reason = "frame_timeout" if parser.in_frame else "idle_timeout"
                    break
                if not data:
                    reason = "peer_closed" if not parser.in_frame else "peer_closed_mid_frame"
                    break
                close = ended = False
                events = parser.feed(data)
                held = self._buffered.move(held, parser.buffered)
                for ev in events:
                    if isinstance(ev, Frame | Oversized):
                        restarts, dropped = self._restarted(peer, restarts, dropped)
                    if isinstance(ev, Frame):
                        count += 1
                        ended = True
                        answer = await self._handle(ev.payload, peer)
                    elif isinstance(ev, Oversized):
                        ended = True
                        answer = self._oversized(ev, peer)
                    elif isinstance(ev, Restarted):
                        # logged once per frame (when it ends, or the connection does), with the count
                        restarts += ev.restarts
                        dropped += ev.dropped
                        continue
                    else:  # Unframed: not MLLP, no ACK can be framed sensibly
                        assert isinstance(ev, Unframed)
                        restarts, dropped = self._restarted(peer, restarts, dropped)
                        log.warning("mllp.unframed_data", channel=self.channel, peer=peer,
                                    bytes=ev.sample_size, **({"restarts": ev.restarts} if ev.restarts else {}))
                        reason = "unframed_data"
                        close = True
                        break
                    if answer is not None:
                        writer.write(frame(answer))
                        if not writer.transport.get_write_buffer_size():
                            await writer.drain()  # all sent already: the usual case, no timer
                            continue
                        try:  # a peer that sends but never reads its ACKs is not waited for forever
                            async with asyncio.timeout(frame_limit):
                                await writer.drain()
                        except TimeoutError:
                            reason = "ack_not_read"
                            close = True
                            break
                if close:
                    break
                if parser.frames_started != started:
                    started = parser.frames_started
                    frame_deadline = loop.time() + frame_limit
                if ended and not parser.in_frame:
                    idle_deadline = loop.time() + idle
        except asyncio.CancelledError:
            reason = "shutdown"
        except (ConnectionError, OSError) as e:
            reason = type(e).__name__
        except Exception:  # the boundary: one connection's bug must not reach the others
            log.exception("mllp.connection_error", channel=self.channel, peer=peer)
            reason = "internal_error"
        finally:
            self._restarted(peer, restarts, dropped)
            self._conns.discard(task)
            self._clients.give_back(client)
            self._buffered.move(held, 0)
            self.lines.line(("mllp.disconnected", client, reason, count > 0), "mllp.disconnected", "info",
                            channel=self.channel, peer=peer, reason=reason, messages=count)
            # close() waits to flush what is buffered; a peer that does not read would keep the
            # socket (and its buffered ACKs) forever, so that case, and any close that does not
            # finish soon, is an abort.
            if reason == "ack_not_read":
                writer.transport.abort()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                writer.close()
                await asyncio.wait_for(writer.wait_closed(), 2)
            # (a closed TLS transport has dropped its protocol: get_write_buffer_size raises then)
            with contextlib.suppress(AttributeError):
                if not writer.transport.is_closing() or writer.transport.get_write_buffer_size():
                    writer.transport.abort()

    def _restarted(self, peer: str, restarts: int, dropped: int) -> tuple[int, int]:
        """One ``mllp.frame_restarted`` line for the restarts of a frame (the parser already makes a
        run of start blocks one start, and stops a connection past its ``max_restarts``)."""
        if restarts:
            log.warning("mllp.frame_restarted", channel=self.channel, peer=peer, restarts=restarts,
                        dropped_bytes=dropped)
        return 0, 0

    # -- one message ---------------------------------------------------------------
    async def _handle(self, payload: bytes, peer: str) -> bytes | None:
        """Everything about one frame; returns the ACK bytes to send (None: MSH-15 says none).
        A frame that starts with FHS or BHS is a batch (``_handle_batch``)."""
        if is_batch(payload):
            return await self._handle_batch(payload, peer)
        checked = await self._check_message(payload, peer)
        if isinstance(checked, Hl7Answer):
            return _wire(checked)
        return _wire(await self.hl7.store(checked, peer))

    async def _check_message(self, payload: bytes, peer: str) -> _Checked | Hl7Answer:
        """Steps 1-2: the receiver's checks (listeners/hl7_receive.py, shared by every HL7 source),
        then validation when configured; a refusal is an ``Hl7Answer``."""
        checked = self.hl7.check(payload, peer)
        if isinstance(checked, Hl7Answer) or self._validator is None:
            return checked
        try:
            check_limits(checked.header, checked.payload, self._limits)
            await self._validator.validate(checked.header, checked.payload)
        except HL7Error as e:
            return self.hl7.refuse(e.header or checked.header, e, peer=peer)
        except Exception:
            log.exception("mllp.check_failed", channel=self.channel, peer=peer)
            return self.hl7.refuse(checked.header, HL7Error(APPLICATION_INTERNAL_ERROR,
                                                            "message could not be checked"), peer=peer)
        return checked

    # -- a batch (HL7 v2.5 2.10.3) ------------------------------------------------------
    async def _handle_batch(self, payload: bytes, peer: str) -> bytes:
        """Every message of an FHS/BHS batch through the same checks and intake as a message sent
        alone, then one batch ACK (``engine.hl7.batch.build_batch_ack``).

        Checks run in order, one message at a time (validation may take a worker process);
        the messages that pass are then submitted together in their batch order, so they share
        group commits and their deliveries keep the batch's order. Each one is stored, routed and
        de-duplicated by its own MSH-10 and fails alone. The answer lists the messages in error
        (``batch_ack: errors``, what 2.10.3 describes; an empty batch acknowledges them all) or
        every message's ACK (``batch_ack: all``).
        """
        t0 = time.perf_counter()
        request = read_batch(payload)
        ref = request.control_id or next((b.control_id for b in request.batches if b.control_id), "")
        per_batch: list[list[bytes]] = []
        comments: list[str] = []
        totals = {"messages": 0, "errors": 0}
        for b in request.batches:
            checked: list[_Checked | Hl7Answer] = []
            for msg in b.messages:
                checked.append(await self._check_message(msg, peer))
            stored: dict[int, Hl7Answer] = {}
            todo = [(i, c) for i, c in enumerate(checked) if isinstance(c, _Checked)]
            label = {"batch": b.control_id or ref} if b.control_id or ref else None
            for k in range(0, len(todo), BATCH_SUBMIT):
                chunk = todo[k:k + BATCH_SUBMIT]
                done = await asyncio.gather(*(self.hl7.store(c, peer, extra_headers=label) for _, c in chunk))
                stored.update((i, a) for (i, _), a in zip(chunk, done, strict=True))
            answers = [stored[i] if isinstance(c, _Checked) else c for i, c in enumerate(checked)]
            errors = sum(1 for a in answers if not a.ok)
            totals["messages"] += len(answers)
            totals["errors"] += errors
            keep = self.config.batch_ack == "all"
            per_batch.append([ack for a in answers if (ack := _wire(a)) is not None and (keep or not a.ok)])
            comments.append(f"{len(answers)} messages, {len(answers) - errors} accepted, {errors} in error")
        problems = request.all_problems()
        log.info("hl7.batch", channel=self.channel, peer=peer, batch=ref[:20] or None,
                 batches=len(request.batches), problems=problems or None,
                 ms=round((time.perf_counter() - t0) * 1000, 2), **totals)
        return build_batch_ack(request, per_batch, comments=comments)

    def _oversized(self, ev: Oversized, peer: str) -> bytes | None:
        err = HL7Error(APPLICATION_INTERNAL_ERROR,
                       f"message exceeds the receiver's limit of {self.config.max_frame_bytes} bytes")
        if is_batch(ev.prefix):
            # A batch too large for one frame: refused whole (nothing stored), answered as a batch
            # whose one ACK (AR 207, no MSA-2: no message was read) says why.
            request = read_batch(ev.prefix)
            request.batches[1:] = []
            for b in request.batches:
                b.problems.clear()
            request.problems.clear()
            log.warning("hl7.batch_refused", channel=self.channel, peer=peer, bytes=ev.size,
                        limit=self.config.max_frame_bytes)
            rej = build_ack(None, "AR", error=HL7Error(APPLICATION_INTERNAL_ERROR,
                            f"batch exceeds the receiver's limit of {self.config.max_frame_bytes} bytes; "
                            "nothing was stored: send smaller batches"))
            return build_batch_ack(request, [[rej]], comments=["batch refused: too large, nothing stored"])
        try:
            header: Header | None = read_header(ev.prefix, require=False)
        except HL7Error:
            header = None
        return _wire(self.hl7.refuse(header, err, peer=peer, internal=f"oversized:{ev.size}"))


def _wire(answer: Hl7Answer) -> bytes | None:
    """The bytes to send for an answer: none when the message's MSH-15 asks for no such ACK."""
    return answer.ack if should_send(answer.header, answer.code) else None


@component("source", "mllp", config=MLLPSourceConfig)
def build(config: MLLPSourceConfig, ctx: ComponentContext) -> Any:
    """HL7 v2 MLLP listener: stores each message, then answers AA/CA (or AE/AR, CE/CR with ERR)."""
    return MLLPListener(config, ctx)
