"""Schema migrations with several engines: N processes starting at once, and an engine older than its schema."""

import subprocess
import sys
import textwrap

import pytest
from sqlalchemy import insert, select

from engine.security.crypto import KeyRing
from engine.store import schema
from engine.store.db import SCHEMA_VERSION, SchemaTooNew, Store

MIGRATE = textwrap.dedent("""
    import sys, time
    from engine.security.crypto import KeyRing
    from engine.store.db import Store
    url, blobs, keys, start = sys.argv[1:5]
    while time.time() < float(start):
        time.sleep(0.001)
    Store(url, blobs, KeyRing(keys)).migrate()
    print("migrated")
""")


def test_engines_starting_together_on_an_empty_database_all_migrate(store_url, tmp_path):
    """Without the migration lock, PostgreSQL answers some of them with a UniqueViolation on
    pg_type or schema_version_pkey (seen with three engines started at once)."""
    import time

    keys = tmp_path / "keys.json"
    KeyRing(keys)  # one key file for all, as a shared deployment has
    for _round in range(3):
        start = time.time() + 1.5
        procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, store_url, str(tmp_path / "blobs"), str(keys),
                                   str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-800:] for o in outs]
        s = Store(store_url, tmp_path / "blobs", KeyRing(keys))
        with s.engine.connect() as c:
            versions = c.execute(select(schema.schema_version.c.version)).scalars().all()
        assert sorted(versions) == list(range(1, SCHEMA_VERSION + 1))
        if s.is_sqlite:
            s.dispose()
            break
        with s.engine.begin() as c:  # empty it again for the next round
            from sqlalchemy import text
            c.execute(text("DROP SCHEMA public CASCADE"))
            c.execute(text("CREATE SCHEMA public"))
        s.dispose()


def test_an_engine_older_than_the_schema_refuses_to_start(store):
    with store.engine.begin() as c:
        c.execute(insert(schema.schema_version).values(version=SCHEMA_VERSION + 1, applied_at=0.0))
    with pytest.raises(SchemaTooNew, match=f"version {SCHEMA_VERSION + 1}, newer than"):
        store.migrate()


def test_a_version_4_store_gets_the_instance_dimensions_in_one_additive_step(store):
    """v5 adds dicom_instances.image_rows / image_columns / number_of_frames to a store of v4
    (its rows keep NULL there: C-FIND and QIDO-RS then leave the three out, as before)."""
    from sqlalchemy import delete, inspect, text

    with store.engine.begin() as conn:
        for col in ("image_rows", "image_columns", "number_of_frames"):
            conn.execute(text(f"ALTER TABLE dicom_instances DROP COLUMN {col}"))
        conn.execute(delete(schema.schema_version).where(schema.schema_version.c.version >= 5))
    assert store.migrate() == SCHEMA_VERSION
    with store.engine.connect() as conn:
        cols = {c["name"] for c in inspect(conn).get_columns("dicom_instances")}
    assert {"image_rows", "image_columns", "number_of_frames"} <= cols


V6_COLUMNS = ("content_date", "content_time", "image_type", "acquisition_number")


def test_a_version_5_store_gets_the_instance_content_columns_in_one_additive_step(store):
    """v6 adds dicom_instances.content_date / content_time / image_type / acquisition_number to a
    store of v5, whose rows keep NULL there (C-FIND and QIDO-RS leave the four empty for them);
    the statement an engine of v5 inserts instances with still works on the v6 table (rolling upgrade)."""
    from sqlalchemy import delete, inspect, text

    with store.engine.begin() as conn:
        for col in V6_COLUMNS:
            conn.execute(text(f"ALTER TABLE dicom_instances DROP COLUMN {col}"))
        conn.execute(delete(schema.schema_version).where(schema.schema_version.c.version >= 6))
        conn.execute(text("INSERT INTO dicom_patients (pid_hmac, name_hmac, attrs_blob, created_at) "
                          "VALUES ('p', 'n', 'b', 0)"))
        conn.execute(text("INSERT INTO dicom_studies (patient_pk, study_uid, study_date, study_time, "
                          "accession_hmac, attrs_blob, created_at) "
                          "SELECT pk, '1.2.3', '', '', 'a', 'b', 0 FROM dicom_patients"))
        conn.execute(text("INSERT INTO dicom_series (study_pk, series_uid, modality, attrs_blob, created_at) "
                          "SELECT pk, '1.2.3.4', 'CT', 'b', 0 FROM dicom_studies"))
    v5_insert = text(  # the columns an engine of v5 writes (engine/store/dicom/index.py at v5)
        "INSERT INTO dicom_instances (series_pk, sop_uid, sop_class_uid, instance_number, image_rows, "
        "image_columns, number_of_frames, transfer_syntax, message_id, blob_id, digest, size, channel, "
        "archived, received_at) SELECT pk, :sop, '1.2.840.10008.5.1.4.1.1.2', 1, 512, 512, NULL, "
        "'1.2.840.10008.1.2.1', 'm', NULL, 'd', 1, '', 0, 0 FROM dicom_series")
    with store.engine.begin() as conn:
        conn.execute(v5_insert, {"sop": "1.2.3.4.5"})
    assert store.migrate() == SCHEMA_VERSION == 6
    with store.engine.begin() as conn:
        cols = {c["name"] for c in inspect(conn).get_columns("dicom_instances")}
        assert set(V6_COLUMNS) <= cols
        assert max(conn.execute(select(schema.schema_version.c.version)).scalars()) == 6
        conn.execute(v5_insert, {"sop": "1.2.3.4.6"})  # an engine of v5 still running beside it
        rows = conn.execute(text("SELECT content_date, content_time, image_type, acquisition_number "
                                 "FROM dicom_instances")).all()
    assert [tuple(r) for r in rows] == [(None, None, None, None)] * 2
    assert store.migrate() == 6  # a second start finds nothing to do


def test_an_engine_of_version_5_refuses_a_store_of_version_6(store, monkeypatch):
    """The store migrated to 6, opened by code that knows 5 (the previous release): SchemaTooNew."""
    import engine.store.db as db

    monkeypatch.setattr(db, "SCHEMA_VERSION", 5)
    with pytest.raises(SchemaTooNew, match=r"version 6, newer than this medrelay understands \(5\)"):
        store.migrate()
