"""hl7_map: every rule and every path form on real messages; output checked byte for byte and by hl7apy."""

from __future__ import annotations

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from pydantic import TypeAdapter

from engine.envelope import Drop, Envelope
from engine.mapping.base import MappingError
from engine.mapping.hl7 import HL7, Hl7Document, parse_hl7_path
from engine.mapping.interpreter import RunContext, check_rules, compile_rules
from engine.mapping.rules import RuleList
from engine.mapping.tables import Table
from transforms.hl7_map import Hl7MapConfig
from transforms.hl7_map import build as hl7_map

ORU = ("MSH|^~\\&|LAB|LABFAC|HIS|HOSP|20240301101500||ORU^R01^ORU_R01|C1|P|2.5.1\r"
       "PID|1||123456^^^HOSP^MR~998877^^^OLD^PI||DOE^JANE||19700215|F|||||||||||||||||||\r"
       "PV1|1|E|W1^R2^B3\r"
       "ZPI|secret|stuff\r"
       "OBR|1|PL-77|FL-5501|24331-1^Lipid panel^LN|||20240301080000\r"
       "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\r"
       "OBX|2|NM|K^Potassium^L||<3|mmol/L|||||F\r"
       "OBX|3|ST|CMT^Comment^L||see \\T\\ note||||||F\r")

LAB = Table("lab-codes", ("code", "target_code", "target_display", "target_system"), {
    "GLU": {"code": "GLU", "target_code": "2345-7", "target_display": "Glucose [Mass/volume] in Serum or Plasma",
            "target_system": "http://loinc.org"},
    "K": {"code": "K", "target_code": "2823-3", "target_display": "Potassium^Serum", "target_system": "http://loinc.org"},
})
TABLES = {"lab-codes": LAB, "sex": Table("sex", ("code", "target_code"),
                                         {"F": {"code": "F", "target_code": "female"}})}


def rules(*r):
    return TypeAdapter(RuleList).validate_python(list(r))


def run(msg: str, *r, ctx: RunContext | None = None) -> str:
    doc = Hl7Document(msg)
    compile_rules(rules(*r), HL7, TABLES).run(doc, ctx)
    return doc.text()


def seg(text: str, name: str, n: int = 1) -> list[str]:
    found = [s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.startswith(name + "|")]
    return found[n - 1].split("|")


def val(text: str, path: str) -> str:
    return Hl7Document(text).value(parse_hl7_path(path), {})


# -- paths ---------------------------------------------------------------------------
@pytest.mark.parametrize("path,expect", [
    ("PID-3", ("PID", None, 3, None, 0, 0)),
    ("PID-3.1", ("PID", None, 3, None, 1, 0)),
    ("PID-3.4.2", ("PID", None, 3, None, 4, 2)),
    ("OBX[2]-5", ("OBX", 2, 5, None, 0, 0)),
    ("PID-3(2).1", ("PID", None, 3, 2, 1, 0)),
    ("PID-3[2].1", ("PID", None, 3, 2, 1, 0)),
    ("OBX[3]-3(1).2.1", ("OBX", 3, 3, 1, 2, 1)),
    ("ZPI", ("ZPI", None, 0, None, 0, 0)),
    ("OBX[2]", ("OBX", 2, 0, None, 0, 0)),
])
def test_path_forms(path, expect):
    p = parse_hl7_path(path)
    assert (p.segment, p.occurrence, p.field, p.repetition, p.component, p.subcomponent) == expect


def test_path_forms_read_the_right_place():
    assert val(ORU, "PID-3(2).1") == "998877"
    assert val(ORU, "PID-3[2].4") == "OLD"
    assert val(ORU, "PID-3.4") == "HOSP"  # first repetition
    assert val(ORU, "OBX[2]-3.1") == "K"
    assert val(ORU, "OBX-3.1") == "GLU"  # first occurrence
    assert val(ORU, "OBX[3]-5") == "see & note"  # unescaped
    assert val(ORU, "MSH-2") == "^~\\&"
    assert val(ORU, "MSH-1") == "|"
    assert val(ORU, "MSH-9.2") == "R01"
    assert Hl7Document(ORU).values(parse_hl7_path("OBX-3.1"), {}) == ["GLU", "K", "CMT"]
    assert Hl7Document(ORU).values(parse_hl7_path("PID-3.1"), {}) == ["123456", "998877"]


@pytest.mark.parametrize("bad,reason", [
    ("PID3", "not an HL7 position"), ("pid-3", "not an HL7 position"), ("PID-0", "count from 1"),
    ("PID-99", "PID has 40 fields"), ("XYZ-1", "unknown segment XYZ"), ("PID-3.13", "CX, which has 12 components"),
    ("OBX[0]-5", "count from 1"), ("ZPI-10000", "go up to 9999"), ("OBX[100000]-1", "go up to 9999"),
])
def test_bad_positions_are_errors(bad, reason):
    errs = check_rules(rules({"set": {bad: "x"}}), HL7, TABLES)
    assert len(errs) == 1 and reason in errs[0].message and errs[0].loc == (0, "set", bad)


def test_msh_1_and_2_cannot_be_written_but_z_segments_can_have_any_field():
    errs = check_rules(rules({"set": {"MSH-1": "#"}}, {"copy": {"from": "PID-3", "to": "MSH-2"}},
                             {"delete": ["MSH"]}, {"set": {"ZXY-77.30": "ok"}}), HL7, TABLES)
    assert [e.loc for e in errs] == [(0, "set", "MSH-1"), (1, "copy", "to"), (2, "delete", 0)]


# -- set ---------------------------------------------------------------------------------
def test_set_fields_components_and_untouched_segments_byte_exact():
    out = run(ORU, {"set": {"MSH-5": "LIS", "MSH-6": "MAIN", "PV1-3.2": "R9"}})
    assert seg(out, "MSH")[4:6] == ["LIS", "MAIN"]
    assert seg(out, "PV1")[3] == "W1^R9^B3"
    before, after = ORU.split("\r"), out.split("\r")
    assert [b for b, a in zip(before, after, strict=True) if b != a] == [before[0], before[2]]


def test_set_escapes_delimiters_and_reads_back_plain():
    out = run(ORU, {"set": {"PID-5.1": "O'Brien|Smith^Jr & co~\\x"}})
    assert seg(out, "PID")[5] == "O'Brien\\F\\Smith\\S\\Jr \\T\\ co\\R\\\\E\\x^JANE"
    assert val(out, "PID-5.1") == "O'Brien|Smith^Jr & co~\\x"


def test_set_with_a_list_gives_components():
    out = run(ORU, {"set": {"MSH-9": ["ORU", "R01", "ORU_R01"], "PV1-3": ["ER", "", "1"]}})
    assert seg(out, "MSH")[8] == "ORU^R01^ORU_R01"
    assert seg(out, "PV1")[3] == "ER^^1"


def test_set_creates_missing_fields_components_repetitions_and_segments():
    msg = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X|P|2.5\rPID|1\r"
    out = run(msg, {"set": {"PID-13(2).4": "me@x.org", "PV1-2": "O", "PID-3.1": "9"}})
    assert seg(out, "PID")[3] == "9"
    assert seg(out, "PID")[13] == "~^^^me@x.org"
    assert out.split("\r")[2] == "PV1||O"  # a segment the message lacked, appended
    assert out.endswith("\r")


def test_set_every_occurrence_or_one():
    out = run(ORU, {"set": {"OBX-11": "C", "OBX[2]-8": "L"}})
    assert [seg(out, "OBX", n)[11] for n in (1, 2, 3)] == ["C", "C", "C"]
    assert [seg(out, "OBX", n)[8] for n in (1, 2, 3)] == ["", "L", ""]


def test_indexed_segment_beyond_the_last_is_created_after_its_kind():
    out = run(ORU, {"set": {"OBX[4]-1": "4", "OBX[4]-2": "ST"}})
    lines = out.rstrip("\r").split("\r")
    assert lines[-1] == "OBX|4|ST"


def test_setting_a_number_and_bool():
    out = run(ORU, {"set": {"OBX[1]-5": 7.0, "PID-30": True}})
    assert seg(out, "OBX")[5] == "7" and seg(out, "PID")[30] == "Y"


# -- copy ------------------------------------------------------------------------------------
def test_copy_keeps_structure_and_fits_the_target_level():
    out = run(ORU, {"copy": [{"from": "PID-3.1", "to": "PID-2"}, {"from": "PID-3", "to": "PID-4"},
                             {"from": "PID-3", "to": "PID-18.1"}]})
    p = seg(out, "PID")
    assert p[2] == "123456"
    assert p[4] == "123456^^^HOSP^MR~998877^^^OLD^PI"  # whole field, both repetitions
    assert p[18] == "123456"  # a field into a component: its first component


def test_copy_within_a_repeating_segment_works_per_occurrence():
    out = run(ORU, {"copy": {"from": "OBX-3.1", "to": "OBX-4"}})
    assert [seg(out, "OBX", n)[4] for n in (1, 2, 3)] == ["GLU", "K", "CMT"]


def test_copy_from_an_absent_position_leaves_the_target():
    out = run(ORU, {"copy": {"from": "ZZZ-1", "to": "PID-2"}})
    assert seg(out, "PID")[2] == ""


# -- delete ------------------------------------------------------------------------------------
def test_delete_segments_and_fields():
    out = run(ORU, {"delete": ["ZPI", "PID-19", "OBX[2]", "PID-3(2)", "PV1-3.2"]})
    assert "ZPI|" not in out
    assert [s.split("|")[1] for s in out.split("\r") if s.startswith("OBX")] == ["1", "3"]
    assert seg(out, "PID")[3] == "123456^^^HOSP^MR"
    assert seg(out, "PV1")[3] == "W1^^B3"


def test_delete_a_single_string_and_all_occurrences():
    out = run(ORU, {"delete": "OBX"})
    assert "OBX" not in out and out.endswith("FL-5501|24331-1^Lipid panel^LN|||20240301080000\r")


def test_deleting_the_last_fields_trims_only_what_the_rule_added():
    msg = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|X|P|2.5\rPID|1||123||DOE\r"
    assert seg(run(msg, {"delete": "PID-5"}), "PID") == ["PID", "1", "", "123", "", ""]
    assert seg(run(msg, {"set": {"PID-9": "x"}}, {"delete": "PID-9"}), "PID") == ["PID", "1", "", "123", "", "DOE"]


# -- add ------------------------------------------------------------------------------------------
def test_add_a_repetition_and_a_segment():
    out = run(ORU, {"add": {"PID-3": ["A1", "", "", "NEWHIS", "PI"], "ZMR": ["1", ["a", "b"]]}})
    assert seg(out, "PID")[3].endswith("~A1^^^NEWHIS^PI")
    assert out.rstrip("\r").split("\r")[-1] == "ZMR|1|a^b"


# -- lookup --------------------------------------------------------------------------------------
LOOKUP = {"lookup": {"field": "OBX-3.1", "table": "lab-codes",
                     "set": {"OBX-3.1": "target_code", "OBX-3.2": "target_display", "OBX-3.3": "LN"},
                     "missing": "keep"}}


def test_lookup_per_obx_with_columns_and_literals():
    out = run(ORU, LOOKUP)
    assert seg(out, "OBX", 1)[3] == "2345-7^Glucose [Mass/volume] in Serum or Plasma^LN"
    assert seg(out, "OBX", 2)[3] == "2823-3^Potassium\\S\\Serum^LN"  # the table value is escaped
    assert seg(out, "OBX", 3)[3] == "CMT^Comment^L"  # missing: keep


@pytest.mark.parametrize("missing", ["drop", "error"])
def test_lookup_missing_drop_and_error(missing):
    r = {"lookup": {**LOOKUP["lookup"], "missing": missing}}
    with pytest.raises(Drop if missing == "drop" else MappingError) as e:
        run(ORU, r)
    assert "OBX-3.1" in str(e.value) and "lab-codes" in str(e.value)
    if missing == "error":
        assert "'CMT'" in str(e.value)  # the code, so the table can be fixed


def test_lookup_error_on_a_patient_field_withholds_the_value():
    with pytest.raises(MappingError) as e:
        run(ORU, {"lookup": {"field": "PID-3.1", "table": "lab-codes", "missing": "error"}})
    assert "123456" not in str(e.value) and "withheld" in str(e.value)


def test_lookup_default_value_and_default_set():
    out = run(ORU, {"lookup": {**LOOKUP["lookup"], "missing": "UNMAPPED"}})
    assert seg(out, "OBX", 3)[3] == "UNMAPPED^UNMAPPED^LN"
    out = run(ORU, {"lookup": {"field": "PID-8", "table": "sex"}})
    assert seg(out, "PID")[8] == "female"


def test_lookup_of_an_empty_field_does_nothing():
    out = run(ORU, {"lookup": {"field": "PID-9", "table": "sex", "missing": "error"}})
    assert out == ORU


def test_lookup_checks_table_names():
    errs = check_rules(rules({"lookup": {"field": "OBX-3.1", "table": "nope"}}), HL7, TABLES)
    assert errs[0].loc == (0, "lookup", "table") and "no table 'nope'" in errs[0].message


# -- when / foreach / drop / error -------------------------------------------------------------
def test_when_then_else():
    out = run(ORU, {"when": {"PV1-2": "E"}, "then": [{"set": {"PV1-3.1": "ER"}}]},
              {"when": {"PV1-2": "I"}, "then": [{"set": {"PV1-4": "x"}}], "else": [{"set": {"PV1-4": "y"}}]})
    assert seg(out, "PV1")[3:5] == ["ER^R2^B3", "y"]


def test_when_on_a_repeating_segment_works_per_occurrence():
    """ORU OBX-5 type fix: NM results that are not numbers become ST, each OBX on its own."""
    out = run(ORU, {"when": {"OBX-2": "NM", "OBX-5": {"not": {"regex": r"^-?\d+(\.\d+)?$"}}},
                    "then": [{"set": {"OBX-2": "ST"}}]})
    assert [seg(out, "OBX", n)[2] for n in (1, 2, 3)] == ["NM", "ST", "ST"]


def test_foreach_with_nested_lookup_and_when():
    out = run(ORU, {"foreach": "OBX", "rules": [
        {"when": {"OBX-3.3": "L"}, "then": [LOOKUP]},
        {"when": {"OBX-3.3": "LN"}, "then": [{"set": {"OBX-17": "mapped"}}]},
    ]})
    assert [seg(out, "OBX", n)[17] if len(seg(out, "OBX", n)) > 17 else "" for n in (1, 2, 3)] == \
        ["mapped", "mapped", ""]


def test_foreach_can_delete_the_occurrence():
    out = run(ORU, {"foreach": "OBX", "rules": [{"when": {"OBX-2": "ST"}, "then": [{"delete": "OBX"}]}]})
    assert [s.split("|")[1] for s in out.split("\r") if s.startswith("OBX")] == ["1", "2"]


def test_drop_and_error_rules():
    with pytest.raises(Drop, match="test patient"):
        run(ORU, {"when": {"PID-5.1": "DOE"}, "then": [{"drop": "test patient"}]})
    with pytest.raises(MappingError, match="no OBR"):
        run(ORU, {"when": {"OBR-4": {"missing": True}}, "then": [{"error": "no OBR"}]}, {"delete": "OBR"},
            {"when": {"OBR": {"missing": True}}, "then": [{"error": "no OBR"}]})


def test_regenerate_uids_is_consistent():
    msg = "MSH|^~\\&|A|B|C|D|20240101||ORM^O01|X|P|2.5\rZDS|1.2.3.4^RIS^Application^DICOM\r"
    ctx = RunContext(uid_secret=b"k" * 32)
    a = run(msg, {"regenerate_uids": ["ZDS-1.1"]}, ctx=ctx)
    b = run(msg, {"regenerate_uids": ["ZDS-1.1"]}, ctx=RunContext(uid_secret=b"k" * 32))
    new = seg(a, "ZDS")[1].split("^")[0]
    assert a == b and new.startswith("2.25.") and len(new) <= 64 and new != "1.2.3.4"
    assert seg(a, "ZDS")[1].endswith("^RIS^Application^DICOM")


# -- the message as a whole -------------------------------------------------------------------
@pytest.mark.parametrize("term,trailing", [("\r", True), ("\r", False), ("\n", True), ("\r\n", True)])
def test_segment_terminators_are_preserved(term, trailing):
    msg = ORU.rstrip("\r").replace("\r", term) + (term if trailing else "")
    out = run(msg, {"set": {"MSH-5": "LIS"}})
    assert out == msg.replace("|HIS|", "|LIS|", 1)


def test_other_delimiters_are_honoured():
    msg = "MSH#*!?%#A#B#C#D#20240101##ADT*A01#X#P#2.5\rPID#1##12*a%b*c\r"
    out = run(msg, {"set": {"PID-5.1": "x*y#z"}}, {"copy": {"from": "PID-3.2.2", "to": "PID-2"}})
    assert seg(out.replace("#", "|"), "PID")[0] == "PID"
    pid = out.split("\r")[1].split("#")
    assert pid[5] == "x?S?y?F?z" and pid[2] == "b"
    assert val(out, "PID-5.1") == "x*y#z"
    assert val(out, "MSH-2") == "*!?%"


def test_not_hl7_is_a_mapping_error():
    with pytest.raises(MappingError):
        Hl7Document("PID|1\r")


# -- the transform -----------------------------------------------------------------------------------
class _Ctx:
    class settings:
        tables = TABLES


ISSUE_RULES = [
    {"set": {"MSH-5": "LIS", "MSH-6": "MAIN"}},
    {"copy": {"from": "PID-3.1", "to": "PID-2"}},
    {"delete": ["ZPI", "PID-19"]},
    LOOKUP,
    {"when": {"PV1-2": "E"}, "then": [{"set": {"PV1-3.1": "ER"}}]},
]


def test_the_issue_example_as_a_transform_and_hl7apy_accepts_the_result():
    t = hl7_map(Hl7MapConfig(type="hl7_map", rules=ISSUE_RULES, validate_output=True), _Ctx())
    env = Envelope(channel="c", kind="hl7v2", payload=ORU.encode(), headers={"MSH-5": "HIS"})
    out = t(env)
    text = out.payload.decode()
    assert out.headers["MSH-5"] == "LIS" and out.headers["MSH-6"] == "MAIN"
    assert "ZPI" not in text and seg(text, "PV1")[3] == "ER^R2^B3" and seg(text, "PID")[2] == "123456"
    parse_message(text.replace("ZPI", "ZZZ"), validation_level=VALIDATION_LEVEL.STRICT).validate()


def test_validate_output_refuses_a_broken_result():
    t = hl7_map(Hl7MapConfig(type="hl7_map", rules=[{"set": {"OBX-2": "NOTATYPE" * 10}}], validate_output=True),
                _Ctx())
    with pytest.raises(ValueError):
        t(Envelope(channel="c", kind="hl7v2", payload=ORU.encode()))


def test_charset_is_kept_and_values_that_do_not_fit_are_an_error():
    latin = ORU.replace("|2.5.1\r", "|2.5.1||||||8859/1\r", 1).replace("DOE^JANE", "MÜLLER^JANE")
    t = hl7_map(Hl7MapConfig(type="hl7_map", rules=[{"set": {"PID-5.2": "Jürgen"}}]), _Ctx())
    out = t(Envelope(channel="c", kind="hl7v2", payload=latin.encode("iso8859-1"))).payload
    assert "MÜLLER^Jürgen".encode("iso8859-1") in out
    ascii_msg = ORU.replace("|2.5.1\r", "|2.5.1||||||ASCII\r", 1)
    with pytest.raises(MappingError, match="character set"):
        t(Envelope(channel="c", kind="hl7v2", payload=ascii_msg.encode()))
    # without MSH-18 an ASCII message takes UTF-8
    assert "Jürgen".encode() in t(Envelope(channel="c", kind="hl7v2", payload=ORU.encode())).payload
