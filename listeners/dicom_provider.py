"""pynetdicom's side of the listener: every association that is not plain storage.

pynetdicom 3.0's acceptor reads a PDU as ``recv(6)`` and then ``recv(declared
length)``, whatever the length; and its DIMSE layer drops a C-STORE-RQ with an empty
Affected SOP Instance UID without answering (the peer waits until its own timeout)
and aborts on one longer than 64 characters, where medrelay's Upper Layer answers
0xA900. Three adapters, installed per association by ``RequestHandler``; nothing
else of pynetdicom is changed:

- ``BoundedSocket`` replays the A-ASSOCIATE-RQ that the connection's thread already
  read (``dicom_ul.read_request``), checks every PDU header against
  ``dicom_ul.pdu_limit`` before reading the body (a longer one gets A-ABORT and the
  connection closes, nothing allocated), reads bodies in place (no 4 KiB steps), and
  bounds a stalled read by the idle timeout.
- ``StoreCommandGuard`` runs ``dicom_dimse.check_store_rq``, the check of the plain
  path, on every C-STORE-RQ before pynetdicom's DIMSE layer sees it, and answers a
  refused one with the same bytes as ``dicom_ul``. An accepted one it serves itself with
  the plain path's hooks (``dicom_ul.Hooks``): the data set is collected, or streamed to
  its blob from ``stream_min`` bytes on, and stored by the same ``StoreSCP.handle``; the
  response goes out through the DUL's queue. pynetdicom's DIMSE layer would assemble the
  whole data set in memory, however large, on an association that also proposes
  Query/Retrieve, worklist or MPPS.
- ``RequestHandler.handle`` waits for its association to end, so the connection
  counts against ``max_connections`` for as long as it is open.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket
from pynetdicom.transport import RequestHandler as _PynetdicomHandler

from listeners.dicom_dimse import (
    C_STORE_RQ,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    INVALID_PARAMETER,
    MAX_COMMAND,
    NO_DATA_SET,
    UNEXPECTED_PDU,
    check_store_rq,
    decode_command,
    store_response,
    us,
)
from listeners.dicom_ul import Hooks, StoreInProgress, abort_pdu, pdu_limit, recv_exact, refuse_command

log = structlog.get_logger()

# The data set of any request but a C-STORE (a C-FIND/C-MOVE/C-GET identifier, an N-CREATE or
# N-SET attribute list, a storage commitment N-ACTION) is collected whole in memory by
# pynetdicom's DIMSE layer: a peer that never sends the last fragment would grow the process
# without end. A commitment request of ``max_instances`` (10000) references is ~1.2 MiB (8 MiB
# holds ~65 000), a C-FIND identifier a few KiB; a request past this size is not a request, it
# gets A-ABORT. The bound is per association: 16 associations (max_associations) each holding a
# request just under it are 128 MiB, where 64 MiB each took the engine past 1 GB (probe).
MAX_REQUEST_DATA = 8 * 1024 * 1024

KNOWN_PDUS = range(0x01, 0x08)  # pynetdicom reads a body only for these (others: Evt19 from the header)


def _peer(assoc: Any) -> tuple[str, str]:
    r = assoc.requestor
    return str(r.ae_title or "").strip(), f"{r.address}:{r.port}"


class BoundedSocket(AssociationSocket):
    """pynetdicom's AssociationSocket with the PDU length limits of ``dicom_ul``.

    Installed on the socket pynetdicom made (``__class__`` is swapped rather than a
    second AssociationSocket made, which would queue a second Evt5 in the DUL).
    """

    _prefix: bytes
    _pos: int
    _max_pdu: int
    _header_next: bool
    _channel: str

    def bound(self, prefix: bytes, *, max_pdu: int, channel: str) -> None:
        self._prefix, self._pos = prefix, 0
        self._max_pdu = max_pdu
        self._header_next = True
        self._channel = channel

    @property
    def ready(self) -> bool:
        if self._pos < len(self._prefix):
            return True
        return bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        """The DUL reads a header (6 bytes), then, for a known PDU type, its body."""
        if not self._header_next:
            self._header_next = True
            return self._read(nr_bytes)
        head = self._read(nr_bytes)
        if len(head) == 6 and head[0] in KNOWN_PDUS:
            kind, length = head[0], int.from_bytes(head[2:6], "big")
            limit = pdu_limit(kind, self._max_pdu)
            if length > limit:
                self._refuse(f"PDU type 0x{kind:02x} of {length} bytes, limit {limit}")
                return bytearray()  # the DUL sees the connection closed (Evt17)
            self._header_next = False
        return head

    def _read(self, n: int) -> bytearray:
        out = bytearray()
        if self._pos < len(self._prefix):  # the A-ASSOCIATE-RQ read before the hand-off
            out += self._prefix[self._pos:self._pos + n]
            self._pos += len(out)
            if self._pos >= len(self._prefix):
                self._prefix, self._pos = b"", 0
            if len(out) == n:
                return out
        sock = self.socket
        if sock is None:
            return out
        try:
            rest = recv_exact(sock, n - len(out))
        except TimeoutError:  # a PDU begun and not finished within the idle timeout
            self._refuse("PDU not completed within the idle timeout", reason=0x00)
            return bytearray()
        except OSError:  # reset by the peer: a short read, which the DUL takes as the close it is
            return out
        if not out:
            return rest
        out += rest
        return out

    def _refuse(self, detail: str, reason: int = INVALID_PARAMETER) -> None:
        calling, peer = _peer(self.assoc)
        log.warning("dicom.protocol_error", channel=self._channel, calling_aet=calling, peer=peer, detail=detail)
        sock = self.socket
        if sock is not None:
            try:
                sock.sendall(abort_pdu(0x02, reason))
            except OSError:
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class StoreCommandGuard:
    """Wraps ``assoc.dimse.receive_primitive`` (called in the DUL thread for every P-DATA).

    Command fragments are held until the command set is complete (a few hundred bytes).
    A C-STORE-RQ never reaches pynetdicom: one that ``check_store_rq`` refuses has its data
    set read past, one it passes is stored here (``StoreInProgress``, with ``hooks``), and
    either response goes out through the DUL's own queue. Everything else, data set
    fragments included, is forwarded as it came.
    """

    def __init__(self, assoc: Any, forward: Callable[[P_DATA], None], channel: str,
                 hooks: Hooks | None = None) -> None:
        self.assoc = assoc
        self.forward = forward
        self.channel = channel
        self.hooks = hooks  # the plain path's storage; None: accepted C-STOREs go to pynetdicom
        self.storing: StoreInProgress | None = None  # a C-STORE served here, its data set arriving
        self.storing_cx = 0
        self.held: list[Any] = []
        self.held_len = 0
        self.skipping: tuple[int, bytes] | None = None  # (context, response) of a refused C-STORE
        self.expect_data = False  # a forwarded command's data set is on its way
        self.data_room: int | None = None  # bytes its data set may still take (None: a C-STORE's)
        self.dead = False

    def __call__(self, primitive: P_DATA) -> None:
        if self.dead:
            return
        out: list[Any] = []
        changed = False
        for item in primitive.presentation_data_value_list:
            value = item[1]
            control = value[0] if value else 0
            if self.skipping is not None:
                changed = True
                if control & 0x01:
                    self._abort(UNEXPECTED_PDU, "command fragment inside a data set")
                    return
                if control & 0x02:
                    self._reply(*self.skipping)
                    self.skipping = None
                continue
            if control & 0x01 and self.storing is not None:
                self._abort(UNEXPECTED_PDU, "command fragment inside a data set")
                return
            if not control & 0x01 and self.storing is not None:
                changed = True
                if item[0] != self.storing_cx:
                    self._abort(UNEXPECTED_PDU, "data set fragment of another presentation context")
                    return
                self.storing.add(memoryview(value)[1:])
                if control & 0x02:
                    storing, self.storing = self.storing, None
                    self._reply(self.storing_cx, store_response(storing.cmd, *storing.finish()))
                continue
            if not control & 0x01:
                if self.held or not self.expect_data:
                    self._abort(UNEXPECTED_PDU, "data set fragment before its command")
                    return
                if control & 0x02:
                    self.expect_data = False
                if self.data_room is not None:
                    self.data_room -= len(value) - 1
                    if self.data_room < 0:
                        self._abort(INVALID_PARAMETER, f"request data set longer than {MAX_REQUEST_DATA} bytes")
                        return
                out.append(item)  # a data set fragment of a forwarded command: pynetdicom's
                continue
            changed = True
            self.held.append(item)
            self.held_len += len(value) - 1
            if self.held_len > MAX_COMMAND:
                self._abort(INVALID_PARAMETER, f"command set longer than {MAX_COMMAND} bytes")
                return
            if control & 0x02:  # the last fragment of the command set
                held, self.held, self.held_len = self.held, [], 0
                verdict = self._check(held)
                if verdict == "aborted":
                    return
                if verdict == "forward":
                    out.extend(held)
        if not changed:
            self.forward(primitive)
        elif out:
            rest = P_DATA()
            rest.presentation_data_value_list = [[int(i[0]), bytes(i[1])] for i in out]  # bytes: no copy
            self.forward(rest)

    def _check(self, held: list[Any]) -> str:
        cx_id = held[-1][0]
        try:
            cmd = decode_command(b"".join(bytes(v[1][1:]) for v in held))
        except ValueError as e:
            self._abort(INVALID_PARAMETER, str(e))
            return "aborted"
        if us(cmd, COMMAND_FIELD) != C_STORE_RQ:
            self.expect_data = us(cmd, DATA_SET_TYPE) != NO_DATA_SET
            self.data_room = MAX_REQUEST_DATA
            return "forward"
        cx = self.assoc._accepted_cx.get(cx_id)  # pynetdicom 3.0: accepted contexts by ID
        if cx is None:
            self._abort(INVALID_PARAMETER, f"presentation context {cx_id} was not accepted")
            return "aborted"
        refusal = check_store_rq(cmd, str(cx.abstract_syntax))
        if refusal is None and self.hooks is not None:  # check_store_rq passes only one with a data set
            calling, peer = _peer(self.assoc)
            self.storing = StoreInProgress(self.hooks, cmd, str(cx.transfer_syntax[0]), calling, f"{calling}@{peer}")
            self.storing_cx = cx_id
            return "own"
        if refusal is None:
            self.expect_data = True  # check_store_rq passes only a C-STORE-RQ with a data set
            self.data_room = None
            return "forward"
        if refusal.abort:
            self._abort(refusal.abort, refusal.detail)
            return "aborted"
        calling, peer = _peer(self.assoc)
        answer = refuse_command(self.hooks, cmd, refusal, str(cx.transfer_syntax[0]), calling, f"{calling}@{peer}")
        self.skipping = (cx_id, store_response(cmd, *answer))
        return "refused"

    def _reply(self, cx_id: int, rsp: bytes) -> None:
        """The C-STORE-RSP as P-DATA primitives for the DUL to send, within the peer's Maximum Length."""
        peer_max = int(self.assoc.requestor.maximum_length or 0)
        room = len(rsp) if peer_max == 0 else max(1, peer_max - 6)
        for start in range(0, len(rsp), room):
            chunk = rsp[start:start + room]
            control = 0x03 if start + room >= len(rsp) else 0x01
            p = P_DATA()
            p.presentation_data_value_list = [[cx_id, bytes((control,)) + chunk]]
            self.assoc.dul.send_pdu(p)

    def _abort(self, reason: int, detail: str) -> None:
        """The A-ABORT of ``dicom_ul`` (service provider, ``reason``), then the connection closes."""
        self.dead = True
        self.close()
        calling, peer = _peer(self.assoc)
        log.warning("dicom.protocol_error", channel=self.channel, calling_aet=calling, peer=peer, detail=detail)
        sock = self.assoc.dul.socket
        if sock is not None and sock.socket is not None:
            try:
                sock.socket.sendall(abort_pdu(0x02, reason))
            except OSError:
                pass
            sock.close()

    def close(self) -> None:
        """The association has ended: a data set still arriving is dropped (nothing stored, its
        blob removed)."""
        storing, self.storing = self.storing, None
        if storing is not None:
            storing.abort()


class RequestHandler(_PynetdicomHandler):
    """pynetdicom's handler with the adapters above; the server provides ``handoff`` (the
    A-ASSOCIATE-RQ bytes already read, by socket) and ``channel``."""

    server: Any

    def handle(self) -> None:
        assoc = self._create_association()
        sock = assoc.dul.socket
        sock.__class__ = BoundedSocket
        sock.bound(self.server.handoff.pop(self.request, b""), max_pdu=self.ae.maximum_pdu_size,
                   channel=self.server.channel)
        try:
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small RSP per instance
        except (AttributeError, OSError):
            pass
        guard = StoreCommandGuard(assoc, assoc.dimse.receive_primitive, self.server.channel,
                                  hooks=getattr(self.server, "store_hooks", None))
        assoc.dimse.receive_primitive = guard
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.dul.daemon = True  # pynetdicom's DUL thread is not a daemon: it kept the process alive at exit
        assoc.start()
        assoc.join()
        guard.close()

