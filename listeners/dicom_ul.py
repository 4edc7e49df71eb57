"""Storage associations on our own DICOM Upper Layer (PS3.8 9.3) and DIMSE (PS3.7 9.3.1, 9.3.5).

Why not pynetdicom for these: its reactor polls (1 ms sleeps in the DUL and the
association loops, several on the serial path of every instance) and its generic
DIMSE machinery costs ~3 ms of CPU per 0.5 MB instance, which is all the time a
bare pynetdicom SCP takes. Issue 3 asks medrelay, with commit, index and
encryption on top, to be at least as fast as that SCP, so the common case runs
here: an association that proposes only Storage and Verification contexts and no
extended negotiation (what modalities and ``storescu`` send). Everything else
(Query/Retrieve, worklist, role selection, user identity, TLS, anything we would
reject) stays with pynetdicom, which also does all the decoding and encoding of
association PDUs for us here: we only parse P-DATA-TF here and the few command
elements of C-STORE and C-ECHO (``listeners/dicom_dimse.py``) ourselves.

The split is decided on the A-ASSOCIATE-RQ read with ``MSG_PEEK``: nothing is
consumed until we know who handles the association.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from listeners.dicom_dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    NO_DATA_SET,
    decode_command,
    encode_response,
    ui,
    us,
)
from listeners.dicom_status import STORE
from listeners.dicom_store import StoreRequest, part10, valid_uid

log = structlog.get_logger()

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ_PDU, P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x01, 0x04, 0x05, 0x07
# A-ABORT reasons (PS3.8 9.3.8): service provider source with these diagnostics
UNEXPECTED_PDU, INVALID_PARAMETER = 0x02, 0x06
HARD_PDU_CAP = 1 << 28  # with max_pdu 0 ("unlimited") a PDU length still cannot allocate more than this

# The user information items a plain storage SCU sends; anything else is pynetdicom's.
PLAIN_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
               ImplementationVersionNameNotification)


# -- the A-ASSOCIATE-RQ, read without consuming it ------------------------------

class PeekTimeout(Exception):
    """No complete A-ASSOCIATE-RQ within the ACSE timeout: the connection is closed (the
    ARTIM expiry of PS3.8 9.2.3), not handed on to wait a second timeout."""


def peek_pdu(sock: socket.socket, timeout: float) -> bytes | None:
    """The first PDU on a new connection, still in the socket's receive queue; None if it
    is not an A-ASSOCIATE-RQ of sane size (pynetdicom answers those)."""
    deadline = time.monotonic() + timeout
    want = 6
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(want, socket.MSG_PEEK | socket.MSG_WAITALL)
            if not data:
                return None
            if len(data) >= 6 and want == 6:
                if data[0] != A_ASSOCIATE_RQ_PDU:
                    return None
                want = 6 + int.from_bytes(data[2:6], "big")
                if want > 1 << 20:
                    return None
                continue
            if len(data) >= want:
                return data
            if time.monotonic() > deadline:
                raise PeekTimeout
            time.sleep(0.001)  # only while the RQ is split across segments
    except TimeoutError:
        raise PeekTimeout from None
    except OSError:
        return None


def decode_rq(data: bytes) -> A_ASSOCIATE | None:
    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(data)
        return pdu.to_primitive()
    except Exception:  # malformed: pynetdicom's own path answers it
        return None


def is_plain_storage(rq: A_ASSOCIATE, fast_syntaxes: frozenset[str]) -> bool:
    """Only Storage/Verification contexts and no extended negotiation: ours; else pynetdicom's."""
    if str(rq.application_context_name) != APPLICATION_CONTEXT:
        return False
    if not all(isinstance(item, PLAIN_ITEMS) for item in rq.user_information):
        return False
    contexts = rq.presentation_context_definition_list
    return bool(contexts) and all(str(cx.abstract_syntax) in fast_syntaxes for cx in contexts)


def peer_max_length(rq: A_ASSOCIATE) -> int:
    for item in rq.user_information:
        if isinstance(item, MaximumLengthNotification):
            return int(item.maximum_length_received or 0)
    return 0


def accept_pdu(rq: A_ASSOCIATE, results: list[PresentationContext], max_pdu: int,
               implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID,
               implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION) -> bytes:
    """A-ASSOCIATE-AC encoded by pynetdicom, with the user information its acceptor sends."""
    prim = A_ASSOCIATE()
    prim.application_context_name = APPLICATION_CONTEXT
    prim.calling_ae_title = rq.calling_ae_title
    prim.called_ae_title = rq.called_ae_title
    prim.result = 0x00
    prim.result_source = 0x01
    prim.presentation_context_definition_results_list = results
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = implementation_uid
    iv = ImplementationVersionNameNotification()
    iv.implementation_version_name = implementation_version
    prim.user_information = [ml, ic, iv]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(prim)
    return bytes(pdu.encode())


def reject_pdu(result: int, source: int, diagnostic: int) -> bytes:
    return bytes((0x03, 0, 0, 0, 0, 4, 0, result, source, diagnostic))


def abort_pdu(source: int, reason: int) -> bytes:
    return bytes((A_ABORT, 0, 0, 0, 0, 4, 0, 0, source, reason))


RELEASE_RP = bytes((0x06, 0, 0, 0, 0, 4, 0, 0, 0, 0))


def pdata_pdus(context_id: int, command: bytes, max_length: int) -> bytes:
    """The command as P-DATA-TF PDUs within the peer's Maximum Length (0 = none)."""
    room = len(command) if max_length == 0 else max(1, max_length - 6)
    out = []
    for start in range(0, len(command), room):
        chunk = command[start:start + room]
        last = 0x03 if start + room >= len(command) else 0x01
        item = struct.pack(">IBB", len(chunk) + 2, context_id, last) + chunk
        out.append(struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item)
    return b"".join(out)


# -- one association -----------------------------------------------------------------

class ProtocolError(Exception):
    def __init__(self, reason: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class Hooks:
    """What the listener does around an association (logs, audit, the store handler)."""

    store: Callable[[StoreRequest], tuple[int, str | None]]
    accepted: Callable[[str, str], None]
    rejected: Callable[[str, str], None]
    ended: Callable[[str, str, str], None]  # calling AET, peer, how: released | aborted | closed


class StorageAssociation:
    """An accepted storage association, served synchronously in its connection's thread."""

    is_acceptor = True  # counted by pynetdicom's AE.active_associations with its own

    def __init__(self, sock: socket.socket, address: tuple[str, int], rq: A_ASSOCIATE, *,
                 contexts: list[PresentationContext], max_pdu: int, network_timeout: float,
                 hooks: Hooks) -> None:
        self.sock = sock
        self.rq = rq
        self.contexts = contexts
        self.max_pdu = max_pdu
        self.network_timeout = network_timeout
        self.hooks = hooks
        self.calling_aet = str(rq.calling_ae_title).strip()
        self.peer = f"{address[0]}:{address[1]}"
        self.peer_max = peer_max_length(rq)
        self.accepted: dict[int, PresentationContext] = {}
        self._closed = threading.Event()

    # pynetdicom calls these on every active association (AE.shutdown, server.bind)
    def abort(self) -> None:
        self._send_quietly(abort_pdu(0x02, 0x00))
        self._close()

    def bind(self, *args: Any) -> None:
        pass

    def unbind(self, *args: Any) -> None:
        pass

    def reject(self, result: int, source: int, diagnostic: int) -> None:
        self._send_quietly(reject_pdu(result, source, diagnostic))
        self.hooks.rejected(self.calling_aet, self.peer)
        self._close()

    def run(self, rq_length: int) -> None:
        self._read_exact(rq_length)  # consume the A-ASSOCIATE-RQ we decoded from the peek
        results, _ = negotiate_as_acceptor(self.rq.presentation_context_definition_list, self.contexts)
        self.accepted = {int(cx.context_id): cx for cx in results if cx.result == 0x00}
        self.sock.sendall(accept_pdu(self.rq, results, self.max_pdu))
        self.hooks.accepted(self.calling_aet, self.peer)
        how = "closed"
        try:
            how = self._serve()
        except ProtocolError as e:
            log.warning("dicom.protocol_error", calling_aet=self.calling_aet, peer=self.peer, detail=str(e))
            self._send_quietly(abort_pdu(0x02, e.reason))
            how = "aborted"
        except (OSError, ConnectionError) as e:  # peer vanished or idle past network_timeout
            if isinstance(e, TimeoutError):
                self._send_quietly(abort_pdu(0x02, 0x00))
            how = "aborted"
        finally:
            self._close()
            self.hooks.ended(self.calling_aet, self.peer, how)

    def _serve(self) -> str:
        self.sock.settimeout(self.network_timeout)
        limit = self.max_pdu or HARD_PDU_CAP
        command: list[Any] = []
        data: list[Any] = []
        cmd: dict[int, bytes] | None = None
        cmd_cx = 0
        while True:
            head = self._read_exact(6, eof_ok=True)
            if head is None:
                return "closed"
            kind, length = head[0], int.from_bytes(head[2:6], "big")
            if kind == P_DATA_TF:
                if length > limit:
                    raise ProtocolError(INVALID_PARAMETER, f"P-DATA-TF of {length} bytes, Maximum Length {limit}")
                body = self._read_exact(length)
                for cx_id, control, value in self._pdvs(body):
                    if cmd is None:  # still assembling a command
                        if not control & 0x01:
                            raise ProtocolError(UNEXPECTED_PDU, "data set fragment before its command")
                        command.append(value)
                        cmd_cx = cx_id
                        if control & 0x02:
                            try:
                                cmd = decode_command(b"".join(command))
                            except ValueError as e:
                                raise ProtocolError(INVALID_PARAMETER, str(e)) from None
                            command = []
                            if us(cmd, 0x00000800) == NO_DATA_SET:
                                self._dispatch(cmd, cmd_cx, [])
                                cmd = None
                    else:
                        if control & 0x01 or cx_id != cmd_cx:
                            raise ProtocolError(UNEXPECTED_PDU, "command fragment inside a data set")
                        data.append(value)
                        if control & 0x02:
                            self._dispatch(cmd, cmd_cx, data)
                            cmd, data = None, []
            elif kind == A_RELEASE_RQ:
                if length != 4:  # fixed size (PS3.8 9.3.6); never allocate what a peer announces
                    raise ProtocolError(INVALID_PARAMETER, f"A-RELEASE-RQ of {length} bytes")
                self._read_exact(length)
                self.sock.sendall(RELEASE_RP)
                return "released"
            elif kind == A_ABORT:
                return "aborted"
            else:
                raise ProtocolError(UNEXPECTED_PDU, f"PDU type 0x{kind:02x} on an established association")

    def _pdvs(self, body: bytearray) -> list[tuple[int, int, memoryview]]:
        out = []
        view = memoryview(body)
        pos, end = 0, len(body)
        while pos < end:
            if pos + 6 > end:
                raise ProtocolError(INVALID_PARAMETER, "truncated PDV item")
            item_len = int.from_bytes(body[pos:pos + 4], "big")
            if item_len < 2 or pos + 4 + item_len > end:
                raise ProtocolError(INVALID_PARAMETER, "PDV item length out of range")
            cx_id, control = body[pos + 4], body[pos + 5]
            if cx_id not in self.accepted:
                raise ProtocolError(INVALID_PARAMETER, f"presentation context {cx_id} was not accepted")
            out.append((cx_id, control, view[pos + 6:pos + 4 + item_len]))
            pos += 4 + item_len
        return out

    def _dispatch(self, cmd: dict[int, bytes], cx_id: int, data: list[Any]) -> None:
        field, msg_id = us(cmd, 0x00000100), us(cmd, 0x00000110)
        if field == C_CANCEL_RQ:  # nothing to cancel: a C-STORE is answered before the next request
            return
        if msg_id is None:
            raise ProtocolError(INVALID_PARAMETER, "command without Message ID")
        cx = self.accepted[cx_id]
        sop_class = ui(cmd, 0x00000002)
        if field == C_ECHO_RQ:
            rsp = encode_response(C_ECHO_RSP, msg_id, sop_class or str(cx.abstract_syntax), 0x0000)
        elif field == C_STORE_RQ and data:
            sop_uid = ui(cmd, 0x00001000)
            status, comment = self._store(cx, sop_class, sop_uid, data)
            rsp = encode_response(C_STORE_RSP, msg_id, sop_class, status, sop_uid=sop_uid, comment=comment)
        else:
            raise ProtocolError(UNEXPECTED_PDU, f"command 0x{field or 0:04x} on a storage association")
        self.sock.sendall(pdata_pdus(cx_id, rsp, self.peer_max))

    def _store(self, cx: PresentationContext, sop_class: str, sop_uid: str,
               data: list[Any]) -> tuple[int, str | None]:
        if not valid_uid(sop_class) or not valid_uid(sop_uid):
            return STORE["mismatch"].code, "invalid Affected SOP Class/Instance UID"
        if sop_class != str(cx.abstract_syntax):
            return STORE["mismatch"].code, "Affected SOP Class UID differs from the presentation context"
        ts = str(cx.transfer_syntax[0])
        blob, meta_end = part10(sop_class, sop_uid, ts, data)
        req = StoreRequest(sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=ts,
                           calling_aet=self.calling_aet, peer=f"{self.calling_aet}@{self.peer}",
                           part10=blob, meta_end=meta_end)
        return self.hooks.store(req)

    # -- socket helpers --------------------------------------------------------------
    def _read_exact(self, n: int, *, eof_ok: bool = False) -> bytearray | None:
        buf = bytearray(n)
        got = 0
        with memoryview(buf) as view:
            while got < n:
                k = self.sock.recv_into(view[got:], n - got)
                if not k:
                    if eof_ok and got == 0:
                        return None
                    raise ConnectionError("peer closed the connection mid-PDU")
                got += k
        return buf

    def _send_quietly(self, pdu: bytes) -> None:
        try:
            self.sock.sendall(pdu)
        except OSError:
            pass

    def _close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
