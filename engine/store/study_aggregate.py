"""What has been seen of each study, so a study's ImagingStudy grows with its instances.

One row per SOP instance (not one JSON document per study): concurrent workers
converting instances of the same study each insert their own row, so there is no
read-modify-write race and no lost instance. Only UIDs, numbers and coded
categorical values (modality, body part, laterality) are kept: no names, ids or dates,
so the table needs no encryption.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import Column, Engine, Float, Index, Integer, String, Table, select
from sqlalchemy.dialects import postgresql, sqlite

from engine.store.schema import metadata

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


@dataclass(frozen=True, slots=True)
class InstanceRow:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str = ""
    series_number: int | None = None
    instance_number: int | None = None
    modality: str = ""
    body_part: str = ""
    laterality: str = ""


_FIELDS = ("study_uid", "series_uid", "sop_class_uid", "series_number", "instance_number",
           "modality", "body_part", "laterality")


def record(engine: Engine, row: InstanceRow) -> list[InstanceRow]:
    """Upsert one instance and return every instance of its study (ordered by series, instance).

    Re-sending an instance updates its row (a corrected series number wins) instead of adding one.
    """
    values = {"sop_instance_uid": row.sop_instance_uid, "seen_at": time.time(),
              **{f: getattr(row, f) for f in _FIELDS}}
    dialect = engine.dialect.name
    ins = (postgresql.insert(study_instances) if dialect == "postgresql" else sqlite.insert(study_instances))
    stmt = ins.values(**values).on_conflict_do_update(
        index_elements=["sop_instance_uid"], set_={f: values[f] for f in (*_FIELDS, "seen_at")})
    t = study_instances.c
    with engine.begin() as conn:
        conn.execute(stmt)
        rows = conn.execute(
            select(t.study_uid, t.series_uid, t.sop_instance_uid, t.sop_class_uid, t.series_number,
                   t.instance_number, t.modality, t.body_part, t.laterality)
            .where(t.study_uid == row.study_uid)
            .order_by(t.series_number, t.series_uid, t.instance_number, t.sop_instance_uid)
        ).all()
    return [InstanceRow(*r) for r in rows]


def forget(engine: Engine, study_uid: str) -> int:
    """Drop a study's rows (e.g. after the study is deleted downstream); returns rows removed."""
    with engine.begin() as conn:
        return conn.execute(study_instances.delete().where(study_instances.c.study_uid == study_uid)).rowcount
