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
split across reads, and bounds part headers), within ``max_body_bytes``; parts are
held in memory until stored (streaming them to the blob store is issue 13 item 3).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydicom.filereader import read_dataset
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from engine.store.dicom import index as idx
from listeners.dicom_dimse import valid_uid
from listeners.dicom_status import STORE
from listeners.dicom_store import StoreRequest, StoreSCP, file_meta
from listeners.dicomweb_json import ur

log = structlog.get_logger()
MAX_PARTS = 10000
STORE_CONCURRENCY = 8  # parts in the intake at once: they share its group commits


class StowError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


@dataclass
class Part:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Result:
    sop_class: str
    sop_uid: str
    study_uid: str
    status: int  # 0 = stored (or already stored)
    reason: str | None = None
    series_uid: str = ""


def boundary_of(content_type: str) -> str:
    main, _, rest = content_type.partition(";")
    if main.strip().lower() != "multipart/related":
        raise StowError(415, "send multipart/related; type=\"application/dicom\"")
    params = {}
    for item in rest.split(";"):
        k, _, v = item.strip().partition("=")
        params[k.strip().lower()] = v.strip().strip('"')
    part_type = params.get("type", "application/dicom").lower()
    if part_type != "application/dicom":
        raise StowError(415, "only type=\"application/dicom\" parts are accepted (not metadata + bulk data)")
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > 70:
        raise StowError(400, "multipart/related without a valid boundary")
    return boundary


async def read_parts(chunks: Any, boundary: str, limit: int) -> list[Part]:
    """The body's parts, parsed as the chunks arrive, within ``limit`` bytes in all."""
    parts: list[Part] = []
    header_field, header_value = bytearray(), bytearray()

    def on_part_begin() -> None:
        if len(parts) >= MAX_PARTS:
            raise StowError(413, f"more than {MAX_PARTS} parts")
        parts.append(Part())

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].data += data[start:end]

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        parts[-1].headers[header_field.decode("latin-1").strip().lower()] = header_value.decode("latin-1").strip()
        header_field.clear()
        header_value.clear()

    parser = MultipartParser(boundary, {  # type: ignore[arg-type]
        "on_part_begin": on_part_begin, "on_part_data": on_part_data, "on_header_field": on_header_field,
        "on_header_value": on_header_value, "on_header_end": on_header_end})
    size = 0
    try:
        async for chunk in chunks:
            size += len(chunk)
            if size > limit:
                raise StowError(413, f"body larger than {limit} bytes")
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError:
        raise StowError(400, "malformed multipart body") from None
    return parts


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
    ctype = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    if ctype != "application/dicom":
        return Result("", "", "", STORE["cannot_understand"].code, f"part of type {ctype[:40]} is not DICOM")
    try:
        meta, end = _meta_end(part.data)
    except Exception:
        return Result("", "", "", STORE["cannot_understand"].code, "part is not a readable DICOM Part-10 file")
    sop_class, sop_uid, ts = (meta["MediaStorageSOPClassUID"], meta["MediaStorageSOPInstanceUID"],
                              meta["TransferSyntaxUID"])
    if not (valid_uid(sop_class) and valid_uid(sop_uid) and valid_uid(ts)):
        return Result(sop_class[:64], sop_uid[:64], "", STORE["mismatch"].code,
                      "file meta lacks a valid SOP Class/Instance UID or transfer syntax")
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
    """Store one part (blocking: run it on a worker thread)."""
    req = request_of(part, peer)
    part.data = bytearray()  # the request holds its own copy now
    if isinstance(req, Result):
        return req
    study_uid, series_uid = _uids_of(req)
    if study is not None and study_uid != study:
        return Result(req.sop_class, req.sop_uid, study_uid, STORE["mismatch"].code,
                      "StudyInstanceUID differs from the study of the request URL")
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
