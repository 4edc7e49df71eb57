"""The archive's tables: patient / study / series / instance index, what each study has shown, and the
Modality Worklist.

They live apart from the code that fills them so that the store layer (``engine.store.db``) can
create the whole schema without importing the DICOM code above it. What each column holds, and
what it may not hold (PHI), is documented with the code that writes it: ``index``, ``study``
and ``worklist``.
"""

from __future__ import annotations

from sqlalchemy import Column, Float, ForeignKey, Index, Integer, String, Table, Text, UniqueConstraint  # noqa: F401

from engine.store.schema import metadata

patients = Table(
    "dicom_patients", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("pid_hmac", String(64), nullable=False, unique=True),
    Column("name_hmac", String(64), nullable=False, index=True),
    Column("attrs_blob", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

studies = Table(
    "dicom_studies", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("patient_pk", Integer, ForeignKey("dicom_patients.pk"), nullable=False, index=True),
    Column("study_uid", String(64), nullable=False, unique=True),
    Column("study_date", String(8), nullable=False, default="", index=True),
    Column("study_time", String(16), nullable=False, default=""),
    Column("accession_hmac", String(64), nullable=False, index=True),
    Column("attrs_blob", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

series = Table(
    "dicom_series", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("study_pk", Integer, ForeignKey("dicom_studies.pk"), nullable=False, index=True),
    Column("series_uid", String(64), nullable=False, unique=True),
    Column("modality", String(16), nullable=False, default="", index=True),
    Column("series_number", Integer, nullable=True),
    Column("attrs_blob", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)

instances = Table(
    "dicom_instances", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("series_pk", Integer, ForeignKey("dicom_series.pk"), nullable=False, index=True),
    Column("sop_uid", String(64), nullable=False, unique=True),
    Column("sop_class_uid", String(64), nullable=False),
    Column("instance_number", Integer, nullable=True),
    Column("transfer_syntax", String(64), nullable=False),
    Column("message_id", String(32), nullable=False, index=True),
    Column("blob_id", String(64), nullable=True),  # set when filed by the store handler
    Column("digest", String(64), nullable=False),  # SHA-256 of the encoded data set
    Column("size", Integer, nullable=False),
    Column("channel", String(128), nullable=False, default=""),
    Column("archived", Integer, nullable=False, default=0),
    Column("received_at", Float, nullable=False),
)

study_instances = Table(
    "study_instances",
    metadata,
    Column("sop_instance_uid", String(64), primary_key=True),
    Column("study_uid", String(64), nullable=False),
    Column("series_uid", String(64), nullable=False),
    Column("sop_class_uid", String(64), nullable=False, default=""),
    Column("series_number", Integer, nullable=True),
    Column("instance_number", Integer, nullable=True),
    Column("modality", String(16), nullable=False, default=""),
    Column("body_part", String(16), nullable=False, default=""),
    Column("laterality", String(2), nullable=False, default=""),
    Column("seen_at", Float, nullable=False),
    Index("ix_study_instances_study", "study_uid", "series_uid"),
)

worklist_items = Table(
    "worklist_items",
    metadata,
    Column("item_key", String(64), primary_key=True),
    Column("station_aet", String(16), nullable=False, default=""),
    Column("modality", String(16), nullable=False, default=""),
    Column("start_date", String(8), nullable=False, default=""),
    Column("start_time", String(16), nullable=False, default=""),
    Column("accession_number", String(16), nullable=False, default=""),
    Column("status", String(16), nullable=False),
    Column("blob_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_worklist_station_date", "status", "station_aet", "start_date"),
    Index("ix_worklist_modality_date", "status", "modality", "start_date"),
)
