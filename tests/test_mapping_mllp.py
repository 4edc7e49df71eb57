"""End to end: an ORU over MLLP through a route with the issue's hl7_map; what the downstream MLLP server gets.

Both peers are tests/mllp_peers.py (their own framing), the engine is the real runtime,
and the tables come from a CSV file named in top-level `tables:`.
"""

from __future__ import annotations

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from mllp_peers import MLLPReceiver, RawClient, msa, segment

ORU = (b"MSH|^~\\&|LAB|LABFAC|HIS|HOSP|20240301101500||ORU^R01^ORU_R01|ORU-77|P|2.5.1\r"
       b"PID|1||123456^^^HOSP^MR||DOE^JANE||19700215|F|||||||||||||||||||\r"
       b"PV1|1|E|W1^R2^B3\r"
       b"ZPI|internal|stuff\r"
       b"OBR|1|PL-77|FL-5501|24331-1^Lipid panel^LN|||20240301080000\r"
       b"OBX|1|NM|GLU^Glucose^L||5.5|mmol/L|||||F\r"
       b"OBX|2|NM|K^Potassium^L||4.1|mmol/L|||||F\r"
       b"OBX|3|ST|CMT^Comment^L||see note||||||F\r")

CONFIG = """
store: {{url: "sqlite:///data/m.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
tables:
  lab-codes: {{file: {csv}}}         # columns: code,target_code,target_display,target_system
  sex: {{values: {{M: male, F: female, U: unknown}}}}
channels:
  lab-in:
    source: {{type: mllp, host: 127.0.0.1, port: 0}}
    routes:
      - name: to-lis
        transforms:
          - type: hl7_map
            rules:
              - set: {{MSH-5: LIS, MSH-6: MAIN}}
              - copy: {{from: PID-3.1, to: PID-2}}
              - delete: [ZPI, PID-19]              # whole segments or fields
              - lookup: {{field: OBX-3.1, table: lab-codes, set: {{OBX-3.1: target_code, OBX-3.2: target_display, OBX-3.3: "LN"}}, missing: {missing}}}
              - when: {{"PV1-2": E}}
                then: [{{set: {{PV1-3.1: ER}}}}]
        to: {{type: mllp, host: 127.0.0.1, port: {port}}}
"""  # noqa: E501 - the issue's own YAML, one rule a line


def _csv(tmp_path):
    p = tmp_path / "lab-codes.csv"
    p.write_text("code,target_code,target_display,target_system\n"
                 "GLU,2345-7,Glucose [Mass/volume] in Serum or Plasma,http://loinc.org\n"
                 "K,2823-3,Potassium [Moles/volume] in Serum or Plasma,http://loinc.org\n")
    return p


def test_oru_through_hl7_map_reaches_the_downstream_server_mapped(engine_factory, tmp_path):
    with MLLPReceiver() as rx:
        e = engine_factory(CONFIG.format(csv=_csv(tmp_path), port=rx.port, missing="keep"))
        with RawClient(*e.address("lab-in")) as c:
            ack = c.request(ORU)
        assert msa(ack)[1] == "AA"
        got = rx.wait_for(1)[0]
    text = got.decode()
    assert segment(got, "MSH")[4:6] == ["LIS", "MAIN"]
    assert segment(got, "MSH")[9] == "ORU-77"  # the control id is the sender's
    assert segment(got, "PID")[2] == "123456"
    assert "ZPI" not in text
    assert segment(got, "PV1")[3] == "ER^R2^B3"
    obx = [s.split("|") for s in text.split("\r") if s.startswith("OBX|")]
    assert [o[3] for o in obx] == ["2345-7^Glucose [Mass/volume] in Serum or Plasma^LN",
                                   "2823-3^Potassium [Moles/volume] in Serum or Plasma^LN", "CMT^Comment^L"]
    # untouched segments are the sender's bytes
    assert b"OBR|1|PL-77|FL-5501|24331-1^Lipid panel^LN|||20240301080000\r" in got
    parse_message(text.strip(), validation_level=VALIDATION_LEVEL.STRICT).validate()


def test_missing_error_dead_letters_with_the_code_and_sends_nothing(engine_factory, tmp_path):
    from engine.messages import list_messages, show_message

    with MLLPReceiver() as rx:
        e = engine_factory(CONFIG.format(csv=_csv(tmp_path), port=rx.port, missing="error"))
        with RawClient(*e.address("lab-in")) as c:
            assert msa(c.request(ORU))[1] == "AA"  # accepted and stored: the mapping runs on the route
        rows = e.wait_for(lambda: list_messages(e.store, state="dead", limit=5))
        info = show_message(e.store, rows[0]["id"])
        err = info["deliveries"][0]["last_error"]
        assert "'CMT'" in err and "lab-codes" in err and "OBX-3.1" in err
        assert rx.received == []
