"""hl7_map values that are no HL7 value (a nested list, a mapping) are config errors, never a repr.

Found by the issue 16 probe: `set: {OBX-9: [a, [b, c]]}` passed `medrelay check` and wrote
`a^['b', 'c']` into every message.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import TypeAdapter

from engine.mapping.base import MappingError
from engine.mapping.hl7 import HL7, Hl7Document
from engine.mapping.interpreter import check_rules, compile_rules
from engine.mapping.rules import RuleList

MSG = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X|P|2.5\rPID|1\rOBX|1|NM|GLU||5\r"


def rules(*r):
    return TypeAdapter(RuleList).validate_python(list(r))


@pytest.mark.parametrize("value", [["a", ["b", "c"]], {"x": 1}, ["a", {"b": 1}]])
def test_set_with_a_nested_value_is_a_check_error(value):
    errs = check_rules(rules({"set": {"OBX-9": value}}), HL7, {})
    assert [e.loc for e in errs] == [(0, "set", "OBX-9")]
    assert "HL7 value" in errs[0].message or "must be text" in errs[0].message


def test_nested_value_in_when_then_is_found_too():
    errs = check_rules(rules({"when": {"PV1-2": "E"}, "then": [{"set": {"PV1-3": ["a", ["b"]]}}]}), HL7, {})
    assert len(errs) == 1 and errs[0].loc[-2:] == ("set", "PV1-3")


def test_a_list_at_a_subcomponent_is_a_check_error():
    errs = check_rules(rules({"set": {"PID-3.1.1": ["a", "b"]}}), HL7, {})
    assert len(errs) == 1 and "field or component position" in errs[0].message


@pytest.mark.parametrize("value,expect", [("x", "x"), (5, "5"), (1.5, "1.5"), (True, "Y"), (None, ""),
                                          (["a", "b"], "a^b")])
def test_plain_values_still_pass_and_write(value, expect):
    assert check_rules(rules({"set": {"OBX-9": value}}), HL7, {}) == []
    doc = Hl7Document(MSG)
    compile_rules(rules({"set": {"OBX-9": value}}), HL7, {}).run(doc, None)
    fields = doc.text().split("\r")[2].split("|")
    assert (fields[9] if len(fields) > 9 else "") == expect


def test_add_with_a_nested_value_dead_letters_instead_of_writing_a_repr():
    doc = Hl7Document(MSG)
    with pytest.raises(MappingError, match="not an HL7 value"):
        compile_rules(rules({"add": {"ZMR": ["a", ["b", ["c"]]]}}), HL7, {}).run(doc, None)


def test_medrelay_check_reports_file_line_and_path(tmp_path: Path):
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(
        "channels:\n"
        "  c:\n"
        "    source: {type: mllp, host: 127.0.0.1, port: 0}\n"
        "    routes:\n"
        "      - name: r\n"
        "        transforms:\n"
        "          - type: hl7_map\n"
        "            rules:\n"
        "              - set: {OBX-9: [a, [b, c]]}\n"
        "        to: {type: mllp, host: 127.0.0.1, port: 1}\n")
    medrelay = Path(sys.executable).parent / "medrelay"
    r = subprocess.run([str(medrelay), "check", str(cfg)], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert r.returncode != 0
    assert "channels.yaml:9: channels.c.routes[0].transforms[0].rules[0].set.OBX-9:" in r.stdout + r.stderr


# -- the same class for dicom_map: values pydicom cannot write --------------------------
@pytest.mark.parametrize("value", [True, ["a", ["b"]], {"vr": "SH", "value": ["x", ["y"]]}, ["a", {"b": 1}]])
def test_dicom_set_with_a_bool_or_nested_value_is_a_check_error(value):
    from engine.mapping.dicom import DICOM

    errs = check_rules([{"set": {"InstitutionName": value}}], DICOM, {})
    assert [e.loc for e in errs] == [(0, "set", "InstitutionName")]
    assert "a DICOM value is text, a number" in errs[0].message


def test_dicom_numbers_are_written_as_the_vr_takes_them(tmp_path: Path):
    """An int into LO (InstitutionName) passed check and failed every message at serialisation."""
    from tests.test_mapping_dicom_fhir import run_dicom

    ds = run_dicom(tmp_path, [{"set": {"InstitutionName": 100, "StationName": {"vr": "SH", "value": ["x", 7]},
                                       "SeriesNumber": 12, "SliceThickness": 2.5, "Rows": 64}}])
    assert ds.InstitutionName == "100"
    assert list(ds.StationName) == ["x", "7"]
    assert ds.SeriesNumber == 12 and float(ds.SliceThickness) == 2.5 and ds.Rows == 64


# -- fhir_map: the output is checked as the FHIR store checks it ------------------------
def test_fhir_map_output_with_a_code_outside_its_required_binding_dead_letters(tmp_path: Path):
    """fhir.resources lets `Observation.status: notastatus` through; the FHIR store refuses it."""
    from tests.test_mapping_dicom_fhir import resources, run_fhir

    with pytest.raises(MappingError, match="required value set .*observation-status"):
        run_fhir(tmp_path, [{"set": {"Observation.status": "notastatus"}}])
    out = run_fhir(tmp_path, [{"set": {"Observation.status": "amended"}}])
    assert {o["status"] for o in resources(out, "Observation")} == {"amended"}
    raw = run_fhir(tmp_path, [{"set": {"Observation.status": "notastatus"}}], validate_output=False)
    assert {o["status"] for o in resources(raw, "Observation")} == {"notastatus"}
