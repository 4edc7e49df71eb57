"""`source: {type: dicom}`: a DICOM AE (pynetdicom) for Verification, Storage,
Query/Retrieve (Patient and Study Root: C-FIND, C-MOVE, C-GET), Modality Worklist,
Modality Performed Procedure Step (listeners/dicom_mpps.py) and Storage Commitment
(listeners/dicom_commit.py).

Peers must be named: the calling AE title has to be in ``calling_aets`` (or
``allow_any_calling_aet: true`` said explicitly) and the called AE title has to be
ours, otherwise A-ASSOCIATE-RJ. Handlers are bound as data (pynetdicom
``evt_handlers``); each has one error boundary that answers with a failure status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import socket
import ssl
import sys
import threading
import time
from datetime import datetime
from typing import Any, Literal

import structlog
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.registry import component
from engine.security import proxy_protocol
from engine.security.client_slots import ClientSlots, client_host
from engine.security.proxy_protocol import ProxyProtocolConfig
from engine.security.refusal_log import RefusalLog
from engine.security.tls import TLSConfig, report_handshake_failure, server_context
from engine.store.db import STREAM_MIN
from listeners import dicom_store_stream
from listeners import dicom_ul as ul
from listeners.dicom_commit import CommitmentSCP
from listeners.dicom_contexts import STORAGE_SOP_CLASSES, VERIFICATION, add_contexts, add_workflow_contexts
from listeners.dicom_mpps import MppsSCP
from listeners.dicom_provider import RequestHandler
from listeners.dicom_qr import TALLY_KWARG, QueryRetrieve, count_stores, retrieve_role_contexts
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


class StorageCommitmentConfig(BaseModel):
    """Storage Commitment Push Model SCP (PS3.4 J.3): which instances are safely archived."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="answer N-ACTION storage commitment requests")
    peers: dict[str, DicomPeer] = Field(
        default_factory=dict, description="where to send the N-EVENT-REPORT, by the requester's AE title, "
        "when its association has ended (PS3.4 J.3.3); without one the result waits for no one and is audited "
        "as undelivered", json_schema_extra={"example": {"CT01": {"host": "ct01.example", "port": 104}}})
    same_association: bool = Field(True, description="send the result on the requester's association while "
                                   "it is still open (else always on a new association to `peers`)")
    max_instances: int = Field(10000, ge=1, description="most instances in one request; more: 0x0213")
    retries: int = Field(3, ge=0, description="further attempts to deliver a result on a new association")
    retry_delay: float = Field(10.0, gt=0, description="seconds between those attempts")

    @field_validator("peers")
    @classmethod
    def _peers(cls, v: dict[str, DicomPeer]) -> dict[str, DicomPeer]:
        return {check_ae_title(k): p for k, p in v.items()}


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
    max_pdu: int = Field(262144, ge=0, description="Maximum Length we announce for P-DATA-TF PDUs we receive; "
                         "a longer one is answered with A-ABORT unread (0 = unlimited, still at most 256 MiB)")
    max_associations: int = Field(16, ge=1, description="concurrent associations (A-ASSOCIATE-RJ, transient, "
                                  "local limit exceeded beyond)")
    max_connections: int = Field(64, ge=1, description="open TCP connections, associated or not yet; one more "
                                 "is closed at once (at least max_associations)")
    max_connections_per_client: int | None = Field(
        None, ge=1, description="open TCP connections from one client address (the one a trusted balancer's PROXY "
        "header announces, else the peer's); one more gets A-ASSOCIATE-RJ (transient, local limit exceeded) "
        "and is closed, so one peer cannot take every place of max_connections. null (the default): no "
        "per-client cap, as a router or PACS may open many associations from one address; behind a balancer "
        "it needs the PROXY protocol (else every client is the balancer)")
    acse_timeout: float = Field(30.0, gt=0, description="seconds from connect to a complete A-ASSOCIATE-RQ, "
                                "TLS handshake included (ARTIM), then closed; and to wait for association messages")
    proxy_protocol: ProxyProtocolConfig | None = Field(
        None, description="behind a TCP load balancer (HAProxy send-proxy / send-proxy-v2): trusted = the "
        "balancers' addresses/CIDRs, timeout = seconds for the header; "
        "their connections must start with a PROXY header (v1/v2, before TLS), "
        "whose client address is logged and audited; others are served as usual")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for DIMSE messages")
    idle_timeout: float = Field(120.0, gt=0, validation_alias=AliasChoices("idle_timeout", "network_timeout"),
                                description="seconds without a byte from the peer before an established "
                                "association, or a PDU begun, is aborted (formerly network_timeout)")
    duplicates: Literal["keep_first", "replace"] = Field(
        "keep_first", description="a re-sent SOP Instance UID: keep_first answers success and keeps the "
        "first copy; replace files the new data set (an identical re-send is still recognised)")
    query_retrieve: bool = Field(True, description="serve C-FIND / C-MOVE / C-GET from the archive index")
    worklist: bool = Field(True, description="serve Modality Worklist C-FIND (engine.store.dicom.worklist)")
    case_insensitive_pn: bool = Field(True, description="match Person Names case-insensitively (PS3.4 C.2.2.2.1)")
    move_destinations: dict[str, DicomPeer] = Field(
        default_factory=dict, description="C-MOVE destinations by AE title; others get 0xA801",
        json_schema_extra={"example": {"PACS": {"host": "pacs.example", "port": 104}}})
    mpps: bool = Field(True, description="serve Modality Performed Procedure Step N-CREATE / N-SET "
                       "(listeners/dicom_mpps.py): each becomes a message with headers event: mpps, "
                       "mpps_state, ...; it takes only routes with `when: {event: mpps}`")
    storage_commitment: StorageCommitmentConfig = Field(
        default_factory=lambda: StorageCommitmentConfig(),
        description="Storage Commitment Push Model SCP (N-ACTION, N-EVENT-REPORT; listeners/dicom_commit.py): "
        "enabled, peers (requester AE title -> host, port, tls: where results go when its association has "
        "ended), same_association, max_instances, retries, retry_delay")

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
        if self.max_connections < self.max_associations:
            raise ValueError("max_connections must be at least max_associations (every association is a "
                             "connection)")
        return self


FAST_SYNTAXES = frozenset((*STORAGE_SOP_CLASSES, *VERIFICATION))


class AssociationServer(ThreadedAssociationServer):
    """pynetdicom's server: a thread per connection, bounded by ``max_connections``.

    The connection's thread does the TLS handshake, if any, reads the A-ASSOCIATE-RQ
    (``DicomListener.take_connection``) and either serves the association itself (plain
    storage, over TCP or TLS, ``listeners.dicom_ul``),
    answers it (refused, rejected, timed out), or hands it to pynetdicom with the bytes
    already read (``listeners.dicom_provider``).
    """

    listener: DicomListener
    max_connections = 64
    # socketserver's listen backlog is 5: under a burst of connections the kernel drops SYNs
    # and a peer waits a second or more per retry, before we can accept, count or refuse it.
    request_queue_size = 256
    storage_sessions: set[ul.StorageAssociation]
    store_hooks: ul.Hooks | None = None  # set by the listener: C-STOREs on pynetdicom's associations (dicom_provider)
    # Connection threads end with their association; shutting the server down must not
    # wait for them (pynetdicom's own associations run in threads of their own).
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.handoff: dict[Any, bytes] = {}  # A-ASSOCIATE-RQ bytes read, by socket, for RequestHandler
        self._local = threading.local()
        self.open_connections = 0
        self._count_lock = threading.Lock()
        self.client_slots = ClientSlots(None)  # the listener sets max_connections_per_client
        # what the accepting thread hands on (see _handle_request_noblock); None ends each
        self._starts: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._refusals: queue.SimpleQueue[Any | None] = queue.SimpleQueue()
        super().__init__(*args, **kwargs)
        assert self.socket is not None
        self.socket.setblocking(False)  # accept until EAGAIN; accepted sockets are blocking still
        for name, target in (("starter", self._start_threads), ("refuser", self._refuse_connections)):
            threading.Thread(target=target, name=f"dicom-{name}", daemon=True).start()

    @property
    def channel(self) -> str:
        return self.listener.ctx.channel

    @property
    def contexts(self) -> list[Any]:
        """The supported contexts pynetdicom deep-copies for each association: only those the
        connection of this thread proposed (``narrow_contexts``); all ~180 cost ~30 ms of CPU
        per association, the few proposed well under one."""
        narrowed = getattr(self._local, "contexts", None)
        return narrowed if narrowed is not None else self._contexts

    @contexts.setter
    def contexts(self, value: list[Any]) -> None:
        self._contexts = value

    def narrow_contexts(self, rq: Any) -> None:
        """For this connection's thread: the supported contexts of the syntaxes ``rq`` proposes
        (negotiation never looks at the others)."""
        proposed = {str(cx.abstract_syntax) for cx in rq.presentation_context_definition_list}
        self._local.contexts = retrieve_role_contexts(  # a C-GET SCU's order for its SCP-role contexts
            rq, [cx for cx in self._contexts if str(cx.abstract_syntax) in proposed])

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

    def _handle_request_noblock(self) -> None:
        """Accept every connection waiting (socketserver takes one per ``select``) and hand
        each on without waiting: a refused one to the refuser thread, one within
        ``max_connections`` to the starter thread.

        Under a flood this thread gets the GIL back after each system call only when busy
        association threads give it up; each send, close and thread start it made for another
        connection (a thread start waits for the thread to run) put every connection behind
        it further back. A C-ECHO behind 200 flooding connections waited a second for its
        accept; it now waits for 200 accepts.
        """
        for _ in range(self.request_queue_size):
            try:
                request, client_address = self.get_request()
            except OSError:  # BlockingIOError: none left
                return
            if self.verify_request(request, client_address):
                self._starts.put((request, client_address))
            else:
                self._refusals.put(request)
                self._log_refused(client_address)

    def _start_threads(self) -> None:
        while (item := self._starts.get()) is not None:
            request, client_address = item
            try:
                self.process_request(request, client_address)
            except Exception:
                self.handle_error(request, client_address)
                self.shutdown_request(request)

    def _refuse_connections(self) -> None:
        while (request := self._refusals.get()) is not None:
            _refuse_busy(request)

    def server_close(self) -> None:
        self._starts.put(None)
        self._refusals.put(None)
        super().server_close()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Count the connection; False when ``max_connections`` are open (it is then
        refused at once: no thread, nothing read)."""
        with self._count_lock:
            if self.open_connections < self.max_connections:
                self.open_connections += 1
                return True
        return False

    def _log_refused(self, client_address: Any, reason: str = "max_connections reached") -> None:
        """``dicom.connection_refused``, throttled per reason and client (``listener.lines``)."""
        limit = self.max_connections if reason == "max_connections reached" else self.client_slots.limit
        self.listener.lines.line(("dicom.connection_refused", reason, client_host(client_address)),
                                 "dicom.connection_refused", channel=self.channel, peer=_addr(client_address),
                                 reason=reason, limit=limit)

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:  # no thread (none could be started): the count is given back here
            with self._count_lock:
                self.open_connections -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        client: str | None = None
        try:
            client_address = self.listener.announced(request, client_address)
            if client_address is None:
                return
            if not self.client_slots.take(host := client_host(client_address)):
                self._refuse_client(request, client_address)
                return
            client = host
            if self.listener.take_connection(request, client_address):
                try:
                    super().process_request_thread(request, client_address)  # until the association ends
                finally:
                    self.listener.handed_back()
        except Exception as e:  # never a traceback on the console or to the peer
            log.error("dicom.association_failed", channel=self.channel, error=type(e).__name__,
                      detail=str(e)[:200])
            try:
                request.close()
            except OSError:
                pass
        finally:
            if client is not None:
                self.client_slots.give_back(client)
            self.handoff.pop(request, None)
            self._local.contexts = None
            with self._count_lock:
                self.open_connections -= 1

    def _refuse_client(self, request: Any, client_address: Any) -> None:
        """Over ``max_connections_per_client``: refused unread (TLS: before the handshake)."""
        _refuse_busy(request)
        self._log_refused(client_address, "max_connections_per_client")

    def service_actions(self) -> None:
        """pynetdicom runs a full ``gc.collect()`` every 60 turns of the accept loop (a
        50-100 ms pause holding the GIL, for every listener of the engine, and every 30 s
        when idle); the interpreter's own collector frees association cycles without it."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """socketserver would print a traceback to stderr; a log line instead."""
        e = sys.exc_info()[1]
        log.error("dicom.association_failed", channel=self.channel, peer=_addr(client_address),
                  error=type(e).__name__, detail=str(e)[:200])


def _host(peer: str) -> str:
    """The client of a ``host:port`` peer string (the throttle's key: one per client, not per port)."""
    return peer.rsplit(":", 1)[0]


def _addr(address: Any) -> str:
    try:
        return f"{address[0]}:{address[1]}"
    except (TypeError, IndexError):
        return str(address)


def _send_quietly(sock: socket.socket, pdu: bytes) -> None:
    try:
        sock.sendall(pdu)
    except OSError:
        pass


BUSY = ul.reject_pdu(0x02, 0x03, 0x02)  # A-ASSOCIATE-RJ rejected-transient, local limit exceeded


def _refuse_busy(sock: socket.socket) -> bool:
    """A-ASSOCIATE-RJ rejected-transient, local limit exceeded (PS3.8 9.3.4), then closed: a
    requestor that sent its RQ learns why and retries later. Over max_connections, over
    max_connections_per_client (both unread) and over max_associations alike. Never waits for
    the peer (the refuser thread refuses every connection of a flood): sent only if the socket
    takes it at once, and not on a TLS socket before its handshake (none is done for a refusal)."""
    if not isinstance(sock, ssl.SSLSocket):
        with contextlib.suppress(OSError):
            sock.send(BUSY, socket.MSG_DONTWAIT)
    elif sock.version() is not None:  # handshake done (max_associations): its timeout bounds the send
        _send_quietly(sock, BUSY)
    return _close(sock)


def _close(sock: socket.socket) -> bool:
    """Close a connection we are done with (False: nothing for pynetdicom)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
    return False


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
        self._handed = 0  # connections handed to pynetdicom and not ended yet
        # Every line a peer can multiply by connecting (refused, timed out or broken before
        # association, associations accepted, rejected, aborted): once per kind and client every
        # 10 s, with the count of the others (engine/security/refusal_log.py). Audit rows are not.
        self.lines = RefusalLog()
        self._proxy = proxy_protocol.Trust(config.proxy_protocol) if config.proxy_protocol is not None else None
        self._store: StoreSCP | None = None
        self._commitment: CommitmentSCP | None = None

    def _make_ae(self) -> ListenerAE:
        c = self.config
        ae = ListenerAE(ae_title=c.ae_title)
        ae.storage_sessions = set()
        ae.maximum_pdu_size = c.max_pdu
        ae.maximum_associations = c.max_associations
        ae.acse_timeout = c.acse_timeout
        ae.dimse_timeout = c.dimse_timeout
        ae.network_timeout = c.idle_timeout
        ae.require_called_aet = True
        ae.require_calling_aet = [] if c.allow_any_calling_aet else list(c.calling_aets)
        add_contexts(ae, query_retrieve=c.query_retrieve, worklist=c.worklist)
        add_workflow_contexts(ae, mpps=c.mpps, storage_commitment=c.storage_commitment.enabled)
        original = ae.associate

        def associate(*args: Any, **kwargs: Any) -> Any:  # C-MOVE sub-operation associations send raw
            tally = kwargs.pop(TALLY_KWARG, None)
            assoc = make_raw_aware(original(*args, **kwargs))
            if tally is not None:  # what on_move will log: count what this association really sends
                tally.connected = bool(assoc.is_established)
                count_stores(assoc, tally)
            return assoc

        ae.associate = associate  # type: ignore[method-assign]
        return ae

    def handlers(self) -> list[tuple[Any, Any]]:
        c = self.config
        store = self._store = StoreSCP(self.ctx, ae_title=c.ae_title, replace=c.duplicates == "replace")
        out: list[tuple[Any, Any]] = [
            (evt.EVT_C_ECHO, lambda event: 0x0000),
            (evt.EVT_C_STORE, store),
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
        if c.mpps:
            mpps = MppsSCP(self.ctx, ae_title=c.ae_title)
            out += [(evt.EVT_N_CREATE, mpps.on_n_create), (evt.EVT_N_SET, mpps.on_n_set),
                    # N-GET is optional for the MPPS SCP and not served: 0x0211 Unrecognized
                    # Operation (PS3.7 Annex C), not pynetdicom's 0x0110 with a traceback in the log
                    (evt.EVT_N_GET, lambda event: (0x0211, None))]
        if c.storage_commitment.enabled:
            self._commitment = CommitmentSCP(self.ctx, c.storage_commitment, ae=self.ae, ae_title=c.ae_title)
            out.append((evt.EVT_N_ACTION, self._commitment.on_n_action))
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
        """pynetdicom's own rejections (AE titles were checked before the hand-off)."""
        aet, peer = self._peer(event)
        rq = event.assoc.requestor.primitive
        called = str(rq.called_ae_title).strip() if rq is not None else None
        identity = getattr(event.assoc.requestor, "user_identity", None) is not None
        self.rejected(aet, peer, "user identity not accepted" if identity else "association limit reached",
                      called_aet=called)

    def _aborted(self, event: Any) -> None:
        self.ended(*self._peer(event), "aborted")

    def accepted(self, aet: str, peer: str) -> None:
        self.lines.line(("dicom.association_accepted", _host(peer), aet), "dicom.association_accepted", "info",
                        channel=self.ctx.channel, calling_aet=aet, peer=peer)

    def rejected(self, aet: str, peer: str, reason: str, called_aet: str | None = None) -> None:
        """A-ASSOCIATE-RJ sent: which AE title was wrong (or which limit), logged (throttled)
        and audited (every one)."""
        self.lines.line(("dicom.association_rejected", _host(peer), reason), "dicom.association_rejected",
                        channel=self.ctx.channel, calling_aet=aet, called_aet=called_aet, peer=peer, reason=reason)
        self.ctx.audit.record("dicom.association", outcome="failure", actor=aet, peer=peer,
                              channel=self.ctx.channel, detail=f"A-ASSOCIATE-RJ: {reason}")

    def tls_failed(self, address: Any, error: BaseException) -> None:
        report_handshake_failure(self.ctx.audit, "dicom", self.ctx.channel, address, error)

    def ended(self, aet: str, peer: str, how: str) -> None:
        if how == "aborted":
            self.lines.line(("dicom.association_aborted", _host(peer)), "dicom.association_aborted", "info",
                            channel=self.ctx.channel, calling_aet=aet, peer=peer)

    # -- each connection, in its own thread ----------------------------------------
    def rejection(self, rq: Any) -> tuple[int, str] | None:
        """(A-ASSOCIATE-RJ diagnostic, reason) for AE titles we do not accept (PS3.8 9.3.4,
        service-user source); the called AE title first, as pynetdicom orders them."""
        c = self.config
        if str(rq.called_ae_title).strip() != c.ae_title:
            return 0x07, "called AE title not recognised"
        if not c.allow_any_calling_aet and str(rq.calling_ae_title).strip() not in c.calling_aets:
            return 0x03, "calling AE title not recognised"
        return None

    def announced(self, sock: socket.socket, address: tuple[str, int]) -> tuple[str, int] | None:
        """The peer to log and audit: from a trusted balancer, the client its PROXY header
        names (read raw, before any TLS handshake, within acse_timeout); None when that header
        is missing or malformed (the connection is closed, nothing else read)."""
        if self._proxy is None or not self._proxy.trusted(address):
            return address
        try:
            header = proxy_protocol.read_socket(sock, min(self._proxy.config.timeout, self.config.acse_timeout))
        except proxy_protocol.ProxyError as e:
            log.warning("dicom.proxy_header_refused", channel=self.ctx.channel, peer=_addr(address), detail=str(e))
            _close(sock)
            return None
        return proxy_protocol.peer_of(header, address)

    def take_connection(self, sock: socket.socket, address: tuple[str, int]) -> bool:
        """Read the A-ASSOCIATE-RQ within ``acse_timeout`` of the connect (TLS handshake
        included) and deal with the connection: True hands it to pynetdicom (with the RQ
        bytes in ``server.handoff``), False means it was served or answered here and is closed."""
        c, server = self.config, self.server
        peer = _addr(address)
        deadline = time.monotonic() + c.acse_timeout
        if isinstance(sock, ssl.SSLSocket) and not self._handshake(sock, address, deadline):
            return False
        try:
            data = ul.read_request(sock, deadline)
        except ul.ArtimExpired:
            self.lines.line(("dicom.association_timeout", _host(peer)), "dicom.association_timeout", "info",
                            channel=self.ctx.channel, peer=peer, seconds=c.acse_timeout)
            return _close(sock)
        except ul.Refused as r:
            self.lines.line(("dicom.protocol_error", _host(peer)), "dicom.protocol_error", channel=self.ctx.channel,
                            peer=peer, detail=str(r))
            if r.answer:
                _send_quietly(sock, r.answer)
            return _close(sock)
        except OSError:
            return _close(sock)
        if data is None:
            return _close(sock)
        rq = ul.decode_rq(bytes(data))
        if rq is not None:
            refused = self.rejection(rq)
            if refused is not None:
                self.rejected(str(rq.calling_ae_title).strip(), peer, refused[1],
                              called_aet=str(rq.called_ae_title).strip())
                _send_quietly(sock, ul.reject_pdu(0x01, 0x01, refused[0]))
                return _close(sock)
            # plain TCP or TLS alike: a TLS socket is served once its handshake (and with it
            # the client-certificate check) has passed above, recv/sendall being the same
            if self._store is not None and server is not None and ul.is_plain_storage(rq, FAST_SYNTAXES):
                self._serve_storage(sock, address, rq)
                return False
        # pynetdicom's (or malformed: pynetdicom answers it); its reads wait idle_timeout at most
        assert server is not None
        sock.settimeout(c.idle_timeout)
        server.handoff[sock] = bytes(data)
        if rq is not None:
            server.narrow_contexts(rq)
        if not self._reserve():  # last: from here on the slot is given back by handed_back()
            self._limit_reached(sock, rq, peer)
            return False
        return True

    # -- max_associations, counted across both paths ------------------------------------
    def _reserve(self, session: ul.StorageAssociation | None = None) -> bool:
        """Take one of ``max_associations`` (for a storage session, or for a hand-off to
        pynetdicom until ``handed_back``). Checked here, before pynetdicom sees the RQ: a
        rejection pynetdicom sends leaves it waiting (ARTIM, polling) for the peer to close."""
        assert self.server is not None
        with self._sessions_lock:
            if len(self.server.storage_sessions) + self._handed >= self.config.max_associations:
                return False
            if session is None:
                self._handed += 1
            else:
                self.server.storage_sessions.add(session)
            return True

    def handed_back(self) -> None:
        """A connection handed to pynetdicom has ended."""
        with self._sessions_lock:
            self._handed -= 1

    def _limit_reached(self, sock: socket.socket, rq: Any, peer: str) -> None:
        """Over ``max_associations``: refused (and audited) with the RQ read."""
        calling = str(rq.calling_ae_title).strip() if rq is not None else ""
        self.rejected(calling, peer, "association limit reached")
        _refuse_busy(sock)

    def _handshake(self, sock: ssl.SSLSocket, address: Any, deadline: float) -> bool:
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.do_handshake()
            return True
        except (ssl.SSLError, OSError) as e:
            self.tls_failed(address, e)
            _close(sock)
            return False

    def _serve_storage(self, sock: socket.socket, address: tuple[str, int], rq: Any) -> None:
        """A plain storage association, on ``listeners.dicom_ul`` in this thread."""
        c, server = self.config, self.server
        assert self._store is not None and server is not None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session = ul.StorageAssociation(sock, address, rq, contexts=self.ae.supported_contexts,
                                        max_pdu=c.max_pdu, idle_timeout=c.idle_timeout, hooks=self._store_hooks())
        if not self._reserve(session):
            self._limit_reached(sock, rq, session.peer)
            return
        try:
            session.run()
        finally:
            server.storage_sessions.discard(session)

    def _store_hooks(self) -> ul.Hooks:
        """How a C-STORE is stored, on either association path (``dicom_ul`` and the guard of
        ``dicom_provider``): large data sets go to their blob as they arrive."""
        assert self._store is not None
        return ul.Hooks(store=self._store.handle, accepted=self.accepted, rejected=self.rejected,
                        ended=self.ended, stream=functools.partial(dicom_store_stream.begin, self._store),
                        stream_min=STREAM_MIN, refused=self._store.refuse)

    # -- Listener protocol ------------------------------------------------
    async def start(self) -> None:
        c = self.config
        ssl_ctx = server_context(c.tls) if c.tls is not None else None
        self.server = await asyncio.to_thread(self._serve, (c.host, c.port), ssl_ctx)

    def _serve(self, address: tuple[str, int], ssl_ctx: Any) -> AssociationServer:
        """``AE.start_server(block=False)`` with our server class (pynetdicom's own steps)."""
        server = self.ae.make_server(address, evt_handlers=self.handlers(), ssl_context=ssl_ctx,
                                     server_class=AssociationServer, request_handler=RequestHandler)
        server.storage_sessions = self.ae.storage_sessions
        server.listener = self
        server.store_hooks = self._store_hooks()  # C-STOREs on pynetdicom's associations too
        server.max_connections = self.config.max_connections
        server.client_slots = ClientSlots(self.config.max_connections_per_client)
        # set before the first accept: a connection taken in the instant before start() assigned it
        # found no server and was closed unanswered (a peer connecting as the engine starts)
        self.server = server
        stamp = datetime.now().strftime("%Y%m%d%H%M%S")
        threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{stamp}", daemon=True).start()
        self.ae._servers.append(server)
        return server

    async def stop(self) -> None:
        if self._commitment is not None:
            self._commitment.close()
        if self.server is not None:
            server, self.server = self.server, None
            await asyncio.to_thread(server.shutdown)
            await asyncio.to_thread(self._end_associations)
        self.lines.flush()

    def _end_associations(self, wait: float = 5.0) -> None:
        """A-ABORT to every association still open once the port is closed, then wait for them
        (``wait`` seconds at most). A peer holding a silent Q/R association kept the process
        alive after SIGTERM for as long as it held it (pynetdicom's association threads are not
        daemon threads and nothing ended them); an instance in flight is not acknowledged and is
        sent again by its peer (the index answers a duplicate)."""
        open_now = list(self.ae.active_associations)
        for assoc in open_now:
            try:
                if isinstance(assoc, ul.StorageAssociation):
                    assoc.abort()
                else:
                    assoc.abort(block=False)  # queued for its DUL thread, which sends it and ends
            except Exception as e:  # one that cannot be aborted must not keep the others open
                log.warning("dicom.abort_failed", channel=self.ctx.channel, error=type(e).__name__)
        if open_now:
            log.info("dicom.associations_aborted", channel=self.ctx.channel, count=len(open_now))
        deadline = time.monotonic() + wait
        for assoc in open_now:
            if isinstance(assoc, threading.Thread):
                assoc.join(max(0.0, deadline - time.monotonic()))

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
