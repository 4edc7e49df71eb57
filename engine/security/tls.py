"""TLS contexts for every listener and sender, after BCP 195 (RFC 9325).

TLS 1.2 minimum, forward-secret AEAD cipher suites only for 1.2 (1.3 suites are
all acceptable), no compression, no renegotiation; mutual TLS when a CA for
client certificates is given. One place, so MLLP, DICOM, FHIR and syslog agree.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from engine.security.client_slots import client_host
from engine.security.refusal_log import RefusalLog

log = structlog.get_logger()

BCP195_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)


class TLSConfig(BaseModel):
    """`tls:` on a source or destination. Paths are files; keys never inline."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: str | None = Field(None, description="PEM certificate chain presented to the peer")
    key: str | None = Field(None, description="PEM private key file for `cert`")
    ca: str | None = Field(None, description="PEM CA bundle used to verify the peer")
    require_client_cert: bool = Field(False, description="listeners: mutual TLS, verify clients against `ca`")
    verify_hostname: bool = Field(True, description="senders: check the server name against its certificate")
    server_name: str | None = Field(None, description="senders: name to verify instead of the host")


def _harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return ctx


def server_context(cfg: TLSConfig) -> ssl.SSLContext:
    if not cfg.cert or not cfg.key:
        raise ValueError("tls on a listener needs cert and key")
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    ctx.load_cert_chain(cfg.cert, cfg.key)
    if cfg.require_client_cert:
        if not cfg.ca:
            raise ValueError("require_client_cert needs ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    if cfg.ca:
        ctx.load_verify_locations(cfg.ca)
        if not cfg.require_client_cert:
            ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


def client_context(cfg: TLSConfig) -> ssl.SSLContext:
    ctx = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if cfg.ca:
        ctx.load_verify_locations(cfg.ca)
    else:
        ctx.load_default_certs()
    ctx.check_hostname = cfg.verify_hostname
    if cfg.cert and cfg.key:
        ctx.load_cert_chain(cfg.cert, cfg.key)
    return ctx


# asyncio reports its own ssl_handshake_timeout as ConnectionAbortedError ("SSL handshake is
# taking longer than ..."): a silent or dribbling peer, not a refusal worth an audit row each.
HANDSHAKE_GIVE_UPS = (ssl.SSLEOFError, TimeoutError, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


def handshake_refused(error: BaseException) -> bool:
    """A real refusal (no or untrusted client certificate, a peer not speaking TLS, no
    common protocol or cipher), as opposed to a peer that closed or stayed silent
    before any handshake (a port probe, a health check): only the first is audited."""
    return not isinstance(error, HANDSHAKE_GIVE_UPS)


# A peer fails as many handshakes as it opens connections: their lines are throttled per
# listener, client and reason (every listener's, one table); their audit rows are not.
_lines = RefusalLog()


def report_handshake_failure(audit: Any, protocol: str, channel: str, peername: Any, error: BaseException) -> None:
    """``<protocol>.tls_rejected`` in the audit trail (a Security Alert, Node Authentication)
    for a refused handshake, every one; a probe that gave up before any handshake is only
    logged. Log lines are throttled (``engine.security.refusal_log``)."""
    peer = f"{peername[0]}:{peername[1]}" if peername else "?"
    client = client_host(peername)
    if not handshake_refused(error):
        event = f"{protocol}.tls_incomplete"
        _lines.line((event, channel, client), event, "info", channel=channel, peer=peer, error=type(error).__name__)
        return
    reason = str(getattr(error, "reason", None) or type(error).__name__)[:100]
    event = f"{protocol}.tls_rejected"
    _lines.line((event, channel, client, reason), event, channel=channel, peer=peer, reason=reason)
    audit.record(f"{protocol}.tls_rejected", outcome="failure", peer=peer, channel=channel,
                 detail=f"TLS handshake failed: {reason}")


StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def upgrade(transport: asyncio.Transport, protocol: asyncio.BaseProtocol, ssl_context: ssl.SSLContext, *,
                  handshake_timeout: float,
                  on_failure: Callable[[Any, BaseException], None]) -> asyncio.BaseTransport | None:
    """Server-side TLS on an accepted connection whose reading was paused at
    ``connection_made`` (so the ClientHello is still in the socket); ``protocol`` gets the
    TLS transport (its ``connection_made`` is called here). None, after ``on_failure``,
    when the handshake fails."""
    loop = asyncio.get_running_loop()
    peer = transport.get_extra_info("peername")
    shim = _UntilMade(protocol)
    try:
        tls_transport = await loop.start_tls(transport, shim, ssl_context, server_side=True,
                                             ssl_handshake_timeout=handshake_timeout)
    except (ssl.SSLError, OSError, ConnectionError, TimeoutError) as e:
        transport.abort()
        await asyncio.to_thread(on_failure, peer, e)  # it may write an audit row: not in the loop
        return None
    if tls_transport is None:
        transport.abort()
        return None
    shim.connection_made(tls_transport)
    return tls_transport


class _UntilMade(asyncio.Protocol):
    """Stands in for the real protocol from the end of the handshake until ``connection_made``.

    ``loop.start_tls`` does not call ``connection_made``, and the TLS layer may deliver the
    peer's first bytes before ``start_tls`` returns to us; a protocol that sets itself up
    in ``connection_made`` (uvicorn's) must not see them earlier, so they wait here.
    """

    def __init__(self, inner: asyncio.BaseProtocol) -> None:
        self.inner = inner
        self.made = False
        self.pending: list[bytes] = []
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)
        self.made = True
        for data in self.pending:
            self.inner.data_received(data)  # type: ignore[attr-defined]
        self.pending.clear()
        if self.eof:
            self.inner.eof_received()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.made:
            self.inner.data_received(data)  # type: ignore[attr-defined]
        else:
            self.pending.append(data)

    def eof_received(self) -> bool | None:
        if self.made:
            return self.inner.eof_received()  # type: ignore[attr-defined,no-any-return]
        self.eof = True
        return True  # keep the transport open until the real protocol has seen it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.made:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.made:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.made:
            self.inner.resume_writing()


async def start_tls_server(handler: StreamHandler, host: str, port: int, ssl_context: ssl.SSLContext, *,
                           limit: int, handshake_timeout: float,
                           on_failure: Callable[[Any, BaseException], None], backlog: int = 100) -> asyncio.Server:
    """``asyncio.start_server(ssl=...)``, except that a failed handshake reaches ``on_failure``.

    asyncio's own TLS server reports handshake failures only at debug level, so a
    refused client certificate would leave no audit trail. Here each connection is
    accepted in clear with reading paused (the ClientHello stays in the socket), then
    upgraded with ``loop.start_tls``; the streams are built on the TLS transport.
    (``StreamWriter.start_tls`` after ``start_server`` loses the ClientHello, which
    the stream reader has already consumed: the handshake then times out.)
    """
    loop = asyncio.get_running_loop()

    async def serve(transport: asyncio.Transport) -> None:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        tls_transport = await upgrade(transport, protocol, ssl_context, handshake_timeout=handshake_timeout,
                                      on_failure=on_failure)
        if tls_transport is not None:
            assert isinstance(tls_transport, asyncio.WriteTransport)
            await handler(reader, asyncio.StreamWriter(tls_transport, protocol, reader, loop))

    return await loop.create_server(lambda: PausedAccept(serve), host, port, reuse_address=True, backlog=backlog)


class PausedAccept(asyncio.Protocol):
    """Accepts with reading paused and hands the transport to ``serve`` in a task of its own."""

    tasks: set[asyncio.Task[None]] = set()  # held until done (the loop keeps only weak references)

    def __init__(self, serve: Callable[[asyncio.Transport], Awaitable[None]]) -> None:
        self.serve = serve

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self.serve(transport))
        PausedAccept.tasks.add(task)
        task.add_done_callback(PausedAccept.tasks.discard)
