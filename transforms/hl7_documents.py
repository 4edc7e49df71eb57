"""OBX ED (encapsulated data) -> FHIR ``Binary`` + ``DocumentReference``, for hl7_to_fhir.

A PDF report in an ORU travels as ``OBX|n|ED|<code>||<app>^<type>^<subtype>^Base64^<data>``
(HL7 v2.5 2.A.24; the v2-to-FHIR IG maps it to an Attachment). The bytes become a Binary
with a stable id derived from the OBX's business identifier (so a re-sent message PUTs the
same Binary, and a corrected report replaces it), and a DocumentReference points at it by
``Binary/{id}`` with contentType, size and SHA-1 hash; the DiagnosticReport lists it in
``presentedForm`` by URL only. Nothing carries the bytes twice, and the FHIR destination
can send the Binary on its own, as raw bytes, before the Bundle that refers to it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import uuid
from typing import Any

from transforms.v2_datatypes import comp

_NS = uuid.UUID("5b0d1c6e-7f1e-4f57-9a0e-2f5b7d3c9e41")
# ED-2 Type of Data (HL7 table 0191) -> MIME top-level type
_TYPE_0191 = {"AP": "application", "APPLICATION": "application", "IM": "image", "IMAGE": "image",
              "AU": "audio", "AUDIO": "audio", "TX": "text", "TEXT": "text", "VIDEO": "video",
              "MULTIPART": "multipart"}
# OBX-11 -> DocumentReference.docStatus (preliminary | final | amended | entered-in-error)
_DOC_STATUS = {"F": "final", "C": "amended", "P": "preliminary", "R": "preliminary", "S": "preliminary",
               "D": "entered-in-error", "W": "entered-in-error"}


def content_type(rep: Any) -> str:
    """ED-2 / ED-3 as a MIME type: ``^application^pdf`` and ``^AP^PDF`` are both application/pdf."""
    major = _TYPE_0191.get(comp(rep, 1).upper(), comp(rep, 1).lower() or "application")
    minor = comp(rep, 2).lower() or "octet-stream"
    return f"{major}/{minor}"


def ed_bytes(rep: Any) -> bytes:
    """ED-5 decoded by ED-4 (Base64, Hex or A = the text itself)."""
    encoding, data = comp(rep, 3).upper(), "".join(comp(rep, 4).split())
    if encoding in ("BASE64", "B64"):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("OBX-5 ED: data is not valid base64") from None
    if encoding == "HEX":
        try:
            return bytes.fromhex(data)
        except ValueError:
            raise ValueError("OBX-5 ED: data is not valid hex") from None
    if encoding in ("A", ""):
        return comp(rep, 4).encode()
    raise ValueError("OBX-5 ED: unknown encoding (Base64, Hex or A)")


def binary_id(system: str, value: str) -> str:
    """A Binary id (FHIR id: 64 chars of [A-Za-z0-9-.]) stable for one OBX identifier."""
    return uuid.uuid5(_NS, f"{system}\x1f{value}").hex


def document(rep: Any, *, system: str, value: str, code: dict[str, Any], patient_ref: str, status: str,
             date: str | None, report_url: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(Binary, DocumentReference, Attachment by URL for DiagnosticReport.presentedForm)."""
    raw = ed_bytes(rep)
    ctype = content_type(rep)
    bid = binary_id(system, value)
    attachment = {"contentType": ctype, "url": f"Binary/{bid}", "size": len(raw),
                  "hash": base64.b64encode(hashlib.sha1(raw, usedforsecurity=False).digest()).decode()}
    if code.get("text") or (code.get("coding") or [{}])[0].get("display"):
        attachment["title"] = code.get("text") or code["coding"][0]["display"]
    data = base64.b64encode(raw).decode()
    del raw
    binary = {"resourceType": "Binary", "id": bid, "contentType": ctype, "data": data}
    doc: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "identifier": [{"system": system, "value": value}],
        "status": "entered-in-error" if status in ("D", "W") else "current",
        "type": code or {"text": "document"},
        "subject": {"reference": patient_ref},
        "content": [{"attachment": attachment}],
        "context": {"related": [{"reference": report_url}]},
    }
    if status in _DOC_STATUS:
        doc["docStatus"] = _DOC_STATUS[status]
    if date:
        doc["date"] = date
    form = {k: v for k, v in attachment.items() if k != "size"}
    return binary, doc, form
