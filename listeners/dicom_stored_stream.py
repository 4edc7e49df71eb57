"""A large stored instance as C-GET / C-MOVE send it: from its blob's chunks, never whole.

A chunk-sealed blob (engine/store/db.py ``is_chunked``) becomes a StreamedInstance
(routes/dicom_scu.py). When its patient was updated since it was stored, the Patient module
must say what the archive holds now (``reconcile.current_instance`` does that on whole bytes):
here only the header, the elements before Pixel Data, is rewritten by the same
``reconcile.rewrite_patient``, and the Pixel Data element and whatever follows it are streamed
unchanged after it. Deflated and big endian data sets, and a header that cannot be found within
``HEADER_MAX`` bytes, are rewritten whole in memory as before.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from typing import Any

import structlog
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID
from sqlalchemy import select

from engine.dimse import stream_send
from engine.store import schema
from engine.store.db import is_chunked
from engine.store.dicom import index as idx
from engine.store.dicom import reconcile
from routes.dicom_scu import StreamedInstance, streamed_part10

log = structlog.get_logger()

HEADER_MAX = 64 * 1024 * 1024  # bytes before Pixel Data searched for it; beyond: rewritten whole
PIXEL_DATA_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


def open_stored(conn: Any, store: Any, ref: idx.InstanceRef) -> StreamedInstance | None:
    """The stored instance as a StreamedInstance when its blob is chunk-sealed, else None."""
    blob_id = ref.blob_id or conn.execute(select(schema.messages.c.blob_id).where(
        schema.messages.c.id == ref.message_id)).scalar()
    row = conn.execute(select(schema.blobs.c.in_file, schema.blobs.c.nonce).where(
        schema.blobs.c.id == blob_id)).mappings().first() if blob_id else None
    if row is None or not is_chunked(row):
        return None

    def open_part10() -> Iterator[bytes]:
        with store.engine.connect() as c:
            return store.blob_chunks(c, blob_id, aad=ref.message_id)  # reads no more rows

    attrs = reconcile.current_attributes(conn, store, ref.sop_uid)
    if attrs is None:  # byte-identical
        return streamed_part10(open_part10, ref.sop_class_uid, ref.sop_uid, ref.transfer_syntax)
    ts = UID(ref.transfer_syntax)

    def open_dataset() -> Iterator[bytes]:
        meta, body = stream_send.split_part10(open_part10())
        return patched(meta, body, ts, attrs)

    return StreamedInstance(ref.sop_class_uid, ref.sop_uid, ref.transfer_syntax, open_dataset)


def patched(meta: FileMetaDataset, body: Iterator[bytes], ts: UID, attrs: Mapping[str, Any]) -> Iterator[bytes]:
    """The encoded data set ``body`` with its Patient module rewritten to ``attrs``."""
    buf = bytearray()
    cut = -1
    if ts.is_little_endian and not ts.is_deflated:
        for chunk in body:
            buf += chunk
            cut = buf.find(PIXEL_DATA_LE, max(0, len(buf) - len(chunk) - 3))
            if cut >= 0 or len(buf) > HEADER_MAX:
                break
    header = _header(bytes(buf[:cut]), meta, ts) if cut >= 0 else None
    if header is None:  # whole, in memory (the rare case): what reconcile.current_instance does
        log.info("dicom.retrieve_rewritten_whole", reason="no pixel data header found")
        buf.extend(b"".join(body))
        yield _encode(reconcile.rewrite_patient(_part10(meta, bytes(buf)), attrs))
        return
    yield _encode(reconcile.rewrite_patient(_part10(meta, header), attrs))
    rest = bytes(buf[cut:])
    del buf[:]
    yield rest
    yield from body


def _header(data: bytes, meta: FileMetaDataset, ts: UID) -> bytes | None:
    """``data`` when it is a whole run of elements (the Pixel Data tag was not found inside a value)."""
    try:
        fp = io.BytesIO(data)
        read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian)
        return data if fp.tell() == len(data) else None
    except Exception:
        return None


def _part10(meta: FileMetaDataset, dataset: bytes) -> bytes:
    buf = io.BytesIO()
    ds = Dataset()
    ds.file_meta = meta
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue() + dataset


def _encode(part10: bytes) -> bytes:
    return idx.split_part10(part10)[1]

