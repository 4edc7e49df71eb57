"""`code_tables` on dicom_to_hl7 (coded HL7 fields of the ORU/ORM/OMI) and hl7_to_worklist (code sequences
of the MWL item), through the mapping engine's lookups (transforms/converter_tables.py), the same tables
hl7_to_fhir uses; checked by `medrelay check`, and end to end: order over MLLP -> worklist -> findscu."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import hl7.client
import pytest
from conftest import need_tool
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydicom import Dataset, dcmread
from pydicom.sequence import Sequence

from engine.envelope import Envelope
from engine.mapping.tables import Table
from transforms.dicom_to_hl7 import DicomToHl7Config
from transforms.dicom_to_hl7 import build as dicom_to_hl7
from transforms.hl7_to_worklist import Hl7ToWorklistConfig
from transforms.hl7_to_worklist import build as hl7_to_worklist

GOLDEN = Path(__file__).resolve().parent.parent / "conformance" / "golden" / "hl7"
PROCEDURES = Table("procedures", ("code", "target_code", "target_display", "target_system"), {
    "CTHEAD": {"code": "CTHEAD", "target_code": "RPID22", "target_display": "CT Head wo contrast",
               "target_system": "RADLEX"},
    "CTABD": {"code": "CTABD", "target_code": "RPID144", "target_display": "CT Abdomen Pelvis",
              "target_system": "RADLEX"}})
CODE_ONLY = Table("code-only", ("code", "target_code"), {"CTHEAD": {"code": "CTHEAD", "target_code": "RPID22"}})


class Ctx:
    class settings:
        tables = {"procedures": PROCEDURES, "code-only": CODE_ONLY}


def study(code: str) -> bytes:
    import io

    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "DOE^JANE", "123", "19700215", "F"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = "1.2.3", "1.2.3.4", "1.2.3.4.5"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.AccessionNumber, ds.Modality, ds.StudyDate, ds.StudyTime = "ACC1", "CT", "20240301", "101500"
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "L", "Local " + code
    ds.RequestedProcedureCodeSequence = Sequence([item])
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def obr4(msg: bytes) -> str:
    return next(s for s in msg.decode().split("\r") if s.startswith("OBR|")).split("|")[4]


@pytest.mark.parametrize("message", ["ORU^R01", "ORM^O01", "OMI^O23"])
def test_dicom_to_hl7_replaces_local_procedure_codes_and_the_message_stays_valid(message):
    t = dicom_to_hl7(DicomToHl7Config(type="dicom_to_hl7", message=message, code_tables={"OBR-4": "procedures"}),
                     Ctx())
    out = t(Envelope(channel="c", kind="dicom", payload=study("CTHEAD"))).payload
    assert obr4(out) == "RPID22^CT Head wo contrast^RADLEX"
    parse_message(out.decode().replace("\r", "\n").strip().replace("\n", "\r"),
                  validation_level=VALIDATION_LEVEL.STRICT)  # still the standard's structure
    unknown = t(Envelope(channel="c", kind="dicom", payload=study("MRKNEE"))).payload
    assert obr4(unknown) == "MRKNEE^Local MRKNEE^L"  # not in the table: as converted
    plain = dicom_to_hl7(DicomToHl7Config(type="dicom_to_hl7", message=message), Ctx())
    assert obr4(plain(Envelope(channel="c", kind="dicom", payload=study("CTHEAD"))).payload) == \
        "CTHEAD^Local CTHEAD^L"


def test_a_table_with_only_target_code_changes_only_the_code():
    t = dicom_to_hl7(DicomToHl7Config(type="dicom_to_hl7", code_tables={"OBR-4": "code-only"}), Ctx())
    assert obr4(t(Envelope(channel="c", kind="dicom", payload=study("CTHEAD"))).payload) == "RPID22^Local CTHEAD^L"


def mwl_items(cfg: Hl7ToWorklistConfig) -> list[Dataset]:
    import io

    msg = (GOLDEN / "omi_o23_new_251.hl7").read_bytes().replace(b"\n", b"\r").strip()
    out = hl7_to_worklist(cfg, Ctx())(Envelope(channel="c", kind="hl7v2", payload=msg))
    return [dcmread(io.BytesIO(e.payload), force=True) for e in (out if isinstance(out, list) else [out])]


def test_hl7_to_worklist_puts_the_standard_code_in_the_requested_procedure_code_sequence():
    plain = mwl_items(Hl7ToWorklistConfig(type="hl7_to_worklist"))[0].RequestedProcedureCodeSequence[0]
    assert (plain.CodeValue, plain.CodingSchemeDesignator) == ("CTABD", "L")
    item = mwl_items(Hl7ToWorklistConfig(type="hl7_to_worklist",
                                         code_tables={"RequestedProcedureCodeSequence": "procedures"}))[0]
    code = item.RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodeMeaning, code.CodingSchemeDesignator) == (
        "RPID144", "CT Abdomen Pelvis", "RADLEX")
    assert item.RequestedProcedureDescription == "CT Abdomen & Pelvis"  # the order's own text is kept


def test_check_reports_bad_code_table_keys_and_unknown_tables(tmp_path):
    (tmp_path / "channels.yaml").write_text(textwrap.dedent("""\
        store: {url: "sqlite:///data/m.db", blobs: data/blobs}
        keys: {kek_file: data/keys.json}
        tables:
          procedures: {values: {CTHEAD: RPID22}}
        channels:
          orders:
            source: {type: mllp, host: 127.0.0.1, port: 0}
            routes:
              - name: mwl
                transforms:
                  - type: hl7_to_worklist
                    code_tables: {RequestedProcedureCodeSequence: procs, PatientName: procedures}
                to: {type: store}
          images:
            source: {type: dicom, host: 127.0.0.1, port: 0, ae_title: MEDRELAY, allow_any_calling_aet: true}
            routes:
              - name: ris
                transforms:
                  - type: dicom_to_hl7
                    code_tables: {OBR-4.1: procedures, OBX-99: procedures}
                to: {type: file, path: out}
        """))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "check", str(tmp_path / "channels.yaml")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    err = r.stdout + r.stderr
    assert "channels.yaml:12: channels.orders.routes[0].transforms[0].code_tables.PatientName: " \
           "PatientName: name a code sequence" in err, err
    assert "code_tables.OBR-4.1: OBR-4.1: name a coded field" in err
    assert "code_tables.OBX-99: OBX-99: OBX has 30 fields" in err
    r2 = (tmp_path / "channels.yaml").read_text().replace(", PatientName: procedures", "")
    (tmp_path / "channels.yaml").write_text(r2.replace("OBR-4.1: procedures, OBX-99: procedures", "OBR-4: procedures"))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "check", str(tmp_path / "channels.yaml")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    err = r.stdout + r.stderr
    assert r.returncode != 0 and "code_tables.RequestedProcedureCodeSequence: no table 'procs'" in err, err


YAML_MWL = """
store: {url: "sqlite:///%(d)s/db.sqlite", blobs: "%(d)s/blobs"}
keys: {kek_file: "%(d)s/keys.json"}
tables:
  procedures: {file: "%(d)s/procedures.csv"}
channels:
  orders:
    source: {type: mllp, port: 0}
    routes:
      - name: mwl
        transforms: [{type: hl7_to_worklist, code_tables: {RequestedProcedureCodeSequence: procedures}}]
        to: {type: store}
  modalities:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, allow_any_calling_aet: true}
    routes: []
"""


@pytest.mark.dcmtk
def test_findscu_gets_the_standard_procedure_code_from_an_order_with_a_local_one(engine_factory, tmp_path):
    findscu = need_tool("/usr/bin/findscu")
    (tmp_path / "procedures.csv").write_text("code,target_code,target_display,target_system\n"
                                             "CTABD,RPID144,CT Abdomen Pelvis,RADLEX\n")
    eng = engine_factory(YAML_MWL % {"d": tmp_path})
    with hl7.client.MLLPClient(*eng.address("orders")) as c:
        ack = c.send_message((GOLDEN / "omi_o23_new_251.hl7").read_bytes().replace(b"\n", b"\r").strip())
        assert b"MSA|AA|" in ack
    from engine.store.dicom.worklist import find_worklist

    q = Dataset()
    q.AccessionNumber = ""
    eng.wait_for(lambda: find_worklist(eng.store, q) or None)
    out = tmp_path / "rsp"
    out.mkdir()
    proc = subprocess.run(
        [findscu, "-W", "-aet", "CT01", "-aec", "MEDRELAY", "-X", "-od", str(out),
         "-k", "AccessionNumber=ACC100", "-k", "RequestedProcedureCodeSequence[0].CodeValue",
         "-k", "RequestedProcedureCodeSequence[0].CodingSchemeDesignator",
         "-k", "RequestedProcedureCodeSequence[0].CodeMeaning",
         "127.0.0.1", str(eng.address("modalities")[1])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rsp = [dcmread(f) for f in sorted(out.glob("rsp*.dcm"))]
    assert len(rsp) == 1
    code = rsp[0].RequestedProcedureCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == ("RPID144", "RADLEX",
                                                                               "CT Abdomen Pelvis")
