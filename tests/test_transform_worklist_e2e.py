"""End to end: an order over MLLP (real socket peer) -> hl7_to_worklist -> store -> MWL C-FIND matcher."""

from __future__ import annotations

import subprocess
from pathlib import Path

import hl7.client
import pytest
from conftest import need_tool
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence

from engine.store.dicom.worklist import find_worklist

GOLDEN = Path(__file__).resolve().parent.parent / "conformance" / "golden" / "hl7"

YAML = """
store: {url: "sqlite:///%(d)s/db.sqlite", blobs: "%(d)s/blobs"}
keys: {kek_file: "%(d)s/keys.json"}
channels:
  orders:
    source: {type: mllp, port: 0}
    routes:
      - name: mwl
        transforms: [{type: hl7_to_worklist, station_ae_titles: {CT: CT01, MR: MR01}}]
        to: {type: store}
"""


def query(aet: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = ""
    ds.AccessionNumber = ""
    ds.StudyInstanceUID = ""
    sps = Dataset()
    sps.ScheduledStationAETitle = aet
    sps.ScheduledProcedureStepStartDate = ""
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds


def test_orders_over_mllp_reach_the_worklist(engine_factory, tmp_path):
    eng = engine_factory(YAML % {"d": tmp_path})
    host, port = eng.address("orders")
    with hl7.client.MLLPClient(host, port) as c:
        for name in ("omi_o23_new_251", "omi_o23_update_two_orders_251"):
            msg = (GOLDEN / f"{name}.hl7").read_bytes().replace(b"\n", b"\r").strip()
            ack = c.send_message(msg)
            assert b"MSA|AA|" in ack

    def both():
        got = find_worklist(eng.store, query("")) if eng.store else []
        return got if len(got) == 2 else None

    items = eng.wait_for(both)
    by_acc = {str(i.AccessionNumber): i for i in items}
    assert set(by_acc) == {"ACC100", "ACC101"}
    ct = by_acc["ACC100"]
    assert ct.ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate == "20261123"  # the XO update
    assert ct.StudyInstanceUID == "1.2.826.0.1.3680043.8.498.100"
    assert str(find_worklist(eng.store, query("MR01"))[0].PatientName) == "Smith^Anna"


YAML_MWL = YAML + """
  modalities:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, allow_any_calling_aet: true}
    routes: []
"""


@pytest.mark.dcmtk
def test_findscu_modality_worklist_against_orders_received_over_mllp(engine_factory, tmp_path):
    findscu = need_tool("/usr/bin/findscu")
    eng = engine_factory(YAML_MWL % {"d": tmp_path})
    with hl7.client.MLLPClient(*eng.address("orders")) as c:
        for name in ("omi_o23_new_251", "omi_o23_update_two_orders_251"):
            assert b"MSA|AA|" in c.send_message((GOLDEN / f"{name}.hl7").read_bytes().replace(b"\n", b"\r").strip())
    eng.wait_for(lambda: len(find_worklist(eng.store, query(""))) == 2)
    out = tmp_path / "rsp"
    out.mkdir()
    _host, port = eng.address("modalities")
    proc = subprocess.run(
        [findscu, "-W", "-aet", "CT01", "-aec", "MEDRELAY", "-X", "-od", str(out),
         "-k", "PatientName=Sm*", "-k", "PatientID", "-k", "AccessionNumber", "-k", "StudyInstanceUID",
         "-k", "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=CT01",
         "-k", "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261122-20261130",
         "-k", "ScheduledProcedureStepSequence[0].Modality",
         "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rsp = [dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]
    assert len(rsp) == 1
    item = rsp[0]
    assert str(item.PatientName) == "Smith^Anna" and item.PatientID == "P123" and item.AccessionNumber == "ACC100"
    assert item.ScheduledProcedureStepSequence[0].Modality == "CT"
    assert "PatientBirthDate" not in item  # only requested keys come back
