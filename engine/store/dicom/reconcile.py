"""Patient Information Reconciliation in the archive (IHE PIR): updates, merges, and what retrieval sends.

The HIS keeps correcting patients (HL7 ADT A08/A31 updates, A40/A18 merges, FHIR Patient
updates); the ``patient_update`` transform turns each into a change, and the ``patient_update``
store handler applies it here, inside the store destination's transaction:

- **update**: the patient row keyed by the change's Patient ID + Issuer of Patient ID gets the
  new attributes: its sealed JSON, its name key and its blind search terms are rewritten, so
  C-FIND and DICOMweb QIDO answer with the new demographics and find the patient by the new
  name (and no longer by the old one);
- **merge**: the prior patient's studies move to the surviving patient (created from the prior
  one, re-keyed, when the archive does not know the surviving id yet), and the prior patient
  row, its sealed attributes and its terms go; a ``dicom_patient_merges`` row keeps the count.

Stored instances are never rewritten (decision, docs/notes/issue-12-workflow.md): their bytes
stay exactly as the modality sent them, under their original digest and encryption. Instead a
patient whose attributes changed after its instances were stored gets a ``dicom_patient_revisions``
row, and ``current_instance`` (called by ``index.load_instance``, the one function every retrieval
path reads an instance with: C-MOVE, C-GET, WADO-RS / WADO-URI, storage commitment's check)
rewrites the Patient module of such an instance on the way out to what the archive holds now.
An instance of a patient never changed costs one indexed look-up and is sent byte-identical.

Every change is audited (``dicom.patient.update`` / ``dicom.patient.merge``) in the same
transaction, with counts and never the values.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Connection, delete, insert, select, update

from engine.store.dicom import terms
from engine.store.dicom.tables import PATIENT_ATTRS, instances, patients, series, studies
from engine.store.dicom.workflow_tables import patient_merges, patient_revisions
from engine.store.handlers import store_handler
from engine.store.schema import blobs

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.envelope import Envelope

log = structlog.get_logger()

# What a change may set: the Patient module attributes the archive keeps, without the identity.
DEMOGRAPHICS = tuple(k for k in PATIENT_ATTRS if k not in ("PatientID", "IssuerOfPatientID"))


@dataclass(frozen=True)
class Identity:
    patient_id: str
    issuer: str = ""


@dataclass
class Change:
    """One update or merge, as the ``patient_update`` transform hands it over.

    ``keys`` are the identities the archive may hold the patient under (its id with the
    message's issuer, and, when configured, the same id stored without an issuer); ``attrs``
    the new values ("" removes one); for a merge ``prior`` the identities of the patient that
    goes away.
    """

    action: str  # update | merge
    target: Identity
    keys: list[Identity]
    attrs: dict[str, str] = field(default_factory=dict)
    prior: list[Identity] = field(default_factory=list)


@dataclass
class Result:
    patients: int = 0
    studies_moved: int = 0
    created: bool = False

    def detail(self, action: str) -> str:
        return f"patient:{action}:{self.patients} patients,{self.studies_moved} studies moved"


def _key(hkey: bytes, ident: Identity) -> str:
    return terms.patient_key(hkey, {"PatientID": ident.patient_id, "IssuerOfPatientID": ident.issuer}, "")


def _find(conn: Connection, hkey: bytes, idents: list[Identity]) -> list[tuple[int, str, str]]:
    """(pk, pid_hmac, attrs_blob) of the patient rows these identities name, each once."""
    keys = list(dict.fromkeys(_key(hkey, i) for i in idents if i.patient_id))
    if not keys:
        return []
    p = patients.c
    return [(int(r[0]), r[1], r[2]) for r in
            conn.execute(select(p.pk, p.pid_hmac, p.attrs_blob).where(p.pid_hmac.in_(keys)).order_by(p.pk))]


def _attrs(store: Any, conn: Connection, blob_id: str) -> dict[str, Any]:
    return dict(json.loads(store.get_blob(conn, blob_id)))


def _merged(old: Mapping[str, Any], changes: Mapping[str, str]) -> dict[str, Any]:
    out = dict(old)
    for k, v in changes.items():
        if k not in PATIENT_ATTRS:
            continue
        if v == "":
            out.pop(k, None)
        else:
            out[k] = v
    return out


def _rewrite_row(store: Any, conn: Connection, hkey: bytes, pk: int, pid_hmac: str, old_blob: str,
                 attrs: Mapping[str, Any]) -> None:
    """Seal ``attrs`` as the row's attributes and give it the name key and terms they have."""
    sealed = json.dumps(attrs, separators=(",", ":")).encode()
    blob_id = store.put_blob(conn, sealed, terms.blob_aad("PATIENT", pid_hmac))
    conn.execute(update(patients).where(patients.c.pk == pk).values(
        pid_hmac=pid_hmac, attrs_blob=blob_id,
        name_hmac=terms.keyed(hkey, "PatientName", terms.norm_pn(attrs.get("PatientName", "")))))
    if blob_id != old_blob:
        conn.execute(delete(blobs).where(blobs.c.id == old_blob))
    terms.delete_terms(conn, "PATIENT", [pk])
    terms.write_terms(conn, hkey, "PATIENT", pk, attrs)
    _revised(conn, pk)


def _revised(conn: Connection, pk: int) -> None:
    """The patient's stored instances no longer say what the archive says: rewrite on retrieval."""
    t = patient_revisions.c
    now = time.time()
    done = conn.execute(update(patient_revisions).where(t.patient_pk == pk)
                        .values(revision=t.revision + 1, updated_at=now)).rowcount
    if not done:
        conn.execute(insert(patient_revisions).values(patient_pk=pk, revision=1, updated_at=now))


def _drop_patient(conn: Connection, pk: int, blob_id: str) -> None:
    terms.delete_terms(conn, "PATIENT", [pk])
    conn.execute(delete(patient_revisions).where(patient_revisions.c.patient_pk == pk))
    conn.execute(delete(patients).where(patients.c.pk == pk))
    conn.execute(delete(blobs).where(blobs.c.id == blob_id))


def apply_update(store: Any, conn: Connection, hkey: bytes, change: Change) -> Result:
    """New demographics for the rows the change's identities name (nothing when none is known)."""
    out = Result()
    for pk, pid_hmac, blob_id in _find(conn, hkey, change.keys):
        old = _attrs(store, conn, blob_id)
        new = _merged(old, change.attrs)
        if new != old:
            _rewrite_row(store, conn, hkey, pk, pid_hmac, blob_id, new)
            out.patients += 1
    return out


def apply_merge(store: Any, conn: Connection, hkey: bytes, change: Change, message_id: str = "") -> Result:
    """The prior patients' studies under the surviving patient, the prior patients gone."""
    out = Result()
    survivors = _find(conn, hkey, change.keys)
    target_key = _key(hkey, change.target)
    prior = [r for r in _find(conn, hkey, change.prior) if r[1] not in {s[1] for s in survivors}]
    if not prior:
        out.patients = apply_update(store, conn, hkey, change).patients
        return out
    if not survivors:  # the archive did not know the surviving id yet: the first prior row becomes it
        pk, old_key, blob_id = prior.pop(0)
        attrs = _merged(_attrs(store, conn, blob_id), change.attrs)
        attrs["PatientID"] = change.target.patient_id
        if change.target.issuer:
            attrs["IssuerOfPatientID"] = change.target.issuer
        else:
            attrs.pop("IssuerOfPatientID", None)
        _rewrite_row(store, conn, hkey, pk, target_key, blob_id, attrs)
        _record_merge(conn, old_key, target_key, _count_studies(conn, pk), message_id)
        out.created, out.patients = True, 1
        survivor_pk = pk
    else:
        survivor_pk = survivors[0][0]
        out.patients = apply_update(store, conn, hkey, change).patients
    for pk, old_key, blob_id in prior:
        moved = conn.execute(update(studies).where(studies.c.patient_pk == pk)
                             .values(patient_pk=survivor_pk)).rowcount
        out.studies_moved += moved
        _record_merge(conn, old_key, target_key, moved, message_id)
        _drop_patient(conn, pk, blob_id)
        out.patients += 1
    _revised(conn, survivor_pk)  # the moved studies' instances name the prior patient
    return out


def _count_studies(conn: Connection, pk: int) -> int:
    from sqlalchemy import func

    return int(conn.execute(select(func.count()).where(studies.c.patient_pk == pk)).scalar_one())


def _record_merge(conn: Connection, from_key: str, to_key: str, n: int, message_id: str) -> None:
    conn.execute(insert(patient_merges).values(from_pid_hmac=from_key, to_pid_hmac=to_key, studies=n,
                                               message_id=message_id[:32], merged_at=time.time()))


# -- the `store` destination handler ------------------------------------------------------
def read_change(payload: bytes) -> Change:
    """The FHIR Parameters the ``patient_update`` transform writes (see transforms/patient_update.py)."""
    doc = json.loads(payload)
    if doc.get("resourceType") != "Parameters":
        raise ValueError("a patient change is a FHIR Parameters resource")
    params = {p.get("name"): p for p in doc.get("parameter") or []}

    def ident(part: Mapping[str, Any]) -> Identity:
        vals = {p.get("name"): p.get("valueString", "") for p in part.get("part") or []}
        return Identity(str(vals.get("PatientID", "")), str(vals.get("IssuerOfPatientID", "")))

    action = str(params.get("action", {}).get("valueCode", ""))
    if action not in ("update", "merge"):
        raise ValueError(f"unknown patient change {action[:20]!r}")
    target = ident(params.get("patient", {}))
    if not target.patient_id:
        raise ValueError("a patient change without a Patient ID")
    attrs = {p.get("name"): str(p.get("valueString", "")) for p in params.get("patient", {}).get("part") or []
             if p.get("name") in DEMOGRAPHICS}
    keys = [ident(p) for p in doc.get("parameter") or [] if p.get("name") == "key"] or [target]
    prior = [ident(p) for p in doc.get("parameter") or [] if p.get("name") == "prior"]
    if action == "merge" and not any(p.patient_id for p in prior):
        raise ValueError("a merge without the prior Patient ID")
    return Change(action, target, keys, attrs, prior)


@store_handler("patient_update")
def store_patient_update(ctx: ComponentContext, conn: Connection, envelope: Envelope) -> str:
    """`store` destination for changes from the ``patient_update`` transform: the archive follows."""
    change = read_change(envelope.payload)
    hkey = ctx.keyring.hmac_key(terms.HMAC_KEY_NAME)
    if change.action == "merge":
        result = apply_merge(ctx.store, conn, hkey, change, envelope.id)
    else:
        result = apply_update(ctx.store, conn, hkey, change)
    ctx.audit.record(f"dicom.patient.{change.action}", actor=str(envelope.headers.get("MSH-3") or ""),
                     channel=envelope.channel, message_id=envelope.id, conn=conn,
                     entity={"patients": result.patients, "studies_moved": result.studies_moved,
                             "surviving_created": result.created})
    log.info("dicom.patient_reconciled", channel=envelope.channel, message_id=envelope.id, action=change.action,
             patients=result.patients, studies_moved=result.studies_moved)
    return result.detail(change.action)


# -- retrieval: what the archive says now -----------------------------------------------------
_REVISED = (select(patients.c.attrs_blob)
            .select_from(instances.join(series, series.c.pk == instances.c.series_pk)
                         .join(studies, studies.c.pk == series.c.study_pk)
                         .join(patients, patients.c.pk == studies.c.patient_pk)
                         .join(patient_revisions, patient_revisions.c.patient_pk == patients.c.pk)))


def current_attributes(conn: Connection, store: Any, sop_uid: str) -> dict[str, Any] | None:
    """The patient attributes to send with this instance, or None when its stored ones still hold."""
    blob_id = conn.execute(_REVISED.where(instances.c.sop_uid == sop_uid)).scalar()
    return _attrs(store, conn, blob_id) if blob_id is not None else None


def current_instance(conn: Connection, store: Any, sop_uid: str, part10: bytes) -> bytes:
    """``part10`` as it goes out: byte-identical, unless its patient was changed since it was
    stored; then its Patient module says what the archive holds now (same transfer syntax)."""
    attrs = current_attributes(conn, store, sop_uid)
    if attrs is None:
        return part10
    return rewrite_patient(part10, attrs)


def rewrite_patient(part10: bytes, attrs: Mapping[str, Any]) -> bytes:
    """Part-10 bytes with the Patient module attributes of ``attrs`` (pixel data untouched)."""
    from pydicom import dcmread, dcmwrite

    ds = dcmread(io.BytesIO(part10))
    changed = False
    for kw in PATIENT_ATTRS:
        if kw not in attrs:
            continue
        value = attrs[kw]
        if str(ds.get(kw, "")) != str(value) or kw not in ds:
            setattr(ds, kw, value)
            changed = True
    if not changed:
        return part10
    if any(not str(v).isascii() for v in attrs.values()) and "192" not in str(ds.get("SpecificCharacterSet", "")):
        ds.SpecificCharacterSet = "ISO_IR 192"  # the other text values are re-encoded with it
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
