"""Storage associations on our own DICOM Upper Layer (PS3.8 9.3) and DIMSE (PS3.7 9.3.1, 9.3.5).

Why not pynetdicom for these: its reactor polls (1 ms sleeps in the DUL and the
association loops, several on the serial path of every instance) and its generic
DIMSE machinery costs ~3 ms of CPU per 0.5 MB instance, which is all the time a
bare pynetdicom SCP takes. Issue 3 asks medrelay, with commit, index and
encryption on top, to be at least as fast as that SCP, so the common case runs
here: an association that proposes only Storage and Verification contexts and no
extended negotiation (what modalities and ``storescu`` send), over plain TCP or over
TLS (the ``ssl.SSLSocket`` after its handshake: only blocking ``recv_into`` / ``sendall``
with a timeout are used, no select or peek, so bytes OpenSSL has already decrypted and
buffered are never missed). Everything else (Query/Retrieve, worklist, role selection,
user identity, anything we would reject) stays with pynetdicom, which also does all the
decoding and encoding of
association PDUs for us here: we only parse P-DATA-TF here and the few command
elements of C-STORE and C-ECHO (``listeners/dicom_dimse.py``) ourselves.

The split is decided on the A-ASSOCIATE-RQ, which the connection's thread reads
(``read_request``) within the ARTIM time (``acse_timeout``); an association that is
pynetdicom's gets the bytes already read replayed (``listeners/dicom_provider.py``).

Every length a peer declares is checked before anything is read for it (``pdu_limit``):
an A-ASSOCIATE-RQ longer than ``ASSOCIATE_RQ_MAX`` or a P-DATA-TF longer than the
Maximum Length we announced is answered with A-ABORT unread, and buffers grow only
as bytes arrive, so a six-byte header cannot make the engine allocate gigabytes.
"""

from __future__ import annotations

import socket
import ssl
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

from engine.store.dicom import intake_check
from listeners.dicom_dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    COMMAND_FIELD,
    DATA_SET_TYPE,
    INVALID_PARAMETER,
    MAX_COMMAND,
    MESSAGE_ID,
    NO_DATA_SET,
    UNEXPECTED_PDU,
    StoreRefusal,
    check_store_rq,
    decode_command,
    encode_response,
    store_response,
    ui,
    us,
)
from listeners.dicom_store import StoreRequest, part10

log = structlog.get_logger()

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
A_ASSOCIATE_RQ_PDU, P_DATA_TF, A_RELEASE_RQ, A_ABORT = 0x01, 0x04, 0x05, 0x07
UNRECOGNISED_PDU = 0x01  # A-ABORT reason (PS3.8 9.3.8); UNEXPECTED_PDU, INVALID_PARAMETER from dicom_dimse
HARD_PDU_CAP = 1 << 28  # with max_pdu 0 ("unlimited") a P-DATA-TF still cannot be longer than this
# An A-ASSOCIATE-RQ with all 128 presentation contexts, each proposing ~28 transfer syntaxes of
# 64-character UIDs, plus a full user information item, fits; what real SCUs send is < 40 KiB.
ASSOCIATE_RQ_MAX = 256 * 1024
FIXED_PDU_LENGTH = 4  # A-ASSOCIATE-RJ, A-RELEASE-RQ/RP and A-ABORT are always 4 bytes long (PS3.8 9.3)
GROW_STEP = 1 << 20  # a buffer for a longer PDU starts at this and grows as its bytes arrive

# The user information items a plain storage SCU sends; anything else is pynetdicom's.
PLAIN_ITEMS = (MaximumLengthNotification, ImplementationClassUIDNotification,
               ImplementationVersionNameNotification)


# -- the A-ASSOCIATE-RQ, read without consuming it ------------------------------

class ArtimExpired(Exception):
    """No complete A-ASSOCIATE-RQ within the ACSE timeout: the connection is closed (the
    ARTIM expiry of PS3.8 9.2.3), not handed on to wait a second timeout."""


class Refused(Exception):
    """The first PDU is not one we read on: ``answer`` (an A-ABORT, or nothing) goes back and
    the connection is closed (PS3.8 9.2, state Sta2: AA-1 / AA-2)."""

    def __init__(self, answer: bytes, detail: str) -> None:
        super().__init__(detail)
        self.answer = answer


def pdu_limit(kind: int, max_pdu: int) -> int:
    """The longest PDU body (after the 6-byte header) we read of each type; a longer one is
    refused from its header. P-DATA-TF: the Maximum Length we announce (PS3.8 D.1)."""
    if kind in (0x01, 0x02):
        return ASSOCIATE_RQ_MAX
    if kind == P_DATA_TF:
        return max_pdu or HARD_PDU_CAP
    return FIXED_PDU_LENGTH


def read_request(sock: socket.socket, deadline: float) -> bytearray | None:
    """The A-ASSOCIATE-RQ that opens a connection, header included, read (consumed) by
    blocking reads that end at ``deadline`` (monotonic) at the latest; None when the peer
    closed first. Raises ArtimExpired, or Refused for any other first PDU or an oversized one.
    """
    head = recv_until(sock, 6, deadline)
    if len(head) < 6:
        return None
    kind, length = head[0], int.from_bytes(head[2:6], "big")
    if kind != A_ASSOCIATE_RQ_PDU:
        if kind == A_ABORT:
            raise Refused(b"", "A-ABORT before association")
        reason = UNEXPECTED_PDU if 0x02 <= kind <= 0x07 else UNRECOGNISED_PDU
        raise Refused(abort_pdu(0x02, reason), f"PDU type 0x{kind:02x} before association")
    if length > ASSOCIATE_RQ_MAX:
        raise Refused(abort_pdu(0x02, INVALID_PARAMETER),
                      f"A-ASSOCIATE-RQ of {length} bytes, limit {ASSOCIATE_RQ_MAX}")
    body = recv_until(sock, length, deadline)
    if len(body) < length:
        return None
    head += body
    return head


def recv_until(sock: socket.socket, n: int, deadline: float) -> bytearray:
    """``n`` bytes (fewer if the peer closes), each read waiting no later than ``deadline``."""
    buf = bytearray()
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ArtimExpired
        sock.settimeout(left)
        try:
            chunk = sock.recv(min(n - len(buf), 65536))
        except TimeoutError:
            raise ArtimExpired from None
        if not chunk:
            break
        buf += chunk
    return buf


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """``n`` bytes read in place (fewer if the peer closed): one buffer, no 4 KiB steps.

    Up to ``GROW_STEP`` the buffer is allocated at once (every PDU within the default
    Maximum Length: no copy); a longer one grows as its bytes arrive, so a declared
    length the peer never sends costs nothing.
    """
    buf = bytearray(min(n, GROW_STEP))
    view = memoryview(buf)
    got = 0
    try:
        while got < n:
            if got == len(buf):  # only past GROW_STEP: double, never beyond n
                view.release()
                buf.extend(bytes(min(n - got, len(buf))))
                view = memoryview(buf)
            k = sock.recv_into(view[got:], len(buf) - got)
            if not k:
                break
            got += k
    finally:
        view.release()
    if got < len(buf):
        del buf[got:]
    return buf


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
    rejected: Callable[[str, str, str], None]  # calling AET, peer, reason
    ended: Callable[[str, str, str], None]  # calling AET, peer, how: released | aborted | closed
    # A large data set (``stream_min`` bytes and more) goes to a sink as its fragments arrive
    # (listeners/dicom_store_stream.py): stream(sop_class, sop_uid, transfer_syntax, calling_aet,
    # peer) gives one with ``add(fragment)``, ``store() -> (status, comment)`` and ``abort()``,
    # or None to keep the instance in memory.
    stream: Callable[[str, str, str, str, str], Any] | None = None
    stream_min: int = 0
    # A C-STORE-RQ refused on its command (``check_store_rq``): logged and audited as every other
    # refusal (``StoreSCP.refuse``: intake_check.refuse); (status, Error Comment) to answer.
    refused: Callable[[StoreRequest, intake_check.Refusal], tuple[int, str]] | None = None


def refuse_command(hooks: Hooks | None, cmd: dict[int, bytes], refusal: StoreRefusal, transfer_syntax: str,
                   calling_aet: str, peer: str) -> tuple[int, str]:
    """The answer to a C-STORE-RQ ``check_store_rq`` refused, on either association path: its
    status and Error Comment unchanged, audited as a failed receive (nothing reached the Storage
    SCP, so nothing else audits it); the UIDs as given, ``intake_check.uid_as_given``."""
    if hooks is None or hooks.refused is None:
        return refusal.status, refusal.detail
    seen = StoreRequest(sop_class=intake_check.uid_as_given(ui(cmd, 0x00000002)),
                        sop_uid=intake_check.uid_as_given(ui(cmd, 0x00001000)), transfer_syntax=transfer_syntax,
                        calling_aet=calling_aet, peer=peer, part10=b"", meta_end=0)
    return hooks.refused(seen, intake_check.refusal(refusal.status, refusal.detail))


class StoreInProgress:
    """One C-STORE whose data set is arriving, on either association path (this module's and
    ``dicom_provider``'s guard on pynetdicom's): kept in memory, or handed to a blob sink
    (``hooks.stream``) once it reaches ``hooks.stream_min`` bytes; ``finish`` stores it through
    ``hooks.store`` or the sink, ``abort`` drops it (nothing stored, the blob removed)."""

    def __init__(self, hooks: Hooks, cmd: dict[int, bytes], transfer_syntax: str, calling_aet: str,
                 peer: str) -> None:
        self.hooks = hooks
        self.cmd = cmd
        self.transfer_syntax = transfer_syntax
        self.calling_aet = calling_aet
        self.peer = peer  # "AET@host:port"
        self.data: list[Any] = []
        self.length = 0
        self.sink: Any = None

    def add(self, fragment: Any) -> None:
        if self.sink is not None:
            self.sink.add(fragment)
            return
        self.data.append(fragment)
        self.length += len(fragment)
        if self.length >= self.hooks.stream_min and self.hooks.stream is not None:
            self._start_stream()

    def _start_stream(self) -> None:
        """The data set reached ``stream_min``: what came so far, and all that follows, go to a
        sink writing the blob (None from ``hooks.stream``: it stays in memory, asked once)."""
        assert self.hooks.stream is not None
        sink = self.hooks.stream(ui(self.cmd, 0x00000002), ui(self.cmd, 0x00001000), self.transfer_syntax,
                                 self.calling_aet, self.peer)
        if sink is None:
            self.length = -(1 << 62)
            return
        self.sink = sink
        for value in self.data:
            sink.add(value)
        self.data = []

    def finish(self) -> tuple[int, str | None]:
        """Store the instance: (status, error comment). The one boundary of both paths: an
        exception is a failure status, never success."""
        try:
            if self.sink is not None:
                sink, self.sink = self.sink, None
                return sink.store()  # the blob is finished and committed (or removed) first
            sop_class, sop_uid = ui(self.cmd, 0x00000002), ui(self.cmd, 0x00001000)
            blob, meta_end = part10(sop_class, sop_uid, self.transfer_syntax, self.data)
            self.data = []
            return self.hooks.store(StoreRequest(
                sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=self.transfer_syntax,
                calling_aet=self.calling_aet, peer=self.peer, part10=blob, meta_end=meta_end))
        except Exception as e:
            log.error("dicom.store_failed", error=type(e).__name__, detail=str(e)[:200])
            return 0xA700, "internal error, not stored"

    def abort(self) -> None:
        if self.sink is not None:
            sink, self.sink = self.sink, None
            sink.abort()
        self.data = []


class StorageAssociation:
    """An accepted storage association, served synchronously in its connection's thread."""

    is_acceptor = True  # counted by pynetdicom's AE.active_associations with its own

    def __init__(self, sock: socket.socket, address: tuple[str, int], rq: A_ASSOCIATE, *,
                 contexts: list[PresentationContext], max_pdu: int, idle_timeout: float,
                 hooks: Hooks) -> None:
        self.sock = sock
        self.rq = rq
        self.contexts = contexts
        self.max_pdu = max_pdu
        self.idle_timeout = idle_timeout
        self.hooks = hooks
        self.calling_aet = str(rq.calling_ae_title).strip()
        self.peer = f"{address[0]}:{address[1]}"
        self.peer_max = peer_max_length(rq)
        self.accepted: dict[int, PresentationContext] = {}
        self._closed = threading.Event()

    # pynetdicom calls these on every active association (AE.shutdown, server.bind)
    def abort(self) -> None:
        """From another thread: A-ABORT, then close. Over TLS only the close: the association's
        thread may be inside OpenSSL's read, and one SSL object must not be used by two threads
        at once; the shut-down socket ends that read, and the peer sees the connection end."""
        if not isinstance(self.sock, ssl.SSLSocket):
            self._send_quietly(abort_pdu(0x02, 0x00))
        self._close()

    def bind(self, *args: Any) -> None:
        pass

    def unbind(self, *args: Any) -> None:
        pass

    def run(self) -> None:
        """Accept (the A-ASSOCIATE-RQ was read by ``read_request``), then serve until the end."""
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
        except (OSError, ConnectionError) as e:  # peer vanished or idle past idle_timeout
            if isinstance(e, TimeoutError):
                log.info("dicom.association_idle", calling_aet=self.calling_aet, peer=self.peer,
                         seconds=self.idle_timeout)
                self._send_quietly(abort_pdu(0x02, 0x00))
            how = "aborted"
        finally:
            self._close()
            self.hooks.ended(self.calling_aet, self.peer, how)

    def _serve(self) -> str:
        """Read PDUs until release, abort or close. Each length is checked against ``pdu_limit``
        before its bytes are read; each read waits at most ``idle_timeout``."""
        self.sock.settimeout(self.idle_timeout)
        limit = self.max_pdu or HARD_PDU_CAP
        command: list[Any] = []
        command_len = 0
        self._incoming: StoreInProgress | None = None  # the C-STORE whose data set is arriving
        cmd: dict[int, bytes] | None = None
        refusal: StoreRefusal | None = None
        cmd_cx = 0
        try:
            return self._read_pdus(limit, command, command_len, cmd, refusal, cmd_cx)
        finally:
            if self._incoming is not None:  # ended mid-instance: nothing stored, nothing answered
                self._incoming.abort()
                self._incoming = None

    def _read_pdus(self, limit: int, command: list[Any], command_len: int,
                   cmd: dict[int, bytes] | None, refusal: StoreRefusal | None, cmd_cx: int) -> str:
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
                        command_len += len(value)
                        if command_len > MAX_COMMAND:
                            raise ProtocolError(INVALID_PARAMETER, f"command set longer than {MAX_COMMAND} bytes")
                        cmd_cx = cx_id
                        if control & 0x02:
                            cmd, refusal = self._command(b"".join(command), cmd_cx)
                            command, command_len = [], 0
                            if us(cmd, DATA_SET_TYPE) == NO_DATA_SET:
                                self._dispatch(cmd, cmd_cx, None)
                                cmd = None
                            elif refusal is None and us(cmd, COMMAND_FIELD) == C_STORE_RQ:
                                self._incoming = StoreInProgress(
                                    self.hooks, cmd, str(self.accepted[cmd_cx].transfer_syntax[0]),
                                    self.calling_aet, f"{self.calling_aet}@{self.peer}")
                    else:
                        if control & 0x01 or cx_id != cmd_cx:
                            raise ProtocolError(UNEXPECTED_PDU, "command fragment inside a data set")
                        if self._incoming is not None:  # a refused instance's data set is read past, not kept
                            self._incoming.add(value)
                        if control & 0x02:
                            self._dispatch(cmd, cmd_cx, refusal)
                            cmd, refusal = None, None
            elif kind == A_RELEASE_RQ:
                if length != FIXED_PDU_LENGTH:  # never allocate what a peer announces (PS3.8 9.3.6)
                    raise ProtocolError(INVALID_PARAMETER, f"A-RELEASE-RQ of {length} bytes")
                self._read_exact(length)
                self.sock.sendall(RELEASE_RP)
                return "released"
            elif kind == A_ABORT:
                return "aborted"
            else:
                raise ProtocolError(UNEXPECTED_PDU, f"PDU type 0x{kind:02x} on an established association")

    def _command(self, encoded: bytes, cx_id: int) -> tuple[dict[int, bytes], StoreRefusal | None]:
        """A complete command set, decoded; a C-STORE-RQ gets the shared check of both paths."""
        try:
            cmd = decode_command(encoded)
        except ValueError as e:
            raise ProtocolError(INVALID_PARAMETER, str(e)) from None
        refusal = None
        if us(cmd, COMMAND_FIELD) == C_STORE_RQ:
            refusal = check_store_rq(cmd, str(self.accepted[cx_id].abstract_syntax))
            if refusal is not None and refusal.abort:
                raise ProtocolError(refusal.abort, refusal.detail)
        return cmd, refusal

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

    def _dispatch(self, cmd: dict[int, bytes], cx_id: int, refusal: StoreRefusal | None) -> None:
        field, msg_id = us(cmd, COMMAND_FIELD), us(cmd, MESSAGE_ID)
        if field == C_CANCEL_RQ:  # nothing to cancel: a C-STORE is answered before the next request
            return
        if msg_id is None:
            raise ProtocolError(INVALID_PARAMETER, "command without Message ID")
        cx = self.accepted[cx_id]
        if field == C_ECHO_RQ:
            rsp = encode_response(C_ECHO_RSP, msg_id, ui(cmd, 0x00000002) or str(cx.abstract_syntax), 0x0000)
        elif field == C_STORE_RQ and self._incoming is not None:
            incoming, self._incoming = self._incoming, None
            rsp = store_response(cmd, *incoming.finish())
        elif field == C_STORE_RQ and refusal is not None:
            rsp = store_response(cmd, *refuse_command(self.hooks, cmd, refusal, str(cx.transfer_syntax[0]),
                                                      self.calling_aet, f"{self.calling_aet}@{self.peer}"))
        else:
            raise ProtocolError(UNEXPECTED_PDU, f"command 0x{field or 0:04x} on a storage association")
        self.sock.sendall(pdata_pdus(cx_id, rsp, self.peer_max))

    # -- socket helpers --------------------------------------------------------------
    def _read_exact(self, n: int, *, eof_ok: bool = False) -> bytearray | None:
        buf = recv_exact(self.sock, n)
        if len(buf) < n:
            if eof_ok and not buf:
                return None
            raise ConnectionError("peer closed the connection mid-PDU")
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
