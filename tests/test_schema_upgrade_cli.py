"""Which commands upgrade the schema under a running engine (probe session 8b finding 2).

Before: a read-only offline command of a newer install (`medrelay messages list`) migrated a
SQLite store under the running older engine, whose next SIGHUP then failed with SchemaTooNew
(and its fallback to the previous config with it). Now an offline command refuses (exit 4)
when the store is older than it and an engine runs on it, and migrates when none does; a
running engine's SIGHUP reload goes on beside a schema a newer medrelay migrated. Real
`medrelay run` subprocess, real MLLP client, the CLI as a subprocess; the "older engine" is
the running engine with its store's newest schema row taken away (or a newer one added).
"""

from __future__ import annotations

import signal
import sqlite3
import time

from conftest import free_port
from mllp_peers import RawClient, adt, msa

from engine.store.db import SCHEMA_VERSION

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: {port}}}
"""


def versions(proc) -> list[int]:
    with sqlite3.connect(proc.data_dir / "data" / "medrelay.db") as c:
        return sorted(v for (v,) in c.execute("SELECT version FROM schema_version"))


def set_newest(proc, version: int) -> None:
    """Make the store look migrated up to ``version`` only (or to a newer one)."""
    with sqlite3.connect(proc.data_dir / "data" / "medrelay.db", timeout=30) as c:
        c.execute("DELETE FROM schema_version WHERE version > ?", (version,))
        if version > SCHEMA_VERSION:
            c.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 0)", (version,))


def started(medrelay_proc):
    port = free_port()
    proc = medrelay_proc(YAML.format(port=port))
    proc.start()
    proc.wait_port(port)
    return proc, port


def send(port: int, control_id: str) -> None:
    with RawClient("127.0.0.1", port) as c:
        ack = c.request(adt(control_id))
    assert msa(ack)[1:3] == ["AA", control_id], ack


def test_an_offline_command_does_not_upgrade_a_store_an_older_engine_runs_on(medrelay_proc):
    proc, port = started(medrelay_proc)
    send(port, "UP1")
    set_newest(proc, SCHEMA_VERSION - 1)  # as the previous release left it
    r = proc.cli("messages", "list", "-c", "channels.yaml")
    assert r.returncode == 4, r.stdout + r.stderr
    assert f"schema is version {SCHEMA_VERSION - 1} and an engine runs on it" in r.stderr, r.stderr
    assert "Restart the engine with this medrelay first" in r.stderr
    assert "Traceback" not in r.stderr
    assert versions(proc)[-1] == SCHEMA_VERSION - 1  # not migrated under the engine
    send(port, "UP2")  # the engine goes on
    assert proc.terminate() == 0
    r = proc.cli("messages", "list", "-c", "channels.yaml")  # no engine now: the command upgrades it
    assert r.returncode == 0, r.stdout + r.stderr
    assert "UP1" in r.stdout or len(r.stdout.splitlines()) >= 2, r.stdout
    assert versions(proc)[-1] == SCHEMA_VERSION


def test_a_running_engine_reloads_beside_a_schema_a_newer_medrelay_migrated(medrelay_proc):
    proc, port = started(medrelay_proc)
    send(port, "HUP1")
    set_newest(proc, SCHEMA_VERSION + 1)  # a newer engine (rolling upgrade) migrated the store
    lines = len(proc.log_path.read_text().splitlines())
    proc.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "engine.started" not in "".join(
            proc.log_path.read_text().splitlines(True)[lines:]):
        assert proc.proc.poll() is None, proc.log_path.read_text()[-3000:]
        time.sleep(0.1)
    after = "".join(proc.log_path.read_text().splitlines(True)[lines:])
    assert "config.reload_failed" not in after, after[-3000:]
    assert "store.schema_newer" in after, after[-3000:]
    proc.wait_port(port)
    send(port, "HUP2")
    assert proc.terminate() == 0
    # a start (not a reload) of this code on that store is still refused
    proc.start()
    assert proc.proc.wait(30) != 0
    assert "newer than this medrelay understands" in proc.log_path.read_text()
