"""`medrelay backup` / `backup --verify` / `restore`: a backup of a running engine, restored into an
empty location, answers C-FIND, FHIR search and `messages list` exactly like the original; a
damaged backup is found by --verify and refused by restore. SQLite and PostgreSQL."""

import json
import shutil
import time

import httpx
import pytest
from dicom_peers import findscu, free_port, storescu_any, tool, unique_files
from mllp_peers import RawClient, adt, msa

TOKEN = "backup-test-token-0123456789"


def _yaml(url: str, mllp: int, dcm: int, fhir: int) -> str:
    return f"""
store: {{url: "{url}", blobs: data/blobs, inline_max_bytes: 1024}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, host: 127.0.0.1, port: {mllp}}}
    routes: []
  ct:
    source: {{type: dicom, port: {dcm}, ae_title: MEDRELAY, calling_aets: [TESTSCU]}}
    routes: [{{name: archive, to: {{type: store}}}}]
  fhir:
    source: {{type: fhir, host: 127.0.0.1, port: {fhir}, auth: {{bearer_tokens: ["${{BACKUP_TOKEN}}"]}}}}
    routes: []
"""


def _answers(dcm: int, fhir: int, proc, tmp) -> dict:
    _, studies = findscu(dcm, "STUDY", {"PatientName": "*", "StudyInstanceUID": "", "PatientID": ""},
                         out_dir=tmp / f"find{time.monotonic_ns()}")
    bundle = httpx.get(f"http://127.0.0.1:{fhir}/fhir/Patient?family=Backup",
                       headers={"Authorization": f"Bearer {TOKEN}"}).json()
    listing = proc.cli("messages", "list", "-c", str(proc.config_path), "--json", "--limit", "100")
    assert listing.returncode == 0, listing.stderr
    return {"cfind": sorted((str(d.PatientName), d.StudyInstanceUID) for d in studies),
            "fhir": sorted(e["resource"]["id"] for e in bundle.get("entry", [])),
            "messages": sorted(json.loads(line)["id"] for line in listing.stdout.splitlines() if line.strip())}


def _feed(mllp: int, dcm: int, fhir: int, tmp) -> None:
    c = RawClient("127.0.0.1", mllp)
    for i in range(3):
        c.send(adt(f"BK{i}"))
        assert msa(c.recv_frame())[1] == "AA"
    files = unique_files(tmp / f"dcm{mllp}", ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "rtplan.dcm"))
    assert storescu_any(dcm, files) == ["Success"] * len(files)
    for given in ("Ann", "Bob"):
        resp = httpx.post(f"http://127.0.0.1:{fhir}/fhir/Patient", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"resourceType": "Patient", "name": [{"family": "Backup", "given": [given]}]})
        assert resp.status_code == 201, resp.text


@pytest.mark.dcmtk
def test_backup_of_a_running_engine_restores_to_the_same_answers(medrelay_proc, store_url, tmp_path):
    tool("findscu")
    sqlite = store_url.startswith("sqlite")
    url = "sqlite:///data/medrelay.db" if sqlite else store_url
    mllp, dcm, fhir = free_port(), free_port(), free_port()
    a = medrelay_proc(_yaml(url, mllp, dcm, fhir), env={"BACKUP_TOKEN": TOKEN})
    a.start()
    for p in (mllp, dcm, fhir):
        a.wait_port(p)
    _feed(mllp, dcm, fhir, tmp_path)
    before = _answers(dcm, fhir, a, tmp_path)
    assert len(before["cfind"]) >= 1 and len(before["fhir"]) == 2 and len(before["messages"]) >= 6

    dest = tmp_path / "backup"
    r = a.cli("backup", "-c", str(a.config_path), str(dest))  # while the engine runs
    assert r.returncode == 0, r.stderr
    assert "key file is not in it" in r.stdout
    assert not list(dest.rglob("keys.json"))
    manifest = json.loads((dest / "manifest.json").read_text())
    assert manifest["blobs"] and manifest["kek_ids"]
    r = a.cli("backup", "--verify", str(dest), "--kek-file", str(a.data_dir / "data/keys.json"))
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr
    assert a.terminate() == 0

    # an empty location: a new folder with the key file copied from its own backup
    b = medrelay_proc(_yaml(url, mllp, dcm, fhir), env={"BACKUP_TOKEN": TOKEN})
    r = b.cli("restore", "-c", str(b.config_path), str(dest))
    assert r.returncode == 4 and "key file" in r.stderr  # no key file yet: refused, nothing changed
    (b.data_dir / "data").mkdir()
    shutil.copy(a.data_dir / "data/keys.json", b.data_dir / "data/keys.json")
    if not sqlite:  # the same database, emptied
        from conftest import _reset_pg
        _reset_pg(store_url)
    r = b.cli("restore", "-c", str(b.config_path), str(dest))
    assert r.returncode == 0, r.stderr
    r = b.cli("restore", "-c", str(b.config_path), str(dest))
    assert r.returncode == 4 and "empty" in r.stderr  # never over a store that has data
    b.start()
    for p in (mllp, dcm, fhir):
        b.wait_port(p)
    after = _answers(dcm, fhir, b, tmp_path)
    assert after["cfind"] == before["cfind"] and after["fhir"] == before["fhir"]
    assert set(before["messages"]) <= set(after["messages"])  # plus none: restore stores no message
    assert after["messages"] == before["messages"]


def test_a_damaged_backup_is_found_and_refused(tmp_path, sqlite_store):
    from engine.ops.backup import BackupError, backup, restore, verify
    from engine.security.crypto import KeyRing
    from engine.store.db import Store

    with sqlite_store.engine.begin() as c:
        ids = [sqlite_store.put_blob(c, bytes([i]) * 300_000, f"m{i}") for i in range(3)]
    dest = tmp_path / "bk"
    assert backup(sqlite_store, dest).blobs == 3
    assert verify(dest) == []
    victim = dest / "blobs" / ids[1][:2] / ids[1]
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    (dest / "blobs" / ids[2][:2] / ids[2]).unlink()
    problems = verify(dest)
    assert any(ids[1] in p and "SHA-256" in p for p in problems)
    assert any(ids[2] in p and "missing" in p for p in problems)
    assert "lacks key ids" in " ".join(verify(dest, keyring=KeyRing(tmp_path / "other-keys.json")))
    target = Store(f"sqlite:///{tmp_path}/r/db.sqlite", tmp_path / "r/blobs", sqlite_store.keyring)
    with pytest.raises(BackupError, match="damaged, nothing restored"):
        restore(dest, target)
    assert not (tmp_path / "r/db.sqlite").exists() or (tmp_path / "r/db.sqlite").stat().st_size == 0
    with pytest.raises(BackupError, match="not empty"):
        backup(sqlite_store, dest)
