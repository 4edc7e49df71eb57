"""Bringing an archive index written by an older medrelay up to what the code expects.

Runs from ``Store.migrate`` after the tables exist, once per index version (recorded in
``dicom_index_state``), inside the migration's transaction and under its lock: a crash
mid-way leaves the old index as it was and the next start does it again, and of several
engines starting together one does it.

Version 1 (issue 9):

- Patients merged on an empty PatientID are split. Before, every instance without a
  PatientID (and the same issuer) was filed under one patient, named after whichever
  arrived first. Each study of such a patient now gets a patient of its own (the key
  ``terms.patient_key`` gives new instances), with the patient attributes read again from
  the study's first stored instance: the merged row only ever held the first arrival's.
  A study none of whose instances can be read keeps no patient attributes (no name
  rather than someone else's). We re-key rather than add a "key kind" column with a
  default because a default would keep exactly the wrong-patient merge the change
  removes, and because new instances of those studies must find their patient by the
  new key.
- ``dicom_terms`` is filled from the sealed attributes of every patient and study row,
  so C-FIND narrows old rows by the blind index like new ones.

Cost: one decryption per patient and study row (and one instance read per study of a
merged patient), done once; progress is logged every ``CHUNK`` rows.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from typing import Any

import structlog
from pydicom import dcmread
from sqlalchemy import Connection, func, insert, select, update

from engine.store import schema
from engine.store.dicom import terms
from engine.store.dicom.tables import (
    PATIENT_ATTRS,
    index_state,
    index_terms,
    instances,
    patients,
    series,
    studies,
)

log = structlog.get_logger()

NAME = "dicom.index"
VERSION = 1
CHUNK = 1000


def run(conn: Connection, store: Any) -> int:
    """Apply what this index version needs, if it has not been applied; returns the version.

    Runs inside ``Store.migrate``'s transaction, under its lock (one engine migrates, the
    others wait and find it done).
    """
    have = conn.execute(select(index_state.c.version).where(index_state.c.name == NAME)).scalar()
    if have is not None and have >= VERSION:
        return int(have)
    started = time.monotonic()
    counts = _upgrade(conn, store)
    if have is None:
        conn.execute(insert(index_state).values(name=NAME, version=VERSION, applied_at=time.time()))
    else:
        conn.execute(update(index_state).where(index_state.c.name == NAME)
                     .values(version=VERSION, applied_at=time.time()))
    if counts["patients"] or counts["studies"]:
        log.info("dicom.index_upgraded", version=VERSION, seconds=round(time.monotonic() - started, 2), **counts)
    return VERSION


def _upgrade(conn: Connection, store: Any) -> dict[str, int]:
    counts = {"patients": 0, "studies": 0, "split_patients": 0, "split_studies": 0, "unreadable_studies": 0}
    max_patient = conn.execute(select(func.max(patients.c.pk))).scalar()
    max_study = conn.execute(select(func.max(studies.c.pk))).scalar()
    if max_patient is None and max_study is None:
        return counts  # a new store: nothing to do, and no HMAC key needs creating
    hkey = store.keyring.hmac_key(terms.HMAC_KEY_NAME)
    conn.execute(index_terms.delete())  # rebuilt whole: the transaction makes this all or nothing
    for row in _chunks(conn, patients, max_patient or 0):
        attrs = _open(conn, store, row.attrs_blob)
        counts["patients"] += 1
        if not terms.has_patient_id(attrs) and _split(conn, store, hkey, row, counts):
            continue
        terms.write_terms(conn, hkey, "PATIENT", row.pk, attrs)
    for row in _chunks(conn, studies, max_study or 0):
        terms.write_terms(conn, hkey, "STUDY", row.pk, _open(conn, store, row.attrs_blob))
        counts["studies"] += 1
        if counts["studies"] % CHUNK == 0:
            log.info("dicom.index_upgrade_progress", studies=counts["studies"])
    return counts


def _chunks(conn: Connection, table: Any, max_pk: int) -> Any:
    """Rows (pk, pid_hmac / study_uid, attrs_blob) up to ``max_pk``: rows this migration adds are not revisited."""
    last = 0
    while True:
        rows = conn.execute(select(table).where(table.c.pk > last, table.c.pk <= max_pk)
                            .order_by(table.c.pk).limit(CHUNK)).all()
        if not rows:
            return
        yield from rows
        last = rows[-1].pk


def _open(conn: Connection, store: Any, blob_id: str) -> dict[str, Any]:
    return dict(json.loads(store.get_blob(conn, blob_id)))


def _split(conn: Connection, store: Any, hkey: bytes, merged: Any, counts: dict[str, int]) -> bool:
    """Give each study of a patient without PatientID a patient of its own; False when there
    is nothing to split (its one study already has it under the per-study key)."""
    its = conn.execute(select(studies.c.pk, studies.c.study_uid).where(studies.c.patient_pk == merged.pk)
                       .order_by(studies.c.pk)).all()
    if len(its) == 1 and merged.pid_hmac == terms.patient_key(hkey, {}, its[0].study_uid):
        return False
    now = time.time()
    for study_pk, study_uid in its:
        attrs = _patient_attrs_of(conn, store, study_pk)
        if attrs is None:
            counts["unreadable_studies"] += 1
            attrs = {}
        key = terms.patient_key(hkey, attrs, study_uid)
        pk = conn.execute(select(patients.c.pk).where(patients.c.pid_hmac == key)).scalar()
        if pk is None:
            sealed = json.dumps(attrs, separators=(",", ":")).encode()
            blob = store.put_blob(conn, sealed, terms.blob_aad("PATIENT", key))
            pk = conn.execute(insert(patients).values(
                pid_hmac=key, name_hmac=terms.keyed(hkey, "PatientName", terms.norm_pn(attrs.get("PatientName", ""))),
                attrs_blob=blob, created_at=now)).inserted_primary_key[0]  # type: ignore[index]
            terms.write_terms(conn, hkey, "PATIENT", int(pk), attrs)
        conn.execute(update(studies).where(studies.c.pk == study_pk).values(patient_pk=pk))
        counts["split_studies"] += 1
    conn.execute(patients.delete().where(patients.c.pk == merged.pk))
    conn.execute(schema.blobs.delete().where(schema.blobs.c.id == merged.attrs_blob))  # a file: `store gc`
    counts["split_patients"] += 1
    return True


_PATIENT_TAGS = list(PATIENT_ATTRS)


def _patient_attrs_of(conn: Connection, store: Any, study_pk: int) -> dict[str, Any] | None:
    """The patient attributes of a study's first readable stored instance (None: none readable)."""
    q = (select(instances.c.message_id, instances.c.blob_id)
         .select_from(instances.join(series, instances.c.series_pk == series.c.pk))
         .where(series.c.study_pk == study_pk).order_by(instances.c.pk).limit(3))
    for message_id, blob_id in conn.execute(q).all():
        try:
            data = (store.get_blob(conn, blob_id, aad=message_id) if blob_id
                    else store.message_payload(conn, message_id))
            ds = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=_PATIENT_TAGS, force=True)
            return _plain_attrs(ds)
        except Exception as e:  # a missing or damaged instance: try the next one
            log.warning("dicom.index_upgrade_unreadable", message_id=message_id, error=type(e).__name__)
    return None


def _plain_attrs(ds: Mapping[str, Any] | Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kw in PATIENT_ATTRS:
        try:
            value = terms.plain(ds.get(kw))
        except Exception:  # an unreadable optional attribute is left out, as the index does
            log.debug("dicom.index_attr_unreadable", keyword=kw)
            continue
        if value not in (None, "", []):
            out[kw] = value
    return out
