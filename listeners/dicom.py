"""`source: {type: dicom}`: a DICOM AE (pynetdicom) for Verification, Storage,
Query/Retrieve (Patient and Study Root: C-FIND, C-MOVE, C-GET) and Modality Worklist.

Peers must be named: the calling AE title has to be in ``calling_aets`` (or
``allow_any_calling_aet: true`` said explicitly) and the called AE title has to be
ours, otherwise A-ASSOCIATE-RJ. Handlers are bound as data (pynetdicom
``evt_handlers``); each has one error boundary that answers with a failure status.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from datetime import datetime
from typing import Any, Literal

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.registry import component
from engine.security.tls import TLSConfig, report_handshake_failure, server_context
from listeners import dicom_ul as ul
from listeners.dicom_contexts import STORAGE_SOP_CLASSES, VERIFICATION, add_contexts
from listeners.dicom_qr import QueryRetrieve
from listeners.dicom_store import StoreSCP
from routes.dicom_scu import check_ae_title, make_raw_aware

log = structlog.get_logger()


class DicomPeer(BaseModel):
    """A remote AE we open associations to (a C-MOVE destination); its AE title is the key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="host name or address of the peer")
    port: int = Field(ge=1, le=65535, description="TCP port of the peer")
    tls: TLSConfig | None = Field(None, description="TLS to the peer (PS3.15 B.1 / BCP 195)")
    max_pdu: int = Field(0, ge=0, description="largest PDU we accept from the peer (0 = unlimited)")


class DicomSourceConfig(ComponentConfig):
    """A DICOM listener: C-ECHO, C-STORE, C-FIND/C-MOVE/C-GET and Modality Worklist C-FIND."""

    type: Literal["dicom"]
    ae_title: str = Field("MEDRELAY", description="our AE title; associations calling another title are rejected")
    host: str = Field("127.0.0.1", description="address to bind; 0.0.0.0 to listen on every interface")
    port: int = Field(11112, ge=0, le=65535, description="TCP port (0 = any free port, for tests)")
    calling_aets: list[str] = Field(default_factory=list,
                                    description="calling AE titles allowed to associate (A-ASSOCIATE-RJ otherwise)")
    allow_any_calling_aet: bool = Field(False, description="accept any calling AE title (must be said explicitly)")
    tls: TLSConfig | None = Field(None, description="TLS for the listener (cert and key; ca + "
                                                    "require_client_cert for mutual TLS)")
    max_pdu: int = Field(262144, ge=0, description="Maximum Length we announce for PDUs we receive (0 = unlimited)")
    max_associations: int = Field(16, ge=1, description="concurrent associations")
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for association messages")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for DIMSE messages")
    network_timeout: float = Field(120.0, gt=0, description="idle seconds before an association is aborted")
    duplicates: Literal["keep_first", "replace"] = Field(
        "keep_first", description="a re-sent SOP Instance UID: keep_first answers success and keeps the "
        "first copy; replace files the new data set (an identical re-send is still recognised)")
    query_retrieve: bool = Field(True, description="serve C-FIND / C-MOVE / C-GET from the archive index")
    worklist: bool = Field(True, description="serve Modality Worklist C-FIND (engine.store.dicom.worklist)")
    case_insensitive_pn: bool = Field(True, description="match Person Names case-insensitively (PS3.4 C.2.2.2.1)")
    move_destinations: dict[str, DicomPeer] = Field(
        default_factory=dict, description="C-MOVE destinations by AE title; others get 0xA801",
        json_schema_extra={"example": {"PACS": {"host": "pacs.example", "port": 104}}})

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title(v)

    @field_validator("calling_aets")
    @classmethod
    def _calling(cls, v: list[str]) -> list[str]:
        return [check_ae_title(x) for x in v]

    @field_validator("move_destinations")
    @classmethod
    def _dests(cls, v: dict[str, DicomPeer]) -> dict[str, DicomPeer]:
        return {check_ae_title(k): p for k, p in v.items()}

    @model_validator(mode="after")
    def _allow_list(self) -> DicomSourceConfig:
        if not self.calling_aets and not self.allow_any_calling_aet:
            raise ValueError("list the peers in calling_aets, or set allow_any_calling_aet: true")
        return self


def _recv_exact(sock: socket.socket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` without its 4 KiB steps: read into one buffer in place.

    Same contract: returns ``nr_bytes`` bytes, or fewer when the peer closed; socket
    errors and timeouts propagate as before. A 512 KiB instance is otherwise ~130
    recv calls and bytearray extends in the DUL thread.
    """
    buf = bytearray(nr_bytes)
    got = 0
    with memoryview(buf) as view:
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                break
            got += n
    if got < nr_bytes:
        del buf[got:]
    return buf


def _tune_socket(event: Any) -> None:
    """On every new connection: TCP_NODELAY (small DIMSE responses must not wait for Nagle:
    one C-STORE-RSP per instance) and the in-place ``recv`` above."""
    try:
        assoc_sock = event.assoc.dul.socket
        sock = assoc_sock.socket
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            assoc_sock.recv = lambda nr_bytes: _recv_exact(assoc_sock.socket, nr_bytes)
    except (AttributeError, OSError):
        pass


FAST_SYNTAXES = frozenset((*STORAGE_SOP_CLASSES, *VERIFICATION))


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's server, with plain storage associations served by ``listeners.dicom_ul``.

    Each connection already has its own thread here (``ThreadingMixIn``); we look at
    its A-ASSOCIATE-RQ without consuming it and either serve it ourselves or hand the
    untouched socket to pynetdicom.
    """

    take_storage: Any = None  # set by DicomListener: (sock, address) -> handled?
    tls_failed: Any = None  # set by DicomListener: (address, error) -> None
    handshake_timeout: float = 30.0
    storage_sessions: set[ul.StorageAssociation]
    # Our associations run in these request threads; shutting the server down must not
    # wait for them (pynetdicom's own associations run in threads of their own).
    daemon_threads = True

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only; the TLS handshake happens in the connection's own thread.

        pynetdicom does the handshake here, in the accepting thread: one slow or silent
        client holds up every other connection, and a failed handshake vanishes without
        a trace (socketserver drops the error). Ours is timed and audited.
        """
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context is not None:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return client, address

    def _handshake(self, request: Any, client_address: Any) -> bool:
        if not isinstance(request, ssl.SSLSocket):
            return True
        try:
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
            request.settimeout(None)
            return True
        except (ssl.SSLError, OSError) as e:
            if self.tls_failed is not None:
                self.tls_failed(client_address, e)
            try:
                request.close()
            except OSError:
                pass
            return False

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if not self._handshake(request, client_address):
            return
        try:
            if self.take_storage is not None and self.take_storage(request, client_address):
                return
        except Exception as e:  # never a traceback on the console or to the peer
            log.error("dicom.association_failed", error=type(e).__name__, detail=str(e)[:200])
            try:
                request.close()
            except OSError:
                pass
            return
        super().process_request_thread(request, client_address)



class ListenerAE(AE):
    """pynetdicom's AE, counting the storage associations of ``dicom_ul`` with its own, so
    ``max_associations`` holds across both paths."""

    storage_sessions: set[ul.StorageAssociation] = set()

    @property
    def active_associations(self) -> list[Any]:
        return [*super().active_associations, *list(self.storage_sessions)]


class DicomListener:
    def __init__(self, config: DicomSourceConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.server: Any = None
        self.ae = self._make_ae()
        self._sessions_lock = threading.Lock()
        self._store: StoreSCP | None = None

    def _make_ae(self) -> ListenerAE:
        c = self.config
        ae = ListenerAE(ae_title=c.ae_title)
        ae.storage_sessions = set()
        ae.maximum_pdu_size = c.max_pdu
        ae.maximum_associations = c.max_associations
        ae.acse_timeout = c.acse_timeout
        ae.dimse_timeout = c.dimse_timeout
        ae.network_timeout = c.network_timeout
        ae.require_called_aet = True
        ae.require_calling_aet = [] if c.allow_any_calling_aet else list(c.calling_aets)
        add_contexts(ae, query_retrieve=c.query_retrieve, worklist=c.worklist)
        original = ae.associate

        def associate(*args: Any, **kwargs: Any) -> Any:  # C-MOVE sub-operation associations send raw
            return make_raw_aware(original(*args, **kwargs))

        ae.associate = associate  # type: ignore[method-assign]
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        c = self.config
        store = self._store = StoreSCP(self.ctx, ae_title=c.ae_title, replace=c.duplicates == "replace")
        out: list[tuple[Any, Any]] = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, store),
            (evt.EVT_CONN_OPEN, _tune_socket),
            (evt.EVT_ACCEPTED, self._accepted),
            (evt.EVT_REJECTED, self._rejected),
            (evt.EVT_ABORTED, self._aborted),
        ]
        qr = QueryRetrieve(self.ctx, ae_title=c.ae_title, fold_pn=c.case_insensitive_pn,
                           move_destinations=c.move_destinations)
        if c.query_retrieve or c.worklist:
            out.append((evt.EVT_C_FIND, self._find(qr)))
        if c.query_retrieve:
            out += [(evt.EVT_C_MOVE, qr.on_move), (evt.EVT_C_GET, qr.on_get)]
        return out

    @staticmethod
    def _find(qr: QueryRetrieve) -> Any:
        from listeners.dicom_contexts import WORKLIST_FIND

        def on_find(event: Any) -> Any:
            if str(event.request.AffectedSOPClassUID) in WORKLIST_FIND:
                return qr.on_worklist(event)
            return qr.on_find(event)

        def gen(event: Any) -> Any:
            yield from on_find(event)

        return gen

    def _peer(self, event: Any) -> tuple[str, str]:
        r = event.assoc.requestor
        return str(r.ae_title).strip(), f"{r.address}:{r.port}"

    def _accepted(self, event: Any) -> None:
        self.accepted(*self._peer(event))

    def _rejected(self, event: Any) -> None:
        self.rejected(*self._peer(event))

    def _aborted(self, event: Any) -> None:
        self.ended(*self._peer(event), "aborted")

    def accepted(self, aet: str, peer: str) -> None:
        log.info("dicom.association_accepted", channel=self.ctx.channel, calling_aet=aet, peer=peer)

    def rejected(self, aet: str, peer: str) -> None:
        log.warning("dicom.association_rejected", channel=self.ctx.channel, calling_aet=aet, peer=peer)
        self.ctx.audit.record("dicom.association", outcome="failure", actor=aet, peer=peer,
                              channel=self.ctx.channel, detail="A-ASSOCIATE-RJ")

    def tls_failed(self, address: Any, error: BaseException) -> None:
        report_handshake_failure(self.ctx.audit, "dicom", self.ctx.channel, address, error)

    def ended(self, aet: str, peer: str, how: str) -> None:
        if how == "aborted":
            log.info("dicom.association_aborted", channel=self.ctx.channel, calling_aet=aet, peer=peer)

    # -- plain storage associations on listeners.dicom_ul --------------------------
    def take_storage(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Serve the connection here if it is a plain storage association pynetdicom would
        accept; False leaves the socket untouched for pynetdicom."""
        c, server = self.config, self.server
        if c.tls is not None or self._store is None or server is None:
            return False
        before = sock.gettimeout()
        try:
            data = ul.peek_pdu(sock, c.acse_timeout)
        except ul.PeekTimeout:
            log.info("dicom.association_timeout", channel=self.ctx.channel, peer=f"{address[0]}:{address[1]}")
            sock.close()
            return True
        sock.settimeout(before)
        rq = ul.decode_rq(data) if data is not None else None
        if rq is None or not ul.is_plain_storage(rq, FAST_SYNTAXES):
            return False
        calling, called = str(rq.calling_ae_title).strip(), str(rq.called_ae_title).strip()
        if called != c.ae_title or not (c.allow_any_calling_aet or calling in c.calling_aets):
            return False  # pynetdicom sends the A-ASSOCIATE-RJ (and we audit it there)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hooks = ul.Hooks(store=self._store.handle, accepted=self.accepted, rejected=self.rejected,
                         ended=self.ended)
        session = ul.StorageAssociation(sock, address, rq, contexts=self.ae.supported_contexts,
                                        max_pdu=c.max_pdu, network_timeout=c.network_timeout, hooks=hooks)
        with self._sessions_lock:
            acceptors = [a for a in self.ae.active_associations if a.is_acceptor]
            full = len(acceptors) >= c.max_associations
            if not full:
                server.storage_sessions.add(session)
        if full:
            session.reject(0x02, 0x03, 0x02)  # rejected-transient, local limit exceeded (PS3.8 9.3.4)
            return True
        try:
            session.run(len(data or b""))
        finally:
            server.storage_sessions.discard(session)
        return True

    # -- Listener protocol ------------------------------------------------
    async def start(self) -> None:
        c = self.config
        ssl_ctx = server_context(c.tls) if c.tls is not None else None
        self.server = await asyncio.to_thread(self._serve, (c.host, c.port), ssl_ctx)

    def _serve(self, address: tuple[str, int], ssl_ctx: Any) -> AssociationServer:
        """``AE.start_server(block=False)`` with our server class (pynetdicom's own steps)."""
        server = self.ae.make_server(address, evt_handlers=self.handlers(), ssl_context=ssl_ctx,
                                     server_class=AssociationServer)
        server.storage_sessions = self.ae.storage_sessions
        server.take_storage = self.take_storage
        server.tls_failed = self.tls_failed
        server.handshake_timeout = self.config.acse_timeout
        stamp = datetime.now().strftime("%Y%m%d%H%M%S")
        threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True).start()
        self.ae._servers.append(server)
        return server

    async def stop(self) -> None:
        if self.server is not None:
            server, self.server = self.server, None
            await asyncio.to_thread(server.shutdown)

    @property
    def address(self) -> tuple[str, int]:
        if self.server is None:
            return self.config.host, self.config.port
        host, port = self.server.server_address[:2]
        return str(host), int(port)


@component("source", "dicom", config=DicomSourceConfig, kinds=("dicom",))
def build(config: DicomSourceConfig, ctx: ComponentContext) -> DicomListener:
    """DICOM listener: Verification, Storage, Query/Retrieve and Modality Worklist SCP."""
    return DicomListener(config, ctx)
