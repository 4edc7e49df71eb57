"""Blobs on an S3-compatible object store (``store.blobs: s3://bucket/prefix``), against a real
S3 HTTP server started here on 127.0.0.1: moto's server mode (PyPI ``moto[server]``; no MinIO
or SeaweedFS is in the package registries). The engine receives DICOM (DCMTK storescu) and
HL7 large enough to be blob files, gives them back byte-identical (C-GET, the store's read),
leaves no referenced-but-missing object after kill -9 under load, `store gc` removes
unreferenced objects, and backup/restore round-trips the objects."""

from __future__ import annotations

import threading
import time

import pytest
from dicom_peers import data_file, dataset_bytes, free_port, run, storescu_any, tool, unique_files
from mllp_peers import RawClient, adt, msa
from pydicom import dcmread

BUCKET = "medrelay-blobs"
CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
         "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 with one empty bucket; yields its endpoint URL."""
    pytest.importorskip("obstore")
    server_mod = pytest.importorskip("moto.server")
    import boto3

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id=CREDS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDS["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def _objects(client, prefix: str = "") -> dict[str, int]:
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"].rsplit("/", 1)[-1]] = o["Size"]
    return out


def _files(endpoint: str, prefix: str = "site1"):
    from engine.store.blobfiles import ObjectStore, S3Settings

    return ObjectStore(f"s3://{BUCKET}/{prefix}", S3Settings(endpoint, "us-east-1", CREDS["AWS_ACCESS_KEY_ID"],
                                                            CREDS["AWS_SECRET_ACCESS_KEY"], allow_http=True))


def _s3_yaml(endpoint: str, mllp: int, dcm: int, extra_store: str = "") -> str:
    return f"""
store:
  url: "sqlite:///data/medrelay.db"
  blobs: s3://{BUCKET}/site1
  inline_max_bytes: 1024
  s3: {{endpoint: "{endpoint}", region: us-east-1, access_key_id: "${{S3_KEY}}",
        secret_access_key: "${{S3_SECRET}}", allow_http: true}}
{extra_store}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, host: 127.0.0.1, port: {mllp}}}
    routes: []
  ct:
    source: {{type: dicom, port: {dcm}, ae_title: MEDRELAY, calling_aets: [TESTSCU, GETSCU]}}
    routes: [{{name: archive, to: {{type: store}}}}]
"""


def _env() -> dict[str, str]:
    return {"S3_KEY": CREDS["AWS_ACCESS_KEY_ID"], "S3_SECRET": CREDS["AWS_SECRET_ACCESS_KEY"]}


def _big_adt(i: int, size: int = 40_000) -> bytes:
    return adt(f"S3MSG{i:05d}", extra="NTE|1||" + f"x{i:05d}" * (size // 6))


def _referenced_missing(store, files) -> list[str]:
    from sqlalchemy import select

    from engine.store import schema

    with store.engine.connect() as c:
        ids = list(c.execute(select(schema.blobs.c.id).where(schema.blobs.c.in_file == 1)).scalars())
    return [i for i in ids if not files.exists(i)]


def test_object_store_blob_files_and_store_round_trip(s3, tmp_path):
    """The BlobFiles contract on S3: durable write, read, range, delete, iterate; the store seals into it."""
    from engine.security.crypto import IntegrityError, KeyRing
    from engine.store import gc
    from engine.store.db import Store

    endpoint, client = s3
    files = _files(endpoint)
    assert files.is_empty()
    store = Store(f"sqlite:///{tmp_path}/db.sqlite", files, KeyRing(tmp_path / "keys.json"), inline_max=1024)
    store.migrate()
    payloads = [bytes([i]) * (5000 + i) for i in range(3)]
    with store.engine.begin() as c:
        ids = [store.put_blob(c, p, f"m{i}") for i, p in enumerate(payloads)]
        small = store.put_blob(c, b"tiny", "m9")
    objs = _objects(client, "site1/")
    assert set(objs) == set(ids) and small not in objs  # the small one is inline in the database
    assert all(k.startswith(f"site1/{k2[:2]}/") for k2 in ids for k in [f"site1/{k2[:2]}/{k2}"])
    with store.engine.connect() as c:
        for i, blob_id in enumerate(ids):
            assert store.get_blob(c, blob_id) == payloads[i]
    ct = files.read(ids[0])
    assert files.read_range(ids[0], 10, 20) == ct[10:30] and files.size(ids[0]) == len(ct)
    assert not files.exists("0" * 64) and not files.is_empty()
    # an object tampered with in the bucket fails the content check, never decrypts to something else
    client.put_object(Bucket=BUCKET, Key=f"site1/{ids[1][:2]}/{ids[1]}", Body=b"\0" * 5100)
    with store.engine.connect() as c, pytest.raises(IntegrityError):
        store.get_blob(c, ids[1])
    # an unreferenced object (a crash between the PUT and the commit): gc removes it, not the others
    orphan = "ab" + "c" * 62
    files.write([(orphan, b"orphan ciphertext")])
    assert gc.collect(store, older_than=3600.0) == (0, 0)  # too young: a commit could still be in flight
    n, size = gc.collect(store, older_than=0.0)
    assert (n, size) == (1, len(b"orphan ciphertext"))
    assert set(_objects(client, "site1/")) == set(ids)
    store.delete_blob_files([ids[2]])
    assert not files.exists(ids[2])
    store.dispose()


def test_backup_and_restore_with_s3_blobs(s3, tmp_path):
    from engine.ops.backup import BackupError, backup, restore, verify
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    endpoint, client = s3
    keys = KeyRing(tmp_path / "keys.json")
    store = Store(f"sqlite:///{tmp_path}/db.sqlite", _files(endpoint), keys, inline_max=1024)
    store.migrate()
    with store.engine.begin() as c:
        ids = [store.put_blob(c, bytes([i]) * 300_000, f"m{i}") for i in range(3)]
    dest = tmp_path / "bk"
    assert backup(store, dest).blobs == 3 and verify(dest, keyring=keys) == []
    assert sorted(p.name for p in (dest / "blobs").rglob("*") if p.is_file()) == sorted(ids)
    # restore into another prefix of the bucket (an empty location), then read every blob back
    target = Store(f"sqlite:///{tmp_path}/r/db.sqlite", _files(endpoint, "site2"), keys, inline_max=1024)
    restore(dest, target)
    target = Store(f"sqlite:///{tmp_path}/r/db.sqlite", _files(endpoint, "site2"), keys, inline_max=1024)
    target.migrate()
    assert set(_objects(client, "site2/")) == set(ids)
    with target.engine.connect() as c:
        assert [target.get_blob(c, i) for i in ids] == [bytes([i]) * 300_000 for i in range(3)]
    # never over a location that holds objects
    again = Store(f"sqlite:///{tmp_path}/r2/db.sqlite", _files(endpoint, "site2"), keys)
    with pytest.raises(BackupError, match="holds blob files"):
        restore(dest, again)
    for s in (store, target, again):
        s.dispose()


@pytest.mark.dcmtk
def test_engine_with_s3_blobs_receives_and_gives_back_dicom_and_hl7(s3, medrelay_proc, tmp_path):
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    tool("getscu")
    endpoint, client = s3
    mllp, dcm = free_port(), free_port()
    p = medrelay_proc(_s3_yaml(endpoint, mllp, dcm), env=_env())
    p.start()
    p.wait_port(mllp)
    p.wait_port(dcm)
    c = RawClient("127.0.0.1", mllp)
    sent = {}
    for i in range(3):
        msg = _big_adt(i)
        sent[f"S3MSG{i:05d}"] = msg
        c.send(msg)
        assert msa(c.recv_frame())[1] == "AA"
    c.close()
    files = unique_files(tmp_path / "in", ("CT_small.dcm", "MR_small.dcm"))
    assert storescu_any(dcm, files) == ["Success"] * len(files)
    assert not any((p.data_dir / "data").rglob("blobs"))  # nothing went to a local folder
    assert len(_objects(client, "site1/")) >= 5
    # C-GET (DCMTK getscu) gives the CT back byte-identical, read from the bucket
    ct = dcmread(files[0], stop_before_pixels=True)
    out = tmp_path / "got"
    out.mkdir()
    g = run("getscu", "-S", "-aet", "GETSCU", "-aec", "MEDRELAY", "+B", "-od", str(out),
            "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={ct.StudyInstanceUID}",
            "-k", f"SeriesInstanceUID={ct.SeriesInstanceUID}", "-k", f"SOPInstanceUID={ct.SOPInstanceUID}",
            "127.0.0.1", str(dcm))
    assert g.returncode == 0, g.stdout + g.stderr
    got = list(out.iterdir())
    assert len(got) == 1
    assert p.terminate() == 0
    # the HL7 payloads, read back through the store from the bucket, are the bytes sent
    store = Store(f"sqlite:///{p.data_dir}/data/medrelay.db", _files(endpoint), KeyRing(p.data_dir / "data/keys.json"))
    from sqlalchemy import select

    from engine.store import schema
    with store.engine.connect() as conn:
        rows = conn.execute(select(schema.messages.c.id, schema.messages.c.dedupe_key)
                            .where(schema.messages.c.channel == "adt")).all()
        assert len(rows) == 3
        back = sorted(store.message_payload(conn, r.id) for r in rows)
        assert back == sorted(sent.values())
        # and what C-GET sent is the data set the engine holds in the bucket, byte for byte
        from engine.store.dicom import index as idx

        row = idx.existing_instance(conn, str(ct.SOPInstanceUID))
        ref = idx.InstanceRef(str(ct.SOPInstanceUID), row["sop_class_uid"], row["transfer_syntax"],
                              row["message_id"], row["blob_id"])
        _, body = idx.split_part10(idx.load_instance(conn, store, ref))
    assert dataset_bytes(got[0]) == body
    assert _referenced_missing(store, _files(endpoint)) == []
    store.dispose()


def test_kill9_under_load_leaves_no_referenced_but_missing_object(s3, medrelay_proc, tmp_path):
    """Objects are PUT and answered before the commit that names them: kill -9 in the middle of
    a stream of large messages may leave unreferenced objects (gc's job), never a row without one."""
    from engine.security.crypto import KeyRing
    from engine.store import gc
    from engine.store.db import Store

    endpoint, client = s3
    mllp, dcm = free_port(), free_port()
    p = medrelay_proc(_s3_yaml(endpoint, mllp, dcm), env=_env())
    p.start()
    p.wait_port(mllp)
    acked: list[str] = []
    stop = threading.Event()

    def sender(k: int) -> None:
        try:
            c = RawClient("127.0.0.1", mllp)
            for i in range(k * 1000, k * 1000 + 400):
                if stop.is_set():
                    return
                c.send(_big_adt(i, 60_000))
                if msa(c.recv_frame())[1] == "AA":
                    acked.append(f"S3MSG{i:05d}")
        except Exception:
            return  # the engine was killed under us

    threads = [threading.Thread(target=sender, args=(k,), daemon=True) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(acked) < 20 and time.monotonic() < deadline:
        time.sleep(0.02)
    p.kill9()
    stop.set()
    for t in threads:
        t.join(10)
    assert len(acked) >= 20
    store = Store(f"sqlite:///{p.data_dir}/data/medrelay.db", _files(endpoint), KeyRing(p.data_dir / "data/keys.json"))
    store.migrate()
    from sqlalchemy import select

    from engine.store import schema
    with store.engine.connect() as conn:
        stored = {r.dedupe_key: r.id for r in conn.execute(select(schema.messages.c.id, schema.messages.c.dedupe_key))}
        assert _referenced_missing(store, _files(endpoint)) == []
        control_ids = {}
        for mid in stored.values():
            payload = store.message_payload(conn, mid)  # every committed row reads back from its object
            control_ids[payload.split(b"|")[9].decode()] = mid
    assert set(acked) <= set(control_ids)  # nothing acknowledged was lost
    n_objects = len(_objects(client, "site1/"))
    removed, _ = gc.collect(store, older_than=0.0)
    assert len(_objects(client, "site1/")) == n_objects - removed
    assert _referenced_missing(store, _files(endpoint)) == []
    store.dispose()


def test_config_names_the_bucket_and_keeps_secrets_out_of_the_yaml(tmp_path):
    from engine.config import load_settings
    from engine.store.blobfiles import LocalFolder, ObjectStore

    cfg = tmp_path / "channels.yaml"
    cfg.write_text(_s3_yaml("http://127.0.0.1:9", 0, 0))
    import os
    os.environ.update(_env())
    settings = load_settings(cfg)
    files = settings.blob_files()
    assert isinstance(files, ObjectStore) and files.describe == f"s3://{BUCKET}/site1"
    assert settings.store.s3 is not None and settings.store.s3.secret_access_key == CREDS["AWS_SECRET_ACCESS_KEY"]
    cfg.write_text(cfg.read_text().replace('"${S3_SECRET}"', "plain-literal"))
    with pytest.raises(Exception, match="secret"):
        load_settings(cfg)
    cfg.write_text("store: {url: 'sqlite:///data/m.db', blobs: data/blobs}\nkeys: {kek_file: data/k.json}\n"
                   "channels: {}\n")
    local = load_settings(cfg).blob_files()
    assert isinstance(local, LocalFolder) and local.root == tmp_path / "data/blobs"
    assert data_file("CT_small.dcm").exists()


def test_object_store_down_refuses_large_messages_and_recovers(monkeypatch, medrelay_proc, tmp_path):
    """The bucket unreachable: a message that needs a blob object is refused (AE or AR with ERR, never AA), one
    small enough for the database is still accepted, the engine keeps serving; once the service
    is back, large messages are accepted again. Uses its own server so it can stop and restart it."""
    pytest.importorskip("obstore")
    import boto3
    from moto.server import ThreadedMotoServer

    for k, v in CREDS.items():
        monkeypatch.setenv(k, v)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"

    def up() -> ThreadedMotoServer:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing-secret").create_bucket(Bucket=BUCKET)
        return server

    server = up()
    mllp, dcm = free_port(), free_port()
    p = medrelay_proc(_s3_yaml(endpoint, mllp, dcm), env=_env())
    p.start()
    p.wait_port(mllp)
    c = RawClient("127.0.0.1", mllp)
    c.send(_big_adt(1))
    assert msa(c.recv_frame())[1] == "AA"
    server.stop()
    t = time.monotonic()
    c.send(_big_adt(2))
    ack = c.recv_frame()
    assert msa(ack)[1] in ("AE", "AR") and time.monotonic() - t < 45  # refused in bounded time, not hung
    assert b"ERR|" in ack
    c.send(adt("SMALL0001"))  # inline in the database: no object needed
    assert msa(c.recv_frame())[1] == "AA"
    server = up()
    try:
        c.send(_big_adt(3))
        assert msa(c.recv_frame())[1] == "AA"
        c.close()
        assert p.terminate() == 0
    finally:
        server.stop()
    log = p.log_path.read_text()
    assert "testing-secret" not in log and "Traceback" not in log


def test_chunk_sealed_blob_on_s3_reads_by_range(s3, tmp_path, monkeypatch):
    """A chunk-sealed blob in the bucket opens whole and chunk by chunk (ranged GETs); a range
    running past the end gives what there is, one starting past it gives nothing, as a file does."""
    import os

    from engine.security.crypto import IntegrityError, KeyRing
    from engine.store.db import Store

    endpoint, client = s3
    monkeypatch.setattr("engine.store.db.STREAM_MIN", 10_000)
    monkeypatch.setattr("engine.store.db.STREAM_CHUNK", 4096)
    files = _files(endpoint)
    store = Store(f"sqlite:///{tmp_path}/db.sqlite", files, KeyRing(tmp_path / "keys.json"), inline_max=1024)
    store.migrate()
    data = os.urandom(30_000)
    with store.engine.begin() as c:
        blob_id = store.put_blob(c, data, "m-big")
    with store.engine.connect() as c:
        assert store.get_blob(c, blob_id) == data
        chunks = list(store.blob_chunks(c, blob_id))
        assert b"".join(chunks) == data and len(chunks) == 8
    size = files.size(blob_id)
    assert files.read_range(blob_id, size - 5, 100) == files.read(blob_id)[-5:]
    assert files.read_range(blob_id, size, 10) == b"" and files.read_range(blob_id, size + 7, 10) == b""
    with pytest.raises(FileNotFoundError):
        files.read_range("f" * 64, 0, 10)
    # one chunk in the middle of the object replaced: the chunked read stops there
    ct = bytearray(files.read(blob_id))
    ct[4112 * 3 + 1] ^= 1
    client.put_object(Bucket=BUCKET, Key=f"site1/{blob_id[:2]}/{blob_id}", Body=bytes(ct))
    with store.engine.connect() as c:
        it = store.blob_chunks(c, blob_id)
        assert b"".join(next(it) for _ in range(3)) == data[:3 * 4096]
        with pytest.raises(IntegrityError):
            next(it)
    store.dispose()
