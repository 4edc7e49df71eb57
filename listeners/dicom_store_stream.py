"""Large C-STORE data sets streamed to their blob as the P-DATA fragments arrive (issue 13).

A C-STORE-RQ does not say how long its data set is. The Upper Layer (listeners/dicom_ul.py)
keeps fragments in memory as before until they reach ``STREAM_MIN`` (16 MiB, the size from
which blobs are chunk-sealed anyway); from there ``IncomingDataSet`` takes over: the file
meta and every fragment go to a ``BlobStream`` (chunked AES-GCM, written and fsynced by a
writer thread, engine/store/blob_writer.py), the SHA-256 the index keeps is computed as the
bytes pass, and only the first ``HEADER_MAX`` bytes of the data set are kept. When the last
fragment is in:

- the index attributes are read from the header, the elements before the pixel data
  (``scan.header_length``), with the same reader and checks as a small instance;
- a refused instance (undecodable, UIDs that differ from the command) is answered with its
  failure status and its file removed before it was ever named;
- otherwise the blob is finished (fsynced under its content address) and intake commits the
  envelope naming it (``Ahead.presealed``): de-duplication in the index, the audit row and
  ``0x0000`` only after the commit, exactly as for a small instance. The envelope's payload is
  the header alone (routing conditions and message terms read only the header); routes and
  retrieval read the whole instance from the blob.

An association that ends mid-instance (A-ABORT, a closed socket, a protocol error, idle
timeout) calls ``abort``: the half-written file is removed, nothing is committed or answered.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from typing import Any

import structlog
from pydicom.datadict import tag_for_keyword
from pydicom.uid import UID, ExplicitVRLittleEndian

from engine.dimse.stream_send import give_back_memory
from engine.envelope import new_id
from engine.intake import Ahead
from engine.store.blob_writer import BlobStream, can_stream
from engine.store.dicom import index as idx
from engine.store.dicom import intake_check, walk
from engine.store.dicom.scan import BULK_START, NestingTooDeep, header_length
from listeners.dicom_status import STORE
from listeners.dicom_store import StoreSCP, check_attrs, file_meta, outcome_status

log = structlog.get_logger()

HEADER_MAX = 32 << 20  # bytes of a streamed data set kept for its header (everything before the pixel data)
LAST_INDEX_TAG = max(int(tag_for_keyword(kw) or 0) for kw in idx.INDEX_TAGS)
HEADER_TOO_LONG = intake_check.refusal(STORE["cannot_understand"].code,
                                       "header before the pixel data too long or malformed",
                                       event="dicom.store_undecodable")


def streamable(transfer_syntax: str) -> bool:
    """Little Endian (plain or deflated) data sets: the header scan reads those. Big Endian
    (retired) and unknown syntaxes stay on the in-memory path."""
    ts = UID(transfer_syntax)
    return bool(ts.is_transfer_syntax) and (bool(ts.is_little_endian) or bool(ts.is_deflated))


class IncomingDataSet:
    """One large data set on its way to its blob; the Upper Layer's sink for its fragments."""

    def __init__(self, scp: StoreSCP, *, sop_class: str, sop_uid: str, transfer_syntax: str,
                 calling_aet: str, peer: str, message_id: str) -> None:
        self.scp = scp
        self.sop_class, self.sop_uid, self.transfer_syntax = sop_class, sop_uid, transfer_syntax
        self.calling_aet, self.peer, self.message_id = calling_aet, peer, message_id
        self.meta = file_meta(sop_class, sop_uid, transfer_syntax)
        self.blob = BlobStream(scp.ctx.store, message_id)
        self.blob.write(self.meta)
        self.digest = hashlib.sha256()
        self.head = bytearray()
        self.size = 0
        self.closed = False
        self.failed = False
        self.header_end: int | None = None  # once known, ``head`` holds only the header
        ts = UID(transfer_syntax)
        # the structure of the whole data set, walked as its pieces pass (no second read of the blob)
        self.walk: walk.StructureWalk | walk.InflatingWalk | None = walk.walker(
            bool(ts.is_deflated), bool(ts.is_implicit_VR))
        self.walk_error: ValueError | None = None
        self._next_look = 1 << 20

    def add(self, fragment: bytes | memoryview) -> None:
        """One P-DATA fragment of the data set. A failed blob write (disk full, I/O error) stops
        the writing; the rest of the data set is read past and answered with a failure status."""
        if self.failed:
            return
        try:
            self.blob.write(fragment)
        except OSError as e:
            log.warning("dicom.stream_write_failed", channel=self.scp.ctx.channel, message_id=self.message_id,
                        error=type(e).__name__)
            self.failed = True
            self.head = bytearray()
            return
        self.digest.update(fragment)
        if self.walk is not None:
            try:
                self.walk.feed(fragment)
            except (walk.Malformed, NestingTooDeep) as e:  # decided, and refused, at the end
                self.walk, self.walk_error = None, e
        room = HEADER_MAX - len(self.head)
        if room > 0 and self.header_end is None:
            self.head += fragment[:room]
            if len(self.head) >= self._next_look:  # at 1, 2, 4... MiB: keep only the header once it ends
                self._next_look *= 2
                self._look_for_header_end()
        self.size += len(fragment)

    def _look_for_header_end(self) -> None:
        if UID(self.transfer_syntax).is_deflated:
            return  # its header is inside the deflated stream: found from the whole kept prefix at the end
        try:
            n = header_length(self.head, implicit=UID(self.transfer_syntax).is_implicit_VR,
                              last_wanted=LAST_INDEX_TAG)
        except Exception:  # malformed (or nested too deep): decided, and refused, at the end
            return
        # only at the pixel data: a header cut at a larger element is decided from the whole prefix
        if n is not None and n + 4 <= len(self.head) and (
                int.from_bytes(self.head[n:n + 2], "little") << 16 | int.from_bytes(self.head[n + 2:n + 4], "little")
        ) >= BULK_START:
            self.header_end = n
            del self.head[n:]

    def abort(self) -> None:
        """The association ended mid-instance: the file goes, nothing is committed or answered."""
        if not self.closed:
            self.closed = True
            self.blob.abort()
            log.info("dicom.stream_aborted", channel=self.scp.ctx.channel, message_id=self.message_id,
                     received=self.size)
            give_back_memory()

    def store(self) -> tuple[int, str | None]:
        """The last fragment is in: check, finish the blob, commit; the C-STORE status. Never
        raises (the error boundary of ``StoreSCP.handle``): a failure is a failure status."""
        try:
            return self._store()
        except Exception as e:
            log.error("dicom.store_failed", channel=self.scp.ctx.channel, error=type(e).__name__,
                      detail=str(e)[:200])
            return STORE["out_of_resources"].code, "internal error, not stored"
        finally:
            if not self.closed:
                self.closed = True
                self.blob.abort()
            self.head = bytearray()
            give_back_memory()

    def _store(self) -> tuple[int, str | None]:
        if self.failed:
            return STORE["out_of_resources"].code, "not stored: blob write failed"
        try:
            if self.walk is not None:
                self.walk.close()
            if self.walk_error is not None:
                raise self.walk_error
        except (walk.Malformed, NestingTooDeep) as e:  # logged and audited as every refusal before the index
            return self.scp.refuse_error(self, e)
        checked = self._header()
        if isinstance(checked[0], int):
            return checked  # type: ignore[return-value]  (refused: ``store``'s finally removes the file)
        header, attrs = checked
        intake = self.scp.ctx.intake
        if intake is None:
            return STORE["out_of_resources"].code, "no intake"
        try:
            row = self.blob.finish()  # sealed, fsynced and named: durable before the commit names it
        except OSError as e:
            log.warning("dicom.store_refused", channel=self.scp.ctx.channel, message_id=self.message_id,
                        status="error", error=f"blob write failed: {type(e).__name__}")
            return STORE["out_of_resources"].code, "not stored: blob write failed"
        finally:
            self.closed = True
        ahead = Ahead.presealed(self.scp.ctx.store, self.message_id, row)
        try:
            outcome = self.scp.submit(self.message_id, attrs, self.transfer_syntax, self, header, ahead,
                                      self.digest.hexdigest(), self.size)
        except BaseException:
            intake.discard_ahead(ahead)
            raise
        return outcome_status(self.scp.ctx.channel, self.message_id, outcome, streamed=True, size=self.size)

    def _header(self) -> tuple[bytes, dict[str, Any]] | tuple[int, str]:
        """(file meta + the data set's header, index attributes), or a refusal."""
        ts = UID(self.transfer_syntax)
        head: bytes | bytearray = self.head
        read_as = self.transfer_syntax
        try:
            if ts.is_deflated:  # the header of a deflated data set is the start of its inflated stream
                head = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(self.head), HEADER_MAX)
                read_as = ExplicitVRLittleEndian
            n = self.header_end if self.header_end is not None else \
                header_length(head, implicit=UID(read_as).is_implicit_VR, last_wanted=LAST_INDEX_TAG)
            if n is None:
                return self.scp.refuse(self, HEADER_TOO_LONG, error="HeaderTooLong")
            ds = idx.read_index_data_set(memoryview(head)[:n], read_as)
            attrs = idx.extract(ds)
        except Exception as e:  # NestingTooDeep included: refused, never stored
            return self.scp.refuse_error(self, e)
        refused = check_attrs(attrs, self.sop_class, self.sop_uid)
        if refused is not None:
            return self.scp.refuse(self, refused)
        # the envelope's payload: Part-10 up to the pixel data (as stored when deflated: header only)
        return self.meta + bytes(memoryview(self.head)[:n] if not ts.is_deflated else b""), attrs


def begin(scp: StoreSCP, sop_class: str, sop_uid: str, transfer_syntax: str, calling_aet: str,
          peer: str, factory: Callable[..., IncomingDataSet] = IncomingDataSet) -> IncomingDataSet | None:
    """A sink for a large data set (the Upper Layer's ``Hooks.stream``; STOW-RS parts pass their
    subclass as ``factory``), or None when it stays on the in-memory path (blobs that cannot be
    streamed, a syntax the header scan does not read, no intake, a blob file that cannot be
    opened: that path then answers the failure)."""
    ctx = scp.ctx
    if ctx.intake is None or not can_stream(ctx.store) or not streamable(transfer_syntax):
        return None
    try:
        return factory(scp, sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=transfer_syntax,
                       calling_aet=calling_aet, peer=peer, message_id=new_id())
    except OSError as e:
        log.warning("dicom.stream_unavailable", channel=ctx.channel, error=type(e).__name__)
        return None
