"""The archive's tables: patient / study / series / instance index, what each study has shown, and the
Modality Worklist.

They live apart from the code that fills them so that the store layer (``engine.store.db``) can
create the whole schema without importing the DICOM code above it. What each column holds, and
what it may not hold (PHI), is documented with the code that writes it: ``index``, ``terms``,
``study`` and ``worklist``. The attributes each level seals (its JSON blob's keys) are listed
here too: they are part of what the schema holds, and the migration (``upgrade``) reads them.
"""

from __future__ import annotations

from sqlalchemy import (  # noqa: F401
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from engine.store.schema import metadata

# Attributes kept per level (sealed JSON); the clear columns are copies for narrowing.
PATIENT_ATTRS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
                 "PatientSex", "OtherPatientIDs", "EthnicGroup", "PatientComments")
STUDY_ATTRS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
               "StudyDescription", "ReferringPhysicianName", "NameOfPhysiciansReadingStudy",
               "PatientAge", "PatientSize", "PatientWeight", "Occupation", "AdmittingDiagnosesDescription")
SERIES_ATTRS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate",
                "SeriesTime", "BodyPartExamined", "ProtocolName", "PerformedProcedureStepStartDate",
                "PerformedProcedureStepStartTime", "Laterality", "Manufacturer", "StationName",
                "InstitutionName")
IMAGE_ATTRS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime",
               "NumberOfFrames", "Rows", "Columns", "ImageType", "AcquisitionNumber")
LEVEL_ATTRS: dict[str, tuple[str, ...]] = {
    "PATIENT": PATIENT_ATTRS, "STUDY": STUDY_ATTRS, "SERIES": SERIES_ATTRS, "IMAGE": IMAGE_ATTRS,
}

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
    # Rows, Columns, NumberOfFrames: instance-level QIDO-RS defaults (PS3.18 Table 10.6.3-5) and
    # C-FIND keys, kept in clear (image dimensions, not PHI); NULL in rows indexed before v5
    Column("image_rows", Integer, nullable=True),
    Column("image_columns", Integer, nullable=True),
    Column("number_of_frames", Integer, nullable=True),
    # ContentDate, ContentTime (dates of service, clear like study_date/study_time), ImageType (its
    # values joined by backslashes, as encoded) and AcquisitionNumber: instance keys of C-FIND and
    # QIDO-RS, kept in clear (not PHI); NULL in rows indexed before v6
    Column("content_date", String(8), nullable=True),
    Column("content_time", String(16), nullable=True),
    Column("image_type", Text, nullable=True),
    Column("acquisition_number", Integer, nullable=True),
    Column("transfer_syntax", String(64), nullable=False),
    Column("message_id", String(32), nullable=False, index=True),
    Column("blob_id", String(64), nullable=True),  # set when filed by the store handler
    Column("digest", String(64), nullable=False),  # SHA-256 of the encoded data set
    Column("size", Integer, nullable=False),
    Column("channel", String(128), nullable=False, default=""),
    Column("archived", Integer, nullable=False, default=0),
    Column("received_at", Float, nullable=False),
)

# Blind search terms (keyed HMACs, ``engine.security.blind_index``) of the PHI keys C-FIND
# narrows on: PatientName and PatientID (row_pk = dicom_patients.pk), AccessionNumber
# (row_pk = dicom_studies.pk). The scope says which; the primary key is the look-up index.
index_terms = Table(
    "dicom_terms", metadata,
    Column("scope", String(32), nullable=False),
    Column("term", String(32), nullable=False),
    Column("row_pk", Integer, nullable=False),
    PrimaryKeyConstraint("scope", "term", "row_pk", name="pk_dicom_terms"),
)

# What the archive index's own migrations (``upgrade``) have done, by name.
index_state = Table(
    "dicom_index_state", metadata,
    Column("name", String(32), primary_key=True),
    Column("version", Integer, nullable=False),
    Column("applied_at", Float, nullable=False),
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

# The workflow's tables (MPPS, IOCM rejections, patient reconciliation) are in a module of their
# own; importing it here puts them in the schema wherever the archive's tables are.
from engine.store.dicom import workflow_tables as _workflow_tables  # noqa: E402, F401
