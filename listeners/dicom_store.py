"""The Storage SCP: C-STORE answered 0x0000 only once the instance and its index rows commit.

The data set is kept exactly as the peer encoded it (file meta + the received
bytes); only the few attributes the index needs are read, never the pixel data.
Every check that can fail runs before anything touches the store, and UIDs never
become file names (the blob store names files after a hash of each blob's nonce and GCM tag).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from sqlalchemy import Connection

from engine.envelope import Envelope, new_id
from engine.intake import Duplicate, Outcome, Refused
from engine.store import message_terms
from engine.store.dicom import index as idx
from engine.store.dicom import intake_check
from engine.store.dicom.intake_check import check_attrs  # the prefetch's check too (routes/dicom_prefetch.py)
from listeners.dicom_dimse import ui_value, valid_uid
from listeners.dicom_status import STORE

if TYPE_CHECKING:
    from engine.context import ComponentContext

log = structlog.get_logger()

INVALID_COMMAND_UIDS = "invalid Affected SOP Class/Instance UID"


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE request as both association paths hand it to the Storage SCP."""

    sop_class: str
    sop_uid: str
    transfer_syntax: str
    calling_aet: str
    peer: str  # "AET@host:port", for logs and the envelope
    part10: bytes  # preamble + file meta + the data set exactly as received
    meta_end: int  # offset of the data set in part10


def _meta_el(group_elem: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element of group 0002 (UI/SH short form, OB long form)."""
    tag = struct.pack("<HH", 0x0002, group_elem)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    return tag + vr + struct.pack("<H", len(value)) + value


def data_set_uids(meta: dict[str, str], data_set: memoryview) -> tuple[str, str, str]:
    """(SOP Class UID, SOP Instance UID, transfer syntax) a Part-10 file (STOW-RS part, file source)
    is stored as: the data set's UIDs win over a file meta that names others (pydicom-edited
    results, e.g. AI outputs, often keep the Media Storage UIDs of the file they were made from;
    Orthanc and dcm4chee take the data set too), and the file meta is written anew from them
    (``file_meta``), as for a C-STORE. A header that cannot be read here (deflated, unknown
    syntax) keeps the meta's UIDs: the Storage SCP's checks then judge the instance."""
    ts = meta["TransferSyntaxUID"]
    sop_class, sop_uid = meta["MediaStorageSOPClassUID"], meta["MediaStorageSOPInstanceUID"]
    try:
        ds = idx.read_index_data_set(data_set, ts)
    except Exception:
        return sop_class, sop_uid, ts
    return str(ds.get("SOPClassUID", "") or "") or sop_class, str(ds.get("SOPInstanceUID", "") or "") or sop_uid, ts


def file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 7.1), the same bytes pynetdicom's
    ``create_file_meta`` + ``encode_file_meta`` give (a test holds them equal), without
    building a pydicom data set per instance (~0.3 ms)."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join((
        _meta_el(0x0001, b"OB", b"\x00\x01"),
        _meta_el(0x0002, b"UI", ui_value(sop_class)),
        _meta_el(0x0003, b"UI", ui_value(sop_uid)),
        _meta_el(0x0010, b"UI", ui_value(transfer_syntax)),
        _meta_el(0x0012, b"UI", ui_value(PYNETDICOM_IMPLEMENTATION_UID)),
        _meta_el(0x0013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    group_length = struct.pack("<HH", 0x0002, 0x0000) + b"UL" + struct.pack("<HI", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def part10(sop_class: str, sop_uid: str, transfer_syntax: str, fragments: list[Any]) -> tuple[bytes, int]:
    """File meta, then the received data set fragments: one copy of the data set."""
    head = file_meta(sop_class, sop_uid, transfer_syntax)
    return b"".join((head, *fragments)), len(head)


def failure_code(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def peer_of(event: Any) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title}@{r.address}:{r.port}"


def outcome_status(channel: str, message_id: str, outcome: Outcome, **fields: Any) -> tuple[int, str | None]:
    """The C-STORE status of an intake outcome, logged (``fields``: more key/values for the log)."""
    if outcome.ok:
        log.info("dicom.stored", channel=channel, message_id=outcome.message_id, status=outcome.status,
                 index=outcome.result, routes=len(outcome.routes), **fields)
        return STORE["success"].code, None
    if outcome.status == "rejected":  # the index refused it (a UID filed under another parent): not retryable
        log.warning("dicom.store_uid_conflict", channel=channel, message_id=message_id, reason=outcome.error)
        return STORE["uid_conflict"].code, (outcome.error or "refused") + "; not stored"
    log.warning("dicom.store_refused", channel=channel, message_id=message_id, status=outcome.status,
                error=outcome.error)
    return STORE["out_of_resources"].code, "not stored: " + (outcome.error or outcome.status)


def request_of(event: Any) -> StoreRequest:
    """pynetdicom's EVT_C_STORE as the request both association paths share."""
    req = event.request
    blob = event.encoded_dataset(include_meta=True)
    return StoreRequest(sop_class=str(req.AffectedSOPClassUID or ""), sop_uid=str(req.AffectedSOPInstanceUID or ""),
                        transfer_syntax=str(event.context.transfer_syntax),
                        calling_aet=str(event.assoc.requestor.ae_title).strip(), peer=peer_of(event),
                        part10=blob, meta_end=144 + int.from_bytes(blob[140:144], "little"))


def search_identifiers(attrs: dict[str, Any]) -> dict[str, set[str]]:
    """The message search terms' identifiers (engine/store/message_terms.py) from the index
    attributes: the values its own read of the payload gives (``test_dicom_search_identifiers`` holds
    the two equal), without that read."""
    out: dict[str, set[str]] = {f: set() for f in message_terms.FIELDS}
    for field, value in (("patient_id", attrs["PATIENT"].get("PatientID")),
                         ("accession", attrs["STUDY"].get("AccessionNumber")),
                         ("study_uid", attrs["STUDY"].get("StudyInstanceUID"))):
        for one in value if isinstance(value, list) else [] if value is None else [value]:
            for part in str(one).split("\\"):
                if part.strip("\x00 "):
                    out[field].add(part.strip("\x00 "))
    return out


class StoreSCP:
    """The Storage SCP of one listener: pynetdicom's EVT_C_STORE handler (``__call__``) and
    the fast storage path's handler (``handle``) are the same code."""

    def __init__(self, ctx: ComponentContext, *, ae_title: str, replace: bool) -> None:
        self.ctx = ctx
        self.ae_title = ae_title
        self.replace = replace
        self._hkey = ctx.keyring.hmac_key(idx.HMAC_KEY_NAME)

    def __call__(self, event: Any) -> int | Dataset:
        try:
            req = request_of(event)
        except Exception:
            req = None
        if req is None:  # pynetdicom could not give the command's UIDs or the data set
            status, comment = self._refuse_event(event)
            return failure_code(status, comment)
        status, comment = self.handle(req)
        return failure_code(status, comment) if comment else status

    def handle(self, req: StoreRequest) -> tuple[int, str | None]:
        """The one error boundary: any exception is a failure status, never success."""
        try:
            return self.store(req)
        except Exception as e:
            log.error("dicom.store_failed", channel=self.ctx.channel, error=type(e).__name__,
                      detail=str(e)[:200])
            return STORE["out_of_resources"].code, "internal error, not stored"

    def _check(self, req: StoreRequest) -> tuple[memoryview, dict[str, Any]] | tuple[int, str]:
        try:
            attrs = idx.extract(intake_check.read_checked(req.part10, req.meta_end, req.transfer_syntax))
        except Exception as e:  # refused, never retried with another reader (which would take it)
            return self.refuse_error(req, e)
        refused = check_attrs(attrs, req.sop_class, req.sop_uid)
        if refused is not None:
            return self.refuse(req, refused)
        return memoryview(req.part10)[req.meta_end:], attrs

    def refuse(self, req: Any, why: intake_check.Refusal, **fields: Any) -> tuple[int, str]:
        """Refuse an instance before the index (``req``: a StoreRequest or a streamed sink): its
        status and Error Comment, logged and audited as a failed receive (nothing was stored),
        by the one refusal every intake path shares (engine/store/dicom/intake_check.py)."""
        return intake_check.refuse(self.ctx.audit, why, channel=self.ctx.channel, sop_class=req.sop_class,
                                   sop_uid=req.sop_uid, transfer_syntax=req.transfer_syntax,
                                   calling_aet=req.calling_aet, called_aet=self.ae_title, peer=req.peer, **fields)

    def refuse_error(self, req: Any, error: Exception) -> tuple[int, str]:
        """``refuse`` for a data set that failed the check (``intake_check.refusal_of``: cut short
        0xC000, undecodable 0xC000, no index UIDs 0xA900)."""
        return intake_check.refuse_error(self.ctx.audit, error, channel=self.ctx.channel, sop_class=req.sop_class,
                                         sop_uid=req.sop_uid, transfer_syntax=req.transfer_syntax,
                                         calling_aet=req.calling_aet, called_aet=self.ae_title, peer=req.peer)

    def _refuse_event(self, event: Any) -> tuple[int, str]:
        """A C-STORE whose command pynetdicom could not hand over (invalid Affected UIDs)."""
        req = getattr(event, "request", None)
        try:
            peer, calling = peer_of(event), str(event.assoc.requestor.ae_title).strip()
            ts = str(event.context.transfer_syntax)
        except Exception:
            peer = calling = ts = ""
        seen = StoreRequest(sop_class=str(getattr(req, "AffectedSOPClassUID", "") or "")[:64],
                            sop_uid=str(getattr(req, "AffectedSOPInstanceUID", "") or "")[:64],
                            transfer_syntax=ts, calling_aet=calling, peer=peer, part10=b"", meta_end=0)
        return self.refuse(seen, intake_check.refusal(STORE["mismatch"].code, INVALID_COMMAND_UIDS))

    def store(self, req: StoreRequest) -> tuple[int, str | None]:
        if not valid_uid(req.sop_uid) or not valid_uid(req.sop_class):
            return self.refuse(req, intake_check.refusal(STORE["mismatch"].code, INVALID_COMMAND_UIDS))
        intake = self.ctx.intake
        if intake is None:
            return STORE["out_of_resources"].code, "no intake"
        message_id = new_id()
        # The file is sealed and fsynced on a writer thread while we read the index
        # attributes and check for a duplicate; a refusal below deletes it again.
        ahead = intake.write_ahead(message_id, req.part10)
        try:
            outcome = self._checked_submit(req, message_id, ahead)
        except BaseException:
            intake.discard_ahead(ahead)
            raise
        if isinstance(outcome, tuple):
            intake.discard_ahead(ahead)
            return outcome
        return outcome_status(self.ctx.channel, message_id, outcome)

    def _checked_submit(self, req: StoreRequest, message_id: str, ahead: Any) -> Outcome | tuple[int, str | None]:
        checked = self._check(req)
        if isinstance(checked[0], int):
            return checked  # type: ignore[return-value]
        dataset, attrs = checked
        return self.submit(message_id, attrs, req.transfer_syntax, req, req.part10, ahead,
                           hashlib.sha256(dataset).hexdigest(), len(dataset))

    def submit(self, message_id: str, attrs: dict[str, Any], ts: str, req: Any, payload: bytes, ahead: Any,
               digest: str, size: int) -> Outcome:
        """Commit a checked instance (``req``: its ``calling_aet`` and ``peer``); ``payload`` is
        the Part-10 bytes, or only their header when ``ahead`` holds the streamed blob."""
        sop_uid = attrs["IMAGE"]["SOPInstanceUID"]
        channel = self.ctx.channel
        headers = {
            "SOPClassUID": attrs["IMAGE"]["SOPClassUID"], "SOPInstanceUID": sop_uid,
            "StudyInstanceUID": attrs["STUDY"]["StudyInstanceUID"],
            "SeriesInstanceUID": attrs["SERIES"]["SeriesInstanceUID"],
            "Modality": str(attrs["SERIES"].get("Modality", "")), "TransferSyntaxUID": ts,
            "CallingAETitle": req.calling_aet, "CalledAETitle": self.ae_title,
        }
        env = Envelope(channel=channel, kind="dicom", payload=payload, headers=headers, peer=req.peer,
                       id=message_id)
        # No intake dedupe key: the index itself recognises a re-sent SOP Instance UID of any
        # age (the hook answers Duplicate), in the same transaction and with no extra query.
        assert self.ctx.intake is not None
        hook = self._hook(attrs, ts, digest, size)
        with message_terms.given(message_id, search_identifiers(attrs)):  # no second read in the committer
            return self.ctx.intake.submit_blocking(env, ahead=ahead, tx_hook=hook)

    def _hook(self, attrs: dict[str, Any], ts: str, digest: str,
              size: int) -> Callable[[Connection, Envelope], str | Duplicate | Refused]:
        store, hkey, replace = self.ctx.store, self._hkey, self.replace

        def index_rows(conn: Connection, env: Envelope) -> str | Duplicate | Refused:
            # Audit: intake writes the message.receive row (calling AE, SOP class and study UID in
            # its headers) in this same transaction; a second row per instance would only repeat it.
            if not replace and idx.index_into_known_series(conn, attrs, message_id=env.id, transfer_syntax=ts,
                                                           digest=digest, size=size, channel=env.channel):
                return "indexed"
            found = idx.find(conn, hkey, attrs)
            conflict = idx.conflict(found, digest)
            if conflict is not None:
                return Refused(conflict)
            if found.instance_pk is not None and (not replace or found.digest == digest):
                return Duplicate(str(found.message_id))
            return idx.index_instance(conn, store, hkey, attrs, message_id=env.id, transfer_syntax=ts,
                                      digest=digest, size=size, channel=env.channel, replace=replace,
                                      found=found)

        return index_rows
