"""A C-STORE whose data set comes from an iterator of chunks, never held whole (issue 13 item 3).

pynetdicom sends a DIMSE message from a data set in memory (``BytesIO``) or from a file on
disk; a large stored instance is neither: it is an encrypted blob that decrypts chunk by
chunk (engine/store/db.py ``open_blob_chunks``), and writing its plaintext to a temporary file
would put PHI on disk. So the command set is encoded by pynetdicom as usual
(``C_STORE_RQ.encode_msg`` with no data set gives exactly the command fragments) and the data
set follows as P-DATA PDVs cut from the chunks at the peer's maximum PDU length, the last
marked as such (PS3.8 E.2). Nothing else about the message differs from pynetdicom's own.

pynetdicom's DUL thread takes P-DATA from an unbounded queue: fed from a fast iterator it
would queue the whole instance, and each 16 KiB PDU costs it a queue round, a state machine
event and an encode (a 1 GiB send was 2.5x DCMTK's time that way). So on a plain TCP socket
the command set goes through the DUL and, once the DUL has written it, the data set PDUs are
written from this thread in batches of ``WRITE_BATCH`` bytes (the DUL only reads meanwhile).
On TLS, whose SSL object must not be written from a second thread, they go through the DUL
queue with at most ``QUEUE_BYTES`` waiting in it. Either way the send gives up
(``StreamAborted``) when the association is gone or the peer has read nothing for
``stall_timeout`` seconds.

The caller holds the association's reactor paused, as pynetdicom's own ``send_c_store`` does
(routes/dicom_scu.py ``send_raw``), and reads the response itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

FRAGMENT_CAP = 1 << 20  # bytes per PDV at most, also when the peer announces no limit (0) or a huge one
QUEUE_BYTES = 4 << 20  # P-DATA bytes waiting for the DUL thread at most
POLL = 0.0005  # seconds between looks at the DUL queue while it is full
PDV_OVERHEAD = 6  # item length (4), presentation context id (1), message control header (1)
WRITE_BATCH = 1 << 20  # data set bytes per socket write (several PDUs) on a plain TCP socket
# P-DATA-TF: type, reserved, PDU length; PDV item length, presentation context id, message control header
_PDU_HEAD = struct.Struct(">BBIIBB")


def give_back_memory() -> None:
    """Return freed heap pages to the system after a large instance went in or out.

    glibc raises its mmap threshold after large frees, so the PDU buffers and decoded frames of
    the next instance would otherwise come from a heap that never shrinks. Both directions call
    this one function (the receive side, listeners/dicom_store_stream.py, too). Best effort; a
    no-op without glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class StreamAborted(Exception):
    """The data set could not be sent whole: the association ended or the peer stopped reading."""


def fragment_size(max_pdu: int) -> int:
    """Bytes of data set per PDV for a peer that receives PDUs of ``max_pdu`` (0: no limit); even."""
    limit = FRAGMENT_CAP if not max_pdu else min(max_pdu, FRAGMENT_CAP)
    size = limit - PDV_OVERHEAD
    return size - size % 2


def fragments(chunks: Iterable[bytes], size: int) -> Iterator[tuple[bool, bytes | memoryview]]:
    """(is last, piece) of ``size`` bytes cut from ``chunks``; the last one may be shorter.

    Pieces inside a chunk are memoryviews of it (no copy); only a piece that spans two chunks
    is copied. One piece is held back until the next shows whether it is the last: the final
    PDV must carry the "last fragment" bit, and the total length is not known up front.
    """
    pending: bytes | memoryview | None = None
    carry = bytearray()
    for chunk in chunks:
        mv = memoryview(chunk)
        if carry:
            take = size - len(carry)
            carry += mv[:take]
            mv = mv[take:]
            if len(carry) < size:
                continue
            if pending is not None:
                yield False, pending
            pending, carry = bytes(carry), bytearray()
        whole = len(mv) - len(mv) % size
        for off in range(0, whole, size):
            if pending is not None:
                yield False, pending
            pending = mv[off:off + size]
        carry += mv[whole:]
    if carry or pending is None:
        if pending is not None:
            yield False, pending
        pending = bytes(carry)
    yield True, pending


def split_part10(chunks: Iterable[bytes]) -> tuple[FileMetaDataset, Iterator[bytes]]:
    """The file meta of a stored Part-10 stream and the encoded data set after it, still lazy.

    medrelay writes the file meta itself (explicit VR LE group 0002, its group length first),
    so where the data set starts is known from the first 144 bytes (as in
    engine/store/dicom/index.py ``split_part10``, which does this on whole bytes).
    """
    it = iter(chunks)
    buf = bytearray()

    def need(n: int) -> None:
        while len(buf) < n:
            try:
                buf.extend(next(it))
            except StopIteration:
                raise ValueError("not a DICOM Part-10 file (too short)") from None

    need(144)
    if buf[128:132] != b"DICM":
        raise ValueError("not a DICOM Part-10 file")
    if buf[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("file meta does not start with its group length")
    end = 144 + int.from_bytes(buf[140:144], "little")
    need(end)
    meta = dcmread(io.BytesIO(bytes(buf[:end])), stop_before_pixels=True).file_meta
    rest = bytes(buf[end:])
    del buf[:]

    def body() -> Iterator[bytes]:
        if rest:
            yield rest
        yield from it

    return meta, body()


def send_c_store(assoc: object, req: C_STORE, context_id: int, chunks: Iterable[bytes], *,
                 stall_timeout: float = 60.0) -> None:
    """Send C-STORE-RQ ``req`` (its ``DataSet`` unset) with the data set read from ``chunks``.

    Returns once every P-DATA is queued to the DUL (at most ``QUEUE_BYTES`` behind the socket).
    ``StreamAborted`` when the association went away or the peer stopped reading; any error
    from ``chunks`` (an IntegrityError of a damaged blob) is raised as it is. In both cases
    the peer holds a partial message: the caller must abort the association.
    """
    dul = assoc.dul  # type: ignore[attr-defined]
    max_pdu = int(assoc.dimse.maximum_pdu_size or 0)  # type: ignore[attr-defined]
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0001  # a data set follows (set from req.DataSet otherwise)
    msg.data_set = None  # only the command fragments come out of encode_msg
    msg._data_set_path = None
    size = fragment_size(max_pdu)
    sock = _plain_socket(assoc)
    if sock is None:  # TLS: an SSL object is not to be written from a second thread; the DUL writes
        for pdata in msg.encode_msg(context_id, max_pdu):
            dul.send_pdu(pdata)
        limit = max(2, QUEUE_BYTES // size)
        for last, piece in fragments(chunks, size):
            _wait_for_room(assoc, limit, stall_timeout)
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((context_id, (b"\x02" if last else b"\x00") + piece))
            dul.send_pdu(pdata)
        return
    _send_command(assoc, list(msg.encode_msg(context_id, max_pdu)), stall_timeout)
    _write_data_set(assoc, sock, context_id, fragments(chunks, size), stall_timeout)


def _plain_socket(assoc: object) -> socket.socket | None:
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)  # type: ignore[attr-defined]
    return sock if isinstance(sock, socket.socket) and not isinstance(sock, ssl.SSLSocket) else None


def _send_command(assoc: object, pdatas: list[P_DATA], stall_timeout: float) -> None:
    """The command set through the DUL, waiting until its last PDU is on the socket: whatever the
    DUL had queued before it (a C-GET's pending response) is then written too, so the data set
    PDUs written next from this thread cannot overtake or interleave with it."""
    last = pdatas[-1].presentation_data_value_list[-1][1]
    done = threading.Event()

    def on_sent(event: Any) -> None:
        items = getattr(event.pdu, "presentation_data_value_items", None) or ()
        if any(getattr(i, "presentation_data_value", None) == last for i in items):
            done.set()

    assoc.bind(evt.EVT_PDU_SENT, on_sent)  # type: ignore[attr-defined]
    try:
        for pdata in pdatas:
            assoc.dul.send_pdu(pdata)  # type: ignore[attr-defined]
        end = time.monotonic() + stall_timeout
        while not done.wait(0.05):
            if not assoc.dul.is_alive() or not assoc.is_established or assoc.is_aborted:  # type: ignore[attr-defined]
                raise StreamAborted("the association ended before the data set")
            if time.monotonic() > end:
                raise StreamAborted(f"the command set was not written within {stall_timeout:g}s")
    finally:
        assoc.unbind(evt.EVT_PDU_SENT, on_sent)  # type: ignore[attr-defined]


def _write_data_set(assoc: object, sock: socket.socket, context_id: int,
                    pieces: Iterator[tuple[bool, bytes]], stall_timeout: float) -> None:
    """P-DATA-TF PDUs (PS3.8 9.3.5: one PDV each) written in batches of about ``WRITE_BATCH`` bytes.

    The DUL thread only reads meanwhile (nothing else is queued while the reactor is paused for
    this C-STORE); one sendall per batch instead of a queue, an event and an encode per 16 KiB
    PDU is what keeps a large send near the socket's speed. A write that waits longer than
    ``stall_timeout`` (the peer stopped reading) or fails ends the send."""
    previous = sock.gettimeout()
    sock.settimeout(stall_timeout)
    parts: list[bytes | memoryview] = []
    queued = 0
    try:
        for last, piece in pieces:
            n = len(piece)
            parts.append(_PDU_HEAD.pack(0x04, 0x00, n + 6, n + 2, context_id, 0x02 if last else 0x00))
            parts.append(piece)
            queued += n
            if queued >= WRITE_BATCH or last:
                _send_buffers(sock, parts)
                parts = []
                queued = 0
    except TimeoutError:
        raise StreamAborted(f"the peer read nothing for {stall_timeout:g}s") from None
    except OSError as e:
        raise StreamAborted(f"the connection failed during the data set ({type(e).__name__})") from None
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(previous)
    if not assoc.is_established:  # type: ignore[attr-defined]
        raise StreamAborted("the association ended during the data set")


def _send_buffers(sock: socket.socket, bufs: list[bytes | memoryview]) -> None:
    """sendmsg of the PDU headers and pieces as they are (no join), resumed after a partial send."""
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i:i + 512])  # below IOV_MAX (1024)
        while i < len(bufs) and sent >= len(bufs[i]):
            sent -= len(bufs[i])
            i += 1
        if sent:
            bufs[i] = memoryview(bufs[i])[sent:]


def _wait_for_room(assoc: object, limit: int, stall_timeout: float) -> None:
    dul = assoc.dul  # type: ignore[attr-defined]
    q = dul.to_provider_queue
    if q.qsize() < limit:
        return
    seen, since = q.qsize(), time.monotonic()
    while q.qsize() >= limit:
        if not dul.is_alive() or not assoc.is_established or assoc.is_aborted:  # type: ignore[attr-defined]
            raise StreamAborted("the association ended during the data set")
        now = time.monotonic()
        if q.qsize() < seen:
            seen, since = q.qsize(), now
        elif now - since > stall_timeout:
            raise StreamAborted(f"the peer read nothing for {stall_timeout:g}s")
        time.sleep(POLL)
