"""Tables of the imaging workflow around the archive (issue 12): performed procedure steps,
rejected instances (IOCM) and patient reconciliation.

They sit with the archive's other tables at the store layer, so ``Store.migrate()`` creates
them without importing the code above it (``engine.store.dicom.tables`` imports this
module). No clear column holds PHI: UIDs, AE titles, states and times only; datasets are
sealed blobs.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, Index, Integer, String, Table, Text

from engine.store.schema import metadata

# Modality Performed Procedure Steps (PS3.4 F.7): the current state of each, the whole
# data set (N-CREATE merged with every N-SET) sealed in a blob (AAD ``mpps-<uid>``), the
# worklist items it was matched to when it was created, and a version for N-SETs that race.
mpps = Table(
    "dicom_mpps", metadata,
    Column("mpps_uid", String(64), primary_key=True),
    Column("state", String(16), nullable=False),
    Column("station_aet", String(16), nullable=False, default=""),
    Column("study_uid", String(64), nullable=False, default=""),
    Column("blob_id", String(64), nullable=False),
    Column("message_id", String(32), nullable=False),  # the message of the latest N-CREATE / N-SET
    Column("worklist_keys", Text, nullable=False, default=""),  # space-separated worklist item keys
    Column("version", Integer, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_dicom_mpps_study", "study_uid"),
)

# Instances hidden by an IOCM rejection note (a KOS with a CID 7011 title): their index row is
# moved here, so C-FIND, C-MOVE, C-GET and DICOMweb no longer see them, and can be restored
# (or, with ``delete``, their stored bytes are removed and only this record stays).
rejected_instances = Table(
    "dicom_rejected", metadata,
    Column("sop_uid", String(64), primary_key=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("transfer_syntax", String(64), nullable=False),
    Column("message_id", String(32), nullable=False),
    Column("blob_id", String(64), nullable=True),
    Column("digest", String(64), nullable=False),
    Column("size", Integer, nullable=False),
    Column("channel", String(128), nullable=False, default=""),
    Column("received_at", Float, nullable=False),
    Column("kos_uid", String(64), nullable=False),  # the rejection note's SOP Instance UID
    Column("reason", String(16), nullable=False),  # its CID 7011 code value (113001, 113039, ...)
    Column("deleted", Integer, nullable=False, default=0),  # the stored bytes were removed
    Column("rejected_at", Float, nullable=False),
    Index("ix_dicom_rejected_study", "study_uid"),
)

# Patients whose attributes were changed after their instances were stored (ADT A08/A31,
# A40 merges, FHIR Patient updates): retrieval rewrites the Patient module of their instances
# on the way out (``engine.store.dicom.reconcile``); one row per patient, its revision count.
patient_revisions = Table(
    "dicom_patient_revisions", metadata,
    Column("patient_pk", Integer, primary_key=True),
    Column("revision", Integer, nullable=False),
    Column("updated_at", Float, nullable=False),
)

# Studies moved to another patient by a merge keep a note of where they came from (for the
# audit trail and for an operator to see what a merge did); no PHI: identity keys are HMACs.
patient_merges = Table(
    "dicom_patient_merges", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("from_pid_hmac", String(64), nullable=False),
    Column("to_pid_hmac", String(64), nullable=False),
    Column("studies", Integer, nullable=False),
    Column("message_id", String(32), nullable=False, default=""),
    Column("merged_at", Float, nullable=False),
)
