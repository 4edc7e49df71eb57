"""The mapping cookbook (docs/examples/mappings): valid, every fix a passing `medrelay test` case, and the
expected outputs say what docs/mappings.md claims (checked here by content, not only by the case runner).
Also: the rule reference in docs/mappings.md is the one generated from the rule models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pydicom
from conftest import ROOT
from ruamel.yaml import YAML

from engine.mapping.docs import BEGIN, END, rules_markdown

BOOK = ROOT / "docs" / "examples" / "mappings"
CASES = BOOK / "channel-tests"


def medrelay(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, capture_output=True, text=True)


def segs(path, name):
    return [s.split("|") for s in path.read_bytes().decode().split("\r") if s.startswith(name + "|")]


def test_cookbook_checks_and_every_case_passes():
    r = medrelay("check", str(BOOK / "channels.yaml"))
    assert r.returncode == 0, r.stderr
    r = medrelay("test", str(BOOK / "channels.yaml"))
    assert r.returncode == 0, r.stdout + r.stderr
    passed = [ln for ln in r.stdout.splitlines() if ln.startswith("PASS ")]
    assert len(passed) >= 10 and "0 failed" in r.stdout


def test_every_route_of_the_cookbook_has_a_case():
    config = YAML(typ="safe").load((BOOK / "channels.yaml").read_text())
    routes = {r["name"] for ch in config["channels"].values() for r in ch.get("routes", [])}
    covered = {YAML(typ="safe").load(c.read_text())["route"] for c in CASES.glob("*/case.yaml")}
    assert len(routes) >= 10 and routes <= covered, routes - covered


def test_the_expected_outputs_are_the_fixes():
    obx = segs(CASES / "01-lab-codes-to-loinc" / "expected.hl7", "OBX")
    assert [o[3] for o in obx] == ["2345-7^Glucose [Mass/volume] in Serum or Plasma^LN",
                                   "2823-3^Potassium [Moles/volume] in Serum or Plasma^LN", "XYZ^Local only^L"]
    assert [o[2] for o in segs(CASES / "02-obx-value-types" / "expected.hl7", "OBX")] == ["NM", "ST", "ST"]
    pid = segs(CASES / "04-mrn-in-pid-2" / "expected.hl7", "PID")[0]
    assert pid[2] == "" and pid[3] == "4711^^^HOSP^MR"
    z = (CASES / "05-remove-z-segments" / "expected.hl7").read_bytes()
    assert b"\rZ" not in z and z == (CASES / "05-remove-z-segments" / "input.hl7").read_bytes().split(b"ZPI|")[0]
    assert segs(CASES / "06-ris-receiver-name" / "expected.hl7", "MSH")[0][4:6] == ["RIS", "RADIOLOGY"]
    assert segs(CASES / "07-sex-codes" / "expected.hl7", "PID")[0][8] == "F"
    assert segs(CASES / "07b-sex-codes-unknown" / "expected.hl7", "PID")[0][8] == "U"
    ds = pydicom.dcmread(CASES / "09-institution-name" / "expected.dcm")
    assert (ds.InstitutionName, ds.InstitutionalDepartmentName) == ("General Hospital", "Radiology")
    assert ds.private_block(0x0009, "ACME 1.0")[0x11].value == "kVp profile 3"
    assert 0x00091010 not in ds and ds.PatientName == "DOE^JANE"
    bundle = json.loads((CASES / "10-results-to-fhir-with-loinc" / "expected.json").read_text())
    codings = [e["resource"]["code"]["coding"] for e in bundle["entry"]
               if e["resource"]["resourceType"] == "Observation"]
    assert [[c.get("system") for c in cc] for cc in codings] == [[None, "http://loinc.org"], [None, "http://loinc.org"],
                                                                 [None]]


def test_the_value_function_fixes_say_what_the_docs_claim():
    pid = segs(CASES / "11-dates-to-hl7" / "expected.hl7", "PID")[0]
    pv1 = segs(CASES / "11-dates-to-hl7" / "expected.hl7", "PV1")[0]
    assert pid[7] == "19801231" and pv1[44] == "20240302081500+0100"
    assert segs(CASES / "11-dates-to-hl7" / "input.hl7", "PID")[0][7] == "31.12.1980"
    assert segs(CASES / "11b-birth-date-no-date" / "expected.hl7", "PID")[0][7] == ""
    pid = segs(CASES / "12-mrn-and-names-for-legacy-ris" / "expected.hl7", "PID")[0]
    assert pid[3] == "00004711^^^HOSP^MR" and pid[5] == "MUSTERMANN^ERIKA"
    assert segs(CASES / "12-mrn-and-names-for-legacy-ris" / "expected.hl7", "ZPD")[0][1] == "Mustermann, Erika"
    assert segs(CASES / "12-mrn-and-names-for-legacy-ris" / "expected.hl7", "PV1")[0][2] == "U"


def test_a_broken_mapping_fails_its_case(tmp_path):
    shutil.copytree(BOOK, tmp_path / "book")
    cfg = tmp_path / "book" / "channels.yaml"
    cfg.write_text(cfg.read_text().replace("OBX-3.3: LN", "OBX-3.3: LOINC").replace("- delete: [ZPI, ZBE]",
                                                                                 "- delete: [ZPI]"))
    r = medrelay("test", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert "FAIL 01-lab-codes-to-loinc" in r.stdout and "FAIL 05-remove-z-segments" in r.stdout
    assert "PASS 06-ris-receiver-name" in r.stdout


def test_the_rule_reference_in_docs_is_generated_from_the_models():
    text = (ROOT / "docs" / "mappings.md").read_text()
    block = text[text.index(BEGIN):text.index(END) + len(END)]
    assert block == rules_markdown(), "run: .venv/bin/python -m engine.mapping.docs --write docs/mappings.md"
