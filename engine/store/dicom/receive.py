"""An instance received by other means than the DICOM listener (a C-GET medrelay started), filed as
the listener files what it receives.

``prepare`` reads what the index needs from the Part-10 bytes (the same check the listener
uses: ``intake_check.read_checked`` and ``index.extract``) and checks the UIDs; ``index_hook`` is the
intake hook that indexes it in the intake transaction, answering an instance the archive already
holds as a duplicate of the message that brought it. The DICOM listener's Storage SCP does the
same with its own fast path (listeners/dicom_store.py); this is the plain one for the rest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from engine.store.dicom import index as idx
from engine.store.dicom import intake_check


@dataclass(frozen=True)
class Received:
    attrs: dict[str, dict[str, Any]]
    transfer_syntax: str
    digest: str
    size: int

    def headers(self) -> dict[str, str]:
        """The envelope headers the listener gives an instance (routing fields, no PHI)."""
        im, st, se = self.attrs["IMAGE"], self.attrs["STUDY"], self.attrs["SERIES"]
        return {"SOPClassUID": str(im["SOPClassUID"]), "SOPInstanceUID": str(im["SOPInstanceUID"]),
                "StudyInstanceUID": str(st["StudyInstanceUID"]), "SeriesInstanceUID": str(se["SeriesInstanceUID"]),
                "Modality": str(se.get("Modality", "")), "TransferSyntaxUID": self.transfer_syntax}


def prepare(part10: bytes) -> Received:
    """What the index needs; ``idx.MissingKeys``, ``walk.Malformed`` (a data set cut short) or a
    decoding error when the instance cannot be filed (``intake_check.refusal_of`` says how each
    is answered)."""
    ts, dataset = idx.split_part10(part10)
    # the listener's own check: a data set cut short (any syntax) is refused as it refuses it
    attrs = idx.extract(intake_check.read_checked(part10, len(part10) - len(dataset), ts))
    im, st, se = attrs["IMAGE"], attrs["STUDY"], attrs["SERIES"]
    if not (im.get("SOPInstanceUID") and im.get("SOPClassUID") and st.get("StudyInstanceUID")
            and se.get("SeriesInstanceUID")):
        raise idx.MissingKeys("StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and SOPClassUID are required")
    return Received(attrs, ts, hashlib.sha256(dataset).hexdigest(), len(dataset))


def index_hook(store: Any, hkey: bytes, rec: Received) -> Callable[[Connection, Any], Any]:
    """Intake hook: index the instance, or answer ``intake.Duplicate`` when it is indexed already."""
    from engine.intake import Duplicate, Refused

    def hook(conn: Connection, env: Any) -> Any:
        found = idx.find(conn, hkey, rec.attrs)
        conflict = idx.conflict(found, rec.digest)
        if conflict is not None:  # a UID filed under another parent: refused, never filed there
            return Refused(conflict)
        if found.instance_pk is not None:
            return Duplicate(str(found.message_id))
        return idx.index_instance(conn, store, hkey, rec.attrs, message_id=env.id, transfer_syntax=rec.transfer_syntax,
                                  digest=rec.digest, size=rec.size, channel=env.channel, found=found)

    return hook
