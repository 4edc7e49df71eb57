"""Value functions (`compute`, `lookup.apply`): one chain of str -> str functions for HL7 v2, DICOM and FHIR,
checked when the rules compile (what `medrelay check` reports) and run per occurrence like the other rules."""

from __future__ import annotations

import io
import json

import pydicom
import pytest
from pydantic import TypeAdapter, ValidationError
from pydicom.dataset import Dataset

from engine.envelope import Drop
from engine.mapping.base import MappingError
from engine.mapping.dicom import DICOM, DicomDocument
from engine.mapping.fhir import FHIR, FhirDocument
from engine.mapping.hl7 import HL7, Hl7Document
from engine.mapping.interpreter import check_rules, compile_rules
from engine.mapping.rules import RuleList
from engine.mapping.tables import Table
from engine.mapping.values import InvalidValue, date_function

MSG = ("MSH|^~\\&|LAB|HOSP|LIS|MAIN|20240101120000||ORU^R01|1|P|2.5.1\r"
       "PID|1||  00123 ^^^HOSP^MR||Doe^John||31.12.1980|M\r"
       "OBR|1|||CBC\r"
       "OBX|1|NM| glu ||5.5\r"
       "OBX|2|NM|k||4.1\r")


def hl7(msg: str, *rules: dict, tables: dict | None = None) -> Hl7Document:
    prog = compile_rules(TypeAdapter(RuleList).validate_python(list(rules)), HL7, tables or {})
    doc = Hl7Document(msg)
    prog.run(doc)
    return doc


def field(doc: Hl7Document, path: str) -> str:
    from engine.mapping.hl7 import parse_hl7_path

    return doc.value(parse_hl7_path(path), {})


# -- the functions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source,target,value,expect", [
    ("hl7", "iso", "20240131", "2024-01-31"),
    ("hl7", "iso", "202401310830", "2024-01-31T08:30"),
    ("hl7", "iso", "20240131083015.123+0100", "2024-01-31T08:30:15.123+01:00"),
    ("hl7", "iso", "199001", "1990-01"),  # a month stays a month
    ("iso", "hl7", "2024-01-31T08:30:15Z", "20240131083015+0000"),
    ("iso", "hl7", "2024-01-31", "20240131"),
    ("auto", "dicom-da", "2024-01-31T08:30:00", "20240131"),
    ("auto", "dicom-tm", "20240131083015.5", "083015.5"),
    ("dicom-tm", "iso", "0830", None),  # a time alone has no ISO date
    ("dicom-tm", "dicom-tm", "08:30:15", "083015"),  # ACR-NEMA style TM
    ("auto", "hl7", "20240131083015.000000", "20240131083015.000000"),  # DA + TM concatenated
    ("%d.%m.%Y", "hl7", "31.12.1980", "19801231"),
    ("hl7", "%d/%m/%Y %H:%M", "202401310830", "31/01/2024 08:30"),
    ("iso-date", "dicom-da", "2024-02-30", None),  # no such day
    ("hl7", "iso", "31.12.1980", None),
    ("auto", "iso-date", "2024", None),  # a year is not a date
])
def test_date_reformatting_keeps_precision_and_refuses_what_is_no_date(source, target, value, expect):
    fn = date_function(source, target)
    if expect is None:
        with pytest.raises(InvalidValue):
            fn(value)
    else:
        assert fn(value) == expect


def test_text_functions_in_order_per_occurrence_and_concatenation():
    doc = hl7(MSG,
              {"compute": {"from": "PID-3.1", "to": "PID-3.1",
                           "apply": ["trim", {"replace": ["^0+", ""]}, {"pad": {"width": 8, "char": "0"}}]}},
              {"compute": {"from": "PID-7", "to": "PID-7", "apply": [{"date": {"from": "%d.%m.%Y", "to": "hl7"}}]}},
              {"compute": {"from": ["PID-5.1", "PID-5.2"], "to": "ZPN-1", "format": "{0}, {1}", "apply": ["upper"]}},
              {"compute": {"from": ["PID-5.2", "PID-5.1"], "to": "ZPN-2", "join": " "}},
              {"compute": {"from": "OBX-3.1", "to": "OBX-3.1", "apply": ["trim", "upper"]}},
              {"compute": {"from": "OBX-3.1", "to": "OBX-4", "apply": ["lower", {"substring": [0, 2]}]}},
              {"compute": {"from": "MSH-7", "to": "ZPN-3", "apply": [{"substring": [-6]}]}})
    assert field(doc, "PID-3.1") == "00000123"
    assert field(doc, "PID-3.4") == "HOSP"  # the rest of the field is untouched
    assert field(doc, "PID-7") == "19801231"
    assert field(doc, "ZPN-1") == "DOE, JOHN"
    assert field(doc, "ZPN-2") == "John Doe"
    assert field(doc, "ZPN-3") == "120000"
    # per OBX: each occurrence computes from its own value
    assert [field(doc, f"OBX[{i}]-3.1") for i in (1, 2)] == ["GLU", "K"]
    assert [field(doc, f"OBX[{i}]-4") for i in (1, 2)] == ["gl", "k"]


def test_values_are_escaped_when_written():
    doc = hl7(MSG, {"compute": {"from": ["PID-5.1", "PID-5.2"], "to": "ZPN-1", "format": "{0}|{1}&co"}})
    assert "ZPN|Doe\\F\\John\\T\\co" in doc.text()
    assert field(doc, "ZPN-1") == "Doe|John&co"


def test_empty_sources_leave_the_target_unless_a_default_says_otherwise():
    doc = hl7(MSG, {"compute": {"from": "PID-19", "to": "PID-20", "apply": ["upper"]}},
              {"compute": {"from": "PID-8", "to": "PID-8", "apply": ["lower"]}})
    assert field(doc, "PID-20") == "" and field(doc, "PID-8") == "m"
    # a default writes, and creates the segment when the message has none
    doc = hl7(MSG, {"compute": {"from": "PV1-2", "to": "PV1-2", "apply": [{"default": "U"}]}},
              {"compute": {"from": "PID-19", "to": "PID-19", "apply": ["trim", {"default": "NONE"}]}})
    assert field(doc, "PV1-2") == "U" and field(doc, "PID-19") == "NONE"
    # an empty field is no invalid date: nothing is written, nothing fails
    doc = hl7(MSG, {"compute": {"from": "PID-29", "to": "PID-29", "apply": [{"date": {"from": "iso", "to": "hl7"}}]}})
    assert field(doc, "PID-29") == ""


def test_invalid_values_error_keep_clear_drop_or_default():
    bad = MSG.replace("31.12.1980", "sometime")
    date = {"date": {"from": "%d.%m.%Y", "to": "hl7"}}
    with pytest.raises(MappingError) as e:
        hl7(bad, {"compute": {"from": "PID-7", "to": "PID-7", "apply": [date]}})
    assert "PID-7" in str(e.value) and "sometime" not in str(e.value)  # PID: the value is withheld
    with pytest.raises(MappingError) as e:
        hl7(MSG.replace("20240101120000", "yesterday"), {"compute": {"from": "MSH-7", "to": "ZDT-1",
                                                                    "apply": [{"date": {"to": "iso"}}]}})
    assert "'yesterday'" in str(e.value)  # not patient data: shown
    assert field(hl7(bad, {"compute": {"from": "PID-7", "to": "PID-7", "apply": [date], "invalid": "keep"}}),
                 "PID-7") == "sometime"
    assert field(hl7(bad, {"compute": {"from": "PID-7", "to": "PID-7", "apply": [date], "invalid": "clear"}}),
                 "PID-7") == ""
    assert field(hl7(bad, {"compute": {"from": "PID-7", "to": "PID-7", "apply": [date], "invalid": "19000101"}}),
                 "PID-7") == "19000101"
    with pytest.raises(Drop):
        hl7(bad, {"compute": {"from": "PID-7", "to": "PID-7", "apply": [date], "invalid": "drop"}})


def test_lookup_apply_normalises_the_code_before_the_table():
    table = Table("lab", ("code", "target_code"), {"GLU": {"code": "GLU", "target_code": "2345-7"}})
    plain = hl7(MSG, {"lookup": {"field": "OBX-3.1", "table": "lab"}}, tables={"lab": table})
    assert field(plain, "OBX[1]-3.1") == " glu "
    doc = hl7(MSG, {"lookup": {"field": "OBX-3.1", "table": "lab", "apply": ["trim", "upper"]}},
              tables={"lab": table})
    assert field(doc, "OBX[1]-3.1") == "2345-7"
    assert field(doc, "OBX[2]-3.1") == "k"  # not in the table: kept as sent (not normalised)


def test_dicom_date_and_time_to_hl7_and_iso_and_name_clean_up():
    ds = Dataset()
    ds.StudyDate, ds.StudyTime = "20240131", "083015.25"
    ds.InstitutionName = "  general hosp  "
    ds.PatientBirthDate = "19801231"
    general = {"replace": {"pattern": "(?i)^general\\s*hosp$", "with": "General Hospital"}}
    rules = [{"compute": {"from": ["StudyDate", "StudyTime"], "to": "StudyComments",
                          "apply": [{"date": {"to": "iso"}}]}},
             {"compute": {"from": "InstitutionName", "to": "InstitutionName", "apply": ["trim", general]}},
             {"compute": {"from": "StudyDate", "to": "ReferencedStudySequence[0].StudyDate"}}]
    prog = compile_rules(TypeAdapter(RuleList).validate_python(rules), DICOM, {})
    doc = DicomDocument(ds)
    prog.run(doc)
    assert ds.StudyComments == "2024-01-31T08:30:15.25"
    assert ds.InstitutionName == "General Hospital"
    assert ds.ReferencedStudySequence[0].StudyDate == "20240131"
    # and the result is a data set pydicom writes and reads back
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True)
    assert pydicom.dcmread(io.BytesIO(buf.getvalue()), force=True).StudyComments == "2024-01-31T08:30:15.25"


def test_fhir_birth_date_from_an_extension_and_identifier_padding():
    patient = {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "123"}],
               "extension": [{"url": "urn:dob", "valueString": "31.12.1980"}]}
    rules = [{"compute": {"from": "Patient.extension.where(url='urn:dob').valueString", "to": "Patient.birthDate",
                          "apply": [{"date": {"from": "%d.%m.%Y", "to": "iso-date"}}]}},
             {"compute": {"from": "Patient.identifier.where(system='urn:mrn').value",
                          "to": "Patient.identifier.where(system='urn:mrn').value",
                          "apply": [{"pad": {"width": 8, "char": "0"}}]}}]
    prog = compile_rules(TypeAdapter(RuleList).validate_python(rules), FHIR, {})
    doc = FhirDocument(json.loads(json.dumps(patient)))
    prog.run(doc)
    assert doc.root["birthDate"] == "1980-12-31"
    assert doc.root["identifier"][0]["value"] == "00000123"
    from engine.mapping.fhir import validate

    validate(doc.root)


@pytest.mark.parametrize("rule,loc,reason", [
    ({"compute": {"from": "PID-7", "to": "PID-7", "apply": [{"date": {"from": "xx", "to": "iso"}}]}},
     ("compute", "apply", 0), "unknown date format 'xx'"),
    ({"compute": {"from": "PID-7", "to": "PID-7", "apply": [{"date": {"to": "auto"}}]}},
     ("compute", "apply", 0), "unknown date format 'auto'"),
    ({"compute": {"from": "PID-7", "to": "PID-7", "apply": ["trim", {"replace": ["(a", ""]}]}},
     ("compute", "apply", 1), "replace: pattern '(a'"),
    ({"compute": {"from": "PID-7", "to": "PID-7", "apply": [{"replace": ["(a)", "\\2"]}]}},
     ("compute", "apply", 0), "replace: with"),
    ({"compute": {"from": ["PID-5.1"], "to": "ZPN-1", "format": "{0} {1}"}},
     ("compute", "format"), "takes {0}..{0}"),
    ({"compute": {"from": "PID-5.1", "to": "ZPN-1", "format": "{0.__class__}"}},
     ("compute", "format"), "not {0.__class__}"),
    ({"compute": {"from": "PID-99", "to": "ZPN-1"}}, ("compute", "from"), "PID has"),
    ({"compute": [{"from": "PID-5", "to": "ZPN-1"}, {"from": "PID-5", "to": "MSH-1"}]},
     ("compute", 1, "to"), "MSH-1"),
    ({"lookup": {"field": "OBX-3.1", "table": "t", "apply": [{"date": {"from": "nope", "to": "hl7"}}]}},
     ("lookup", "apply", 0), "unknown date format"),
])
def test_bad_functions_are_check_errors_with_their_path(rule, loc, reason):
    errors = check_rules([rule], HL7, {"t": Table("t", ("code", "target_code"), {})})
    assert errors, rule
    assert errors[0].loc == (0, *loc), errors[0].loc
    assert reason in errors[0].message


@pytest.mark.parametrize("bad", [["title-case"], [{"pad": {"width": 0}}], [{"substring": []}],
                                 [{"pad": {"width": 3, "char": "00"}}], [{"upper": True, "lower": True}]])
def test_malformed_functions_are_refused_by_the_model(bad):
    with pytest.raises(ValidationError):
        TypeAdapter(RuleList).validate_python([{"compute": {"from": "PID-7", "to": "PID-7", "apply": bad}}])


def test_medrelay_check_reports_a_bad_function_with_file_line_and_path(tmp_path):
    import subprocess
    import sys
    import textwrap

    (tmp_path / "channels.yaml").write_text(textwrap.dedent("""\
        store: {url: "sqlite:///data/m.db", blobs: data/blobs}
        keys: {kek_file: data/keys.json}
        channels:
          in:
            source: {type: mllp, host: 127.0.0.1, port: 0}
            routes:
              - name: r
                transforms:
                  - type: hl7_map
                    rules:
                      - compute: {from: PID-7, to: PID-7, apply: [trim, {date: {from: hl7, to: iso}}]}
                      - compute: {from: PID-7, to: PID-7, apply: [trim, {replace: ['(a', '']}]}
                to: {type: file, path: out}
        """))
    r = subprocess.run([sys.executable, "-m", "engine.cli", "check", str(tmp_path / "channels.yaml")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "channels.yaml:12: channels.in.routes[0].transforms[0].rules[1].compute.apply[1]: replace: " \
           "pattern '(a'" in r.stdout + r.stderr, r.stdout + r.stderr
