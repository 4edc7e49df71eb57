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


def _restore_target(target, url: str, keys):
    """An empty restore target: a channels.yaml on ``url`` and a copy of the key file."""
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
    return cfg


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
    cfg = _restore_target(target, url, keys)
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


def _in_schema(url: str, name: str) -> str:
    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{name}"


def _schemas(url: str, *names: str, create: bool = True) -> None:
    eng = create_engine(url)
    with eng.begin() as c:
        for n in names:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{n}" CASCADE'))
            if create:
                c.execute(text(f'CREATE SCHEMA "{n}"'))
    eng.dispose()


def test_a_store_in_its_own_schema_is_backed_up_alone_and_restored_only_under_that_name(tmp_path):
    """Probe session 7 finding 4: with the store behind a search_path, pg_dump took the whole
    database (another application's tables in public, other stores' schemas) and the restore then
    failed on "schema ... already exists". Now the backup holds the store's schema only and names
    it, a restore into another schema name is refused before anything is written, and one into an
    empty schema of that name (which exists already, as a DBA makes it) works."""
    import subprocess

    url = fresh_pg_url()
    eng = create_engine(url)
    with eng.begin() as c:  # another application's table beside the store
        c.execute(text("CREATE TABLE other_app (secret text)"))
        c.execute(text("INSERT INTO other_app VALUES ('not the store''s')"))
    eng.dispose()
    _schemas(url, "tenant_a", "tenant_b")
    try:
        keys = tmp_path / "keys.json"
        url_a = _in_schema(url, "tenant_a")
        src = Store(url_a, tmp_path / "blobs", KeyRing(keys), inline_max=1 << 10)
        src.migrate()
        with src.engine.begin() as c:
            src.put_blob(c, os.urandom(4000), "m0")
            src.put_blob(c, b"small", "m1")
        dest = tmp_path / "bk"
        assert backup(src, dest).blobs == 1
        src.dispose()
        manifest = json.loads((dest / "manifest.json").read_text())
        assert manifest["schema"] == "tenant_a"
        toc = subprocess.run(["pg_restore", "--list", str(dest / "medrelay.pgdump")], capture_output=True,
                             text=True, check=True).stdout
        assert "other_app" not in toc and " public " not in toc, toc  # before: every schema of the database
        assert " TABLE tenant_a blobs " in toc

        def restore_into(schema_name: str, folder: str):
            target = tmp_path / folder
            cfg = _restore_target(target, _in_schema(url, schema_name), keys)
            return run_cli("restore", "-c", str(cfg), str(dest), cwd=target), target

        r, target = restore_into("tenant_b", "tb")
        assert r.returncode == 4 and "'tenant_a'" in r.stderr and "nothing restored" in r.stderr, r.stderr
        assert _tables(_in_schema(url, "tenant_b")) == 0
        assert _blob_files(target / "data" / "blobs") == []

        _schemas(url, "tenant_a")  # the store lost; its schema made again, empty, by the DBA
        r, target = restore_into("tenant_a", "ta")
        assert r.returncode == 0, r.stderr  # before: "schema tenant_a already exists", rolled back
        got = Store(_in_schema(url, "tenant_a"), target / "data" / "blobs", KeyRing(target / "data" / "keys.json"))
        try:
            with got.engine.connect() as c:
                assert c.execute(text("SELECT count(*) FROM blobs")).scalar_one() == 2
        finally:
            got.dispose()
        assert len(_blob_files(target / "data" / "blobs")) == 1
    finally:
        _schemas(url, "tenant_a", "tenant_b", create=False)
