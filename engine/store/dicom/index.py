"""The DICOM archive index: patient / study / series / instance rows that answer C-FIND
and locate the stored instance for C-MOVE / C-GET without opening any file.

PHI never sits in clear in these tables (issue 5 greps the data folder for the test
patient's name and id). Each level keeps:

- clear columns only for non-PHI keys that narrow a query in SQL (UIDs, Modality,
  StudyDate/Time, SeriesNumber, InstanceNumber, SOP Class, transfer syntax), and the
  instance level's own non-PHI attributes (Rows, Columns, NumberOfFrames, ContentDate/Time,
  ImageType, AcquisitionNumber: that level has no sealed blob);
- keyed HMACs (key ``dicom-index`` of the key ring): the patient's identity key
  (``pid_hmac``: PatientID + IssuerOfPatientID, or one patient per study when the
  instance has no PatientID; see ``terms``) and blind search terms of PatientName,
  PatientID and AccessionNumber in ``dicom_terms`` (exact values, words, prefixes), by
  which C-FIND narrows in SQL;
- every returnable attribute of the level as JSON sealed in the blob store (AES-GCM,
  rotated with every other blob), decrypted only for the candidate rows the SQL
  narrowing left, where the final PS3.4 C.2.2.2 matching runs (wildcards, ranges...).

Rows of a level are created by the first instance that names them and kept as they
are after that (first writer wins, like most archives): a study stays with the patient
its first instance named. Instance rows point at the message (or blob) that holds the
Part-10 bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import UID
from sqlalchemy import (
    Connection,
    String,
    Table,
    and_,
    bindparam,
    func,
    insert,
    select,
    update,
)

from engine.store import schema
from engine.store.dicom import reconcile, terms, walk
from engine.store.dicom.scan import ScanError, scan, scan_to_pixels
from engine.store.dicom.tables import (  # noqa: F401  (the attribute lists are this module's API too)
    IMAGE_ATTRS,
    LEVEL_ATTRS,
    PATIENT_ATTRS,
    SERIES_ATTRS,
    STUDY_ATTRS,
    instances,
    patients,
    series,
    studies,
)
from engine.store.dicom.terms import keyed, norm_pn  # C-FIND matching uses norm_pn from here
from engine.store.dicom.terms import plain as _plain
from engine.store.dicom.workflow_tables import patient_revisions
from engine.store.handlers import store_handler
from engine.store.prepared import Prepared

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.envelope import Envelope

log = structlog.get_logger()

HMAC_KEY_NAME = terms.HMAC_KEY_NAME
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")


# Computed at query time from the rows below the level (PS3.4 C.6.1.1 / C.6.2.1 optional keys).
DERIVED = {
    "NumberOfPatientRelatedStudies": "PATIENT", "NumberOfPatientRelatedSeries": "PATIENT",
    "NumberOfPatientRelatedInstances": "PATIENT", "ModalitiesInStudy": "STUDY",
    "SOPClassesInStudy": "STUDY", "NumberOfStudyRelatedSeries": "STUDY",
    "NumberOfStudyRelatedInstances": "STUDY", "NumberOfSeriesRelatedInstances": "SERIES",
}
# Attributes whose copy in a clear column answers without decrypting (keyword, column label).
CLEAR_COLUMNS = (("StudyInstanceUID", "study_uid"), ("StudyDate", "study_date"), ("StudyTime", "study_time"),
                 ("SeriesInstanceUID", "series_uid"), ("Modality", "modality"),
                 ("SeriesNumber", "series_number"), ("SOPInstanceUID", "sop_uid"),
                 ("SOPClassUID", "sop_class_uid"), ("InstanceNumber", "instance_number"),
                 ("Rows", "image_rows"), ("Columns", "image_columns"), ("NumberOfFrames", "number_of_frames"),
                 ("ContentDate", "content_date"), ("ContentTime", "content_time"), ("ImageType", "image_type"),
                 ("AcquisitionNumber", "acquisition_number"))
CLEAR_BY_DEPTH = (0, 3, 6, 16)
MULTI_VALUED_COLUMNS = frozenset(("image_type",))  # kept backslash-joined, as encoded; read back as a list
CLEAR_KEYWORDS = frozenset(kw for kw, _ in CLEAR_COLUMNS)
INDEX_TAGS = sorted({kw for attrs in LEVEL_ATTRS.values() for kw in attrs})


class MissingKeys(ValueError):
    """The data set lacks what the index needs (a UID): the listener answers 0xA900."""


# -- sealing ------------------------------------------------------------------
def extract(ds: Dataset, *, fast: bool = True) -> dict[str, dict[str, Any]]:
    """The indexed attributes of one instance, per level, from an already-read data set.

    Plain ASCII values of the common VRs are converted straight from the raw bytes
    (``_fast_value``), with the result pydicom's converters give; anything else goes
    through pydicom. Building pydicom DataElements for ~45 keywords was half of the
    DICOM listener's own CPU per instance; ``test_extract_matches_pydicom`` holds the
    two paths equal over every test file we have (``fast=False`` is the reference).
    """
    charset = ds.get_item(0x00080005)
    text_ok = charset is None or _charset_bytes(charset) in _ASCII_CHARSETS
    out: dict[str, dict[str, Any]] = {level: {} for level in LEVEL_ATTRS}
    for tag in ds.keys():  # only what the data set has (the reader kept only index tags)
        field = _FIELD_BY_TAG.get(tag)
        if field is None:
            continue
        level, kw, vr = field
        raw = ds.get_item(tag)
        if raw is not None:
            if fast and isinstance(raw, RawDataElement) and not raw.value:
                # Empty (Type 2 attributes sent empty: a CT has ~10 of them): pydicom would give
                # "", None or [] for any VR, all of which are left out below; its converters cost
                # ~25 us each, most of the extraction time.
                continue
            value: Any = _SLOW
            if fast and isinstance(raw, RawDataElement) and (text_ok or vr not in _TEXT_VRS):
                value = _fast_value(raw.VR or vr, raw.value, raw.is_little_endian)
            if value is _SLOW:
                try:
                    value = _plain(ds.get(kw))
                except Exception:  # an unreadable optional attribute is left out, not fatal
                    log.debug("dicom.index_attr_unreadable", keyword=kw)
                    continue
            if value not in (None, "", []):
                out[level][kw] = value
    return out


_SLOW = object()
_FIELD_BY_TAG = {Tag(tag_for_keyword(kw)): (level, kw, dictionary_VR(tag_for_keyword(kw)))
                 for level, kws in LEVEL_ATTRS.items() for kw in kws}
_TEXT_VRS = frozenset(("PN", "LO", "SH", "LT"))
_STRING_VRS = frozenset(("UI", "CS", "DA", "TM", "DT", "AS"))
_ASCII_CHARSETS = frozenset((b"", b"ISO_IR 6", b"ISO_IR 100", b"ISO_IR 192", b"ISO 2022 IR 6", b"ISO 2022 IR 100"))
_INT_RE = re.compile(r" *[+-]?[0-9]+ *")
_DECIMAL_RE = re.compile(r" *[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)? *")


def _charset_bytes(elem: Any) -> bytes:
    if isinstance(elem, RawDataElement):
        return bytes(elem.value or b"").rstrip(b" \x00")
    return str(elem.value or "").encode("ascii", "replace")


def _fast_value(vr: str, value: bytes | None, little_endian: bool) -> Any:
    """The plain value pydicom + ``_plain`` would give, or ``_SLOW`` when unsure."""
    if value is None or len(value) == 0:
        return _SLOW
    if vr == "US":
        if len(value) == 2:
            return int.from_bytes(value, "little" if little_endian else "big")
        return _SLOW
    if not value.isascii() or b"\x1b" in value:
        return _SLOW
    s = value.decode("ascii")
    if vr in _STRING_VRS:  # pydicom multi_string: strip the padding, then split
        items = s.rstrip(" \x00").split("\\")
        return items[0] if len(items) == 1 else items
    if vr == "PN":
        items = value.rstrip(b"\x00 ").decode("ascii").split("\\")
        return items[0] if len(items) == 1 else items
    if vr in ("LO", "SH"):  # pydicom convert_text: split, then strip each value
        items = [v.rstrip("\x00 ") for v in s.split("\\")]
        return items[0] if len(items) == 1 else items
    if vr == "LT":
        return s.rstrip("\x00 ")
    if vr == "IS" and "\\" not in s and _INT_RE.fullmatch(s):
        return int(s)
    if vr == "DS" and "\\" not in s and _DECIMAL_RE.fullmatch(s):
        return float(s)
    return _SLOW


def read_index_dataset(part10: bytes) -> Dataset:
    """Read only the indexed attributes (never the pixel data) from Part-10 bytes."""
    return dcmread(io.BytesIO(part10), stop_before_pixels=True, specific_tags=INDEX_TAGS)


_INDEX_TAG_LIST = [Tag(tag_for_keyword(kw)) for kw in INDEX_TAGS]
_PIXEL_DATA = Tag(0x7FE00010)
_SCAN_TAGS = frozenset((*_INDEX_TAG_LIST, 0x00080005))  # + Specific Character Set, as pydicom adds


def _before_pixels(tag: Any, _vr: Any, _length: Any) -> bool:
    return bool(tag >= _PIXEL_DATA)


def read_index_data_set(data_set: bytes | memoryview, transfer_syntax: str, *, scan_ok: bool = True) -> Dataset:
    """Like ``read_index_dataset`` for the bare encoded data set of a known transfer syntax.

    Skips re-reading the file meta the listener has just written; a deflated (or
    unknown) transfer syntax goes through ``dcmread`` as a Part-10 stream instead.
    Little and Big Endian data sets are walked by ``dicom_scan`` (pydicom's reader when it
    declines, or with ``scan_ok=False``).
    """
    ts = UID(transfer_syntax)
    if not ts.is_transfer_syntax or ts.is_deflated:
        raise ValueError(f"no fast path for transfer syntax {transfer_syntax}")
    if scan_ok:
        try:
            return scan(data_set, _SCAN_TAGS, implicit=ts.is_implicit_VR, little=ts.is_little_endian)
        except (ScanError, struct.error):
            pass  # unusual encoding: pydicom's reader decides
    return read_dataset(io.BytesIO(data_set), ts.is_implicit_VR, ts.is_little_endian,
                        stop_when=_before_pixels, specific_tags=_INDEX_TAG_LIST)


def read_checked(data_set: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """The index attributes of a whole data set about to be stored (``read_index_data_set``), and
    its structural walk (engine/store/dicom/walk.py): ``walk.Malformed`` when it is cut short or
    its lengths do not nest, although it arrived complete by its protocol. The one pre-store check
    of every intake path (C-STORE, STOW-RS, the file source, C-GET prefetch).

    The header scan already checked every element before the pixel data (each value within the
    data set, sequences walked), so the walk starts where the scan stopped: the extra cost on a
    CT is the few elements from Pixel Data on. Explicit VR Big Endian likewise (the scan and the
    walk read it; a UN sequence in it is Implicit VR Little Endian, PS3.5 6.2.2, which pydicom's
    reader cannot follow there).
    """
    ts = UID(transfer_syntax)
    if ts.is_deflated:
        raise ValueError("a deflated data set is read with read_index_dataset and walked inflated")
    if ts.is_transfer_syntax:
        little = ts.is_little_endian
        try:
            ds, end = scan_to_pixels(data_set, _SCAN_TAGS, implicit=ts.is_implicit_VR, little=little)
        except (ScanError, struct.error):
            pass  # unusual encoding: pydicom's reader, and the walk of the whole data set
        else:
            walk.check(memoryview(data_set)[end:], implicit=ts.is_implicit_VR, little=little)
            return ds
        walk.check(data_set, implicit=ts.is_implicit_VR, little=little)
    return read_index_data_set(data_set, transfer_syntax, scan_ok=False)


def _int(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _int32(v: Any) -> int | None:
    """``_int`` within the INTEGER columns' range (PostgreSQL's is 32 bits, as IS's, PS3.5 6.2):
    None outside it, so a peer's out-of-range number is not indexed rather than failing the
    instance's whole insert (its value stays in the stored instance)."""
    n = _int(v)
    return n if n is not None and -2**31 <= n < 2**31 else None


def _text(v: Any, size: int | None = None) -> str | None:
    """A clear text column's value: several values joined by backslashes (as encoded), cut to the
    column's size; None when there is none."""
    if v is None:
        return None
    s = "\\".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)
    return s[:size] if s else None


# -- writing ---------------------------------------------------------------------
@dataclass(frozen=True)
class InstanceRef:
    """Where one stored instance is and how it was encoded (for C-MOVE / C-GET)."""

    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    message_id: str
    blob_id: str | None


def _seal(store: Any, conn: Connection, level: str, unique: str, attrs: Mapping[str, Any]) -> str:
    return store.put_blob(conn, json.dumps(attrs, separators=(",", ":")).encode(), terms.blob_aad(level, unique))


def _create(conn: Connection, table: Table, row: Mapping[str, Any]) -> int:
    return int(conn.execute(insert(table), row).inserted_primary_key[0])  # type: ignore[index]


def _get_or_create(conn: Connection, table: Table, pk: int | None, make: Any) -> int:
    if pk is not None:
        return int(pk)
    return _create(conn, table, make())


# Built once: these run for every stored instance, and building a statement (operators,
# coercions, cache key) costs more than SQLite running it.
_EXISTING = select(instances).where(instances.c.sop_uid == bindparam("sop"))
_LOOKUP = select(  # the pks of the four levels in one round trip (None where missing)
    select(patients.c.pk).where(patients.c.pid_hmac == bindparam("pid")).scalar_subquery(),
    select(studies.c.pk).where(studies.c.study_uid == bindparam("study")).scalar_subquery(),
    select(series.c.pk).where(series.c.series_uid == bindparam("series")).scalar_subquery(),
    select(instances.c.pk).where(instances.c.sop_uid == bindparam("sop")).scalar_subquery(),
    select(instances.c.digest).where(instances.c.sop_uid == bindparam("sop")).scalar_subquery(),
    select(instances.c.message_id).where(instances.c.sop_uid == bindparam("sop")).scalar_subquery(),
    select(series.c.study_pk).where(series.c.series_uid == bindparam("series")).scalar_subquery(),
    select(instances.c.series_pk).where(instances.c.sop_uid == bindparam("sop")).scalar_subquery(),
)
_UPDATE_INSTANCE = update(instances).where(instances.c.pk == bindparam("old_pk"))
_INSTANCE_COLUMNS = ("series_pk", "sop_uid", "sop_class_uid", "instance_number", "image_rows", "image_columns",
                     "number_of_frames", "content_date", "content_time", "image_type", "acquisition_number",
                     "transfer_syntax", "message_id", "blob_id", "digest", "size", "channel",
                     "archived", "received_at")
_INSERT_INSTANCE = Prepared(insert(instances), _INSTANCE_COLUMNS)
_FIND = Prepared(_LOOKUP)
_INSERT_INTO_KNOWN_SERIES = Prepared(insert(instances).from_select(
    list(_INSTANCE_COLUMNS),
    select(series.c.pk, *(bindparam(c, type_=instances.c[c].type) for c in _INSTANCE_COLUMNS[1:]))
    .where(series.c.series_uid == bindparam("series_uid", type_=String))
    .where(series.c.study_pk == select(studies.c.pk)  # a series of another study: the full path refuses it
           .where(studies.c.study_uid == bindparam("study_uid", type_=String)).scalar_subquery())
    .where(~select(instances.c.pk).where(instances.c.sop_uid == bindparam("sop_uid", type_=String)).exists())))


def existing_instance(conn: Connection, sop_uid: str) -> Mapping[str, Any] | None:
    return conn.execute(_EXISTING, {"sop": sop_uid}).mappings().first()


@dataclass(frozen=True)
class Found:
    """What the index already holds for one instance's patient, study, series and itself."""

    patient_pk: int | None
    study_pk: int | None
    series_pk: int | None
    instance_pk: int | None
    digest: str | None  # of the indexed instance
    message_id: str | None  # that brought the indexed instance
    series_study_pk: int | None = None  # the study the indexed series is filed under
    instance_series_pk: int | None = None  # the series the indexed instance is filed under


class UidConflict(ValueError):
    """A UID the index already holds under another parent: refused, never filed there.

    A Series Instance UID filed under another study, or a SOP Instance UID with other
    content under another series, means one of the two senders reused a UID; filing the
    instance under the first parent would show it with another patient's study (issue 9).
    ``str()`` is the peer's error comment: it names the level, never a UID or PHI.
    """


def conflict(found: Found, digest: str) -> str | None:
    """Why the instance cannot be filed where the index says its UIDs live, or None.

    The same bytes again (same digest) are a duplicate, never a conflict. Either conflict is
    refused whatever the listener's ``replace`` says: replacing would move the instance to
    another study, which is a correction for an operator (IOCM), not for a re-send.
    """
    if found.instance_pk is not None and found.digest == digest:
        return None
    if found.series_pk is not None and found.series_study_pk != found.study_pk:
        return "Series Instance UID is filed under another study"
    if found.instance_pk is not None and found.instance_series_pk != found.series_pk:
        return "SOP Instance UID is filed under another series"
    return None


def find(conn: Connection, hkey: bytes, attrs: Mapping[str, Mapping[str, Any]]) -> Found:
    """One statement: the pks of the four levels and the indexed instance's digest, if any."""
    p, st, se, im = (attrs.get(level, {}) for level in LEVELS)
    pid = terms.patient_key(hkey, p, str(st.get("StudyInstanceUID", "")))
    row = _FIND.one(conn, {"pid": pid, "study": st.get("StudyInstanceUID"),
                           "series": se.get("SeriesInstanceUID"), "sop": im.get("SOPInstanceUID")})
    assert row is not None  # scalar subqueries: always one row
    return Found(*row)


def _instance_row(im: Mapping[str, Any], *, series_pk: int | None, transfer_syntax: str, message_id: str,
                  blob_id: str | None, digest: str, size: int, channel: str, archived: bool,
                  now: float) -> dict[str, Any]:
    return {
        "series_pk": series_pk, "sop_uid": im["SOPInstanceUID"], "sop_class_uid": im["SOPClassUID"],
        "instance_number": _int32(im.get("InstanceNumber")), "image_rows": _int32(im.get("Rows")),
        "image_columns": _int32(im.get("Columns")), "number_of_frames": _int32(im.get("NumberOfFrames")),
        "content_date": _text(im.get("ContentDate"), 8), "content_time": _text(im.get("ContentTime"), 16),
        "image_type": _text(im.get("ImageType")), "acquisition_number": _int32(im.get("AcquisitionNumber")),
        "transfer_syntax": transfer_syntax,
        "message_id": message_id, "blob_id": blob_id, "digest": digest, "size": size,
        "channel": channel, "archived": int(archived), "received_at": now,
    }


def index_into_known_series(conn: Connection, attrs: Mapping[str, Mapping[str, Any]], *, message_id: str,
                            transfer_syntax: str, digest: str, size: int, channel: str) -> bool:
    """The common case in one statement: a new instance of a series the index already has.

    False (nothing written) when the series is not indexed yet or the SOP Instance UID
    is; the caller then takes the full path (``find`` + ``index_instance``). One
    statement instead of a look-up and an insert matters on the DICOM receive path:
    each statement hands the GIL back and forth once more in the committer.
    """
    im, se = attrs.get("IMAGE", {}), attrs.get("SERIES", {})
    if not (im.get("SOPInstanceUID") and im.get("SOPClassUID") and se.get("SeriesInstanceUID")):
        return False
    row = _instance_row(im, series_pk=None, transfer_syntax=transfer_syntax, message_id=message_id, blob_id=None,
                        digest=digest, size=size, channel=channel, archived=False, now=time.time())
    row["series_uid"] = se["SeriesInstanceUID"]
    row["study_uid"] = attrs.get("STUDY", {}).get("StudyInstanceUID")
    return _INSERT_INTO_KNOWN_SERIES.run(conn, [row]) == 1


def index_instance(conn: Connection, store: Any, hkey: bytes, attrs: Mapping[str, Mapping[str, Any]], *,
                   message_id: str, transfer_syntax: str, digest: str, size: int, channel: str = "",
                   blob_id: str | None = None, replace: bool = False, archived: bool = False,
                   found: Found | None = None) -> str:
    """Insert the rows for one instance inside the caller's transaction.

    Returns "indexed", "replaced" or "exists" (keep-first: an instance already there
    is left untouched). Raises MissingKeys when a hierarchy UID is missing, UidConflict
    when a UID is filed under another parent (``conflict``).
    """
    p, st, se, im = (attrs.get(level, {}) for level in LEVELS)
    study_uid, series_uid = st.get("StudyInstanceUID"), se.get("SeriesInstanceUID")
    sop_uid = im.get("SOPInstanceUID")
    if not (study_uid and series_uid and sop_uid and im.get("SOPClassUID")):
        raise MissingKeys("StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and SOPClassUID are required")
    now = time.time()
    pks = found if found is not None else find(conn, hkey, attrs)
    refused = conflict(pks, digest)
    if refused is not None:
        raise UidConflict(refused)
    if pks.instance_pk is not None and not replace:
        return "exists"
    if pks.study_pk is not None:
        study_pk = int(pks.study_pk)  # a known study stays with the patient its first instance named
    else:
        new_terms: list[dict[str, Any]] = []
        patient_pk = pks.patient_pk
        if patient_pk is None:
            pid_h = terms.patient_key(hkey, p, study_uid)
            patient_pk = _create(conn, patients, {
                "pid_hmac": pid_h, "name_hmac": keyed(hkey, "PatientName", norm_pn(p.get("PatientName", ""))),
                "attrs_blob": _seal(store, conn, "PATIENT", pid_h, p), "created_at": now})
            new_terms += terms.term_rows(hkey, "PATIENT", patient_pk, p)
        study_pk = _create(conn, studies, {
            "patient_pk": patient_pk, "study_uid": study_uid, "study_date": str(st.get("StudyDate", ""))[:8],
            "study_time": str(st.get("StudyTime", ""))[:16],
            "accession_hmac": keyed(hkey, "AccessionNumber", str(st.get("AccessionNumber", "")).strip()),
            "attrs_blob": _seal(store, conn, "STUDY", study_uid, st), "created_at": now})
        terms.insert_terms(conn, new_terms + terms.term_rows(hkey, "STUDY", study_pk, st))  # one statement
    series_pk = _get_or_create(conn, series, pks.series_pk, lambda: {
        "study_pk": study_pk, "series_uid": series_uid, "modality": str(se.get("Modality", ""))[:16],
        "series_number": _int32(se.get("SeriesNumber")),
        "attrs_blob": _seal(store, conn, "SERIES", series_uid, se), "created_at": now})
    row = _instance_row(im, series_pk=series_pk, transfer_syntax=transfer_syntax, message_id=message_id,
                        blob_id=blob_id, digest=digest, size=size, channel=channel, archived=archived, now=now)
    if pks.instance_pk is None:
        _INSERT_INSTANCE.run(conn, [row])
        return "indexed"
    conn.execute(_UPDATE_INSTANCE, {**row, "old_pk": pks.instance_pk})
    return "replaced"


def mark_archived(conn: Connection, sop_uid: str) -> None:
    conn.execute(update(instances).where(instances.c.sop_uid == sop_uid).values(archived=1))


# -- reading ---------------------------------------------------------------------
class Candidates:
    """Rows at one query level after SQL narrowing, with their decrypted attributes.

    ``narrow`` holds SQL conditions that are necessary (never sufficient) for a
    match; the caller applies the full PS3.4 matching to ``rows()``.
    """

    def __init__(self, conn: Connection, store: Any, level: str) -> None:
        if level not in LEVELS:
            raise ValueError(f"unknown level {level!r}")
        self.conn, self.store, self.level = conn, store, level
        self.depth = LEVELS.index(level)
        self.narrow: list[Any] = []
        self._blob_cache: dict[str, dict[str, Any]] = {}
        self._summaries: dict[int, dict[str, Any]] = {}

    def tables(self) -> list[Table]:
        return [patients, studies, series, instances][: self.depth + 1]

    def add(self, cond: Any) -> None:
        self.narrow.append(cond)

    def _from(self) -> Any:
        j = patients
        if self.depth >= 1:
            j = j.join(studies, studies.c.patient_pk == patients.c.pk)
        if self.depth >= 2:
            j = j.join(series, series.c.study_pk == studies.c.pk)
        if self.depth >= 3:
            j = j.join(instances, instances.c.series_pk == series.c.pk)
        return j

    def _attrs(self, blob_id: str) -> dict[str, Any]:
        got = self._blob_cache.get(blob_id)
        if got is None:
            got = json.loads(self.store.get_blob(self.conn, blob_id))
            self._blob_cache[blob_id] = got
        return got

    def rows(self, *, decrypt: bool = True, limit: int | None = None) -> Iterable[tuple[int, dict[str, Any]]]:
        """(pk at the level, attributes of the level and every level above)."""
        tabs = self.tables()
        cols = [t.c.pk.label(f"pk{i}") for i, t in enumerate(tabs)]
        cols += [t.c.attrs_blob.label(f"blob{i}") for i, t in enumerate(tabs[:3])]
        if self.depth >= 1:
            cols += [studies.c.study_uid, studies.c.study_date, studies.c.study_time]
        if self.depth >= 2:
            cols += [series.c.series_uid, series.c.modality, series.c.series_number]
        if self.depth >= 3:
            cols += [instances.c.sop_uid, instances.c.sop_class_uid, instances.c.instance_number,
                     instances.c.image_rows, instances.c.image_columns, instances.c.number_of_frames,
                     instances.c.content_date, instances.c.content_time, instances.c.image_type,
                     instances.c.acquisition_number, instances.c.transfer_syntax]
        q = select(*cols).select_from(self._from())
        if self.narrow:
            q = q.where(and_(*self.narrow))
        q = q.order_by(tabs[-1].c.pk)
        if limit:
            q = q.limit(limit)
        for r in self.conn.execute(q).mappings():
            attrs: dict[str, Any] = {}
            if decrypt:
                for i in range(min(self.depth + 1, 3)):
                    attrs.update(self._attrs(r[f"blob{i}"]))
            for kw, col in CLEAR_COLUMNS[: CLEAR_BY_DEPTH[self.depth]]:
                if r[col] not in (None, ""):
                    attrs.setdefault(kw, r[col].split("\\") if col in MULTI_VALUED_COLUMNS else r[col])
            yield int(r[f"pk{self.depth}"]), attrs

    def derived(self, pk: int, keyword: str) -> Any:
        """ModalitiesInStudy, NumberOfStudyRelatedInstances, ... for one row at this level.

        Counted from the index rows themselves (exact whatever added or removed instances:
        intake, IOCM, retention, merges) with prepared statements; a study's three usual
        values (series, instances, modalities: QIDO-RS returns them for every study) come
        from one statement, kept for the other two."""
        if keyword in _STUDY_SUMMARY_KEYS:
            got = self._summaries.get(pk)
            if got is None:
                rows = _STUDY_SUMMARY.all(self.conn, {"pk": pk})
                got = self._summaries[pk] = {
                    "NumberOfStudyRelatedSeries": len(rows),
                    "NumberOfStudyRelatedInstances": sum(int(r["n"]) for r in rows),
                    "ModalitiesInStudy": sorted({r["modality"] for r in rows if r["modality"]})}
            return got[keyword]
        if keyword == "SOPClassesInStudy":
            return sorted(r["c"] for r in _SOP_CLASSES_IN_STUDY.all(self.conn, {"pk": pk}))
        prepared = _COUNTS.get(keyword)
        if prepared is None:
            raise KeyError(keyword)
        row = prepared.one(self.conn, {"pk": pk})
        return int(row[0]) if row else 0

    def instances_under(self, pks: Sequence[int]) -> list[InstanceRef]:
        """Every stored instance below the given rows of this level (C-MOVE / C-GET)."""
        return instances_below(self.conn, self.level, pks)


_i, _se, _st = instances, series, studies
_STUDY_SUMMARY_KEYS = frozenset(("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"))
_STUDY_SUMMARY = Prepared(  # one row per series of the study: its modality and instance count
    select(_se.c.modality.label("modality"), func.count(_i.c.pk).label("n"))
    .select_from(_se.outerjoin(_i, _i.c.series_pk == _se.c.pk))
    .where(_se.c.study_pk == bindparam("pk")).group_by(_se.c.pk, _se.c.modality))
_SOP_CLASSES_IN_STUDY = Prepared(
    select(_i.c.sop_class_uid.label("c")).distinct().select_from(_i.join(_se, _i.c.series_pk == _se.c.pk))
    .where(_se.c.study_pk == bindparam("pk")))
_COUNTS = {
    "NumberOfPatientRelatedStudies": Prepared(select(func.count()).where(_st.c.patient_pk == bindparam("pk"))),
    "NumberOfPatientRelatedSeries": Prepared(
        select(func.count()).select_from(_se.join(_st, _se.c.study_pk == _st.c.pk))
        .where(_st.c.patient_pk == bindparam("pk"))),
    "NumberOfPatientRelatedInstances": Prepared(
        select(func.count()).select_from(_i.join(_se, _i.c.series_pk == _se.c.pk).join(_st, _se.c.study_pk == _st.c.pk))
        .where(_st.c.patient_pk == bindparam("pk"))),
    "NumberOfSeriesRelatedInstances": Prepared(select(func.count()).where(_i.c.series_pk == bindparam("pk"))),
}


def instances_below(conn: Connection, level: str, pks: Sequence[int]) -> list[InstanceRef]:
    """Every stored instance below rows of ``level`` (C-MOVE / C-GET sub-operations)."""
    if not pks:
        return []
    j = instances.join(series, instances.c.series_pk == series.c.pk).join(
        studies, series.c.study_pk == studies.c.pk)
    key = {"PATIENT": studies.c.patient_pk, "STUDY": studies.c.pk, "SERIES": series.c.pk,
           "IMAGE": instances.c.pk}[level]
    out: list[InstanceRef] = []
    for start in range(0, len(pks), 500):
        q = (select(instances.c.sop_uid, instances.c.sop_class_uid, instances.c.transfer_syntax,
                    instances.c.message_id, instances.c.blob_id)
             .select_from(j).where(key.in_(list(pks[start:start + 500]))).order_by(instances.c.pk))
        out.extend(InstanceRef(*r) for r in conn.execute(q))
    return out



@dataclass(frozen=True)
class Located:
    """One instance found by its three UIDs (WADO-RS / WADO-URI), with what streaming it needs."""

    ref: InstanceRef
    payload_blob: str | None  # the blob holding its Part-10 bytes (its own, or its message's)
    size: int  # of that blob's plaintext
    revised: bool  # its patient was updated or merged since: the bytes go out rewritten


_LOCATE = Prepared(
    select(instances.c.sop_uid, instances.c.sop_class_uid, instances.c.transfer_syntax, instances.c.message_id,
           instances.c.blob_id, func.coalesce(instances.c.blob_id, schema.messages.c.blob_id), schema.blobs.c.size,
           patient_revisions.c.patient_pk, series.c.series_uid, studies.c.study_uid)
    .select_from(instances.join(series, series.c.pk == instances.c.series_pk)
                 .join(studies, studies.c.pk == series.c.study_pk)
                 .outerjoin(schema.messages, schema.messages.c.id == instances.c.message_id)
                 .outerjoin(schema.blobs, schema.blobs.c.id == func.coalesce(instances.c.blob_id,
                                                                              schema.messages.c.blob_id))
                 .outerjoin(patient_revisions, patient_revisions.c.patient_pk == studies.c.patient_pk))
    .where(instances.c.sop_uid == bindparam("sop")))


def locate(conn: Connection, sop_uid: str, study_uid: str | None = None,
           series_uid: str | None = None) -> Located | None:
    """The instance with this SOP Instance UID (in that series of that study, when given), or
    None: one prepared statement, what C-MOVE's matching on three UIDs comes to without
    building that query per request."""
    row = _LOCATE.one(conn, {"sop": sop_uid})
    if row is None or (series_uid is not None and row[8] != series_uid) or \
            (study_uid is not None and row[9] != study_uid):
        return None
    return Located(InstanceRef(*row[:5]), row[5], int(row[6] or 0), row[7] is not None)


def instance_chunks(conn: Connection, store: Any, found: Located) -> Iterator[bytes]:
    """The stored Part-10 bytes of an instance as decrypted, authenticated chunks (``Store.blob_chunks``:
    memory about one chunk), or the bytes ``load_instance`` gives in one piece when its patient
    was revised since (they go out rewritten). The blob row is read before this returns, so
    the caller may close ``conn`` and iterate afterwards."""
    if found.revised or found.payload_blob is None:
        return iter((load_instance(conn, store, found.ref),))
    return store.blob_chunks(conn, found.payload_blob, aad=found.ref.message_id)


def load_instance(conn: Connection, store: Any, ref: InstanceRef) -> bytes:
    """The stored Part-10 bytes of one instance, decrypted and checked (AAD = message id), with
    the Patient module the archive holds now when the patient was updated or merged since
    (``reconcile.current_instance``; otherwise byte-identical). Every retrieval reads through here."""
    data = store.get_blob(conn, ref.blob_id, aad=ref.message_id) if ref.blob_id else \
        store.message_payload(conn, ref.message_id)
    return reconcile.current_instance(conn, store, ref.sop_uid, data)


def split_part10(data: bytes) -> tuple[str, bytes]:
    """(transfer syntax UID, encoded data set) of Part-10 bytes, without decoding the data set.

    medrelay writes the file meta itself (explicit VR LE group 0002 with its group
    length first), so the data set starts right after the group length says.
    """
    if len(data) < 144 or data[128:132] != b"DICM":
        raise ValueError("not a DICOM Part-10 file")
    if data[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("file meta does not start with its group length")
    end = 144 + int.from_bytes(data[140:144], "little")
    meta = dcmread(io.BytesIO(data[:end]), stop_before_pixels=True)
    return str(meta.file_meta.TransferSyntaxUID), data[end:]


# -- the `store` destination handler ----------------------------------------------
@store_handler("dicom")
def store_dicom(ctx: ComponentContext, conn: Connection, envelope: Envelope) -> str:
    """File a DICOM envelope in the archive.

    The DICOM listener indexes at intake, so the usual case is only marking the
    instance archived. A derived envelope (e.g. a de-identified copy) is not in the
    index yet: its payload is sealed as a blob of its own and indexed here; a copy
    with the UID of an indexed instance but other content replaces that index entry.
    """
    ts, dataset = split_part10(envelope.payload)
    digest = hashlib.sha256(dataset).hexdigest()
    ds = read_index_dataset(envelope.payload)
    attrs = extract(ds)
    sop_uid = str(attrs["IMAGE"].get("SOPInstanceUID", ""))
    row = existing_instance(conn, sop_uid) if sop_uid else None
    if row is not None and row["digest"] == digest:
        mark_archived(conn, sop_uid)
        return "archived"
    blob_id = ctx.store.put_blob(conn, envelope.payload, envelope.id)
    result = index_instance(conn, ctx.store, ctx.keyring.hmac_key(HMAC_KEY_NAME), attrs,
                            message_id=envelope.id, blob_id=blob_id, transfer_syntax=ts, digest=digest,
                            size=len(dataset), channel=envelope.channel, replace=True, archived=True)
    log.info("dicom.archived", channel=envelope.channel, message_id=envelope.id, result=result)
    return result
