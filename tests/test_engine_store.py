import pytest
from sqlalchemy import select, update

from engine.security.crypto import IntegrityError, KeyRing
from engine.store import schema
from engine.store.key_rotation import key_usage, rotate


def test_key_file_created_0600(tmp_path):
    KeyRing(tmp_path / "k.json")
    assert (tmp_path / "k.json").stat().st_mode & 0o777 == 0o600


def test_roundtrip_inline_and_file(store):
    small, big = b"MSH|^~\\&|small", b"x" * 5000
    with store.engine.begin() as c:
        a, b = store.put_blobs(c, [(small, "m1"), (big, "m2")])
    assert store.blob_path(b).exists() and not store.blob_path(a).exists()
    assert big not in store.blob_path(b).read_bytes()
    with store.engine.connect() as c:
        assert store.get_blob(c, a, aad="m1") == small
        assert store.get_blob(c, b, aad="m2") == big


def test_tampered_ciphertext_fails_loudly(store):
    with store.engine.begin() as c:
        bid = store.put_blob(c, b"x" * 5000, "m2")
    p = store.blob_path(bid)
    data = bytearray(p.read_bytes())
    data[10] ^= 1
    p.write_bytes(bytes(data))
    with store.engine.connect() as c, pytest.raises(IntegrityError):
        store.get_blob(c, bid, aad="m2")


def test_swapped_blob_fails(store):
    with store.engine.begin() as c:
        a = store.put_blob(c, b"patient A", "m1")
        b = store.put_blob(c, b"patient B", "m2")
    with store.engine.connect() as c:
        with pytest.raises(IntegrityError):
            store.get_blob(c, a, aad="m2")
    # swap the sealed contents in the table but keep the binding: GCM must refuse
    with store.engine.begin() as c:
        rb = c.execute(select(schema.blobs).where(schema.blobs.c.id == b)).mappings().one()
        c.execute(update(schema.blobs).where(schema.blobs.c.id == a).values(
            data=rb["data"], nonce=rb["nonce"], wrapped_key=rb["wrapped_key"]))
    with store.engine.connect() as c, pytest.raises(IntegrityError):
        store.get_blob(c, a, aad="m1")


def test_blob_address_and_legacy_ids(store):
    """New blobs are named by SHA-256 of nonce + GCM tag; rows named by the SHA-256 of the whole
    ciphertext (written before that) still read, and a file that matches neither is refused."""
    import hashlib

    from engine.store.db import blob_address

    with store.engine.begin() as c:
        bid = store.put_blob(c, b"y" * 5000, "m9")
    path = store.blob_path(bid)
    ct = path.read_bytes()
    with store.engine.connect() as c:
        row = c.execute(select(schema.blobs).where(schema.blobs.c.id == bid)).mappings().one()
        row_nonce = row["nonce"]
    assert bid == blob_address(row_nonce, ct) != hashlib.sha256(ct).hexdigest()
    legacy = hashlib.sha256(ct).hexdigest()
    store.blob_path(legacy).write_bytes(ct)
    with store.engine.begin() as c:
        c.execute(schema.blobs.insert().values({**row, "id": legacy, "aad": "m9"}))
    with store.engine.connect() as c:
        assert store.get_blob(c, legacy, aad="m9") == b"y" * 5000
    torn = bytearray(ct)
    torn[-1] ^= 1  # the GCM tag changes: the address no longer matches
    path.write_bytes(bytes(torn))
    with store.engine.connect() as c, pytest.raises(IntegrityError, match="address"):
        store.get_blob(c, bid, aad="m9")


def test_rotation_rewraps_and_retires(store):
    with store.engine.begin() as c:
        ids = store.put_blobs(c, [(f"msg {i}".encode(), f"m{i}") for i in range(30)])
    old = store.keyring.active_id
    new, n, retired = rotate(store)
    assert n == 30 and retired == [old] and new != old
    assert key_usage(store) == {new: 30}
    ring2 = KeyRing(store.keyring.path)  # a fresh process sees the same file
    assert ring2.kek_ids() == [new]
    with store.engine.connect() as c:
        assert store.get_blob(c, ids[7], aad="m7") == b"msg 7"


def test_sqlite_is_wal_and_full_sync(store):
    if not store.is_sqlite:
        with store.engine.connect() as c:
            assert c.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        return
    with store.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2


def test_migration_from_v1_adds_coalesce_key(store):
    from sqlalchemy import inspect, text

    from engine.store.db import SCHEMA_VERSION

    with store.engine.begin() as c:  # make it look like a store written by schema v1
        c.execute(text("DROP INDEX ix_deliveries_coalesce"))
        c.execute(text("ALTER TABLE deliveries DROP COLUMN coalesce_key"))
        c.execute(text("DELETE FROM schema_version WHERE version >= 2"))
    assert store.migrate() == SCHEMA_VERSION
    with store.engine.connect() as c:
        assert "coalesce_key" in {col["name"] for col in inspect(c).get_columns("deliveries")}
        assert c.execute(text("SELECT max(version) FROM schema_version")).scalar() == SCHEMA_VERSION


def test_gc_removes_only_unreferenced_old_files(store):
    import os
    import time

    from engine.store.gc import collect

    with store.engine.begin() as c:
        kept = store.put_blob(c, b"k" * 5000, "m1")
    rows = store.prepare_blobs([(b"o" * 5000, "m2")])  # written ahead, never committed (a crash)
    orphan = store.blob_path(rows[0]["id"])
    young = store.prepare_blobs([(b"y" * 5000, "m3")])[0]["id"]
    old = time.time() - 7200
    os.utime(orphan, (old, old))
    os.utime(store.blob_path(kept), (old, old))
    assert collect(store, older_than=3600, dry_run=True) == (1, orphan.stat().st_size)
    assert orphan.exists()
    assert collect(store, older_than=3600)[0] == 1
    assert not orphan.exists() and store.blob_path(kept).exists() and store.blob_path(young).exists()
    with store.engine.connect() as c:
        assert store.get_blob(c, kept, aad="m1") == b"k" * 5000
