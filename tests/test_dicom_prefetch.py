"""Prior-study prefetch and `medrelay dicom find|move`, against a second medrelay as the remote PACS.

The remote is a real medrelay DICOM listener (its own archive, filled with DCMTK storescu); ours
asks it with C-FIND and pulls with C-MOVE (the remote's sub-operations arrive at our listener) or
C-GET (on our association). Orders come over MLLP from a raw-socket client; our archive is read
back with DCMTK findscu.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import free_port
from dicom_peers import data_file, findscu, storescu
from mllp_peers import RawClient, msa
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from engine.store import schema

REMOTE = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  pacs:
    source:
      type: dicom
      port: 0
      ae_title: PACS2
      calling_aets: [LOCAL, TESTSCU]
      move_destinations: {{LOCAL: {{host: 127.0.0.1, port: {local}}}}}
    routes: [{{name: archive, to: {{type: store}}}}]
"""
LOCAL = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  dcm:
    source: {{type: dicom, port: {local}, ae_title: LOCAL, calling_aets: [PACS2, FINDSCU]}}
    routes: [{{name: archive, to: {{type: store}}}}]
  orders:
    source: {{type: mllp, port: 0}}
    routes:
      - name: prefetch
        to:
          type: dicom_prefetch
          calling_ae_title: LOCAL
          move_destination: LOCAL
          channel: dcm
          max_age_days: 7300
          sources: [{{ae_title: PACS2, host: 127.0.0.1, port: {remote}, retrieve: {retrieve}}}]
{extra}
        retry: {{max_attempts: 2, initial_delay: 0.1, max_delay: 0.2}}
"""


def study_files(tmp, name, *, pid, date, modality, n=1, study=None):
    study = study or generate_uid()
    series = generate_uid()
    out = []
    for i in range(n):
        ds = dcmread(data_file("CT_small.dcm"))
        ds.PatientID, ds.PatientName, ds.IssuerOfPatientID = pid, "Pre^Fetch", "HOSP"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.StudyDate, ds.Modality = study, series, date, modality
        ds.AccessionNumber = f"A{date}"
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        p = tmp / f"{name}-{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out.append(p)
    return study, out


def order(control_id: str, pid: str = "PF1", accession: str = "ACCNEW") -> bytes:
    segs = [f"MSH|^~\\&|RIS|HOSP|MEDRELAY|RAD|20260101120000||ORM^O01^ORM_O01|{control_id}|P|2.5.1",
            f"PID|1||{pid}^^^HOSP^MR||Pre^Fetch||19500101|F", "PV1|1|O",
            f"ORC|NW|PL-{control_id}|||SC",
            f"OBR|1|PL-{control_id}||CTCHEST^CT Chest^L|||||||||||||{accession}|||||||CT"]
    return ("\r".join(segs) + "\r").encode()


@pytest.fixture
def pacs(engine_factory, tmp_path):
    """The remote archive with four studies: PF1 2024 CT (2 instances), 2019 MR, 1990 CT; PF2 2023 CT."""
    local = free_port()
    remote = engine_factory(REMOTE.format(local=local), subdir="remote")
    studies = {}
    files = []
    for name, pid, date, mod, n in (("ct2024", "PF1", "20240105", "CT", 2), ("mr2019", "PF1", "20190310", "MR", 1),
                                    ("ct1990", "PF1", "19900101", "CT", 1), ("other", "PF2", "20230101", "CT", 1)):
        studies[name], got = study_files(tmp_path, name, pid=pid, date=date, modality=mod, n=n)
        files += got
    r = storescu(remote.address("pacs")[1], files, aec="PACS2")
    assert r.returncode == 0, r.stdout
    return remote, local, studies


def local_studies(port, tmp, name):
    out = tmp / name
    out.mkdir()
    proc, rsp = findscu(port, "STUDY", {"PatientID": "PF1", "StudyInstanceUID": "", "StudyDate": ""}, aet="FINDSCU",
                        aec="LOCAL", out_dir=out)
    assert proc.returncode == 0, proc.stdout
    return {str(r.StudyInstanceUID) for r in rsp}


def deliveries(eng, route):
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return [dict(r) for r in c.execute(select(d).where(d.c.route == route).order_by(d.c.id)).mappings()]


def finished(eng, route, n):
    return eng.wait_for(lambda: (lambda rows: rows if len(rows) >= n and all(
        r["state"] in ("done", "dead") for r in rows) else None)(deliveries(eng, route)), timeout=60)


@pytest.mark.dcmtk
def test_order_prefetches_priors_by_c_move_within_age_and_not_twice(engine_factory, pacs, tmp_path):
    remote, local_port, studies = pacs
    eng = engine_factory(LOCAL.format(local=local_port, remote=remote.address("pacs")[1], retrieve="move", extra=""))
    with RawClient(*eng.address("orders")) as c:
        assert msa(c.request(order("O1")))[1] == "AA"
    (row,) = finished(eng, "prefetch", 1)
    assert row["state"] == "done", row
    assert row["detail"].startswith("prefetch: 2 studies found, 2 pulled (3 instances)"), row["detail"]
    assert local_studies(local_port, tmp_path, "f1") == {studies["ct2024"], studies["mr2019"]}
    # another order for the same patient: the priors are archived already, nothing is pulled again
    with RawClient(*eng.address("orders")) as c:
        assert msa(c.request(order("O2")))[1] == "AA"
    rows = finished(eng, "prefetch", 2)
    assert "0 pulled" in rows[1]["detail"] and "archived 2" in rows[1]["detail"], rows[1]["detail"]
    a = schema.audit_events
    with eng.store.engine.connect() as conn:
        acts = [r.action for r in conn.execute(select(a.c.action).where(a.c.action.like("dicom.prefetch%")))]
    assert acts.count("dicom.prefetch.find") == 2 and acts.count("dicom.prefetch.move") == 2


@pytest.mark.dcmtk
def test_c_get_prefetch_with_modality_and_count_limits(engine_factory, pacs, tmp_path):
    remote, local_port, studies = pacs
    extra = "          max_studies: 1\n          modalities: [CT]"
    eng = engine_factory(LOCAL.format(local=local_port, remote=remote.address("pacs")[1], retrieve="get",
                                      extra=extra))
    with RawClient(*eng.address("orders")) as c:
        assert msa(c.request(order("G1")))[1] == "AA"
        # a status update is not a new order: no prefetch
        assert msa(c.request(order("G2").replace(b"ORC|NW|", b"ORC|SC|")))[1] == "AA"
    rows = finished(eng, "prefetch", 2)
    assert rows[0]["detail"].startswith("prefetch: 2 studies found, 1 pulled (2 instances)"), rows[0]["detail"]
    assert "modality 1" in rows[0]["detail"]
    assert rows[1]["detail"] == "prefetch: nothing to do (not a new order (ORC-1 NW))"
    # filed into the dcm channel like a C-STORE: indexed (findscu sees it) and routed by its routes
    assert local_studies(local_port, tmp_path, "g1") == {studies["ct2024"]}
    archived = eng.wait_for(lambda: len([d for d in deliveries(eng, "archive") if d["state"] == "done"]) == 2)
    assert archived


def test_unreachable_source_is_retried_then_dead_lettered(engine_factory):
    eng = engine_factory(LOCAL.format(local=0, remote=free_port(), retrieve="move", extra=""))
    with RawClient(*eng.address("orders")) as c:
        assert msa(c.request(order("U1")))[1] == "AA"
    (row,) = finished(eng, "prefetch", 1)
    assert row["state"] == "dead" and row["attempts"] == 2
    assert "cannot associate with PACS2" in (row["last_error"] or "")


def medrelay(eng, *args):
    return subprocess.run([sys.executable, "-m", "engine.cli", "dicom", *args, "-c", str(eng.config_path)],
                          capture_output=True, text=True, timeout=120, cwd=eng.data_dir)


@pytest.mark.dcmtk
def test_medrelay_dicom_find_and_move(engine_factory, pacs, tmp_path):
    remote, local_port, studies = pacs
    eng = engine_factory(LOCAL.format(local=local_port, remote=remote.address("pacs")[1], retrieve="move", extra=""))
    r = medrelay(eng, "find", "--remote", "PACS2", "--calling-aet", "LOCAL", "-k", "PatientID=PF1",
                 "-k", "StudyInstanceUID", "-k", "StudyDate")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and "3 matches" in r.stderr
    assert any(f"StudyInstanceUID={studies['ct1990']}" in ln and "StudyDate=19900101" in ln for ln in lines)
    r = medrelay(eng, "move", "--remote", "PACS2", "--calling-aet", "LOCAL", "--dest", "LOCAL",
                 "-k", f"StudyInstanceUID={studies['ct1990']}")
    assert r.returncode == 0 and "1 completed, 0 failed" in r.stdout, r.stdout + r.stderr
    assert local_studies(local_port, tmp_path, "m1") == {studies["ct1990"]}
    # an AE the remote does not know as a destination: a failure status, exit 1
    r = medrelay(eng, "move", "--remote", "PACS2", "--calling-aet", "LOCAL", "--dest", "NOWHERE",
                 "-k", f"StudyInstanceUID={studies['ct1990']}")
    assert r.returncode == 1, r.stdout + r.stderr
    # nobody listening: exit 4, one line
    r = medrelay(eng, "find", "--host", "127.0.0.1", "--port", str(free_port()), "--called-aet", "X",
                 "-k", "PatientID=PF1")
    assert r.returncode == 4 and "cannot associate" in r.stderr and "Traceback" not in r.stderr
    r = medrelay(eng, "find", "--remote", "PACS2", "-k", "NotAKeyword=1")
    assert r.returncode == 2 and "not a DICOM keyword" in r.stderr
    a = schema.audit_events
    with eng.store.engine.connect() as conn:
        acts = [(x.action, x.outcome) for x in conn.execute(select(a.c.action, a.c.outcome)
                                                            .where(a.c.action.like("dicom.scu%")))]
    assert ("dicom.scu.find", "success") in acts and ("dicom.scu.move", "success") in acts
    assert ("dicom.scu.find", "failure") in acts
