"""Blind search terms of stored messages: patient id, accession, control id, study UID.

An operator asks "what happened to the ADT for MRN 12345?", but the store holds every
payload encrypted and no identifier in a clear column (docs/architecture.md, "Encryption
at rest"). So at intake, in the transaction that stores the message, a few identifiers
are read from the payload and kept as blind terms (``engine.security.blind_index.term``,
the mechanism FHIR search and C-FIND share): keyed HMACs of the trimmed, case-folded
value, scoped by field, so equal values give equal terms and nothing else is revealed
to someone who holds the database but not the key file. A search reduces its value the
same way and matches in SQL; no message is decrypted to answer it.

What is indexed, per message kind (``FIELDS`` scopes):

  patient_id  HL7 PID-3 (every repetition, CX.1) and PID-2; DICOM PatientID; FHIR Patient
              identifier values
  accession   HL7 ORC-2/ORC-3, OBR-2/OBR-3 (EI.1), OBR-18 and IPC-1 of every segment;
              DICOM AccessionNumber; FHIR identifiers typed ACSN
  control_id  HL7 MSH-10
  study_uid   HL7 IPC-3 and ZDS-1; DICOM StudyInstanceUID; FHIR ImagingStudy urn:dicom:uid
              identifiers

Values are matched whole (an MRN is an identifier, not words): trimmed and case-folded,
nothing else. Each indexed message also gets a marker term naming the term format and the
key; a message without the current marker (stored before this index existed, or before
a change of format or key) is found by ``unindexed`` and filled in by ``reindex`` (run in
the background by the console, and by `medrelay messages reindex`). An extraction that
fails on odd bytes indexes what it got and never fails the commit.
"""

from __future__ import annotations

import functools
import io
import json
import struct
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog
from sqlalchemy import Column, Connection, Index, String, Table, delete, exists, insert, select, text

from engine.hl7.message import codec_for, delimiters_of, read_header, sniff_codec, unescape
from engine.security import blind_index as bi
from engine.store import schema
from engine.store.db import MIGRATION_HOOKS
from engine.store.dicom.scan import UNDEFINED, ScanError, scan
from engine.store.prepared import pg_run

log = structlog.get_logger()

HMAC_KEY_NAME = "message-index"
FORMAT = "1"
FIELDS = ("patient_id", "accession", "control_id", "study_uid")
MAX_VALUE = 256  # longer "identifiers" are not identifiers: not indexed
MAX_FHIR_BYTES = 4 * 1024 * 1024  # larger FHIR bodies (big Bundles) are not parsed at intake

message_terms = Table(
    "message_terms", schema.metadata,
    Column("message_id", String(32), primary_key=True),
    Column("term", String(32), primary_key=True),
    Index("ix_message_terms_term", "term", "message_id"),
)


# -- terms ----------------------------------------------------------------------------
def value_term(key: bytes, field: str, value: str) -> str:
    """The term of one searched or stored value of ``field`` (whole value, trimmed, case-folded)."""
    return bi.term(key, f"message.{field}", "id", value.strip().casefold())


@functools.lru_cache(maxsize=8)
def marker_term(key: bytes) -> str:
    """Every indexed message has this term: it names the format and (through the HMAC) the key."""
    return bi.term(key, "message", "indexed", FORMAT)


def terms_of(key: bytes, kind: str, payload: bytes, headers: dict[str, Any] | None = None,
             given: dict[str, set[str]] | None = None) -> set[str]:
    """The terms of one message: its identifiers' terms and the marker (``given``: the
    identifiers a listener already read from this payload, instead of reading them again)."""
    out = {marker_term(key)}
    try:
        values = given if given is not None else identifiers(kind, payload, headers or {})
    except Exception as e:  # odd bytes: index nothing more, never fail the commit
        log.warning("message_terms.extract_failed", kind=kind, error=type(e).__name__)
        values = {}
    for field, vals in values.items():
        for v in vals:
            v = v.strip()
            if v and len(v) <= MAX_VALUE:
                out.add(value_term(key, field, v))
    return out


def identifiers(kind: str, payload: bytes, headers: dict[str, Any]) -> dict[str, set[str]]:
    """field -> values found in the payload (see the module text for which fields)."""
    if kind == "hl7v2":
        return _hl7(payload, headers)
    if kind == "dicom":
        return _dicom(payload, headers)
    if kind == "fhir":
        return _fhir(payload)
    return {}


# -- HL7 v2 -----------------------------------------------------------------------------
# segment -> (field number, field name, component to keep: 1 = the id, 0 = the whole field)
_HL7_FIELDS: dict[str, tuple[tuple[int, str], ...]] = {
    "PID": ((3, "patient_id"), (2, "patient_id")),
    "ORC": ((2, "accession"), (3, "accession")),
    "OBR": ((2, "accession"), (3, "accession"), (18, "accession")),
    "IPC": ((1, "accession"), (3, "study_uid")),
    "ZDS": ((1, "study_uid"),),
}


def _hl7(payload: bytes, headers: dict[str, Any] | None = None) -> dict[str, set[str]]:
    """Reads the fields above with the header's delimiters and charset, without a full parse
    (python-hl7's costs ~100 us a message; this runs in the committer for every message).

    The listener has read the MSH already and its envelope headers carry what this needs
    (MSH-10, MSH-18), so the header is not read a second time here: the delimiters are MSH-1
    and MSH-2 (payload bytes 3-7, the stored payload starts at MSH). Without those headers
    (a payload from elsewhere) the MSH is read."""
    headers = headers or {}
    out: dict[str, set[str]] = {f: set() for f in FIELDS}
    if payload[:3] == b"MSH" and "MSH-10" in headers and "MSH-18" in headers:
        d = delimiters_of(payload)
        control_id, charset = str(headers["MSH-10"] or ""), str(headers["MSH-18"] or "")
        text_ = payload.decode(codec_for(charset) if charset else sniff_codec(payload))
    else:
        header = read_header(payload, require=False)
        d, control_id = header.delimiters, header.control_id
        text_ = header.decode(payload)
    if control_id:
        out["control_id"].add(control_id)
    for seg in text_.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        wanted = _HL7_FIELDS.get(seg[:3])
        if not wanted or len(seg) < 4 or seg[3] != d.field:
            continue
        fields = seg.split(d.field)
        for n, name in wanted:
            if n >= len(fields) or not fields[n]:
                continue
            for rep in fields[n].split(d.repetition):
                first = rep.split(d.component, 1)[0].split(d.subcomponent, 1)[0]
                value = unescape(first, d)
                if value and value != '""':
                    out[name].add(value)
    return out


# -- DICOM -----------------------------------------------------------------------------
_TAGS = {0x00100020: "patient_id", 0x00080050: "accession", 0x0020000D: "study_uid"}
_KEYWORDS = {"PatientID": "patient_id", "AccessionNumber": "accession", "StudyInstanceUID": "study_uid"}
_CHARSET = 0x00080005
_LAST = max(_TAGS)
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _dicom(payload: bytes, headers: dict[str, Any]) -> dict[str, set[str]]:
    """PatientID, AccessionNumber, StudyInstanceUID of a Part-10 payload: the archive scan's
    element-header reader (engine.store.dicom.scan), stopping after StudyInstanceUID (the
    scan itself walks to the pixel data, ~300 us on a CT; this is ~20 us), for Little Endian
    data sets in ASCII or UTF-8; pydicom for anything else."""
    out: dict[str, set[str]] = {f: set() for f in FIELDS}
    raw = _scan_little_endian(payload)
    if raw is None:
        from pydicom import dcmread

        ds = dcmread(io.BytesIO(payload), force=True, stop_before_pixels=True, specific_tags=list(_KEYWORDS))
        for kw, name in _KEYWORDS.items():
            try:
                v = ds.get(kw)
            except Exception as e:  # an unreadable value is left out
                log.debug("message_terms.dicom_value_unreadable", keyword=kw, error=type(e).__name__)
                continue
            for one in ([] if v is None else v if type(v).__name__ == "MultiValue" else [v]):
                if str(one).strip("\x00 "):
                    out[name].add(str(one).strip("\x00 "))
    else:
        for tag, value in raw.items():
            for one in value.split("\\"):
                if one.strip("\x00 "):
                    out[_TAGS[tag]].add(one.strip("\x00 "))
    uid = headers.get("StudyInstanceUID")
    if uid:
        out["study_uid"].add(str(uid))
    return out


_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHI")
_U32 = struct.Struct("<I")
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


def _leading_elements(buf: memoryview, pos: int, implicit: bool) -> dict[int, str]:
    """The wanted elements among the top-level ones up to StudyInstanceUID (0020,000D).

    Its own few lines rather than ``scan``: ``scan`` walks every element to the pixel data
    (~300 us for a CT header, in the committer, for every instance), while these three tags
    come early. Anything unusual (an undefined length before them, a length past the end)
    raises ScanError and the caller reads the payload with ``scan`` / pydicom instead.
    """
    found: dict[int, str] = {}
    stop = len(buf)
    while pos + 8 <= stop:
        if implicit:
            group, elem, length = _IMPLICIT.unpack_from(buf, pos)
            start = pos + 8
        else:
            group, elem, vr, short = _EXPLICIT.unpack_from(buf, pos)
            if vr in _LONG_VRS:
                length, start = _U32.unpack_from(buf, pos + 8)[0], pos + 12
            else:
                length, start = short, pos + 8
        tag = (group << 16) | elem
        if tag > _LAST:
            break
        if length == UNDEFINED or start + length > stop:
            raise ScanError("undefined or overlong length before the wanted elements")
        if tag in _TAGS or tag == _CHARSET:
            found[tag] = bytes(buf[start:start + length]).decode("utf-8")
        pos = start + length
    return found


def _scan_little_endian(payload: bytes) -> dict[int, str] | None:
    """tag -> text of the wanted elements, or None when pydicom must read it (not Part-10 as
    medrelay writes it, big endian or deflated, another charset, an encoding the reader declines)."""
    if len(payload) < 144 or payload[128:132] != b"DICM" or payload[132:136] != b"\x02\x00\x00\x00":
        return None
    end = 144 + int.from_bytes(payload[140:144], "little")
    buf = memoryview(payload)
    try:
        meta = scan(buf[132:end], {0x00020010}, implicit=False).get_item(0x00020010)
        ts = bytes(meta.value).decode("ascii").strip("\x00 ") if meta is not None else ""
        if ts != _IMPLICIT_LE and not ts.startswith(("1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4",
                                                     "1.2.840.10008.1.2.5")) or ts.endswith(".99"):
            return None  # big endian, deflated (1.2.840.10008.1.2.1.99), unknown
        implicit = ts == _IMPLICIT_LE
        try:
            found = _leading_elements(buf, end, implicit)
        except ScanError:  # e.g. an undefined-length sequence first: the archive's full scan
            ds = scan(buf[end:], {*_TAGS, _CHARSET}, implicit=implicit)
            found = {t: bytes(el.value).decode("utf-8") for t in (*_TAGS, _CHARSET)
                     if (el := ds.get_item(t)) is not None}
    except (ScanError, struct.error, UnicodeDecodeError, ValueError):
        return None
    charset = found.pop(_CHARSET, "").strip("\x00 ").split("\\")[0].strip()
    if charset != "ISO_IR 192" and any(not v.isascii() for v in found.values()):
        return None  # read as UTF-8 above: right only for ASCII or a declared UTF-8
    return found


# -- FHIR ------------------------------------------------------------------------------
def _fhir(payload: bytes) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {f: set() for f in FIELDS}
    if len(payload) > MAX_FHIR_BYTES or not payload.strip():
        return out  # empty: a DELETE's message has no body, so nothing to index (and nothing odd)
    doc = json.loads(payload)
    resources = [doc]
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle":
        resources += [e.get("resource") for e in doc.get("entry") or [] if isinstance(e, dict)]
    for r in resources:
        if not isinstance(r, dict):
            continue
        rtype = r.get("resourceType")
        for ident in r.get("identifier") or []:
            if not isinstance(ident, dict) or not isinstance(ident.get("value"), str):
                continue
            value = ident["value"]
            codes = {c.get("code") for c in ((ident.get("type") or {}).get("coding") or []) if isinstance(c, dict)}
            if rtype == "Patient":
                out["patient_id"].add(value)
            elif "ACSN" in codes:
                out["accession"].add(value)
            elif rtype == "ImagingStudy" and ident.get("system") == "urn:dicom:uid":
                out["study_uid"].add(value.removeprefix("urn:oid:"))
    return out


# -- writing -----------------------------------------------------------------------------
# PostgreSQL: a batch's terms (about four a message) as one statement over two arrays, in the
# caller's pipeline: a row each through executemany cost ~30 us of driver work per term.
_PG_INSERT = ("INSERT INTO message_terms (message_id, term) "
              "SELECT * FROM unnest(CAST(%(ids)s AS varchar[]), CAST(%(terms)s AS varchar[]))")


# message id -> identifiers its listener read already, while that listener waits for the commit
# (``given``): the DICOM listener's index attributes hold them, and reading them from the payload
# again cost ~0.26 ms of the committer's thread per CT instance. At most one entry per submit
# in flight; a commit that finds none (a submit that timed out meanwhile) reads the payload.
_GIVEN: dict[str, dict[str, set[str]]] = {}


@contextmanager
def given(message_id: str, values: dict[str, set[str]]) -> Iterator[None]:
    """Hand ``values`` (field -> values, as ``identifiers`` gives) to the commit of ``message_id``
    for the duration of the block (the listener's blocking submit)."""
    _GIVEN[message_id] = values
    try:
        yield
    finally:
        _GIVEN.pop(message_id, None)


def write(conn: Connection, keyring: Any, envelopes: Iterable[Any], stored: set[str]) -> None:
    """Intake's hook: the terms of the envelopes whose message rows this transaction inserts."""
    key = keyring.hmac_key(HMAC_KEY_NAME)
    rows = [(e.id, t) for e in envelopes if e.id in stored
            for t in sorted(terms_of(key, e.kind, e.payload, dict(e.headers), _GIVEN.get(e.id)))]
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        pg_run(conn, _PG_INSERT, {"ids": [r[0] for r in rows], "terms": [r[1] for r in rows]})
    else:
        conn.execute(insert(message_terms), [{"message_id": m, "term": t} for m, t in rows])


def delete_for(conn: Connection, message_ids: Sequence[str]) -> int:
    """Drop the terms of messages being deleted (retention)."""
    n = 0
    for i in range(0, len(message_ids), 500):
        n += conn.execute(delete(message_terms).where(message_terms.c.message_id.in_(
            list(message_ids[i:i + 500])))).rowcount or 0
    return n


def unindexed(conn: Connection, key: bytes, limit: int) -> list[str]:
    """Up to ``limit`` ids of messages without the current marker (oldest first)."""
    m, t = schema.messages, message_terms
    has = exists().where(t.c.message_id == m.c.id, t.c.term == marker_term(key))
    return list(conn.execute(select(m.c.id).where(~has).order_by(m.c.received_at).limit(limit)).scalars())


def reindex(store: Any, *, batch: int = 200) -> int:
    """Index one batch of messages lacking the current marker (their old terms replaced);
    returns how many were indexed (0: nothing left). Each batch is its own transaction."""
    key = store.keyring.hmac_key(HMAC_KEY_NAME)
    m = schema.messages
    with store.engine.begin() as conn:
        ids = unindexed(conn, key, batch)
        if not ids:
            return 0
        rows = conn.execute(select(m.c.id, m.c.kind, m.c.blob_id, m.c.headers).where(m.c.id.in_(ids))).all()
        delete_for(conn, ids)
        out = []
        for r in rows:
            try:
                payload = store.get_blob(conn, r.blob_id, aad=r.id)
            except Exception as e:  # a blob that does not open keeps the marker only
                log.warning("message_terms.reindex_unreadable", message_id=r.id, error=type(e).__name__)
                payload = b""
            terms = terms_of(key, r.kind, payload, dict(r.headers or {})) if payload else {marker_term(key)}
            out += [{"message_id": r.id, "term": t} for t in sorted(terms)]
        conn.execute(insert(message_terms), out)
    return len(ids)


# -- migration -----------------------------------------------------------------------------
def ensure_schema(conn: Connection, store: Any) -> None:
    """Newest-first listing needs ``messages(received_at, id)``: an index on an existing table,
    which ``create_all`` does not add (a migration hook, as engine.store.fhir.reindex uses)."""
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_messages_received_id ON messages (received_at, id)"))


if ensure_schema not in MIGRATION_HOOKS:
    MIGRATION_HOOKS.append(ensure_schema)
