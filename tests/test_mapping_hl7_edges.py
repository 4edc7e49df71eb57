"""hl7_map edges from the issue 16 probe (docs/notes/probe-issue-16.md, "Not done").

- A segment the rules create (``OBX[5]`` when there are 3) or ``add`` goes after the last one of
  its kind *and the NTE notes that follow it*: an NTE belongs to the segment before it, so a new
  OBX must not take OBX 3's comment (it was inserted between OBX 3 and its NTE).
- A field position without a component in a condition reads the field's first component (per
  repetition): ``when: {MSH-9: ORU}`` is true for ``ORU^R01``; ``MSH-9: ORU^R01`` is never true.
  The intended rule, documented in docs/mappings.md; in a route ``when:`` the key ``MSH-9`` is
  answered by the envelope header (the whole type), shown here too.
"""

from __future__ import annotations

from pydantic import TypeAdapter
from test_mapping_hl7 import ORU, run

from engine.envelope import Envelope
from engine.hl7.message import read_header
from engine.mapping.rules import RuleList
from engine.match import matches
from transforms.hl7_map import Hl7MapConfig
from transforms.hl7_map import build as hl7_map

WITH_NOTES = (ORU.replace("OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\r",
                          "OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\rNTE|1||fasting\r")
              + "NTE|1||comment of OBX 3\rNTE|2||second line\r")


def lines(text: str) -> list[str]:
    return text.rstrip("\r").split("\r")


def test_created_obx_goes_after_the_last_obx_and_its_notes():
    out = lines(run(WITH_NOTES, {"set": {"OBX[5]-1": "5", "OBX[5]-2": "ST"}}))
    assert out[-5:] == ["OBX|3|ST|CMT^Comment^L||see \\T\\ note||||||F", "NTE|1||comment of OBX 3",
                        "NTE|2||second line", "OBX", "OBX|5|ST"]
    assert out[out.index("NTE|1||fasting") - 1].startswith("OBX|1|")  # OBX 1's note stays with it


def test_added_obx_and_note_go_to_their_group():
    out = lines(run(WITH_NOTES, {"add": {"OBX": ["4", "ST", ["X", "New", "L"], "", "new"]}}))
    assert out[-3:] == ["NTE|1||comment of OBX 3", "NTE|2||second line", "OBX|4|ST|X^New^L||new"]
    # a new NTE goes after the last NTE (the NTE rule does not skip past itself)
    assert lines(run(WITH_NOTES, {"add": {"NTE": ["3", "", "third line"]}}))[-1] == "NTE|3||third line"
    # without notes nothing changes: after the last OBX, before what follows it
    plain = ORU + "ZXX|1\r"
    assert lines(run(plain, {"set": {"OBX[4]-1": "4"}}))[-2:] == ["OBX|4", "ZXX|1"]


def transform(rules: list) -> object:
    return hl7_map(Hl7MapConfig(type="hl7_map", rules=TypeAdapter(RuleList).validate_python(rules)))


def test_a_bare_field_in_a_condition_reads_its_first_component():
    env = Envelope(channel="c", kind="hl7v2", payload=ORU.encode())
    mark = [{"when": {"MSH-9": "ORU"}, "then": [{"set": {"PV1-4": "first-component"}}]},
            {"when": {"MSH-9": "ORU^R01"}, "then": [{"set": {"PV1-5": "never"}}]},
            {"when": {"MSH-9.2": "R01"}, "then": [{"set": {"PV1-6": "trigger"}}]},
            {"when": {"PID-3": "998877"}, "then": [{"set": {"PV1-7": "any-repetition"}}]}]
    out = transform(mark)(env).payload.decode()
    pv1 = next(s for s in out.split("\r") if s.startswith("PV1|")).split("|")
    assert pv1[4:8] == ["first-component", "", "trigger", "any-repetition"]


def test_route_when_msh9_is_the_envelope_header_msh9_1_is_the_same_everywhere():
    payload = ORU.encode()
    stored = Envelope(channel="c", kind="hl7v2", payload=payload, headers=read_header(payload).as_headers())
    assert stored.headers["MSH-9"] == "ORU^R01^ORU_R01"
    assert matches({"MSH-9": "ORU^R01^ORU_R01"}, stored) and matches({"MSH-9": "ORU^R01*"}, stored)
    assert not matches({"MSH-9": "ORU"}, stored)
    bare = Envelope(channel="c", kind="hl7v2", payload=payload)
    for env in (stored, bare):
        assert matches({"MSH-9.1": "ORU", "MSH-9.2": "R01"}, env)
