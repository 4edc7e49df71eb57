"""STOW-RS (PS3.18 10.5): multipart/related DICOM parts stored through the C-STORE intake.

Each part goes through ``listeners.dicom_store.StoreSCP.handle``, the Storage SCP's
own path: the same checks (UIDs, decodable header), the same de-duplication by SOP
Instance UID in the index, the same write-ahead, group commit and routing; a part's
outcome is known only after its commit, and the response is sent after every part's.
The response is the Store Instances Response Module (PS3.18 10.5.3.2) in DICOM JSON:
ReferencedSOPSequence for stored instances, FailedSOPSequence with the DIMSE failure
reason (0xA700 out of resources, 0xA900 does not match / wrong study, 0xC000 cannot
understand) for the others; HTTP 200 when all were stored, 202 when some were, 409
when none was (PS3.18 Table 10.5.3-1).

The body is parsed as it arrives with python-multipart's ``MultipartParser`` (the
streaming parser Starlette itself uses; it handles any multipart subtype, boundaries
split across reads, and bounds part headers), within ``max_body_bytes`` held in memory.

A part that reaches ``STREAM_MIN`` (16 MiB, as a C-STORE data set on our Upper Layer) is
streamed to its blob instead (issue 13 item 3), by the Upper Layer's own sink
(listeners/dicom_store_stream.py ``IncomingDataSet``): its file meta is read from the first
bytes, the data set goes to a ``BlobStream`` as it arrives, its index attributes come from the
header, and at the end of the part it is checked, made durable and committed through
``Ahead.presealed`` exactly as a streamed C-STORE (de-dupe, audit, outcome after the commit).
Such a part is committed when it ends, before the response; a body that breaks later keeps it
(as an association aborted after an instance), and a re-send is answered as a duplicate. The
parser runs on a worker thread, fed about 1 MiB at a time, so a slow disk holds up this body
and never the event loop. The whole body is bounded by ``max_stream_bytes``.

Every refusal is audited as the Storage SCP audits its own (a failed ``message.receive`` through
``intake_check.refuse``, the same fields): a part refused here before it reaches the SCP (no
Content-Type, not DICOM, unreadable file meta, invalid UIDs in it, another study than the URL's,
a metadata instance that cannot be built) by ``refused`` when it is answered (``store_one``), and a
body refused whole (too large, malformed multipart, no parts) by ``refuse_body``, one row without
UIDs. Before, only the SCP's own refusals were audited.
"""

from __future__ import annotations

import asyncio
import functools
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydicom.filereader import read_dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from engine.store.blob_writer import can_stream
from engine.store.db import STREAM_MIN
from engine.store.dicom import index as idx
from engine.store.dicom import intake_check
from listeners import dicom_store_stream
from listeners import dicomweb_stow_json as stow_json
from listeners.dicom_dimse import valid_uid
from listeners.dicom_status import STORE
from listeners.dicom_store import StoreRequest, StoreSCP, data_set_uids, file_meta
from listeners.dicom_store_stream import IncomingDataSet
from listeners.dicomweb_json import ur

log = structlog.get_logger()
MAX_PARTS = 10000
STORE_CONCURRENCY = 8  # parts in the intake at once: they share its group commits
PARSE_BATCH = 1 << 20  # body bytes handed to the parser thread at once
DICOM_TYPE = "application/dicom"
OTHER_STUDY = "StudyInstanceUID differs from the study of the request URL"
NOT_PART10 = "part is not a readable DICOM Part-10 file"
BAD_META = "file meta lacks a valid SOP Class/Instance UID or transfer syntax"


class StowError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    sink: StowDataSet | None = None  # streaming to its blob
    result: Result | None = None  # decided while the body was read (streamed and stored, or refused)
    decided: bool = False  # whether it was looked at for streaming
    ended: bool = False  # its delimiter was read (a body cut short leaves the last part open)


class StowDataSet(IncomingDataSet):
    """A streamed part: the Upper Layer's sink, plus the study check of a STOW-RS URL and the
    Study/Series Instance UIDs the response names."""

    def __init__(self, *args: Any, study: str | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.study = study
        self.uids = ("", "")

    def _header(self) -> tuple[bytes, dict[str, Any]] | tuple[int, str]:
        checked = super()._header()
        if isinstance(checked[0], int):
            return checked
        attrs: dict[str, Any] = checked[1]  # type: ignore[assignment]
        self.uids = (str(attrs["STUDY"].get("StudyInstanceUID", "")), str(attrs["SERIES"].get("SeriesInstanceUID", "")))
        if self.study is not None and self.uids[0] != self.study:
            return self.scp.refuse(self, intake_check.refusal(STORE["mismatch"].code, OTHER_STUDY))
        return checked

    def result(self) -> Result:
        status, comment = self.store()
        return Result(self.sop_class, self.sop_uid, self.uids[0], status, comment, self.uids[1])


@dataclass(frozen=True)
class Result:
    sop_class: str
    sop_uid: str
    study_uid: str
    status: int  # 0 = stored (or already stored)
    reason: str | None = None
    series_uid: str = ""
    early: bool = False  # refused before the Storage SCP: audited by ``refused`` when answered
    transfer_syntax: str = ""  # as the file meta gives it, for that audit row


def early(sop_class: str, sop_uid: str, status: int, reason: str, transfer_syntax: str = "",
          study_uid: str = "") -> Result:
    """A part refused before the Storage SCP (its UIDs as given, for the audit row)."""
    return Result(intake_check.uid_as_given(sop_class), intake_check.uid_as_given(sop_uid), study_uid, status,
                  reason, early=True, transfer_syntax=intake_check.uid_as_given(transfer_syntax))


def refused(scp: StoreSCP, peer: str, r: Result) -> Result:
    """Log and audit a part refused before the Storage SCP exactly as the SCP refuses one (calling
    AE empty and ``actor@host:port`` as the peer, as STOW-RS parts reach the SCP); the result."""
    if r.early:
        seen = StoreRequest(sop_class=r.sop_class, sop_uid=r.sop_uid, transfer_syntax=r.transfer_syntax,
                            calling_aet="", peer=peer, part10=b"", meta_end=0)
        scp.refuse(seen, intake_check.refusal(r.status, _printable(r.reason or "refused")))
    return r


def refuse_body(scp: StoreSCP, peer: str, http_status: int, text: str) -> None:
    """A body refused whole: one failed receive without UIDs (0xA700 for one too large, as out of
    resources, 0xC000 otherwise, in the log line; the HTTP status in the reason)."""
    status = STORE["out_of_resources"].code if http_status == 413 else STORE["cannot_understand"].code
    seen = StoreRequest(sop_class="", sop_uid="", transfer_syntax="", calling_aet="", peer=peer, part10=b"", meta_end=0)
    scp.refuse(seen, intake_check.refusal(status, _printable(f"STOW-RS body refused (HTTP {http_status}): {text}")))


def _printable(text: str) -> str:
    """A reason as an audit row and a log line hold it: printable ASCII, at most 200 characters (a
    part's Content-Type or a metadata tag is the peer's text)."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:200])


def boundary_of(content_type: str) -> tuple[str, str]:
    """(boundary, declared part type) of a STOW-RS request's Content-Type; StowError 415/400."""
    main, _, rest = content_type.partition(";")
    if main.strip().lower() != "multipart/related":
        raise StowError(415, "send multipart/related; type=\"application/dicom\"")
    params = {}
    for item in rest.split(";"):
        k, _, v = item.strip().partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    declared = params.get("type", DICOM_TYPE).lower()
    if declared not in (DICOM_TYPE, stow_json.JSON_TYPE):  # the latter: metadata + bulk data
        raise StowError(415, "send type=\"application/dicom\" or type=\"application/dicom+json\" parts")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise StowError(400, "multipart/related without a valid boundary")
    return boundary, declared


def part_type(part: Part) -> str:
    """The media type of a part's Content-Type, lower case; "" when the part has none (PS3.18 10.5.1.2
    requires one on every part: such a part is that instance's failure, never taken as DICOM)."""
    return part.headers.get("content-type", "").split(";")[0].strip().lower()


@dataclass(frozen=True)
class Streaming:
    """What a body's large parts need to be streamed and stored while it is read."""

    scp: StoreSCP
    peer: str
    study: str | None
    limit: int  # bytes of the whole body (``max_stream_bytes``)
    offload: Callable[..., Awaitable[Any]]  # runs a blocking call on a worker thread
    stream_min: int = STREAM_MIN


def streaming_for(scp: StoreSCP, peer: str, study: str | None, limit: int,
                  offload: Callable[..., Awaitable[Any]]) -> Streaming | None:
    """How a body's large parts are streamed, or None when the blob store cannot take a
    streamed write (every part is then held in memory, within ``max_body_bytes``)."""
    return Streaming(scp, peer, study, limit, offload) if can_stream(scp.ctx.store) else None


async def read_parts(chunks: Any, boundary: str, limit: int, streaming: Streaming | None = None,
                     declared: str = DICOM_TYPE) -> list[Part]:
    """The body's parts, parsed as the chunks arrive, holding at most ``limit`` bytes in memory
    (without ``streaming``: ``limit`` bytes of body in all). With ``streaming``, a part that
    reaches ``stream_min`` goes to its blob and is stored when it ends (its ``result``).

    ``declared`` is the body's ``type=`` (PS3.18 10.5.1.2): an ``application/dicom`` body is
    instances, each part stored as one (a part of another type fails); an ``application/dicom+json``
    body is metadata and bulk data (an ``application/dicom`` part in it fails, never stored, and
    nothing of it is streamed)."""
    if declared != DICOM_TYPE:
        streaming = None  # metadata bodies are held in memory, within ``limit``
    parts: list[Part] = []
    header_field, header_value = bytearray(), bytearray()
    held = 0  # bytes of parts in memory

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise StowError(413, f"more than {MAX_PARTS} parts")
        parts.append(Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        nonlocal held
        p = parts[-1]
        if p.result is not None:  # refused already: the rest of it is read past
            return
        if p.sink is not None:
            p.sink.add(memoryview(data)[start:end])
            return
        p.data += data[start:end]
        held += end - start
        if held > limit:
            raise StowError(413, f"body larger than {limit} bytes")
        if streaming is not None and not p.decided and len(p.data) >= streaming.stream_min:
            p.decided = True
            held -= _start_streaming(p, streaming)

    def on_part_end() -> None:
        p = parts[-1]
        p.ended = True
        if p.sink is not None:
            sink, p.sink = p.sink, None
            p.result = sink.result()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[header_field.decode("latin-1").strip().lower()] = header_value.decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end})
    total = limit if streaming is None else max(limit, streaming.limit)
    size = 0
    batch: list[bytes] = []
    batched = 0
    offloaded = False  # a body under PARSE_BATCH is parsed here: no part of it can reach stream_min
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > total:
                raise StowError(413, f"body larger than {total} bytes")
            if streaming is None:
                parser.write(chunk)
                continue
            batch.append(chunk)
            batched += len(chunk)
            if batched >= PARSE_BATCH:
                await streaming.offload(_feed, parser, batch)
                batch, batched, offloaded = [], 0, True
        if offloaded:
            await streaming.offload(_feed, parser, batch, True)  # type: ignore[union-attr]
        else:
            _feed(parser, batch, True)
        if parts and not parts[-1].ended:  # RFC 2046 5.1.1: the close delimiter is required
            raise StowError(400, "multipart body ends inside a part (no close delimiter)")
    except MultipartParseError:
        raise StowError(400, "malformed multipart body") from None
    finally:
        for p in parts:  # a body that ended mid-part: its streamed file goes, nothing is committed
            if p.sink is not None:
                p.sink.abort()
                p.sink = None
    if declared == stow_json.JSON_TYPE:  # PS3.18 10.5.1.2.2: instances rebuilt from JSON + bulk data parts
        if not stow_json.has_metadata(parts):
            raise StowError(400, "a type=\"application/dicom+json\" body has no application/dicom+json part")
        fail = functools.partial(early, status=STORE["cannot_understand"].code)
        off = streaming.offload if streaming is not None else asyncio.to_thread  # pydicom work: not on the loop
        return await off(stow_json.assemble, parts, lambda c, u, why: fail(c, u, reason=why))
    return parts


def _feed(parser: MultipartParser, batch: list[bytes], final: bool = False) -> None:
    for chunk in batch:
        parser.write(chunk)
    if final:
        parser.finalize()


def _start_streaming(p: Part, s: Streaming) -> int:
    """Move an application/dicom part that reached ``stream_min`` to a streamed sink, or refuse
    it now (no readable file meta: read past, never held); the bytes of memory freed. A part the
    sink cannot take (a syntax the header scan does not read, blobs that cannot be streamed) and
    a part of another type (the bulk data of a metadata body) stay in memory."""
    if part_type(p) != DICOM_TYPE:  # not DICOM, or no Content-Type: held, failed at the end
        return 0
    try:
        meta, end = _meta_end(p.data)
    except Exception:
        req = request_of(p, s.peer)  # the reason, as a small part gets it
        p.result = req if isinstance(req, Result) else early("", "", STORE["cannot_understand"].code, NOT_PART10)
    else:
        sop_class, sop_uid, ts = data_set_uids(meta, memoryview(p.data)[end:])
        if not (valid_uid(sop_class) and valid_uid(sop_uid) and valid_uid(ts)):
            p.result = early(sop_class, sop_uid, STORE["mismatch"].code, BAD_META, ts)
        else:
            sink = dicom_store_stream.begin(s.scp, sop_class, sop_uid, ts, "", s.peer,
                                            factory=functools.partial(StowDataSet, study=s.study))
            if not isinstance(sink, StowDataSet):
                return 0
            try:
                sink.add(memoryview(p.data)[end:])
            except BaseException:
                sink.abort()
                raise
            p.sink = sink
    freed = len(p.data)
    p.data = bytearray()
    return freed


def _meta_end(data: bytes | bytearray) -> tuple[dict[str, str], int]:
    """The File Meta Information (group 0002) of a Part-10 file: (UIDs, offset of the data set)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part-10 file (no DICM prefix)")
    fp = io.BytesIO(memoryview(data)[132:])
    meta = read_dataset(fp, False, True, stop_when=lambda tag, _vr, _len: tag.group != 2)
    out = {k: str(meta.get(k, "") or "").strip("\x00 ") for k in
           ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")}
    return out, 132 + fp.tell()


def request_of(part: Part, peer: str) -> StoreRequest | Result:
    """The part as the Storage SCP's request (file meta rewritten the way the listener writes
    it), or the failure to report for it."""
    ctype = part_type(part)
    if not ctype:
        return early("", "", STORE["cannot_understand"].code, "part without a Content-Type")
    if ctype != DICOM_TYPE:
        return early("", "", STORE["cannot_understand"].code,
                     f"part of type {ctype[:40]} in a type=\"application/dicom\" body is not DICOM")
    try:
        meta, end = _meta_end(part.data)
    except Exception:
        return early("", "", STORE["cannot_understand"].code, NOT_PART10)
    sop_class, sop_uid, ts = data_set_uids(meta, memoryview(part.data)[end:])
    if not (valid_uid(sop_class) and valid_uid(sop_uid) and valid_uid(ts)):
        return early(sop_class, sop_uid, STORE["mismatch"].code, BAD_META, ts)
    head = file_meta(sop_class, sop_uid, ts)
    body = memoryview(part.data)[end:]
    return StoreRequest(sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=ts, calling_aet="", peer=peer,
                        part10=head + body, meta_end=len(head))


def _uids_of(req: StoreRequest) -> tuple[str, str]:
    """(StudyInstanceUID, SeriesInstanceUID) from the header (never the pixel data)."""
    try:
        ds = idx.read_index_data_set(memoryview(req.part10)[req.meta_end:], req.transfer_syntax)
    except Exception:
        try:
            ds = idx.read_index_dataset(req.part10)
        except Exception:
            return "", ""
    return str(ds.get("StudyInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")


def store_one(scp: StoreSCP, part: Part, peer: str, study: str | None) -> Result:
    """Store one part (blocking: run it on a worker thread); a streamed one was stored already.
    A part refused before the Storage SCP is audited here, as the SCP audits its own refusals."""
    if part.result is not None:
        return refused(scp, peer, part.result)
    req = request_of(part, peer)
    part.data = bytearray()  # the request holds its own copy now
    if isinstance(req, Result):
        return refused(scp, peer, req)
    study_uid, series_uid = _uids_of(req)
    if study is not None and study_uid != study:
        return refused(scp, peer, early(req.sop_class, req.sop_uid, STORE["mismatch"].code, OTHER_STUDY,
                                        req.transfer_syntax, study_uid))
    status, comment = scp.handle(req)
    return Result(req.sop_class, req.sop_uid, study_uid, status, comment, series_uid)


async def store_all(parts: list[Part], run: Callable[[Part], Awaitable[Result]]) -> list[Result]:
    gate = asyncio.Semaphore(STORE_CONCURRENCY)

    async def one(p: Part) -> Result:
        async with gate:
            return await run(p)

    return list(await asyncio.gather(*(one(p) for p in parts)))


def response(results: list[Result], base: str, study: str | None) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Store Instances Response Module as DICOM JSON)."""
    stored = [r for r in results if r.status == 0]
    failed = [r for r in results if r.status != 0]
    body: dict[str, Any] = {}
    studies = {r.study_uid for r in stored if r.study_uid}
    if study is not None or len(studies) == 1:
        body["00081190"] = ur(f"{base}/studies/{study or next(iter(studies))}")
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [_item(r, base, failure=True) for r in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [_item(r, base, failure=False) for r in stored]}
    status = 200 if not failed else (202 if stored else 409)
    return status, body


def _item(r: Result, base: str, *, failure: bool) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if r.sop_class:
        item["00081150"] = {"vr": "UI", "Value": [r.sop_class]}
    if r.sop_uid:
        item["00081155"] = {"vr": "UI", "Value": [r.sop_uid]}
    if failure:
        item["00081197"] = {"vr": "US", "Value": [r.status]}
    elif r.study_uid and r.series_uid:
        url = f"{base}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_uid}"
        item["00081190"] = {"vr": "UR", "Value": [url]}
    return item
