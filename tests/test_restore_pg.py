"""`medrelay restore` into PostgreSQL that fails half way leaves the target database as it found it
(issue 13 leftovers 3): before, pg_restore ran statement by statement, so a dump that broke in its
data left the tables it had created, and every retry was refused ("the target PostgreSQL database
has tables"). Now the database is restored last, as one transaction (``--single-transaction``),
and the blob files written before it are removed again; the error says so.

The failure is a real one: a backup whose dump is damaged inside its data (its table of contents
whole, so ``pg_restore --list`` and the recorded SHA-256, taken after the damage as a backup onto a
failing medium would, both pass ``verify``); the real CLI and pg_restore against the PostgreSQL of
MEDRELAY_TEST_PG_URL.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from conftest import _reset_pg, fresh_pg_url
from sqlalchemy import create_engine, text
from test_engine_ops import run_cli

from engine.ops.backup import backup, verify
from engine.security.crypto import KeyRing
from engine.store.db import Store


def _tables(url: str) -> int:
    eng = create_engine(url)
    try:
        with eng.connect() as c:
            return int(c.execute(text("SELECT count(*) FROM information_schema.tables "
                                      "WHERE table_schema = current_schema()")).scalar_one())
    finally:
        eng.dispose()


def _blob_files(folder) -> list[str]:
    return sorted(f for _, _, fs in os.walk(folder) for f in fs) if folder.exists() else []


def test_a_restore_whose_dump_breaks_half_way_leaves_the_database_empty_and_a_retry_works(tmp_path):
    url = fresh_pg_url()
    keys = tmp_path / "keys.json"
    src = Store(url, tmp_path / "blobs", KeyRing(keys), inline_max=1 << 20)
    src.migrate()
    with src.engine.begin() as c:  # three blobs inline (the dump's bulk), one in a file
        for i in range(3):
            src.put_blob(c, os.urandom(300_000), f"m{i}")
        src.put_blob(c, os.urandom(2 << 20), "big")
    dest = tmp_path / "bk"
    assert backup(src, dest).blobs == 1
    src.dispose()
    good = tmp_path / "good"
    shutil.copytree(dest, good)
    dump = dest / "medrelay.pgdump"
    data = bytearray(dump.read_bytes())
    at = len(data) * 6 // 10  # inside the table data, far past the table of contents
    data[at:at + 4096] = b"\xff" * 4096
    dump.write_bytes(bytes(data))
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["database"]["sha256"] = hashlib.sha256(data).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    assert verify(dest) == []  # nothing tells before pg_restore reads the data

    _reset_pg(url)  # the same database, emptied: the restore target
    target = tmp_path / "target"
    (target / "data").mkdir(parents=True)
    shutil.copy(keys, target / "data" / "keys.json")
    cfg = target / "channels.yaml"
    cfg.write_text(f"""
store: {{url: "{url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  in:
    source: {{type: test_null}}
    routes: []
""")
    r = run_cli("restore", "-c", str(cfg), str(dest), cwd=target)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "pg_restore failed" in r.stderr and "rolled back" in r.stderr and "nothing restored" in r.stderr, r.stderr
    assert "blob files written were removed" in r.stderr, r.stderr
    assert _tables(url) == 0  # before: the tables created before the damaged data stayed
    assert _blob_files(target / "data" / "blobs") == []
    assert sorted(os.listdir(target / "data")) == ["keys.json"]

    r = run_cli("restore", "-c", str(cfg), str(good), cwd=target)  # the retry, from a whole backup
    assert r.returncode == 0, r.stderr  # before: refused, "the target PostgreSQL database has tables"
    assert _tables(url) > 0
    assert len(_blob_files(target / "data" / "blobs")) == 1
