"""Modality Performed Procedure Step SCP (PS3.4 F.7): N-CREATE and N-SET on the DICOM listener.

A modality reports the step it performs: N-CREATE when it starts (IN PROGRESS), N-SET as it
goes and when it ends (COMPLETED or DISCONTINUED). Each request is checked here (the Type 1
attributes of PS3.4 Table F.7.2-1, the state machine, what N-SET may not change, the final-state
attributes), then submitted to intake like any message: the whole step as it now stands (the
N-CREATE merged with every N-SET) is the payload, a Part-10 data set of the MPPS SOP Class, and
the intake hook records the step and moves its worklist items on (``engine.store.dicom.mpps``)
in the transaction that stores the message and its audit row. The peer gets its status only
after that commit.

The message carries headers that name it and never PHI: ``event: mpps``, ``dimse`` (N-CREATE /
N-SET), ``mpps_uid``, ``mpps_state``, ``mpps_previous_state``, ``SOPClassUID``, ``StudyInstanceUID``
(of the first scheduled step), ``Modality``, the AE titles, ``store_as: mpps``. Like every
event message it takes only routes whose ``when:`` names ``event`` (``when: {event: mpps}``),
so a channel's image routes never see it; ``mpps_to_hl7`` and ``mpps_to_fhir`` send it on.

Leniency, on purpose: missing Type 2 attributes are accepted (many modalities leave them
out); an N-SET that changes nothing (a retry of one that was committed) succeeds without a new
message, also on a step already final.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pydicom import Dataset, dcmwrite
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from engine.envelope import Envelope, new_id
from engine.store.dicom import mpps as steps
from listeners.dicom_contexts import MPPS
from listeners.dicom_dimse import valid_uid
from listeners.dicom_status import MPPS_CREATE, MPPS_SET, Status

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.intake import Outcome

log = structlog.get_logger()

MPPS_CLASS = MPPS[0]
# PS3.4 Table F.7.2-1: Type 1 for the N-CREATE SCU (the Scheduled Step Attributes' Study
# Instance UID too, checked per item).
CREATE_TYPE1 = ("PerformedProcedureStepStatus", "ScheduledStepAttributesSequence", "PerformedProcedureStepID",
                "PerformedStationAETitle", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
                "Modality")
# ... and "Not allowed" for the N-SET SCU: a different value is refused (the same value is not a change).
NOT_SETTABLE = ("SpecificCharacterSet", "ScheduledStepAttributesSequence", "PatientName", "PatientID",
                "PatientBirthDate", "PatientSex", "ReferencedPatientSequence", "PerformedProcedureStepID",
                "PerformedStationAETitle", "PerformedStationName", "PerformedLocation",
                "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "Modality", "StudyID",
                "SOPClassUID", "SOPInstanceUID")
FINAL_TYPE1 = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime")
NOT_UPDATABLE_ID = 0xA710  # PS3.4 F.7.2.2.4: "Performed Procedure Step Object may no longer be updated"


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused: the status, an Error Comment (no PHI) and the attributes."""

    status: Status
    comment: str
    attributes: tuple[str, ...] = ()
    error_id: int | None = None

    def dataset(self, *, with_attributes: bool) -> Dataset:
        ds = Dataset()
        ds.Status = self.status.code
        ds.ErrorComment = self.comment[:64]
        if self.error_id is not None:
            ds.ErrorID = self.error_id
        tags = [tag_for_keyword(a) for a in self.attributes if tag_for_keyword(a) is not None]
        if with_attributes and tags:
            ds.AttributeIdentifierList = tags
        return ds


def _text(ds: Dataset, keyword: str) -> str:
    v = ds.get(keyword)
    return "" if v is None else str(v).strip()


def _missing(ds: Dataset, keywords: tuple[str, ...], table: dict[str, Status]) -> Refusal | None:
    absent = [k for k in keywords if k not in ds]
    if absent:
        return Refusal(table["missing"], "missing " + ", ".join(absent), tuple(absent))
    empty = [k for k in keywords if ((not ds[k].value) if ds[k].VR == "SQ" else not _text(ds, k))]
    if empty:
        key = "missing_value" if "missing_value" in table else "missing"
        return Refusal(table[key], "no value: " + ", ".join(empty), tuple(empty))
    return None


def check_create(ds: Dataset) -> Refusal | None:
    """PS3.4 F.7.2.1: the Type 1 attributes and the initial state; None when acceptable."""
    got = _missing(ds, CREATE_TYPE1, MPPS_CREATE)
    if got is not None:
        return got
    state = _text(ds, "PerformedProcedureStepStatus").upper()
    if state != steps.IN_PROGRESS:
        return Refusal(MPPS_CREATE["invalid_value"], "N-CREATE status must be IN PROGRESS",
                       ("PerformedProcedureStepStatus",))
    for item in ds.ScheduledStepAttributesSequence:
        if not valid_uid(_text(item, "StudyInstanceUID")):
            return Refusal(MPPS_CREATE["missing_value"], "Scheduled Step Attributes without a Study Instance UID",
                           ("ScheduledStepAttributesSequence",))
    return None


def check_set(current: Dataset, mods: Dataset) -> tuple[Refusal | None, Dataset, str]:
    """PS3.4 F.7.2.2: (refusal or None, the step with ``mods`` applied, its new state)."""
    old_state = _text(current, "PerformedProcedureStepStatus").upper()
    changed = [e for e in mods if e.tag.group > 0x0002 and (e.tag not in current or current[e.tag].value != e.value)]
    merged = Dataset()
    merged.update(current)
    for e in mods:
        if e.tag.group > 0x0002:
            merged[e.tag] = e
    state = _text(merged, "PerformedProcedureStepStatus").upper()
    if not changed:
        return None, merged, old_state
    if old_state in steps.FINAL:
        return Refusal(MPPS_SET["final"], "Performed Procedure Step Object may no longer be updated",
                       error_id=NOT_UPDATABLE_ID), merged, state
    frozen = [e.keyword for e in changed if e.keyword in NOT_SETTABLE]
    if frozen:
        return Refusal(MPPS_SET["invalid_value"], "N-SET may not change " + ", ".join(frozen),
                       tuple(frozen)), merged, state
    if state not in steps.STATES:
        return Refusal(MPPS_SET["invalid_value"], "status must be IN PROGRESS, COMPLETED or DISCONTINUED",
                       ("PerformedProcedureStepStatus",)), merged, state
    if state in steps.FINAL:
        got = _missing(merged, FINAL_TYPE1, MPPS_SET)
        if got is None and state == steps.COMPLETED:
            series = merged.get("PerformedSeriesSequence") or []
            if not series or not all(valid_uid(_text(s, "SeriesInstanceUID")) for s in series):
                got = Refusal(MPPS_SET["missing"], "COMPLETED needs Performed Series Sequence with "
                              "Series Instance UIDs", ("PerformedSeriesSequence",))
        if got is not None:
            return got, merged, state
    return None, merged, state


def scheduled_steps(ds: Dataset) -> list[dict[str, str]]:
    """What each Scheduled Step Attributes item names (for the worklist item look-up)."""
    keys = ("AccessionNumber", "RequestedProcedureID", "ScheduledProcedureStepID", "StudyInstanceUID")
    return [{k: _text(item, k) for k in keys} for item in ds.get("ScheduledStepAttributesSequence") or []]


def part10(ds: Dataset, uid: str) -> bytes:
    """The step as a Part-10 data set of the MPPS SOP Class (Explicit VR Little Endian)."""
    out = Dataset()
    out.update(ds)
    out.SOPClassUID = MPPS_CLASS
    out.SOPInstanceUID = uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MPPS_CLASS
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out.file_meta = meta
    buf = io.BytesIO()
    dcmwrite(buf, out, enforce_file_format=True)
    return buf.getvalue()


def read_step(data: bytes) -> Dataset:
    from pydicom import dcmread

    return dcmread(io.BytesIO(data), force=True)


class MppsSCP:
    """EVT_N_CREATE / EVT_N_SET handlers of one DICOM listener."""

    def __init__(self, ctx: ComponentContext, *, ae_title: str) -> None:
        self.ctx = ctx
        self.ae_title = ae_title

    # -- N-CREATE ----------------------------------------------------------------------
    def on_n_create(self, event: Any) -> tuple[Any, Dataset | None]:
        aet, peer = _requestor(event)
        uid = str(event.request.AffectedSOPInstanceUID or "")
        created_uid = not uid
        uid = uid or generate_uid()
        try:
            if not valid_uid(uid):
                return self._refuse("N-CREATE", uid, aet, peer, Refusal(MPPS_CREATE["invalid_instance"],
                                                                        "Affected SOP Instance UID is not a UID"))
            try:
                ds = _decoded(event.attribute_list)
            except Exception:
                return self._refuse("N-CREATE", uid, aet, peer,
                                    Refusal(MPPS_CREATE["processing"], "attribute list cannot be decoded"))
            refusal = check_create(ds)
            if refusal is None:
                with self.ctx.store.engine.connect() as conn:
                    if steps.get(conn, uid) is not None:
                        refusal = Refusal(MPPS_CREATE["duplicate"], "a step with this SOP Instance UID exists")
            if refusal is not None:
                return self._refuse("N-CREATE", uid, aet, peer, refusal)
            outcome = self._submit("N-CREATE", uid, ds, None, aet, peer)
        except Exception as e:  # one error boundary: never a traceback to the peer
            log.error("dicom.mpps_failed", channel=self.ctx.channel, dimse="N-CREATE", error=type(e).__name__)
            return MPPS_CREATE["processing"].code, None
        if not outcome.ok:
            return self._failed("N-CREATE", uid, aet, peer, outcome, MPPS_CREATE)
        rsp = None
        if created_uid:  # PS3.7 10.1.5.1.4: the SCP names the instance it created
            rsp = Dataset()
            rsp.AffectedSOPInstanceUID = uid
        return MPPS_CREATE["success"].code, rsp

    # -- N-SET ----------------------------------------------------------------------------
    def on_n_set(self, event: Any) -> tuple[Any, Dataset | None]:
        aet, peer = _requestor(event)
        uid = str(event.request.RequestedSOPInstanceUID or "")
        try:
            try:
                mods = _decoded(event.modification_list)
            except Exception:
                return self._refuse("N-SET", uid, aet, peer,
                                    Refusal(MPPS_SET["processing"], "modification list cannot be decoded"))
            with self.ctx.store.engine.connect() as conn:
                seen = steps.get(conn, uid) if valid_uid(uid) else None
                current = read_step(steps.dataset_bytes(self.ctx.store, conn, seen)) if seen is not None else None
            if seen is None or current is None:
                return self._refuse("N-SET", uid, aet, peer,
                                    Refusal(MPPS_SET["no_such_instance"], "no such performed procedure step"))
            refusal, merged, state = check_set(current, mods)
            if refusal is not None:
                return self._refuse("N-SET", uid, aet, peer, refusal)
            if merged == current:
                log.info("dicom.mpps_unchanged", channel=self.ctx.channel, mpps_uid=uid, state=seen.state,
                         calling_aet=aet)
                return MPPS_SET["success"].code, None
            outcome = self._submit("N-SET", uid, merged, seen, aet, peer)
        except Exception as e:
            log.error("dicom.mpps_failed", channel=self.ctx.channel, dimse="N-SET", error=type(e).__name__)
            return MPPS_SET["processing"].code, None
        if not outcome.ok:
            return self._failed("N-SET", uid, aet, peer, outcome, MPPS_SET)
        return MPPS_SET["success"].code, None

    # -- intake ---------------------------------------------------------------------------
    def _submit(self, dimse: str, uid: str, ds: Dataset, seen: steps.Step | None, aet: str, peer: str) -> Outcome:
        state = _text(ds, "PerformedProcedureStepStatus").upper()
        scheduled = scheduled_steps(ds)
        study_uid = next((s["StudyInstanceUID"] for s in scheduled if s["StudyInstanceUID"]), "")
        station = _text(ds, "PerformedStationAETitle")
        payload = part10(ds, uid)
        headers = {
            "event": "mpps", "dimse": dimse, "mpps_uid": uid, "mpps_state": state,
            "mpps_previous_state": seen.state if seen is not None else "",
            "SOPClassUID": MPPS_CLASS, "SOPInstanceUID": uid, "StudyInstanceUID": study_uid,
            "Modality": _text(ds, "Modality"), "CallingAETitle": aet, "CalledAETitle": self.ae_title,
            "store_as": "mpps",
        }
        env = Envelope(channel=self.ctx.channel, kind="dicom", payload=payload, headers=headers, peer=peer,
                       id=new_id())
        store, audit, channel = self.ctx.store, self.ctx.audit, self.ctx.channel

        def record(conn: Any, e: Envelope) -> str:
            if seen is None:
                step = steps.create(store, conn, uid=uid, state=state, part10=payload, station_aet=station,
                                    study_uid=study_uid, message_id=e.id, steps=scheduled)
                action = "dicom.mpps.create"
            else:
                step = steps.update(store, conn, seen, state=state, part10=payload, message_id=e.id)
                action = "dicom.mpps.update"
            audit.record(action, actor=aet, peer=peer, channel=channel, message_id=e.id, conn=conn,
                         entity={"mpps_uid": uid, "state": state, "previous_state": headers["mpps_previous_state"],
                                 "study_uid": study_uid, "worklist_items": len(step.worklist_keys)})
            return f"mpps:{state}:{len(step.worklist_keys)}"

        assert self.ctx.intake is not None
        outcome = self.ctx.intake.submit_blocking(env, tx_hook=record)
        if outcome.ok:
            log.info("dicom.mpps", channel=channel, dimse=dimse, mpps_uid=uid, state=state, calling_aet=aet,
                     message_id=outcome.message_id, detail=outcome.result, routes=len(outcome.routes))
        return outcome

    def _refuse(self, dimse: str, uid: str, aet: str, peer: str, refusal: Refusal) -> tuple[Dataset, None]:
        log.warning("dicom.mpps_refused", channel=self.ctx.channel, dimse=dimse, mpps_uid=uid[:64] or None,
                    status=f"0x{refusal.status.code:04X}", reason=refusal.comment, calling_aet=aet)
        self.ctx.audit.record("dicom.mpps.create" if dimse == "N-CREATE" else "dicom.mpps.update",
                              outcome="failure", actor=aet, peer=peer, channel=self.ctx.channel,
                              entity={"mpps_uid": uid[:64], "status": refusal.status.code},
                              detail=refusal.comment[:200])
        return refusal.dataset(with_attributes=dimse == "N-SET"), None

    def _failed(self, dimse: str, uid: str, aet: str, peer: str, outcome: Outcome,
                table: dict[str, Status]) -> tuple[Dataset, None]:
        """Intake did not commit: the peer must send again (resources) unless the step moved on."""
        error = outcome.error or outcome.status
        if "Exists" in error:
            refusal = Refusal(table.get("duplicate", table["processing"]), "a step with this SOP Instance UID exists")
        elif "Conflict" in error:
            refusal = Refusal(table["processing"], "the step changed meanwhile: read it and send again")
        else:
            refusal = Refusal(table["resources"], "not stored: send again")
        return self._refuse(dimse, uid, aet, peer, refusal)


def _decoded(ds: Dataset) -> Dataset:
    """Every element read now (pydicom decodes lazily): bytes that are not a data set fail here,
    as one failure status, not later half way through the checks. A Performed Procedure Step
    Status sent in lower case or padded (``in progress``, invalid CS: PS3.5 6.2 allows upper case
    only) is normalised to what the step's row, headers and routes already say (``IN PROGRESS``),
    so the stored data set, N-SET's comparison with it and every reader agree. Normalised, not
    refused with 0x0106: the meaning is unambiguous, and a refusal would leave the modality's
    exam without a step (its worklist item never completed) for a casing slip."""
    for _elem in ds.iterall():
        pass
    raw = ds.get("PerformedProcedureStepStatus")
    if isinstance(raw, str) and raw != raw.strip().upper():
        ds.PerformedProcedureStepStatus = raw.strip().upper()
        log.info("dicom.mpps_status_normalised", sent=raw[:16], stored=ds.PerformedProcedureStepStatus)
    return ds


def _requestor(event: Any) -> tuple[str, str]:
    r = event.assoc.requestor
    return str(r.ae_title).strip(), f"{r.address}:{r.port}"
