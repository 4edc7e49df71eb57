"""listeners/hl7_ack: ACK building (original and enhanced mode, ERR per version) and ACK reading."""

from datetime import datetime

import hl7
import pytest
from mllp_peers import adt

from engine.hl7.ack import ack_code, build_ack, parse_ack, should_send
from engine.hl7.message import HL7Error, read_header


def segs(ack: bytes, enc="ascii"):
    return {s.split("|", 1)[0]: s.split("|") for s in ack.decode(enc).split("\r") if s}


def test_aa_fields():
    h = read_header(adt("C1", sender="HIS^1.2^ISO", facility="HOSP"))
    ack = build_ack(h, "AA", control_id="NEWID", now=datetime(2024, 1, 2, 3, 4, 5))
    s = segs(ack)
    msh = s["MSH"]
    # fields index: msh[n-1] is MSH-n
    assert msh[1] == "^~\\&"
    assert (msh[2], msh[3], msh[4], msh[5]) == ("RIS", "RAD", "HIS^1.2^ISO", "HOSP")
    assert msh[6] == "20240102030405"
    assert msh[8] == "ACK^A01^ACK" and msh[9] == "NEWID" and msh[10] == "P" and msh[11] == "2.5"
    assert s["MSA"][1:3] == ["AA", "C1"]
    assert "ERR" not in s
    assert ack.endswith(b"\r")
    parsed = hl7.parse(ack.decode())  # an independent parser reads it
    assert str(parsed.segment("MSA")(1)) == "AA"


def test_new_control_id_is_unique_and_short():
    h = read_header(adt("C1"))
    ids = {segs(build_ack(h, "AA"))["MSH"][9] for _ in range(100)}
    assert len(ids) == 100 and all(len(i) <= 20 for i in ids)


def test_ae_err_v25():
    h = read_header(adt("C2"))
    err = HL7Error(101, "required field PID-5 is missing", location="PID^1^5")
    s = segs(build_ack(h, "AE", error=err))
    assert s["MSA"][1:3] == ["AE", "C2"]
    e = s["ERR"]
    assert e[2] == "PID^1^5" and e[3] == "101^Required field missing^HL70357" and e[4] == "E"
    assert e[8] == "required field PID-5 is missing"


def test_ar_err_v23_uses_err1():
    h = read_header(adt("C3", version="2.3"))
    s = segs(build_ack(h, "AR", error=HL7Error(203, "nope", location="MSH^1^12")))
    assert s["MSH"][8] == "ACK^A01"  # no MSH-9.3 before 2.3.1
    assert s["ERR"][1] == "MSH^1^12^203&Unsupported version id&HL70357"
    assert s["MSA"][3] == "nope"


def test_charset_echo_and_encoding():
    raw = adt("C4", sender="KLINIKÜ", charset="UNICODE UTF-8", encoding="utf-8", name="Müller^Jürgen")
    ack = build_ack(read_header(raw), "AA")
    s = segs(ack, "utf-8")
    assert s["MSH"][17] == "UNICODE UTF-8" and s["MSH"][4] == "KLINIKÜ"
    assert "KLINIKÜ".encode() in ack
    raw = adt("C5", sender="KLINIKÜ", charset="8859/1", encoding="latin-1")
    ack = build_ack(read_header(raw), "AA")
    assert "KLINIKÜ".encode("latin-1") in ack and segs(ack, "latin-1")["MSH"][17] == "8859/1"


def test_default_header_for_garbage():
    ack = build_ack(None, "AR", error=HL7Error(100, "message does not start with an MSH segment"))
    s = segs(ack)
    assert s["MSA"][1] == "AR" and s["MSA"][2] == ""
    assert s["MSH"][8] == "ACK" and s["MSH"][11] == "2.5"
    assert s["ERR"][3].startswith("100^")


def test_detail_is_escaped():
    h = read_header(adt("C6"))
    s = segs(build_ack(h, "AE", error=HL7Error(102, "bad|value^x")))
    assert s["ERR"][8] == "bad\\F\\value\\S\\x"


@pytest.mark.parametrize("code,enhanced,expected", [
    (101, False, "AE"), (102, False, "AE"), (103, False, "AE"), (200, False, "AR"), (203, False, "AR"),
    (207, False, "AR"), (100, False, "AE"),
    (101, True, "CE"), (203, True, "CR"), (202, True, "CR"), (207, True, "CE"),
])
def test_ack_code(code, enhanced, expected):
    assert ack_code(enhanced=enhanced, ok=False, error=HL7Error(code, "x")) == expected
    assert ack_code(enhanced=enhanced, ok=True) == ("CA" if enhanced else "AA")


@pytest.mark.parametrize("msh15,code,send", [
    ("AL", "CA", True), ("AL", "CE", True), ("NE", "CA", False), ("NE", "CR", False),
    ("ER", "CA", False), ("ER", "CE", True), ("SU", "CA", True), ("SU", "CE", False), ("", "CA", True),
])
def test_should_send(msh15, code, send):
    h = read_header(adt("C7", msh15=msh15, msh16="AL"))
    assert should_send(h, code) is send
    assert should_send(read_header(adt("C8")), "AE") is True  # original mode always answers


def test_parse_ack():
    a = parse_ack(b"MSH|^~\\&|R|F|S|G|1||ACK^A01^ACK|X|P|2.5\rMSA|AE|C9\rERR||PID^1^5|101^Req^HL70357|E\r")
    assert (a.code, a.control_id, a.error_code, a.ok) == ("AE", "C9", "101", False)
    a = parse_ack(b"MSH|^~\\&|R|F|S|G|1||ACK|X|P|2.3\rMSA|CA|C9\rERR|MSH^1^12^203&x&HL70357\r")
    assert (a.code, a.error_code, a.ok) == ("CA", "203", True)
    for bad in (b"MSH|^~\\&|R|F|S|G|1||ACK|X|P|2.5\r", b"MSH|^~\\&|R|F|S|G|1||ACK|X|P|2.5\rMSA|ZZ|1\r",
                b"garbage"):
        with pytest.raises(HL7Error):
            parse_ack(bad)


# -- issue 9: the ACK is well-formed for the version given ---------------------------------------
@pytest.mark.parametrize("version,msh9,err_field", [
    ("2.1", "ACK^A01", "203"), ("2.2", "ACK^A01", "MSH^1^12^203&Unsupported version id&HL70357"),
    ("2.3", "ACK^A01", "MSH^1^12^203&Unsupported version id&HL70357"),
    ("2.3.1", "ACK^A01^ACK", "MSH^1^12^203&Unsupported version id&HL70357"),
    ("2.4", "ACK^A01^ACK", "MSH^1^12^203&Unsupported version id&HL70357"),
])
def test_err_layout_before_v25(version, msh9, err_field):
    h = read_header(adt("V1", version=version))
    s = segs(build_ack(h, "AR", error=HL7Error(203, "not taken", location="MSH^1^12")))
    assert s["MSH"][8] == msh9 and s["MSH"][11] == version
    assert s["ERR"][1] == err_field and s["MSA"][3] == "not taken"


@pytest.mark.parametrize("version", ["2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9", "2.9.1"])
def test_err_layout_from_v25(version):
    h = read_header(adt("V2", version=version))
    s = segs(build_ack(h, "AR", error=HL7Error(203, "not taken", location="MSH^1^12")))
    assert s["MSH"][8] == "ACK^A01^ACK" and s["MSH"][11] == version
    assert s["ERR"][2] == "MSH^1^12" and s["ERR"][3] == "203^Unsupported version id^HL70357"
    assert len(s["MSA"]) == 3  # MSA-3 is withdrawn from v2.5 on; the text is in ERR-8


@pytest.mark.parametrize("sent", ["9.9", "V2.5", "3.0", "2.5.0", ""])
def test_ack_to_a_version_that_is_not_hl7_v2_is_v25(sent):
    h = read_header(adt("V3").replace(b"|P|2.5", f"|P|{sent}".encode()))
    s = segs(build_ack(h, "AR", error=HL7Error(203, "not an HL7 v2 version", location="MSH^1^12")))
    assert s["MSH"][11] == "2.5" and s["MSH"][8] == "ACK^A01^ACK"
    assert s["ERR"][3].startswith("203^") and s["MSA"][1:3] == ["AR", "V3"]


def test_ack_version_echo_keeps_vid_components_and_drops_blanks():
    h = read_header(adt("V4").replace(b"|P|2.5", b"|P|2.5.1^DEU"))
    assert segs(build_ack(h, "AA"))["MSH"][11] == "2.5.1^DEU"
    h = read_header(adt("V5").replace(b"|P|2.5", b"|P| 2.4 "))
    s = segs(build_ack(h, "AA"))
    assert s["MSH"][11] == "2.4" and s["MSH"][8] == "ACK^A01^ACK"


def test_ack_to_a_bom_message_is_utf8_without_bom():
    raw = b"\xef\xbb\xbf" + adt("B1", sender="KLINIKÜ", encoding="utf-8")
    ack = build_ack(read_header(raw), "AA")
    assert ack.startswith(b"MSH|") and "KLINIKÜ".encode() in ack
    assert segs(ack, "utf-8")["MSA"][1:3] == ["AA", "B1"]


def test_parse_ack_from_a_windows_peer():
    """An ACK from downstream may carry a BOM and LF ends too: the same shared reader."""
    a = parse_ack(b"\xef\xbb\xbfMSH|^~\\&|R|F|S|G|1||ACK^A01^ACK|X|P|2.5\nMSA|AA|C10\n")
    assert (a.code, a.control_id, a.ok) == ("AA", "C10", True)
    a = parse_ack(b"\r\nMSH|^~\\&|R|F|S|G|1||ACK^A01^ACK|X|P|2.5\r\nMSA|AE|C11\r\nERR||PID^1^5|101^x^HL70357|E\r\n")
    assert (a.code, a.control_id, a.error_code) == ("AE", "C11", "101")
    with pytest.raises(HL7Error) as e:
        parse_ack("MSH|^~\\&|R|F|S|G|1||ACK|X|P|2.5\rMSA|AA|C12\r".encode("utf-16"))
    assert e.value.code == 103
