"""hl7_to_fhir takes the config's code tables (OBX-3 local codes -> LOINC coding) and Z-segment extensions."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from engine.envelope import Envelope
from engine.mapping.tables import Table
from transforms.hl7_to_fhir import Hl7ToFhirConfig
from transforms.hl7_to_fhir import build as hl7_to_fhir

ORU = (b"MSH|^~\\&|LAB|LABFAC|HIS|HOSP|20240301101500||ORU^R01^ORU_R01|C1|P|2.5.1\r"
       b"PID|1||123456^^^HOSP^MR||DOE^JANE||19700215|F\r"
       b"ZPI|1|GOLD\r"
       b"OBR|1|PL-77|FL-5501|PANEL^Chemistry^L|||20240301080000|||||||||||||||20240301100000|||F\r"
       b"OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|3.9-5.8|N|||F\r"
       b"OBX|2|NM|XYZ^Local^L||1|mmol/L|||||F\r")


class Ctx:
    class settings:
        tables = {"lab": Table("lab", ("code", "target_code", "target_display", "target_system"), {
            "GLU": {"code": "GLU", "target_code": "2345-7", "target_display": "Glucose",
                    "target_system": "http://loinc.org"}})}


def test_code_tables_add_a_coding_and_z_fields_become_extensions():
    t = hl7_to_fhir(Hl7ToFhirConfig(type="hl7_to_fhir", code_tables={"Observation.code": "lab"}, extensions=[
        {"from": "ZPI-2", "resource": "Patient", "url": "http://hospital.example/fhir/loyalty"}]), Ctx())
    bundle = json.loads(t(Envelope(channel="c", kind="hl7v2", payload=ORU)).payload)
    res = [e["resource"] for e in bundle["entry"]]
    obs = [r for r in res if r["resourceType"] == "Observation"]
    assert obs[0]["code"]["coding"][-1] == {"system": "http://loinc.org", "code": "2345-7", "display": "Glucose"}
    assert len(obs[0]["code"]["coding"]) == 2 and len(obs[1]["code"]["coding"]) == 1
    patient = next(r for r in res if r["resourceType"] == "Patient")
    assert patient["extension"] == [{"url": "http://hospital.example/fhir/loyalty", "valueString": "GOLD"}]


def test_without_tables_the_conversion_is_unchanged():
    plain = hl7_to_fhir(Hl7ToFhirConfig(type="hl7_to_fhir"))(Envelope(channel="c", kind="hl7v2", payload=ORU))
    assert b"loinc" not in plain.payload and b"extension" not in plain.payload


def test_check_reports_converter_table_problems(tmp_path):
    (tmp_path / "channels.yaml").write_text(textwrap.dedent("""\
        store: {url: "sqlite:///data/m.db", blobs: data/blobs}
        keys: {kek_file: data/keys.json}
        tables:
          lab: {values: {GLU: 2345-7}}
        channels:
          in:
            source: {type: mllp, host: 127.0.0.1, port: 0}
            routes:
              - name: fhir
                transforms:
                  - type: hl7_to_fhir
                    code_tables: {Observation.code: labs, Observation.cod: lab}
                    extensions: [{from: ZPI-99x, resource: Patient, url: "urn:x"},
                                 {from: ZPI-2, resource: Patinet, url: "urn:y"}]
                to: {type: file, path: out}
        """))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "check", "channels.yaml"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 2
    t = "channels.in.routes[0].transforms[0]"
    assert f"channels.yaml:12: {t}.code_tables.Observation.code: no table 'labs'" in r.stderr
    assert (f"channels.yaml:12: {t}.code_tables.Observation.cod: Observation.cod.coding.code: "
            "Observation has no element 'cod'") in r.stderr
    assert f"{t}.extensions[0].from: not an HL7 position" in r.stderr
    assert f"{t}.extensions[1].resource: 'Patinet' is not a FHIR R4 resource type" in r.stderr
