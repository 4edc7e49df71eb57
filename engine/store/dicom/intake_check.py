"""The one pre-store check of a received DICOM instance, and the one refusal of it.

Why one module: the DICOM listener (our Upper Layer and pynetdicom's associations), STOW-RS, the
file source, ``medrelay import`` and the C-GET prefetch (routes/dicom_prefetch.py, which may not
import listeners/) all decide the same question, "can this data set be stored?", and a peer must
get the same answer for the same bytes whichever way it sent them. Before, the prefetch answered
0xA900 for anything it could not file (a data set cut short included) and only the cut-short
refusal of the listener was audited.

``read_checked`` is the check: the index attributes read (never the pixel data) and the whole
structure walked (engine/store/dicom/walk.py), Little and Big Endian, plain or deflated.
``refusal_of`` says how a failure of it is answered, ``refuse`` logs and audits a refusal: a
refused receive is an audit event (PS3.15 A.5, DICOM Instances Transferred with its outcome
failed), so every refusal before the index writes a failed ``message.receive`` row, as the intake
does for a refusal in the index (a UID filed under another parent).
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from engine.store.dicom import index as idx
from engine.store.dicom import walk

log = structlog.get_logger()

# The C-STORE statuses of a refusal; the same codes as listeners/dicom_status.STORE (engine/ may
# not import listeners/; tests/test_dicom_refusal_audit.py holds them equal).
MISMATCH = 0xA900  # Error: Data Set does not match SOP Class (PS3.4 B.2.3)
CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (PS3.4 B.2.3)

MALFORMED = "data set cut short or its lengths do not nest"
UNDECODABLE = "data set cannot be decoded"
MISSING_UIDS = "Study/Series Instance UID missing or invalid"
DIFFERS_FROM_COMMAND = "SOP Class/Instance UID differ from the command"

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def valid_uid(value: Any) -> bool:
    """PS3.5 9.1: digits and dots, at most 64 characters (leading zeros tolerated, as peers send them).
    Here, not in listeners/: the C-GET prefetch (routes/) checks received data sets with it too."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_RE.fullmatch(value) is not None


def uid_as_given(value: str) -> str:
    """A UID from a peer as an audit row and a log line name it: at most 64 characters, anything
    but printable ASCII as "?" (a refused command's UID may be neither)."""
    return "".join(c if " " <= c <= "~" else "?" for c in value[:64])


@dataclass(frozen=True)
class Refusal:
    """How an instance is refused: its status, the reason audited (``refused: <reason>``), the
    Error Comment answered and the log event."""

    status: int
    reason: str
    comment: str
    event: str


def refusal(status: int, reason: str, comment: str | None = None, event: str = "dicom.store_refused_data") -> Refusal:
    return Refusal(status, reason, reason if comment is None else comment, event)


CUT_SHORT = refusal(CANNOT_UNDERSTAND, MALFORMED, MALFORMED + "; not stored", "dicom.store_malformed")


def check_attrs(attrs: dict[str, Any], sop_class: str, sop_uid: str) -> Refusal | None:
    """The checks of an instance's index attributes against its C-STORE command (the listener's
    and the C-GET prefetch's sub-operations): a refusal, or None."""
    im, st, se = attrs["IMAGE"], attrs["STUDY"], attrs["SERIES"]
    if im.get("SOPInstanceUID") != sop_uid or im.get("SOPClassUID") != sop_class:
        return refusal(MISMATCH, DIFFERS_FROM_COMMAND)
    if not valid_uid(st.get("StudyInstanceUID")) or not valid_uid(se.get("SeriesInstanceUID")):
        return refusal(MISMATCH, MISSING_UIDS)
    return None


def walk_deflated(data_set: bytes | memoryview) -> None:
    """The structural walk of a deflated data set held whole (inflated in bounded pieces)."""
    w = walk.InflatingWalk()
    w.feed(data_set)
    w.close()


@functools.lru_cache(maxsize=64)
def _syntax_kind(transfer_syntax: str) -> str:
    """How a data set of this syntax is read: bare ("plain"), "deflated", or an unknown syntax ("other")."""
    ts = UID(transfer_syntax)
    return "deflated" if ts.is_deflated else "plain" if ts.is_transfer_syntax else "other"


def read_checked(part10: bytes, meta_end: int, transfer_syntax: str) -> Dataset:
    """The index attributes of a whole Part-10 instance about to be stored, its data set walked;
    ``walk.Malformed`` when it is cut short, ``NestingTooDeep`` or a decoding error otherwise.
    Any failure refuses the instance: it is not retried with another reader, which would take
    what the first one refused."""
    data_set = memoryview(part10)[meta_end:]
    kind = _syntax_kind(transfer_syntax)
    if kind == "plain":  # the data set alone (no second file-meta parse)
        return idx.read_checked(data_set, transfer_syntax)
    if kind == "deflated":  # first: a deflate stream cut short is said so
        walk_deflated(data_set)
    return idx.read_index_dataset(part10)  # deflated or unknown syntax: the Part-10 reader inflates


def refusal_of(error: Exception) -> Refusal:
    """The refusal of a failed ``read_checked`` (or index ``extract``). A data set cut short is
    0xC000 Cannot understand, not 0xA700 (a re-send of the same bytes fails the same way) nor
    0xA900 (nothing says the SOP class is wrong); one without the UIDs the index needs 0xA900."""
    if isinstance(error, walk.Malformed):
        return CUT_SHORT
    if isinstance(error, idx.MissingKeys):
        return refusal(MISMATCH, MISSING_UIDS)
    return refusal(CANNOT_UNDERSTAND, UNDECODABLE, event="dicom.store_undecodable")


def refuse(
    audit: Any,
    why: Refusal,
    *,
    channel: str,
    sop_class: str,
    sop_uid: str,
    transfer_syntax: str,
    calling_aet: str,
    called_aet: str,
    peer: str,
    **fields: Any,
) -> tuple[int, str]:
    """Log and audit one refused instance; the (status, Error Comment) to answer. The audit row is
    queued (``record_soon``): a Storage SCP thread does not wait on the store for a refusal.
    ``fields``: more key/values for the log line (no PHI: UIDs, error types)."""
    log.info(why.event, channel=channel, status=f"0x{why.status:04X}", reason=why.reason, sop_class=sop_class, **fields)
    headers = {
        "SOPClassUID": sop_class,
        "SOPInstanceUID": sop_uid,
        "TransferSyntaxUID": transfer_syntax,
        "CallingAETitle": calling_aet,
        "CalledAETitle": called_aet,
    }
    audit.record_soon(
        "message.receive",
        outcome="failure",
        actor=calling_aet,
        peer=peer,
        channel=channel,
        entity={"kind": "dicom", "headers": headers},
        detail="refused: " + why.reason,
    )
    return why.status, why.comment


def refuse_error(audit: Any, error: Exception, **fields: Any) -> tuple[int, str]:
    """``refuse`` for a failed ``read_checked`` / ``extract``: the error's type is logged, and for a
    data set cut short where (the walk's message: offsets, never values)."""
    if isinstance(error, walk.Malformed):
        fields["detail"] = str(error)[:200]
    return refuse(audit, refusal_of(error), error=type(error).__name__, **fields)


def meta_uids(part10: bytes) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, transfer syntax) of a Part-10 instance's file meta, each
    "" when it cannot be read: what the audit row of a refused instance names when its data set
    could not be read (a C-STORE sub-operation's meta holds its command's Affected UIDs)."""
    try:
        end = 144 + int.from_bytes(part10[140:144], "little")
        fm = dcmread(io.BytesIO(part10[:end]), stop_before_pixels=True).file_meta
        return (
            str(fm.get("MediaStorageSOPClassUID", "") or ""),
            str(fm.get("MediaStorageSOPInstanceUID", "") or ""),
            str(fm.get("TransferSyntaxUID", "") or ""),
        )
    except Exception:
        return "", "", ""
