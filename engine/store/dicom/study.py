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

from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from engine.store.dicom.tables import study_instances


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


def with_archived(engine: Engine, rows: list[InstanceRow]) -> list[InstanceRow]:
    """Add the study's instances that the DICOM archive index holds but this table has not seen.

    A debounced route (quiet period) converts only a study's last instance, so the
    earlier ones never pass through the transform; the archive indexed every one of
    them at intake. Rows seen here win (they carry body part and laterality).
    """
    if not rows:
        return rows
    try:
        from engine.store.dicom import index as di
    except ImportError:  # pragma: no cover - the index module ships with the engine
        return rows
    st, se, im = di.studies, di.series, di.instances
    with engine.connect() as conn:
        found = conn.execute(
            select(se.c.series_uid, im.c.sop_uid, im.c.sop_class_uid, se.c.series_number, im.c.instance_number,
                   se.c.modality)
            .select_from(im.join(se, se.c.pk == im.c.series_pk).join(st, st.c.pk == se.c.study_pk))
            .where(st.c.study_uid == rows[0].study_uid)).all()
    seen = {r.sop_instance_uid for r in rows}
    extra = [InstanceRow(rows[0].study_uid, series_uid, sop, sop_class or "", snum, inum, modality or "")
             for series_uid, sop, sop_class, snum, inum, modality in found if sop not in seen]
    if not extra:
        return rows
    return sorted([*rows, *extra], key=lambda r: (r.series_number if r.series_number is not None else 1 << 30,
                                                  r.series_uid, r.instance_number if r.instance_number is not None
                                                  else 1 << 30, r.sop_instance_uid))
