"""Code tables (CSV, values, ConceptMap) and `medrelay check` on mappings: file, line and path of every problem."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT

from engine.config import ConfigError, load_settings
from engine.mapping.tables import TableError, TableSpec, load_table

CSV = "code,target_code,target_display,target_system\nGLU,2345-7,Glucose,http://loinc.org\nK,2823-3,Potassium,http://loinc.org\n"

CONCEPTMAP = {
    "resourceType": "ConceptMap", "url": "http://example.org/cm/lab", "status": "active",
    "group": [{"source": "urn:lab:local", "target": "http://loinc.org", "element": [
        {"code": "GLU", "display": "Glucose local", "target": [{"code": "2345-7", "display": "Glucose",
                                                               "equivalence": "equivalent"}]},
        {"code": "NOPE", "target": [{"code": "x", "equivalence": "unmatched"}]},
        {"code": "K", "target": [{"code": "2823-3", "relationship": "equivalent"}]},  # R5 style
    ], "unmapped": {"mode": "fixed", "code": "LA4489-6", "display": "Unknown"}}],
}


def test_csv_table(tmp_path):
    (tmp_path / "t.csv").write_text("\ufeff" + CSV)
    t = load_table("lab", TableSpec(file="t.csv"), tmp_path)
    assert t.columns == ("code", "target_code", "target_display", "target_system")
    assert t.get("GLU")["target_code"] == "2345-7" and t.get(" K ")["target_display"] == "Potassium"
    assert t.get("glu") is None
    assert load_table("lab", TableSpec(file="t.csv", ignore_case=True), tmp_path).get("glu") is not None


@pytest.mark.parametrize("content,spec,message", [
    (CSV + "GLU,1,dup,x\n", {}, "source code listed more than once: 'GLU'"),
    (CSV, {"key": "local"}, "column local not in the header"),
    (CSV, {"columns": ["target_code", "unit"]}, "column unit not in the header"),
    ("", {}, "empty, expected a header row"),
    (CSV + ",x,y,z\n", {}, "line 4: empty code"),
])
def test_csv_problems(tmp_path, content, spec, message):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(TableError) as e:
        load_table("lab", TableSpec(file="t.csv", **spec), tmp_path)
    assert message in e.value.message and e.value.attr == "file"


def test_missing_file_is_an_environment_problem(tmp_path):
    with pytest.raises(TableError) as e:
        load_table("lab", TableSpec(file="nope.csv"), tmp_path)
    assert e.value.phase == "environment" and "file not found" in e.value.message


def test_values_and_conceptmap_tables(tmp_path):
    v = load_table("sex", TableSpec(values={"M": "male", "F": {"target_code": "female", "display": "Female"}}),
                   tmp_path)
    assert v.get("M") == {"code": "M", "target_code": "male"} and v.get("F")["display"] == "Female"
    (tmp_path / "cm.json").write_text(json.dumps(CONCEPTMAP))
    cm = load_table("lab", TableSpec(conceptmap="cm.json"), tmp_path)
    assert cm.get("GLU")["target_code"] == "2345-7" and cm.get("GLU")["target_system"] == "http://loinc.org"
    assert cm.get("K")["target_code"] == "2823-3"
    assert cm.get("NOPE")["target_code"] == "LA4489-6"  # "unmatched" is no match: the unmapped default
    assert cm.get("OTHER")["target_display"] == "Unknown"
    (tmp_path / "bad.json").write_text(json.dumps({"resourceType": "ValueSet"}))
    with pytest.raises(TableError, match="not a FHIR ConceptMap"):
        load_table("x", TableSpec(conceptmap="bad.json"), tmp_path)


def test_a_table_takes_one_source():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="exactly one of file, values, conceptmap"):
        TableSpec(file="a.csv", values={"a": "b"})


# -- medrelay check ---------------------------------------------------------------------------
BASE = """\
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
tables:
  lab-codes: {file: tables/lab-codes.csv}
  loinc: {conceptmap: tables/cm.json}
channels:
  lab-in:
    source: {type: mllp, host: 127.0.0.1, port: 0}
    routes:
      - name: to-lis
        transforms:
          - type: hl7_map
            rules:
              - set: {MSH-5: LIS}
              - lookup: {field: OBX-3.1, table: lab-codes, set: {OBX-3.1: target_code}}
              - when: {"PV1-2": E}
                then: [{set: {PV1-3.1: ER}}]
        to: {type: file, path: out}
"""


def write(tmp_path, yaml_text=BASE, csv=CSV):
    (tmp_path / "tables").mkdir(exist_ok=True)
    (tmp_path / "tables" / "lab-codes.csv").write_text(csv)
    (tmp_path / "tables" / "cm.json").write_text(json.dumps(CONCEPTMAP))
    (tmp_path / "channels.yaml").write_text(textwrap.dedent(yaml_text))
    return tmp_path / "channels.yaml"


def check(path):
    return subprocess.run([sys.executable, "-m", "engine.cli", "check", str(path)], cwd=ROOT,
                          capture_output=True, text=True)


def test_a_valid_mapping_config_checks(tmp_path):
    r = check(write(tmp_path))
    assert r.returncode == 0, r.stderr


def test_rule_errors_have_file_line_and_path(tmp_path):
    bad = (BASE.replace("MSH-5: LIS", "MSH-5: LIS, PID-99: x, XYZ-1: y").replace("table: lab-codes", "table: labcodes")
           .replace('"PV1-2": E', '"PV1-2": {gt: high}').replace("PV1-3.1: ER", "PV1-3.1.x: ER"))
    path = write(tmp_path, bad)
    r = check(path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    rp = "channels.lab-in.routes[0].transforms[0].rules"
    assert f"{path}:14: {rp}[0].set.PID-99: PID-99: PID has 40 fields" in lines
    assert any(ln.startswith(f"{path}:14: {rp}[0].set.XYZ-1: XYZ-1: unknown segment XYZ") for ln in lines)
    assert any(ln.startswith(f"{path}:15: {rp}[1].lookup.table: no table 'labcodes'") for ln in lines)
    assert f"{path}:16: {rp}[2].when: PV1-2: gt: takes a number (use before/after for dates), got 'high'" in lines
    assert any(ln.startswith(f"{path}:17: {rp}[2].then[0].set.PV1-3.1.x: not an HL7 position") for ln in lines)


def test_rule_schema_errors_name_the_rule(tmp_path):
    path = write(tmp_path, BASE.replace("- set: {MSH-5: LIS}", "- sett: {MSH-5: LIS}")
                 .replace("set: {OBX-3.1: target_code}}", "set: {OBX-3.1: target_code}, missin: keep}"))
    r = check(path)
    assert r.returncode == 2
    rp = "channels.lab-in.routes[0].transforms[0].rules"
    assert f"{path}:14: {rp}[0]: a rule needs one of the keys set, copy, compute, delete, add, lookup, when, " \
           "foreach, regenerate_uids, drop, error" in r.stderr
    assert f"{path}:15: {rp}[1].lookup.missin: Extra inputs are not permitted" in r.stderr


def test_table_problems_have_file_line_and_path(tmp_path):
    path = write(tmp_path, csv=CSV + "K,1,again,x\n")
    r = check(path)
    assert r.returncode == 2
    assert f"{path}:4: tables.lab-codes.file: source code listed more than once: 'K'" in r.stderr
    (tmp_path / "tables" / "lab-codes.csv").unlink()
    r = check(path)
    assert r.returncode == 4 and f"{path}:4: tables.lab-codes.file: file not found" in r.stderr


def test_route_when_operators_are_checked(tmp_path):
    path = write(tmp_path, BASE.replace("      - name: to-lis\n", "      - name: to-lis\n"
                                        "        when: {MSH-9.1: {regex: \"(\"}}\n"))
    r = check(path)
    assert r.returncode == 2 and "channels.lab-in.routes[0].when" in r.stderr and "regex" in r.stderr


def test_tables_are_part_of_the_config_hash_and_reload_with_it(tmp_path):
    path = write(tmp_path)
    a = load_settings(path)
    assert a.tables["lab-codes"].get("GLU")["target_code"] == "2345-7"
    (tmp_path / "tables" / "lab-codes.csv").write_text(CSV.replace("2345-7", "9999-9"))
    b = load_settings(path)
    assert b.config_hash != a.config_hash
    assert b.tables["lab-codes"].get("GLU")["target_code"] == "9999-9"


def test_loading_fails_on_a_broken_table(tmp_path):
    path = write(tmp_path, csv="nonsense\n")
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    assert "column code not in the header" in str(e.value)
