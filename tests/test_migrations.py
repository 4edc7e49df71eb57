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
