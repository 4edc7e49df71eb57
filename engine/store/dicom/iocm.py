"""IHE IOCM rejection notes: a Key Object Selection whose title is a CID 7011 code hides instances.

A modality or a PACS workstation rejects instances by storing a KOS (Key Object Selection
Document) whose Concept Name is one of PS3.16 CID 7011 (Rejected for Quality Reasons, for
Patient Safety Reasons, Incorrect Modality Worklist Entry, Data Retention Policy Expired) and
whose Current Requested Procedure Evidence Sequence lists the rejected instances. The
``iocm_rejection`` transform recognises such a KOS; its ``iocm`` store handler (here) then, in
the store destination's transaction:

- moves each listed instance's index row to ``dicom_rejected`` (with the note's UID and
  reason), so C-FIND, C-MOVE, C-GET, DICOMweb and storage commitment no longer see it; a series
  left without instances goes too, and a study left without series (with its terms);
- with ``delete``, also removes what holds the instance's bytes: its own blob, or the message
  that brought it with its deliveries, once those are final (a message still being delivered
  keeps its bytes, hidden, and is counted as kept). Removing the blob row removes its wrapped
  data key, so a file left on disk can no longer be decrypted (crypto-shredding) and ``medrelay
  store gc`` deletes it as unreferenced;
- writes one audit event (``dicom.iocm.reject`` / ``dicom.iocm.delete``) with the counts.

The note itself stays in the archive, as IOCM wants. Instances named by the note but not in the
archive (rejected before, never received) are counted and otherwise ignored.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from sqlalchemy import Connection, delete, exists, func, insert, select

from engine.store import attempts, message_terms, schema
from engine.store.dicom import terms
from engine.store.dicom.tables import instances, series, studies
from engine.store.dicom.workflow_tables import rejected_instances
from engine.store.handlers import store_handler

if TYPE_CHECKING:
    from pydicom import Dataset

    from engine.context import ComponentContext
    from engine.envelope import Envelope

log = structlog.get_logger()

KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
# PS3.16 CID 7011 Rejected Objects Document Titles (scheme DCM)
REJECTION_TITLES = {
    "113001": "Rejected for Quality Reasons",
    "113037": "Rejected for Patient Safety Reasons",
    "113038": "Incorrect Modality Worklist Entry",
    "113039": "Data Retention Policy Expired",
}
FINAL_DELIVERIES = ("done", "filtered", "superseded", "dead")


@dataclass(frozen=True)
class Rejection:
    kos_uid: str
    code: str
    refs: list[tuple[str, str, str, str]]  # (study UID, series UID, SOP Class UID, SOP Instance UID)


@dataclass
class Counts:
    hidden: int = 0
    missing: int = 0
    deleted: int = 0
    kept: int = 0


def read_rejection(ds: Dataset, codes: set[str] | None = None) -> Rejection | None:
    """The rejection a KOS data set makes, or None when it is not a CID 7011 rejection note."""
    if str(ds.get("SOPClassUID", "")) != KOS_CLASS:
        return None
    title = ds.get("ConceptNameCodeSequence")
    if not title:
        return None
    code = str(title[0].get("CodeValue", "") or "").strip()
    scheme = str(title[0].get("CodingSchemeDesignator", "") or "").strip()
    if scheme != "DCM" or code not in (codes or REJECTION_TITLES):
        return None
    refs = []
    for st in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study = str(st.get("StudyInstanceUID", "") or "")
        for se in st.get("ReferencedSeriesSequence") or []:
            series_uid = str(se.get("SeriesInstanceUID", "") or "")
            for ref in se.get("ReferencedSOPSequence") or []:
                refs.append((study, series_uid, str(ref.get("ReferencedSOPClassUID", "") or ""),
                             str(ref.get("ReferencedSOPInstanceUID", "") or "")))
    return Rejection(str(ds.get("SOPInstanceUID", "")), code, refs)


_ROW = (select(instances, series.c.series_uid, series.c.pk.label("series_pk_"), studies.c.study_uid,
               studies.c.pk.label("study_pk_"))
        .select_from(instances.join(series, series.c.pk == instances.c.series_pk)
                     .join(studies, studies.c.pk == series.c.study_pk)))


def reject(conn: Connection, rejection: Rejection, *, delete_bytes: bool) -> Counts:
    """Hide (and with ``delete_bytes`` remove) the instances a rejection note names."""
    out = Counts()
    emptied: set[int] = set()
    now = time.time()
    for study_uid, series_uid, sop_class, sop_uid in rejection.refs:
        row = conn.execute(_ROW.where(instances.c.sop_uid == sop_uid)).mappings().first()
        if row is None or (sop_class and row["sop_class_uid"] != sop_class) or row["study_uid"] != study_uid \
                or (series_uid and row["series_uid"] != series_uid):  # the note must name it where it is
            out.missing += 1
            continue
        conn.execute(insert(rejected_instances).values(
            sop_uid=sop_uid, sop_class_uid=row["sop_class_uid"], study_uid=row["study_uid"],
            series_uid=row["series_uid"], transfer_syntax=row["transfer_syntax"], message_id=row["message_id"],
            blob_id=row["blob_id"], digest=row["digest"], size=row["size"], channel=row["channel"],
            received_at=row["received_at"], kos_uid=rejection.kos_uid[:64], reason=rejection.code,
            deleted=0, rejected_at=now))
        conn.execute(delete(instances).where(instances.c.pk == row["pk"]))
        emptied.add(int(row["series_pk_"]))
        out.hidden += 1
        if delete_bytes:
            if _delete_bytes(conn, row["blob_id"], row["message_id"]):
                out.deleted += 1
                conn.execute(rejected_instances.update().where(rejected_instances.c.sop_uid == sop_uid)
                             .values(deleted=1))
            else:
                out.kept += 1
    _drop_empty(conn, emptied)
    return out


def _delete_bytes(conn: Connection, blob_id: str | None, message_id: str) -> bool:
    b, m, d = schema.blobs, schema.messages, schema.deliveries
    if blob_id:
        conn.execute(delete(b).where(b.c.id == blob_id))
    still_indexed = conn.execute(select(exists().where(instances.c.message_id == message_id))).scalar()
    pending = conn.execute(select(exists().where(d.c.message_id == message_id,
                                                 d.c.state.not_in(FINAL_DELIVERIES)))).scalar()
    if still_indexed or pending:
        return bool(blob_id)  # its own blob went; the message still serves something else
    msg_blob = conn.execute(select(m.c.blob_id).where(m.c.id == message_id)).scalar()
    ids = list(conn.execute(select(d.c.id).where(d.c.message_id == message_id)).scalars())
    attempts.delete_for(conn, ids)
    message_terms.delete_for(conn, [message_id])
    conn.execute(delete(d).where(d.c.message_id == message_id))
    conn.execute(delete(m).where(m.c.id == message_id))
    if msg_blob:
        conn.execute(delete(b).where(b.c.id == msg_blob))
    return True


def _drop_empty(conn: Connection, series_pks: set[int]) -> None:
    """Series left without instances, then studies left without series, leave the index."""
    study_pks: set[int] = set()
    for pk in series_pks:
        if conn.execute(select(func.count()).where(instances.c.series_pk == pk)).scalar_one() == 0:
            study_pks.update(conn.execute(select(series.c.study_pk).where(series.c.pk == pk)).scalars())
            conn.execute(delete(series).where(series.c.pk == pk))
    for pk in study_pks:
        if conn.execute(select(func.count()).where(series.c.study_pk == pk)).scalar_one() == 0:
            terms.delete_terms(conn, "STUDY", [pk])
            conn.execute(delete(studies).where(studies.c.pk == pk))


def is_rejected(conn: Connection, sop_uid: str) -> bool:
    return conn.execute(select(exists().where(rejected_instances.c.sop_uid == sop_uid))).scalar() is True


@store_handler("iocm")
def store_iocm(ctx: ComponentContext, conn: Connection, envelope: Envelope) -> str:
    """`store` destination for a rejection note the ``iocm_rejection`` transform recognised."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(envelope.payload), stop_before_pixels=True, force=True)
    rejection = read_rejection(ds)
    if rejection is None:
        return "iocm: not a rejection note"
    delete_bytes = str(envelope.headers.get("iocm_delete", "")) == "1"
    counts = reject(conn, rejection, delete_bytes=delete_bytes)
    ctx.audit.record("dicom.iocm.delete" if delete_bytes else "dicom.iocm.reject",
                     actor=str(envelope.headers.get("CallingAETitle") or ""), channel=envelope.channel,
                     message_id=envelope.id, conn=conn,
                     entity={"kos_uid": rejection.kos_uid, "reason": rejection.code, "hidden": counts.hidden,
                             "deleted": counts.deleted, "kept": counts.kept, "not_found": counts.missing})
    log.info("dicom.iocm_rejected", channel=envelope.channel, message_id=envelope.id, reason=rejection.code,
             hidden=counts.hidden, deleted=counts.deleted, kept=counts.kept, not_found=counts.missing)
    return f"iocm:{rejection.code}:hidden {counts.hidden},deleted {counts.deleted},not found {counts.missing}"
