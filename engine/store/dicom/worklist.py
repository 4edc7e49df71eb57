"""Modality Worklist items: the table, the `store` handler and the MWL C-FIND matcher.

Public API (the DICOM listener's MWL C-FIND handler calls this)::

    find_worklist(store: engine.store.db.Store, query: pydicom.Dataset, *,
                  case_insensitive_names: bool = False, limit: int | None = None)
        -> list[pydicom.Dataset]

``query`` is the C-FIND identifier (Modality Worklist Information Model, PS3.4 K.6.1).
Matching follows PS3.4 C.2.2.2: empty value = universal match (the key is returned),
single value, wildcards ``*`` ``?`` (string VRs other than dates/UIDs), date/time
ranges (``20261122-20261130``, ``-20261130``, ``20261122-``), UID lists (``\\``).
Keys inside ScheduledProcedureStepSequence are matched against the item's first
scheduled step. Each answer holds only the keys the query asked for (plus
SpecificCharacterSet). Only SCHEDULED and STARTED items are returned (cancelled, completed and
discontinued ones are not; the step's MPPS sets the last three), with their current
ScheduledProcedureStepStatus.

Storage decision (PHI): the item dataset, which carries PatientName, PatientID and
birth date, is stored only as an encrypted blob (``Store.put_blob``, AAD
``wl-<item key>``). The clear columns are the non-PHI keys modalities filter on:
station AE title, modality, scheduled date/time, accession number and status. The
SQL query narrows candidates by those; PatientName/PatientID and every other key are
matched after decrypting the candidates. That costs a decrypt per candidate of one
station/day, a few dozen rows, which is cheap, and keeps names out of the database
in clear. An SQL LIKE on names would need them in clear and was rejected for that.

Items are written by the ``worklist`` store handler from envelopes made by the
``hl7_to_worklist`` transform: ``headers["action"]`` create / update / cancel, and
``headers["worklist_key"]`` (a hash of the placer order number) naming the item.
"""

from __future__ import annotations

import re
import time
from io import BytesIO
from typing import TYPE_CHECKING, Any

import structlog
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence
from sqlalchemy import Connection, delete, insert, select, update

from engine.store.dicom.tables import worklist_items
from engine.store.handlers import STORE_HANDLERS, store_handler
from engine.store.schema import blobs

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.envelope import Envelope
    from engine.store.db import Store

log = structlog.get_logger()

SCHEDULED, CANCELLED = "SCHEDULED", "CANCELLED"
# Set by the performed procedure step (MPPS, engine.store.dicom.mpps): IN PROGRESS -> STARTED,
# COMPLETED, DISCONTINUED. SCHEDULED and STARTED items are offered to modalities (a started step
# can be resumed on the modality that crashed); completed and discontinued ones are not.
STARTED, COMPLETED, DISCONTINUED = "STARTED", "COMPLETED", "DISCONTINUED"
OFFERED = (SCHEDULED, STARTED)
PERFORMED = (STARTED, COMPLETED)  # an order update does not put these back to SCHEDULED


def _aad(item_key: str) -> str:
    return f"wl-{item_key}"


def read_item(data: bytes) -> Dataset:
    """A stored or transported item: DICOM Explicit VR Little Endian, no preamble or file meta."""
    return dcmread(BytesIO(data), force=True)


def _sps(ds: Dataset) -> Dataset:
    seq = ds.get("ScheduledProcedureStepSequence")
    return seq[0] if seq else Dataset()


def _columns(ds: Dataset) -> dict[str, str]:
    sps = _sps(ds)
    return {
        "station_aet": str(sps.get("ScheduledStationAETitle", "") or "").strip()[:16],
        "modality": str(sps.get("Modality", "") or "").strip()[:16],
        "start_date": str(sps.get("ScheduledProcedureStepStartDate", "") or "").strip()[:8],
        "start_time": str(sps.get("ScheduledProcedureStepStartTime", "") or "").strip()[:16],
        "accession_number": str(ds.get("AccessionNumber", "") or "").strip()[:16],
    }


def _old_blob(conn: Connection, item_key: str) -> str | None:
    row = conn.execute(select(worklist_items.c.blob_id).where(worklist_items.c.item_key == item_key)).first()
    return row[0] if row else None


def apply(store: Store, conn: Connection, item_key: str, action: str, payload: bytes) -> str:
    """Create, update or cancel one item inside the caller's transaction; returns a short detail.

    create and update are both upserts (a re-sent NW, or an XO for an order we missed,
    still leaves the right item). cancel marks the row CANCELLED and keeps it (audit);
    a cancel for an unknown order is answered, not failed: there is nothing to undo.
    """
    now = time.time()
    old_blob = _old_blob(conn, item_key)
    if action == "cancel":
        if old_blob is None:
            return "worklist:cancel:unknown"
        conn.execute(update(worklist_items).where(worklist_items.c.item_key == item_key)
                     .values(status=CANCELLED, updated_at=now))
        return "worklist:cancelled"
    if action not in ("create", "update"):
        raise ValueError(f"unknown worklist action {action!r}")
    ds = read_item(payload)
    blob_id = store.put_blob(conn, payload, _aad(item_key))
    values = {**_columns(ds), "status": SCHEDULED, "blob_id": blob_id, "updated_at": now}
    if old_blob is not None and _status(conn, item_key) in PERFORMED:
        del values["status"]  # a re-sent or updated order keeps what the modality reported (MPPS)
    if old_blob is None:
        conn.execute(insert(worklist_items).values(item_key=item_key, created_at=now, **values))
        detail = "worklist:created"
    else:
        conn.execute(update(worklist_items).where(worklist_items.c.item_key == item_key).values(**values))
        if old_blob != blob_id:
            conn.execute(delete(blobs).where(blobs.c.id == old_blob))
        detail = "worklist:updated"
    return detail


def _status(conn: Connection, item_key: str) -> str | None:
    return conn.execute(select(worklist_items.c.status).where(worklist_items.c.item_key == item_key)).scalar()


def set_status(conn: Connection, item_keys: list[str], status: str) -> int:
    """A performed procedure step's progress on its items (not on cancelled ones); returns how many."""
    if not item_keys:
        return 0
    t = worklist_items.c
    return conn.execute(update(worklist_items).where(t.item_key.in_(item_keys), t.status != CANCELLED)
                        .values(status=status, updated_at=time.time())).rowcount


def items_for_step(store: Store, conn: Connection, steps: list[dict[str, str]], *, station_aet: str = "",
                   limit: int = 500) -> list[str]:
    """The keys of the items a performed step names (its Scheduled Step Attributes Sequence).

    ``steps`` hold AccessionNumber, RequestedProcedureID, ScheduledProcedureStepID and
    StudyInstanceUID of each scheduled step. Items are narrowed in SQL by the accession number
    (clear column), else by the performing station's items still offered; then decrypted and
    compared: the scheduled step id when both have one, else the requested procedure id, else
    the study instance UID. At most ``limit`` candidates are decrypted per step.
    """
    t = worklist_items.c
    found: list[str] = []
    for step in steps:
        acc = step.get("AccessionNumber", "")
        q = select(t.item_key, t.blob_id).where(t.status != CANCELLED)
        if acc:
            q = q.where(t.accession_number == acc[:16])
        elif station_aet:
            q = q.where(t.station_aet == station_aet[:16], t.status.in_(OFFERED))
        else:
            continue
        for key, blob_id in conn.execute(q.order_by(t.item_key).limit(limit)).all():
            item = read_item(store.get_blob(conn, blob_id, _aad(key)))
            if _same_step(step, item) and key not in found:
                found.append(key)
    return found


def _same_step(step: dict[str, str], item: Dataset) -> bool:
    sps_id = str(_sps(item).get("ScheduledProcedureStepID", "") or "").strip()
    rp_id = str(item.get("RequestedProcedureID", "") or "").strip()
    study = str(item.get("StudyInstanceUID", "") or "").strip()
    if step.get("ScheduledProcedureStepID") and sps_id:
        return step["ScheduledProcedureStepID"] == sps_id
    if step.get("RequestedProcedureID") and rp_id:
        return step["RequestedProcedureID"] == rp_id
    return bool(step.get("StudyInstanceUID")) and step["StudyInstanceUID"] == study


@store_handler("worklist")
def store_worklist(ctx: ComponentContext, conn: Connection, envelope: Envelope) -> str:
    """`store` destination handler for envelopes from ``hl7_to_worklist``."""
    key = str(envelope.headers.get("worklist_key") or "")
    action = str(envelope.headers.get("action") or "")
    if not key:
        raise ValueError("worklist envelope without worklist_key header")
    detail = apply(ctx.store, conn, key, action, envelope.payload)
    log.info("worklist.stored", channel=envelope.channel, message_id=envelope.id, action=action, detail=detail)
    return detail


def register_store_handler() -> None:
    """Make sure ``worklist`` is in the store handler registry (importing this module does it too)."""
    STORE_HANDLERS["worklist"] = store_worklist


# ---------------------------------------------------------------------- matching
_RANGE_VRS = frozenset({"DA", "TM", "DT"})
_NO_WILDCARD_VRS = frozenset({"DA", "TM", "DT", "UI", "SQ", "US", "UL", "SS", "SL", "FL", "FD", "IS", "DS"})


def _text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        return "\\".join(str(x) for x in v)
    return str(v)


def _wildcard(pattern: str, flags: int) -> re.Pattern[str]:
    return re.compile("".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern) + r"\Z",
                      flags | re.DOTALL)


def _in_range(q: str, value: str, vr: str) -> bool:
    if not value:
        return False
    lo, _, hi = q.partition("-")
    if vr == "TM":
        value = value.replace(":", "")
        lo, hi = lo.replace(":", ""), hi.replace(":", "")
    n = len(value)
    return (not lo or value >= lo[:n]) and (not hi or value[:len(hi)] <= hi)


def match_value(q: str, value: str, vr: str, *, case_insensitive: bool = False) -> bool:
    """PS3.4 C.2.2.2 matching of one attribute; ``q`` '' is universal matching."""
    q = q.strip()
    if not q or q == "*":
        return True
    value = value.strip()
    if vr in _RANGE_VRS and "-" in q:
        return _in_range(q, value, vr)
    if vr == "UI" and "\\" in q:
        return value in q.split("\\")
    if vr not in _NO_WILDCARD_VRS and ("*" in q or "?" in q):
        return bool(_wildcard(q, re.IGNORECASE if case_insensitive and vr == "PN" else 0).match(value))
    if vr == "PN" and case_insensitive:
        return q.casefold() == value.casefold()
    if vr in ("DA", "TM"):
        return value.replace(":", "").startswith(q.replace(":", "")) if vr == "TM" else value == q
    return q == value


def _matches(query: Dataset, item: Dataset, case_insensitive: bool) -> bool:
    for elem in query:
        if elem.keyword == "SpecificCharacterSet" or elem.tag.group == 0x0002:
            continue
        if elem.VR == "SQ":
            if elem.value:
                sub_q = elem.value[0]
                have = item.get(elem.keyword) if elem.keyword else None
                if not have:
                    if any(_text(e.value).strip() for e in sub_q if e.VR != "SQ"):
                        return False
                    continue
                if not _matches(sub_q, have[0], case_insensitive):
                    return False
            continue
        q = _text(elem.value)
        if q.strip():
            have = item.get(elem.tag)
            if not match_value(q, _text(have.value) if have is not None else "", elem.VR,
                               case_insensitive=case_insensitive):
                return False
    return True


def _answer(query: Dataset, item: Dataset, top: bool = True) -> Dataset:
    """Only the requested keys, with the item's values (empty when the item lacks them)."""
    out = Dataset()
    for elem in query:
        if elem.tag.group == 0x0002:
            continue
        have = item.get(elem.tag)
        if elem.VR == "SQ":
            sub_q = elem.value[0] if elem.value else Dataset()
            items = have.value if have is not None and have.VR == "SQ" else []
            seq = Sequence([_answer(sub_q, it, False) for it in items]) if len(sub_q) else Sequence(list(items))
            out.add_new(elem.tag, "SQ", seq)
        elif have is not None:
            out.add(have)
        else:
            out.add_new(elem.tag, elem.VR, None)
    if top:
        out.SpecificCharacterSet = item.get("SpecificCharacterSet", "ISO_IR 192")
    return out


def find_worklist(store: Store, query: Dataset, *, case_insensitive_names: bool = False,
                  limit: int | None = None) -> list[Dataset]:
    """Answer a Modality Worklist C-FIND from the stored items (see module docstring)."""
    sps_q = _sps(query)
    t = worklist_items.c
    stmt = select(t.item_key, t.blob_id, t.status).where(t.status.in_(OFFERED))
    aet = _text(sps_q.get("ScheduledStationAETitle", "")).strip()
    if aet and not any(c in aet for c in "*?\\"):
        stmt = stmt.where(t.station_aet == aet)
    modality = _text(sps_q.get("Modality", "")).strip()
    if modality and not any(c in modality for c in "*?\\"):
        stmt = stmt.where(t.modality == modality)
    date = _text(sps_q.get("ScheduledProcedureStepStartDate", "")).strip()
    if date and "\\" not in date:
        lo, dash, hi = date.partition("-")
        if not dash:
            stmt = stmt.where(t.start_date == lo)
        else:
            if lo:  # partial dates ("2026-", "-2025") bound by their first / last day
                stmt = stmt.where(t.start_date >= lo.ljust(8, "0"))
            if hi:
                stmt = stmt.where(t.start_date <= hi.ljust(8, "9"))
    acc = _text(query.get("AccessionNumber", "")).strip()
    if acc and not any(c in acc for c in "*?\\"):
        stmt = stmt.where(t.accession_number == acc)
    stmt = stmt.order_by(t.start_date, t.start_time, t.item_key)
    out: list[Dataset] = []
    with store.engine.connect() as conn:
        for key, blob_id, status in conn.execute(stmt).all():
            item = read_item(store.get_blob(conn, blob_id, _aad(key)))
            if status != SCHEDULED and item.get("ScheduledProcedureStepSequence"):
                item.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStatus = status
            if _matches(query, item, case_insensitive_names):
                out.append(_answer(query, item))
                if limit is not None and len(out) >= limit:
                    break
    log.debug("worklist.find", matches=len(out))
    return out
