"""The store is private to the engine's account (probe 5b finding 10): `medrelay run` in a
subprocess under the usual umask 022, a real MLLP client, and os.stat of what it made.

Before, data/medrelay.db (and so its -wal and -shm, which SQLite makes with the database's
mode) was 0644 and data/blobs 0755: the identifier index and metadata readable by any
account on the host. Now the database files are 0600 and the blob folders 0700 (their files
were 0600 already); an older install's looser modes are tightened at start, with one warning
per path, once.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from conftest import free_port
from mllp_peers import RawClient, adt, msa

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: {port}, max_frame_bytes: 4194304}}
"""


def mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def start(proc, port: int) -> None:
    old = os.umask(0o022)  # the usual umask, whatever the test runner's is; the child inherits it
    try:
        proc.start()
    finally:
        os.umask(old)
    proc.wait_port(port)


def send(port: int, control_id: str, size: int = 0) -> None:
    """An ADT; with ``size`` an OBX that makes it larger than the database keeps inline (a blob file)."""
    extra = "OBX|1|ED|PDF^Report||" + "A" * size if size else ""
    with RawClient("127.0.0.1", port) as c:
        ack = c.request(adt(control_id, extra=extra))
    assert msa(ack)[1:3] == ["AA", control_id], ack


def store_paths(data: Path) -> dict[str, Path]:
    db = data / "medrelay.db"
    return {"db": db, "wal": Path(f"{db}-wal"), "shm": Path(f"{db}-shm"), "lock": Path(f"{db}.migrate.lock"),
            "owner lock": Path(f"{db}.lock")}


def test_a_new_store_is_private(medrelay_proc):
    port = free_port()
    proc = medrelay_proc(YAML.format(port=port))
    start(proc, port)
    send(port, "PERM1")
    send(port, "PERM2", size=600 * 1024)
    data = proc.data_dir / "data"
    files = store_paths(data)
    for name, p in files.items():
        assert p.exists(), name  # the engine is running: SQLite's -wal and -shm are there
        assert mode(p) == 0o600, (name, oct(mode(p)))
    blobs = data / "blobs"
    assert mode(blobs) == 0o700, oct(mode(blobs))
    fanout = [d for d in blobs.iterdir() if d.is_dir()]
    assert len(fanout) == 256 and {mode(d) for d in fanout} == {0o700}
    blob_files = [f for d in fanout for f in d.iterdir()]
    assert blob_files and {mode(f) for f in blob_files} == {0o600}
    assert mode(data / "keys.json") == 0o600
    assert mode(data) == 0o755  # the operator's folder (it may hold an outbox others read): left as made
    assert proc.terminate() == 0
    assert "store.permissions_tightened" not in proc.log_path.read_text()


def test_an_older_install_is_tightened_at_start_once(medrelay_proc):
    port = free_port()
    proc = medrelay_proc(YAML.format(port=port))
    start(proc, port)
    send(port, "OLD1", size=600 * 1024)
    proc.kill9()  # as a crash leaves it: -wal and -shm stay behind
    data = proc.data_dir / "data"
    files = store_paths(data)
    blobs = data / "blobs"
    opened = [*files.values(), blobs, blobs / "00", blobs / "ff"]
    for p in opened:
        assert p.exists(), p
        os.chmod(p, 0o755 if p.is_dir() else 0o644)  # what an engine before this change made
    before = len(proc.log_path.read_text().splitlines())
    start(proc, port)
    for name, p in files.items():
        assert mode(p) == 0o600, (name, oct(mode(p)))
    assert {mode(p) for p in (blobs, blobs / "00", blobs / "ff")} == {0o700}
    send(port, "OLD2")  # the store still works, and what was acknowledged before the crash is there
    assert proc.terminate() == 0
    events = [json.loads(ln) for ln in proc.log_path.read_text().splitlines()[before:] if ln.startswith("{")]
    tightened = [e for e in events if e["event"] == "store.permissions_tightened"]
    assert sorted(e["path"] for e in tightened) == sorted(map(str, opened)), tightened  # one warning per path
    assert {(e["was"], e["now"]) for e in tightened} == {("0o644", "0o600"), ("0o755", "0o700")}
    # the next start finds nothing to tighten: the warning is not repeated
    before = len(proc.log_path.read_text().splitlines())
    start(proc, port)
    assert proc.terminate() == 0
    assert "store.permissions_tightened" not in "\n".join(proc.log_path.read_text().splitlines()[before:])


def test_a_backup_is_as_private_as_the_store(medrelay_proc, tmp_path):
    """`medrelay backup` copies the database and blob files: made 0600 in 0700 folders (were 0644
    and 0755); the backup folder it makes is 0700 too (dd25e09, as docs/deployment.md says)."""
    port = free_port()
    proc = medrelay_proc(YAML.format(port=port))
    start(proc, port)
    send(port, "BAK1", size=600 * 1024)
    dest = tmp_path / "backup-1"
    old = os.umask(0o022)
    try:
        r = proc.cli("backup", "-c", str(proc.config_path), str(dest))
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stdout + r.stderr
    assert mode(dest / "medrelay.db") == 0o600
    folders = [dest / "blobs", *(d for d in (dest / "blobs").iterdir())]
    files = [f for d in folders[1:] for f in d.iterdir()]
    assert files and {mode(d) for d in folders} == {0o700} and {mode(f) for f in files} == {0o600}
    assert mode(dest) == 0o700
    assert proc.cli("backup", "--verify", str(dest)).returncode == 0
    assert proc.terminate() == 0
