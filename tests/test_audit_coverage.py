"""Every kind of event the audit trail must hold, produced by real peers and commands:
receive, send, query, retrieve, export, FHIR read/search, de-identification, key
operations, login failure, config change.

Each event is produced the way production produces it (MLLP, DCMTK, HTTP, the CLI,
SIGHUP), so a component that stops recording its event fails here by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from sqlalchemy import select

from engine.audit.ps3_15 import QUERY, classify
from engine.store import schema

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "audit-coverage-token-9f1"


def actions(store) -> list[tuple[str, str, str | None]]:
    a = schema.audit_events
    with store.engine.connect() as c:
        return [(r.action, r.outcome, r.message_id) for r in c.execute(select(a).order_by(a.c.id))]


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDRELAY_PLUGINS": "engine_fakes", "FHIR_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


MLLP_YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  adt:
    source: {type: mllp, port: 0}
    routes:
      - name: out
        to: {type: test_collect, name: coverage}
"""


def send_one_adt(engine_factory, yaml: str, outbox: str, control_id: str):
    """An engine on ``yaml`` that has accepted one ADT^A01 (AA) on channel ``adt``."""
    import engine_fakes
    from mllp_peers import RawClient, adt, msa

    engine_fakes.OUTBOX.pop(outbox, None)
    e = engine_factory(yaml)
    with RawClient("127.0.0.1", e.address("adt")[1]) as c:
        assert msa(c.request(adt(control_id)))[1] == "AA"
    return e


def test_receive_send_export_and_keys(engine_factory):
    e = send_one_adt(engine_factory, MLLP_YAML, "coverage", "COV0001")
    e.wait_for(lambda: any(a == "message.send" for a, _, _ in actions(e.store)))
    got = actions(e.store)
    mid = next(m for a, _, m in got if a == "message.receive")
    assert ("message.send", "success", mid) in got
    r = cli("messages", "show", "-c", str(e.config_path), mid, cwd=e.data_dir)
    assert r.returncode == 0 and "COV0001" in r.stdout and "DOE^JOHN" not in r.stdout  # headers, no PHI
    r = cli("messages", "show", "-c", str(e.config_path), mid, "--phi", cwd=e.data_dir)
    assert r.returncode == 0 and "DOE^JOHN" in r.stdout, r.stderr
    r = cli("keys", "rotate", "-c", str(e.config_path), cwd=e.data_dir)
    assert r.returncode == 0, r.stderr
    got = actions(e.store)
    assert ("message.export", "success", mid) in got
    assert any(a == "keys.rotate" for a, _, _ in got)


def test_config_change_on_reload(medrelay_proc):
    import time

    from conftest import free_port

    port = free_port()
    p = medrelay_proc(MLLP_YAML.replace("port: 0", f"port: {port}"),
                      env={"MEDRELAY_PLUGINS": "engine_fakes",
                           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])})
    p.start()
    p.wait_port(port)
    p.config_path.write_text(p.config_path.read_text().replace("name: coverage", "name: coverage2"))
    p.proc.send_signal(signal.SIGHUP)
    from engine.config import load_settings
    from engine.runtime import open_store

    deadline = time.monotonic() + 30
    store = open_store(load_settings(p.config_path, env=p.env))
    try:
        while time.monotonic() < deadline:
            if any(a == "config.change" for a, _, _ in actions(store)):
                break
            time.sleep(0.1)
        assert any(a == "config.change" for a, _, _ in actions(store))
    finally:
        store.dispose()
    assert p.terminate() == 0


FHIR_YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  api:
    source: {type: fhir, port: 0, auth: {bearer_tokens: ["${FHIR_TOKEN}"]}}
"""


def test_fhir_read_search_and_login_failure(engine_factory):
    e = engine_factory(FHIR_YAML, env={"FHIR_TOKEN": TOKEN})
    base = f"http://127.0.0.1:{e.address('api')[1]}/fhir"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = httpx.post(f"{base}/Patient", json={"resourceType": "Patient", "gender": "other"}, headers=auth)
    assert r.status_code == 201
    pid = r.json()["id"] if r.content else r.headers["location"].split("/Patient/")[1].split("/")[0]
    assert httpx.get(f"{base}/Patient/{pid}", headers=auth).status_code == 200
    assert httpx.get(f"{base}/Patient?gender=other", headers=auth).status_code == 200
    assert httpx.get(f"{base}/Patient", headers={"Authorization": "Bearer wrong"}).status_code == 401
    got = {(a, o) for a, o, _ in actions(e.store)}
    assert {("message.receive", "success"), ("fhir.read", "success"), ("fhir.search", "success"),
            ("login.failure", "failure")} <= got
    assert classify("fhir.search").event_id == QUERY
    # the trail is readable as FHIR AuditEvent (the FHIR helper's read-only view)
    ae = httpx.get(f"{base}/AuditEvent?subtype=login.failure", headers=auth)
    assert ae.status_code == 200 and ae.json().get("entry"), ae.text


DICOM_YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  dcm:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [TESTSCU]}
"""


def test_dicom_query_and_retrieve_are_audited(engine_factory, tmp_path):
    from tests.dicom_peers import data_file, findscu, store_statuses, storescu

    e = engine_factory(DICOM_YAML)
    port = e.address("dcm")[1]
    r = storescu(port, [data_file("CT_small.dcm")])
    assert store_statuses((r.stdout or "") + (r.stderr or "")) == ["Success"]
    assert any(a == "message.receive" for a, _, _ in actions(e.store))
    findscu(port, "STUDY", {"StudyInstanceUID": ""}, out_dir=tmp_path / "rsp")
    got = [a for a, _, _ in actions(e.store)]
    assert any(classify(a).event_id == QUERY for a in got), got


DEID_YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  adt:
    source: {type: mllp, port: 0}
    routes:
      - name: research
        transforms: [{type: deidentify}]
        to: {type: test_collect, name: deidcov}
"""


def test_deidentification_is_audited(engine_factory):
    import engine_fakes

    e = send_one_adt(engine_factory, DEID_YAML, "deidcov", "DEID001")
    e.wait_for(lambda: engine_fakes.OUTBOX.get("deidcov"))
    # the audit row is its own write, not part of the delivery: wait for it, not for the delivery
    e.wait_for(lambda: any("deid" in a for a, _, _ in actions(e.store)))
