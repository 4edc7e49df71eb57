"""STOW-RS metadata + bulk data (PS3.18 10.5.1.2.2): DICOM JSON parts and the parts they reference.

A body of ``multipart/related; type="application/dicom+json"`` carries one or more
``application/dicom+json`` parts (each a JSON array of instances, PS3.18 F.2) and bulk data
parts named by ``Content-Location`` (or ``Content-ID``, referenced as ``cid:...``) that the
instances' ``BulkDataURI`` values point at. Each instance is rebuilt here as a Part 10 file
with pydicom's ``Dataset.from_json`` (its BulkDataURI handler returns the referenced part)
and then stored exactly as an ``application/dicom`` part is (listeners/dicomweb_stow.py
``store_one``: the C-STORE intake's checks, de-duplication and commit).

Transfer syntax: a Pixel Data bulk part whose media type carries ``transfer-syntax=`` of an
encapsulated syntax (e.g. ``image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90``) is one
compressed frame, stored encapsulated in that syntax; otherwise (``application/octet-stream``)
the instance is Explicit VR Little Endian. A compressed multi-frame instance (one part per
frame) is refused. Everything is held in memory within the body limit of the request (such a
body is never streamed: dicomweb_stow reads it without its streaming sink, a larger one is 413).
This module knows nothing of the parts'
classes: dicomweb_stow passes its own ``Part`` and a failure maker, so there is no import circle.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian

JSON_TYPE = "application/dicom+json"
DICOM_TYPE = "application/dicom"
MAX_INSTANCES = 10000  # instances in the JSON parts of one body (as dicomweb_stow's MAX_PARTS)

# failure(sop_class, sop_uid, reason) -> the caller's failed-part result
Failure = Callable[[str, str, str], Any]


def media_type(headers: dict[str, str]) -> tuple[str, dict[str, str]]:
    """(type/subtype in lower case, parameters) of a part's Content-Type ("" when it has none)."""
    main, *params = headers.get("content-type", "").split(";")
    out = {}
    for p in params:
        k, _, v = p.strip().partition("=")
        out[k.strip().lower()] = v.strip().strip('"')
    return main.strip().lower(), out


def has_metadata(parts: list[Any]) -> bool:
    return any(media_type(p.headers)[0] == JSON_TYPE for p in parts)


def _locations(p: Any) -> list[str]:
    names = []
    if p.headers.get("content-location"):
        names.append(p.headers["content-location"].strip())
    cid = p.headers.get("content-id", "").strip().strip("<>")
    if cid:
        names.append(f"cid:{cid}")
    return names


def _bulk_index(parts: list[Any]) -> dict[str, Any]:
    """Bulk data parts by every name they can be referenced by (full URI and its path)."""
    out: dict[str, Any] = {}
    for p in parts:
        if media_type(p.headers)[0] in (JSON_TYPE, DICOM_TYPE, ""):  # not bulk data (failed in assemble)
            continue
        for name in _locations(p):
            out.setdefault(name, p)
            path = name.split("://", 1)[-1].partition("/")[2] if "://" in name else ""
            if path:
                out.setdefault("/" + path, p)
    return out


class Refused(ValueError):
    """Why an instance of the metadata cannot be stored, in our words (peer values are never echoed)."""


def build_instance(obj: dict[str, Any], bulk: dict[str, Any]) -> bytes:
    """One DICOM JSON instance with its bulk data as a Part 10 file; Refused saying why not (any other
    exception: pydicom could not read or write the peer's values)."""
    pixel_ts: list[str] = []

    def resolve(tag: str, vr: str, uri: str) -> bytes:
        p = bulk.get(uri)
        if p is None and "://" in uri:
            p = bulk.get("/" + uri.split("://", 1)[1].partition("/")[2])
        if p is None:
            raise Refused(f"BulkDataURI of ({tag[:4]},{tag[4:]}) names no part of the body")
        if p.result is not None:  # refused by the reader (too large to hold)
            raise Refused(f"bulk data part of ({tag[:4]},{tag[4:]}) was refused: {p.result.reason}")
        if tag.upper() == "7FE00010":
            ts = media_type(p.headers)[1].get("transfer-syntax", "")
            if ts:
                pixel_ts.append(ts)
        return bytes(p.data)

    ds = Dataset.from_json(obj, bulk_data_uri_handler=resolve)
    meta = FileMetaDataset()
    for elem in [e for e in ds if e.tag.group == 2]:  # file meta given in the JSON
        meta.add(elem)
        del ds[elem.tag]
    ts = UID(pixel_ts[0] if pixel_ts else str(meta.get("TransferSyntaxUID", "") or ExplicitVRLittleEndian))
    if not ts.is_transfer_syntax:
        raise Refused(f"transfer syntax {str(ts)[:64]} is not one")
    if ts.is_compressed:
        if "PixelData" not in ds:
            ts = UID(ExplicitVRLittleEndian)
        elif pixel_ts:  # one compressed frame from its own part
            if int(ds.get("NumberOfFrames", 1) or 1) > 1:
                raise Refused("compressed multi-frame pixel data in bulk data parts is not supported")
            ds.PixelData = encapsulate([ds.PixelData])
            ds["PixelData"].VR = "OB"
        else:
            raise Refused("a compressed transfer syntax needs the pixel data part's transfer-syntax")
    elif "PixelData" in ds and ds["PixelData"].VR not in ("OB", "OW"):
        ds["PixelData"].VR = "OW"
    sop_class, sop_uid = str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    if not sop_class or not sop_uid:
        raise Refused("instance without SOPClassUID or SOPInstanceUID")
    meta.TransferSyntaxUID = ts
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UID(sop_class), UID(sop_uid)
    ds.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _uid(obj: Any, tag: str) -> str:
    try:
        return str(obj[tag]["Value"][0])[:64]
    except (KeyError, IndexError, TypeError):
        return ""


def assemble(parts: list[Any], failure: Failure) -> list[Any]:
    """The parts to store: each JSON instance as a new ``application/dicom`` part (of the same
    class as ``parts``), or, for one that cannot be built, a part whose ``result`` is the
    ``failure``; bulk data parts are consumed; an ``application/dicom`` part or one without a
    Content-Type is a failure (a body declared metadata is not taken as instances)."""
    make = type(parts[0])
    out: list[Any] = []
    count = 0
    bulk = _bulk_index(parts)
    for p in parts:
        kind = media_type(p.headers)[0]
        if kind == DICOM_TYPE:  # PS3.18 10.5.1.2.2: such a body is metadata and bulk data only
            out.append(make(result=failure("", "", "an application/dicom part in a type=\"application/dicom+json\" "
                                                   "body (send instances as type=\"application/dicom\")")))
            continue
        if not kind:  # every part names its type (PS3.18 10.5.1.2); an untyped part is no bulk data either
            out.append(make(result=failure("", "", "part without a Content-Type")))
            continue
        if kind != JSON_TYPE:
            continue
        try:
            doc = json.loads(bytes(p.data))
        except (ValueError, RecursionError):
            out.append(make(result=failure("", "", "metadata part is not valid JSON")))
            continue
        except MemoryError:
            out.append(make(result=failure("", "", "metadata part too large to read")))
            continue
        p.data = bytearray()
        instances = doc if isinstance(doc, list) else [doc]
        for obj in instances:
            count += 1
            if count > MAX_INSTANCES:
                out.append(make(result=failure("", "", f"more than {MAX_INSTANCES} instances in the metadata")))
                break
            sop_class, sop_uid = _uid(obj, "00080016"), _uid(obj, "00080018")
            if not isinstance(obj, dict):
                out.append(make(result=failure("", "", "metadata item is not a DICOM JSON object")))
                continue
            try:
                data = build_instance(obj, bulk)
            except Exception as e:  # the peer's JSON: any failure is this instance's, never a 500
                reason = str(e) if isinstance(e, Refused) else f"metadata cannot be read ({type(e).__name__})"
                out.append(make(result=failure(sop_class, sop_uid, reason[:200])))
                continue
            out.append(make(headers={"content-type": "application/dicom"}, data=bytearray(data)))
    return out
