"""`medrelay test` shows a mismatch as a diff, and `medrelay test --update` rewrites the expected outputs
that changed (HL7, FHIR, DICOM), names them, keeps each file's style and leaves the others alone.

Run on a copy of the cookbook (docs/examples/mappings) through the real command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pydicom
from conftest import ROOT

BOOK = ROOT / "docs" / "examples" / "mappings"


def medrelay(*args, cwd):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def book(tmp_path):
    shutil.copytree(BOOK, tmp_path / "book", ignore=shutil.ignore_patterns("data", "outbox"))
    return tmp_path / "book"


def change(cfg, *pairs):
    text = cfg.read_text()
    for old, new in pairs:
        assert old in text, old
        text = text.replace(old, new)
    cfg.write_text(text)


def test_a_mismatch_shows_a_diff_and_update_rewrites_only_what_changed(tmp_path):
    b = book(tmp_path)
    cfg, cases = b / "channels.yaml", b / "channel-tests"
    change(cfg, ("OBX-3.3: LN", "OBX-3.3: LOINC"),
           ("set: {InstitutionName: institution, InstitutionalDepartmentName: department}",
            "set: {InstitutionName: institution, InstitutionalDepartmentName: ZZ-Imaging}"),
           ("display: target_display}", "display: LOINC-DISPLAY}"))
    before = {p: p.read_bytes() for p in cases.glob("*/*")}

    r = medrelay("test", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    out = r.stdout
    # HL7: a unified diff, one segment a line, expected -> got
    assert "FAIL 01-lab-codes-to-loinc" in out
    assert "--- expected.hl7 (expected)" in out and "+++ got" in out
    assert "-OBX|1|NM|2345-7^Glucose [Mass/volume] in Serum or Plasma^LN|" in out
    assert "+OBX|1|NM|2345-7^Glucose [Mass/volume] in Serum or Plasma^LOINC|" in out
    # DICOM: one attribute a line
    assert "FAIL 09-institution-name" in out and "Institutional Department Name" in out and "ZZ-Imaging" in out
    # FHIR: indented JSON lines
    assert "FAIL 10-results-to-fhir-with-loinc" in out and '"display": "LOINC-DISPLAY"' in out
    assert {p: p.read_bytes() for p in cases.glob("*/*")} == before  # without --update nothing is written

    r = medrelay("test", "--update", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    updated = sorted(ln.split()[1].rstrip(":") for ln in r.stdout.splitlines() if ln.startswith("UPDATED "))
    assert updated == ["01-lab-codes-to-loinc", "09-institution-name", "10-results-to-fhir-with-loinc"]
    assert "3 updated" in r.stdout and "0 failed" in r.stdout
    after = {p: p.read_bytes() for p in cases.glob("*/*")}
    changed = sorted(str(p.relative_to(cases)) for p in after if after[p] != before[p])
    assert changed == ["01-lab-codes-to-loinc/expected.hl7", "09-institution-name/expected.dcm",
                       "10-results-to-fhir-with-loinc/expected.json"]
    assert not list(cases.glob("*/*.tmp"))

    hl7 = after[cases / "01-lab-codes-to-loinc" / "expected.hl7"]
    assert b"^LOINC|" in hl7 and b"^LN|" not in hl7
    old = before[cases / "01-lab-codes-to-loinc" / "expected.hl7"]
    assert (b"\r\n" in hl7) == (b"\r\n" in old) and (b"\n" in hl7) == (b"\n" in old)  # the file's own line ends
    ds = pydicom.dcmread(cases / "09-institution-name" / "expected.dcm")
    assert ds.InstitutionalDepartmentName == "ZZ-Imaging" and ds.InstitutionName == "General Hospital"
    text = after[cases / "10-results-to-fhir-with-loinc" / "expected.json"].decode()
    assert text.startswith("{\n  ") and "LOINC-DISPLAY" in text  # still indented for review
    json.loads(text)

    r = medrelay("test", str(cfg), cwd=tmp_path)  # and now they pass as they are
    assert r.returncode == 0, r.stdout
    assert "UPDATED" not in r.stdout


def test_update_writes_a_missing_expected_file_but_never_fixes_a_drop_or_writes_outside_the_case(tmp_path):
    b = book(tmp_path)
    cfg, cases = b / "channels.yaml", b / "channel-tests"
    (cases / "06-ris-receiver-name" / "expected.hl7").unlink()
    r = medrelay("test", str(cfg), cwd=tmp_path)
    assert r.returncode == 1 and "FAIL 06-ris-receiver-name" in r.stdout

    # the test patients filter no longer drops: that is a failure --update cannot rewrite
    change(cfg, ("drop: {any: [{PID-5.1: {regex: '^(TEST|ZZTEST)'}}",
                 "drop: {any: [{PID-5.1: {regex: '^(NEVER)'}}"))
    (cases / "07-sex-codes" / "case.yaml").write_text(
        (cases / "07-sex-codes" / "case.yaml").read_text().replace("expect: expected.hl7",
                                                                   "expect: ../../channels.yaml"))
    config_before = cfg.read_bytes()
    r = medrelay("test", "--update", str(cfg), cwd=tmp_path)
    assert r.returncode == 1
    assert "UPDATED 06-ris-receiver-name: expected.hl7 written" in r.stdout
    assert (cases / "06-ris-receiver-name" / "expected.hl7").read_bytes().split(b"\r")[0].split(b"|")[4:6] == [
        b"RIS", b"RADIOLOGY"]
    assert "FAIL 03-drop-test-patients: expected the route to drop the message" in r.stdout
    assert "FAIL 07-sex-codes" in r.stdout and "only inside the case folder" in r.stdout
    assert cfg.read_bytes() == config_before
