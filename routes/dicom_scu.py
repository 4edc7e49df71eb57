"""Sending a stored instance with C-STORE exactly as it was received.

pynetdicom's ``send_c_store`` re-encodes a pydicom Dataset, which is not
byte-identical (group lengths dropped, deflate redone, odd VRs rewritten) and costs
a decode. Here the encoded data set goes out as the bytes we hold, in the transfer
syntax it was received in. When the peer did not accept that transfer syntax, an
uncompressed data set falls back to pynetdicom's own conversion, and a compressed one
(or one the peer takes only compressed otherwise) is converted by
transforms/dicom_codec.py to a syntax of an accepted context; one that cannot be
raises TranscodeError, which pynetdicom's C-GET/C-MOVE loops count as a failed
sub-operation and the C-STORE route as a permanent failure.

A large stored instance (a chunk-sealed blob) is a StreamedInstance: its data set is sent
from the blob's chunks as they are decrypted (engine/dimse/stream_send.py), never whole in
memory; converted it is decoded and/or encoded frame by frame as it is sent
(transforms/dicom_transcode_stream.py), and only a conversion that cannot be planned so joins
it (at most ``dicom_codec.MAX_WHOLE_BYTES``).

This uses pynetdicom 3.0 internals (the same sequence ``send_c_store`` runs); the
tests in tests/test_dicom_*.py pin the behaviour, so an upgrade that breaks it fails
loudly rather than sending something else. Shared by routes/dicom.py and the
listener's C-MOVE / C-GET sub-operations.
"""

from __future__ import annotations

import contextlib
import io
import queue
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from engine.dimse import stream_send
from transforms import dicom_codec as codec
from transforms import dicom_transcode_stream as transcode_stream

log = structlog.get_logger()

PAUSE_WAIT = 10.0  # seconds for the association's reactor to pause before a C-STORE (normally microseconds)
RESPONSE_POLL = 0.2  # seconds per wait slice for the C-STORE response


def check_ae_title(value: str) -> str:
    """PS3.5 AE VR: 1-16 characters, no backslash or control characters, not only spaces."""
    v = value.strip()
    if not v or len(v) > 16 or "\\" in v or any(ord(c) < 32 or ord(c) > 126 for c in v):
        raise ValueError(f"invalid AE title {value!r}: 1-16 printable ASCII characters, no backslash")
    return v


class RawInstance(Dataset):
    """A data set that carries its encoded bytes; pynetdicom's retrieve loop sees a Dataset.

    Only the SOP Class / Instance UIDs are real elements (pynetdicom reads them to
    report failed sub-operations); ``raw`` is what goes on the wire.
    """

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, raw: bytes) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self._raw_ts = UID(transfer_syntax)
        self._raw = raw

    @property
    def raw(self) -> bytes:
        return self._raw

    @property
    def raw_transfer_syntax(self) -> UID:
        return self._raw_ts


class StreamedInstance(RawInstance):
    """A stored instance sent from its blob's chunks as they are decrypted (a large one).

    ``open_dataset()`` gives a fresh iterator of the encoded data set each call (a retry, a
    second association). ``raw`` joins it: only a conversion (transcoding, or pynetdicom's
    own for an uncompressed syntax the peer did not take) needs the whole data set.
    """

    def __init__(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
                 open_dataset: Callable[[], Iterator[bytes]]) -> None:
        super().__init__(sop_class_uid, sop_instance_uid, transfer_syntax, b"")
        self._open_dataset = open_dataset

    def open_dataset(self) -> Iterator[bytes]:
        return self._open_dataset()

    @property
    def raw(self) -> bytes:
        return b"".join(self._open_dataset())


def streamed_part10(open_part10: Callable[[], Iterator[bytes]], sop_class_uid: str | None = None,
                    sop_instance_uid: str | None = None, transfer_syntax: str | None = None) -> StreamedInstance:
    """A StreamedInstance from a factory of stored Part-10 chunks (engine/store/db.py
    ``blob_chunks``); the file meta is read here only for what is not given (the archive
    index knows all three; a route's envelope headers lack the transfer syntax)."""
    if not (sop_class_uid and sop_instance_uid and transfer_syntax):
        meta, body = stream_send.split_part10(open_part10())
        body.close()  # type: ignore[attr-defined]
        sop_class_uid = sop_class_uid or str(meta.MediaStorageSOPClassUID)
        sop_instance_uid = sop_instance_uid or str(meta.MediaStorageSOPInstanceUID)
        transfer_syntax = transfer_syntax or str(meta.TransferSyntaxUID)

    def open_dataset() -> Iterator[bytes]:
        return stream_send.split_part10(open_part10())[1]

    return StreamedInstance(sop_class_uid, sop_instance_uid, transfer_syntax, open_dataset)


def _decoded(inst: RawInstance) -> Dataset:
    from pydicom.filereader import read_dataset

    ts = inst.raw_transfer_syntax
    fp = io.BytesIO(inst.raw)
    if ts.is_deflated:
        import zlib

        fp = io.BytesIO(zlib.decompress(inst.raw, -zlib.MAX_WBITS))
    ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian)
    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def send_raw(assoc: Association, inst: RawInstance, *, msg_id: int = 1, priority: int = 2,
             originator_aet: str | None = None, originator_id: int | None = None) -> Dataset:
    """C-STORE ``inst`` on an established association; returns the response status Dataset.

    An empty Dataset means no valid response (timeout, abort), as with pynetdicom.
    """
    if not assoc.is_established:
        raise RuntimeError("association is not established")
    accepted = accepted_syntaxes(assoc, str(inst.SOPClassUID))
    try:
        if str(inst.raw_transfer_syntax) not in accepted:  # asked first: pynetdicom logs an ERROR for a miss
            raise ValueError("not accepted as stored")
        context = assoc._get_valid_context(inst.SOPClassUID, inst.raw_transfer_syntax, "scu",
                                           allow_conversion=False)
    except ValueError:
        if isinstance(inst, StreamedInstance) and codec.choose(str(inst.raw_transfer_syntax), accepted) in \
                codec.UNCOMPRESSED:
            inst = transcoded(inst, accepted)  # a large one: frame by frame where it can be (TranscodeError)
        elif not inst.raw_transfer_syntax.is_compressed and any(ts in codec.NATIVE for ts in accepted):
            ds = _decoded(inst)  # an uncompressed syntax the peer did not take: let pynetdicom convert
            return _original(assoc)(ds, msg_id=msg_id, priority=priority, originator_aet=originator_aet,
                                    originator_id=originator_id)
        else:
            inst = transcoded(inst, accepted)  # TranscodeError: a failed sub-operation / delivery, never sent
        context = assoc._get_valid_context(inst.SOPClassUID, inst.raw_transfer_syntax, "scu",
                                           allow_conversion=False)
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = priority
    req.MoveOriginatorApplicationEntityTitle = originator_aet
    req.MoveOriginatorMessageID = originator_id
    req.AffectedSOPClassUID = inst.SOPClassUID
    req.AffectedSOPInstanceUID = inst.SOPInstanceUID
    streamed = isinstance(inst, StreamedInstance)
    if streamed:  # the first chunk before anything is sent: a blob that fails its check is a clean failure
        chunks = _opened(inst)  # type: ignore[arg-type]
    else:
        req.DataSet = io.BytesIO(inst.raw)
    assoc._reactor_checkpoint.clear()
    try:
        paused_by = time.monotonic() + PAUSE_WAIT
        while not assoc._is_paused and time.monotonic() < paused_by:
            time.sleep(0.0001)
        rsp = None
        if assoc._is_paused:
            if streamed:
                _send_streamed(assoc, req, context.context_id, chunks)
            else:
                assoc.dimse.send_msg(req, context.context_id)
            rsp = _response(assoc)
    except stream_send.StreamAborted as e:
        log.warning("dicom.stream_aborted", reason=str(e), outcome="not sent")
        rsp = None
    finally:
        assoc._reactor_checkpoint.set()
        if streamed:
            stream_send.give_back_memory()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


def _opened(inst: StreamedInstance) -> Iterator[bytes]:
    """``inst``'s data set iterator with its first chunk already read (and authenticated): an
    error opening it (address check, header rewrite) is raised while nothing is sent yet, so
    C-GET / C-MOVE count a failed sub-operation and the association goes on."""
    it = inst.open_dataset()
    try:
        first = next(it, b"")
    except BaseException:
        close = getattr(it, "close", None)
        if close is not None:
            close()
        raise

    def chained() -> Iterator[bytes]:
        try:
            yield first
            yield from it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()

    return chained()


def _send_streamed(assoc: Association, req: C_STORE, context_id: int, chunks: Iterator[bytes]) -> None:
    """The data set from the blob's chunks; a send that stops half-way (the peer gone, a damaged
    chunk) leaves a partial message on the association, so it is aborted before the error goes on."""
    try:
        stream_send.send_c_store(assoc, req, context_id, chunks,
                                 stall_timeout=float(assoc.network_timeout or assoc.dimse_timeout or 60.0))
    except BaseException:
        with contextlib.suppress(Exception):
            assoc.abort()
        raise
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()


def accepted_syntaxes(assoc: Association, sop_class: str) -> list[str]:
    """Transfer syntaxes of the accepted presentation contexts for ``sop_class``."""
    return [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
            if str(cx.abstract_syntax) == sop_class and cx.transfer_syntax]


def transcoded(inst: RawInstance, accepted: list[str], *, lossy: codec.Lossy | None = None) -> RawInstance:
    """``inst`` in a syntax of ``accepted`` (transforms.dicom_codec.choose), or TranscodeError,
    logged with what was stored and what the peer takes."""
    stored = str(inst.raw_transfer_syntax)
    try:
        target = codec.send_plan(stored, accepted, lossy=lossy)
        if isinstance(inst, StreamedInstance):  # large: frame by frame (decoded and/or encoded one at a time)
            plan = transcode_stream.plan(inst.open_dataset, stored, target, lossy=lossy)
            if plan is not None:
                log.info("dicom.transcoded", stored=stored, sent=target, streamed=True, frames=plan.frames)
                return StreamedInstance(str(inst.SOPClassUID), plan.sop_instance_uid or str(inst.SOPInstanceUID),
                                        target, plan.open)
        raw = codec.convert(transcode_stream.joined(inst.open_dataset) if isinstance(inst, StreamedInstance)
                            else inst.raw, stored, target, lossy=lossy)
    except codec.TranscodeError as e:
        log.warning("dicom.transcode_failed", stored=stored, accepted=sorted(set(accepted))[:8],
                    reason=str(e)[:200], outcome="not sent")
        raise
    log.debug("dicom.transcoded", stored=stored, sent=target)
    uid = str(inst.SOPInstanceUID)
    if target in codec.LOSSY_METHOD:  # a lossy copy is a new instance: the command names its new UID
        uid = str(codec.sop_head(raw, UID(target)).SOPInstanceUID)
    return RawInstance(str(inst.SOPClassUID), uid, target, raw)


def _response(assoc: Association) -> Any:
    """The next DIMSE message, within ``dimse_timeout``; None at once when the association is gone.

    pynetdicom's ``get_msg(block=True)`` waits the whole ``dimse_timeout`` even after the
    connection was closed or aborted (the queue gets nothing on abort): polling in short
    slices lets a dropped association, or one the engine shut down, end the wait now.
    """
    timeout = assoc.dimse_timeout
    end = None if timeout is None else time.monotonic() + timeout
    while True:
        left = RESPONSE_POLL if end is None else min(RESPONSE_POLL, end - time.monotonic())
        if left <= 0:
            return None
        try:
            _cx, rsp = assoc.dimse.msg_queue.get(block=True, timeout=left)
            return rsp
        except queue.Empty:
            pass
        if not assoc.dul.is_alive() or assoc.acse.is_aborted():
            return None


def _original(assoc: Association) -> Any:
    return getattr(assoc, "_medrelay_send_c_store", assoc.send_c_store)


def make_raw_aware(assoc: Association) -> Association:
    """Let ``assoc.send_c_store`` (called by pynetdicom's C-GET/C-MOVE loops) send RawInstances raw."""
    if getattr(assoc, "_medrelay_send_c_store", None) is not None:
        return assoc
    original = assoc.send_c_store
    assoc._medrelay_send_c_store = original  # type: ignore[attr-defined]

    def send_c_store(dataset: Any, msg_id: int = 1, priority: int = 2, originator_aet: str | None = None,
                     originator_id: int | None = None) -> Dataset:
        if isinstance(dataset, RawInstance):
            return send_raw(assoc, dataset, msg_id=msg_id, priority=priority, originator_aet=originator_aet,
                            originator_id=originator_id)
        return original(dataset, msg_id=msg_id, priority=priority, originator_aet=originator_aet,
                        originator_id=originator_id)

    assoc.send_c_store = send_c_store  # type: ignore[method-assign]
    return assoc


def instance_from_part10(data: bytes, sop_class_uid: str | None = None,
                         sop_instance_uid: str | None = None) -> RawInstance:
    """A RawInstance from stored Part-10 bytes (UIDs read from the file meta when not given)."""
    from engine.store.dicom.index import split_part10

    ts, raw = split_part10(data)
    if sop_class_uid is None or sop_instance_uid is None:
        end = len(data) - len(raw)
        meta = dcmread(io.BytesIO(data[:end]), stop_before_pixels=True).file_meta
        sop_class_uid = str(meta.MediaStorageSOPClassUID)
        sop_instance_uid = str(meta.MediaStorageSOPInstanceUID)
    return RawInstance(sop_class_uid, sop_instance_uid, ts, raw)
