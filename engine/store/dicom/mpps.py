"""Modality Performed Procedure Steps in the archive: their state, their data set, their worklist items.

The DICOM listener's MPPS SCP (listeners/dicom_mpps.py) checks each N-CREATE / N-SET against
PS3.4 F.7 and submits it to intake as a message; the intake hook then calls ``create`` or
``update`` here, in the transaction that stores the message, its deliveries and its audit row.
So a step is never half recorded: its state, its sealed data set (the N-CREATE merged with every
N-SET, AAD ``mpps-<uid>``) and the progress of the worklist items it performs commit together.

State machine (PS3.4 F.7.2.2): IN PROGRESS -> COMPLETED | DISCONTINUED, nothing after a final
state. ``update`` re-checks it against the row it changes (``version``), so two N-SETs that
raced past the listener's own check cannot both win: the second raises ``Conflict``.

No clear column holds PHI: the step's UID, state, performing station AE title and study UID.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import Connection, delete, insert, select
from sqlalchemy import update as sql_update

from engine.store.dicom import worklist
from engine.store.dicom.workflow_tables import mpps as mpps_table
from engine.store.handlers import store_handler
from engine.store.schema import blobs

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.envelope import Envelope

log = structlog.get_logger()

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
STATES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
FINAL = frozenset((COMPLETED, DISCONTINUED))
WORKLIST_STATUS = {IN_PROGRESS: worklist.STARTED, COMPLETED: worklist.COMPLETED,
                   DISCONTINUED: worklist.DISCONTINUED}


class Exists(Exception):
    """N-CREATE of a step the archive already has (0x0111 Duplicate SOP Instance)."""


class Conflict(Exception):
    """The step changed (or reached a final state) since the listener read it."""


@dataclass(frozen=True)
class Step:
    """One stored performed procedure step."""

    uid: str
    state: str
    version: int
    station_aet: str
    study_uid: str
    message_id: str
    worklist_keys: tuple[str, ...]
    blob_id: str

    @property
    def final(self) -> bool:
        return self.state in FINAL


def _aad(uid: str) -> str:
    return f"mpps-{uid}"


def get(conn: Connection, uid: str) -> Step | None:
    t = mpps_table.c
    r = conn.execute(select(t.mpps_uid, t.state, t.version, t.station_aet, t.study_uid, t.message_id,
                            t.worklist_keys, t.blob_id).where(t.mpps_uid == uid)).first()
    if r is None:
        return None
    return Step(r[0], r[1], int(r[2]), r[3], r[4], r[5], tuple((r[6] or "").split()), r[7])


def dataset_bytes(store: Any, conn: Connection, step: Step) -> bytes:
    """The step's whole data set as stored (Part-10 bytes), decrypted and checked."""
    return bytes(store.get_blob(conn, step.blob_id, _aad(step.uid)))


def create(store: Any, conn: Connection, *, uid: str, state: str, part10: bytes, station_aet: str,
           study_uid: str, message_id: str, steps: list[dict[str, str]]) -> Step:
    """Record a new step (N-CREATE) and start the worklist items it performs; ``Exists`` if known."""
    if get(conn, uid) is not None:
        raise Exists(uid)
    keys = worklist.items_for_step(store, conn, steps, station_aet=station_aet)
    blob_id = store.put_blob(conn, part10, _aad(uid))
    now = time.time()
    # Checked above in this same transaction (intake's committer is the one writer); a second
    # engine process racing on PostgreSQL gets the primary key's IntegrityError, refused as a failure.
    conn.execute(insert(mpps_table).values(
        mpps_uid=uid, state=state, station_aet=station_aet[:16], study_uid=study_uid[:64],
        blob_id=blob_id, message_id=message_id, worklist_keys=" ".join(keys), version=1,
        created_at=now, updated_at=now))
    worklist.set_status(conn, keys, WORKLIST_STATUS[state])
    return Step(uid, state, 1, station_aet, study_uid, message_id, tuple(keys), blob_id)


def update(store: Any, conn: Connection, seen: Step, *, state: str, part10: bytes, message_id: str) -> Step:
    """Apply an N-SET the listener checked against ``seen``; ``Conflict`` when the row moved on."""
    if seen.final:
        raise Conflict(f"{seen.uid} is {seen.state}")
    blob_id = store.put_blob(conn, part10, _aad(seen.uid))
    t = mpps_table.c
    done = conn.execute(sql_update(mpps_table).where(t.mpps_uid == seen.uid, t.version == seen.version)
                        .values(state=state, blob_id=blob_id, message_id=message_id, version=seen.version + 1,
                                updated_at=time.time())).rowcount
    if done != 1:
        raise Conflict(f"{seen.uid} changed meanwhile")
    if blob_id != seen.blob_id:
        conn.execute(delete(blobs).where(blobs.c.id == seen.blob_id))
    if state != seen.state:
        worklist.set_status(conn, list(seen.worklist_keys), WORKLIST_STATUS[state])
    return Step(seen.uid, state, seen.version + 1, seen.station_aet, seen.study_uid, message_id,
                seen.worklist_keys, blob_id)


@store_handler("mpps")
def store_mpps(ctx: ComponentContext, conn: Connection, envelope: Envelope) -> str:
    """`store` destination for an MPPS message: the listener recorded the step when it took it,
    so an archive route that also takes MPPS messages has nothing left to do."""
    step = get(conn, str(envelope.headers.get("mpps_uid") or ""))
    return f"mpps: {step.state} (recorded by the listener)" if step is not None else "mpps: unknown step"
