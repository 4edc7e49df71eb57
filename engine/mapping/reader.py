"""Reading condition keys from an envelope of any kind: headers first, then the payload once.

Used by the ``filter`` transform and by route ``when:`` (engine.match) so both speak the
same keys: an envelope header (``MSH-9.1``, ``Modality``, ``CallingAETitle``,
``resourceType``) answers without parsing; anything else is a position in the kind's own
grammar (HL7 ``OBX-3.1``, DICOM ``(0010,0020)`` or ``ReferencedStudySequence[0].ReferencedSOPInstanceUID``,
FHIRPath ``Patient.identifier.value``), read from the payload parsed at most once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.mapping.base import EMPTY_SCOPE
from engine.mapping.conditions import MISSING


def kind_of(name: str) -> Any:
    """The path grammar of an envelope kind."""
    if name == "hl7v2":
        from engine.mapping.hl7 import HL7

        return HL7
    if name == "dicom":
        from engine.mapping.dicom import DICOM

        return DICOM
    if name == "fhir":
        from engine.mapping.fhir import FHIR

        return FHIR
    raise ValueError(f"no mapping grammar for {name!r} messages")


def document_of(kind: str, payload: bytes) -> Any:
    """A document of ``kind`` parsed from ``payload`` (for reading; the *_map transforms write)."""
    if kind == "hl7v2":
        from engine.hl7.message import HL7Error, read_header
        from engine.mapping.hl7 import Hl7Document

        try:
            text = read_header(payload, require=False).decode(payload)
        except HL7Error:
            text = payload.decode("latin-1")
        return Hl7Document(text)
    if kind == "dicom":
        from engine.mapping.dicom import DicomDocument

        return DicomDocument.from_bytes(payload, headers_only=True)
    if kind == "fhir":
        from engine.mapping.fhir import FhirDocument

        return FhirDocument.from_bytes(payload)
    raise ValueError(f"no mapping grammar for {kind!r} messages")


class EnvelopeReader:
    """``read(key)`` for conditions: a header, ``kind``, else the payload (parsed on first need)."""

    def __init__(self, kind: str, payload: bytes, headers: Mapping[str, Any]) -> None:
        self.kind = kind
        self.payload = payload
        self.headers = headers
        self._doc: Any = None
        self._failed = False

    def __call__(self, key: Any) -> Any:
        k = str(key)
        if k == "kind":
            return self.kind
        hit = self.headers.get(k, MISSING)
        if hit is not MISSING:
            return hit
        if self._failed:
            return MISSING
        try:
            path = kind_of(self.kind).compile_path(k)
        except ValueError:  # a key that is no position of this kind (a header this message lacks)
            return MISSING
        try:
            if self._doc is None:
                self._doc = document_of(self.kind, self.payload)
            vals = self._doc.values(path, EMPTY_SCOPE)
        except Exception:  # an unreadable payload matches nothing rather than failing the route
            self._failed = self._doc is None
            return MISSING
        return vals if vals else MISSING
