"""The audit rows of DICOMweb reads, group-committed off the request path (engine/audit/trail.py).

``Audit.record_soon`` queues a row; a writer thread commits what is queued in one
transaction. Proved here on SQLite and PostgreSQL: concurrent rows share commits (fewer
transactions than rows), ``flush`` returns once all are in, ``close`` writes what is still
queued (clean shutdown loses nothing), rows queued after ``close`` or past ``max_pending``
are written at once by the caller. End to end: `medrelay run` answers QIDO-RS requests and
is stopped with SIGTERM right after the last answer; every request has its row.
"""

from __future__ import annotations

import threading

import httpx
from dicom_peers import free_port
from sqlalchemy import create_engine, event, func, select

from engine.audit.trail import Audit
from engine.store import schema

TOKEN = "dicomweb-audit-token-0123456789"


def count(store, action: str) -> int:
    a = schema.audit_events
    with store.engine.connect() as c:
        return c.execute(select(func.count()).where(a.c.action == action)).scalar_one()


def test_rows_share_commits_flush_and_close_write_everything(store):
    commits = []
    event.listen(store.engine, "commit", lambda conn: commits.append(1))
    audit = Audit(store)

    def burst(k: int) -> None:
        for n in range(50):
            audit.record_soon("dicomweb.query", actor=f"t{k}", peer="127.0.0.1:1", channel="web",
                              entity={"level": "STUDY", "matches": n})

    threads = [threading.Thread(target=burst, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert audit.flush(30)
    assert count(store, "dicomweb.query") == 400
    assert len(commits) < 400, "every row had a commit of its own"
    for n in range(30):  # queued, then closed at once: close() writes them
        audit.record_soon("dicomweb.retrieve", entity={"level": "IMAGE", "instances": 1, "n": n})
    audit.close()
    assert count(store, "dicomweb.retrieve") == 30
    audit.record_soon("login.failure", outcome="failure")  # after close: written by the caller
    assert count(store, "login.failure") == 1


def test_past_max_pending_the_caller_writes_its_own_row(store):
    audit = Audit(store, max_pending=0)  # the queue is always "full"
    audit.record_soon("dicomweb.query", entity={"level": "STUDY", "matches": 0})
    assert count(store, "dicomweb.query") == 1  # no flush needed: written before returning
    assert audit._thread is None  # no writer was started


def test_engine_stop_writes_the_rows_of_every_answered_read(medrelay_proc):
    port = free_port()
    proc = medrelay_proc(f"""
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  web:
    source: {{type: dicomweb, host: 127.0.0.1, port: {port}, base_path: /dicom-web,
             auth: {{bearer_tokens: ["${{DW_TOKEN}}"]}}}}
    routes: []
""", env={"DW_TOKEN": TOKEN})
    proc.start()
    proc.wait_port(port, 60)
    n = 300
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as c:
        for _ in range(n):
            assert c.get(f"http://127.0.0.1:{port}/dicom-web/studies").status_code == 204
    assert proc.terminate(60) == 0  # SIGTERM right after the last answer
    eng = create_engine(f"sqlite:///{proc.data_dir}/data/medrelay.db")
    a = schema.audit_events
    with eng.connect() as c:
        got = c.execute(select(func.count()).where(a.c.action == "dicomweb.query")).scalar_one()
        stop_at = c.execute(select(a.c.at).where(a.c.action == "engine.stop")).scalar_one()
        last_read = c.execute(select(func.max(a.c.at)).where(a.c.action == "dicomweb.query")).scalar_one()
    eng.dispose()
    assert got == n
    assert last_read <= stop_at  # written before the engine said it stopped
