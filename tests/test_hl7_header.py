"""engine/hl7/message.py: MSH reading, charsets, escapes, field paths, 0357 errors."""

import pytest

from engine.hl7 import message as h

MSG = ("MSH|^~\\&|LAB^1.2.3^ISO|FAC|RIS|RAD|20240101120000||ORU^R01^ORU_R01|CTRL\\F\\1|P^T|2.5.1|||AL|NE||"
       "UNICODE UTF-8\rPID|1||12345^^^H^MR~999^^^X||Müller^Jürgen||19800101|M\r"
       "OBX|1|ST|A||first\rOBX|2|ST|B||v\\S\\x\r")


def test_read_header_fields():
    hd = h.read_header(MSG.encode("utf-8"))
    assert hd.sending_application == "LAB" and hd.sending_facility == "FAC"
    assert hd.receiving_application == "RIS" and hd.receiving_facility == "RAD"
    assert (hd.message_type, hd.trigger_event, hd.message_structure) == ("ORU", "R01", "ORU_R01")
    assert hd.control_id == "CTRL|1"  # unescaped
    assert hd.get(10) == "CTRL\\F\\1"  # raw, as sent
    assert hd.processing_id == "P" and hd.version == "2.5.1"
    assert (hd.accept_ack_type, hd.application_ack_type) == ("AL", "NE") and hd.enhanced_mode
    assert hd.charset == "UNICODE UTF-8" and hd.codec == "utf-8"
    assert hd.get(3) == "LAB^1.2.3^ISO"
    assert hd.timestamp == "20240101120000"


def test_as_headers_msh_only_no_phi():
    headers = h.read_header(MSG.encode("utf-8")).as_headers()
    assert headers["MSH-9.1"] == "ORU" and headers["MSH-9.2"] == "R01" and headers["MSH-10"] == "CTRL|1"
    assert headers["MSH-3"] == "LAB" and headers["MSH-9"] == "ORU^R01^ORU_R01"
    assert all(k.startswith("MSH-") for k in headers)
    assert "MSH-7" not in headers
    flat = repr(headers)
    assert "Müller" not in flat and "12345" not in flat and "19800101" not in flat


@pytest.mark.parametrize("charset,codec,name", [
    ("UNICODE UTF-8", "utf-8", "Müller^Jürgen"),
    ("UTF-8", "utf-8", "Łukasz^Żółć"),
    ("8859/1", "iso8859-1", "Müller^Jürgen"),
    ("ASCII", "ascii", "DOE^JOHN"),
])
def test_charsets(charset, codec, name):
    text = f"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5||||||{charset}\rPID|1||1||{name}\r"
    raw = text.encode(codec)
    hd = h.read_header(raw)
    assert hd.codec == codec
    assert h.decode(raw) == text
    assert h.field(raw, "PID-5") == name.split("^")[0]


def test_charset_mismatch_and_unknown():
    raw = "MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller\r".encode("latin-1")
    with pytest.raises(h.HL7Error) as e:
        h.decode(raw)
    assert e.value.code == 102
    with pytest.raises(h.HL7Error) as e:
        h.read_header(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5||||||KLINGON\r")
    assert e.value.code == 103 and e.value.location == "MSH^1^18"


def test_no_charset_sniffs():
    assert h.read_header(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\r").codec == "ascii"
    assert h.read_header("MSH|^~\\&|Ä|B|C|D|1||ADT^A01|1|P|2.5\r".encode()).codec == "utf-8"
    assert h.read_header("MSH|^~\\&|Ä|B|C|D|1||ADT^A01|1|P|2.5\r".encode("latin-1")).codec == "iso8859-1"


@pytest.mark.parametrize("raw,code", [
    (b"", 100), (b"hello world", 100), (b"PID|1||1\r", 100),
    (b"MSHA^~\\&|A", 102), (b"MSH|^^\\&|A|B|C|D|1||ADT^A01|1|P|2.5", 102),
    (b"MSH|^~\\&|A|B|C|D|1|||1|P|2.5", 101), (b"MSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5", 101),
])
def test_errors(raw, code):
    with pytest.raises(h.HL7Error) as e:
        h.read_header(raw)
    assert e.value.code == code
    assert e.value.code_text == h.TABLE_0357[code]


def test_missing_control_id_keeps_partial_header():
    with pytest.raises(h.HL7Error) as e:
        h.read_header(b"MSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5")
    assert e.value.header is not None and e.value.header.sending_application == "A"


def test_other_delimiters_and_newlines():
    raw = b"\nMSH#$%*@#APP#FAC#R#F#1##ADT$A04#X$1#P#2.3\nPID#1##7##NAME$GIVEN\n"
    hd = h.read_header(raw)
    assert hd.delimiters.field == "#" and hd.delimiters.component == "$"
    assert hd.trigger_event == "A04" and hd.control_id == "X$1"
    assert h.field(raw, "PID-5.2") == "GIVEN"


def test_field_paths():
    raw = MSG.encode("utf-8")
    assert h.field(raw, "PID-8") == "M"
    assert h.field(raw, "PID-5") == "Müller"
    assert h.field(raw, "PID-5.2") == "Jürgen"
    assert h.field(raw, "PID-3[2]") == "999"
    assert h.field(raw, "PID-3.4") == "H"
    assert h.field(raw, "OBX[2]-5") == "v^x"
    assert h.field(raw, "MSH-9.2") == "R01"
    assert h.field(raw, "MSH-3.2") == "1.2.3"
    assert h.field(raw, "MSH-10") == "CTRL|1"
    assert h.field(raw, "ZZZ-1") == "" and h.field(raw, "PID-30") == ""
    msg = h.parse(MSG)
    assert h.field(msg, "PID-5.2") == "Jürgen"
    with pytest.raises(ValueError):
        h.parse_path("PID.5")


def test_escape_roundtrip():
    s = "a|b^c&d~e\\f"
    assert h.escape(s) == "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"
    assert h.unescape(h.escape(s)) == s
    assert h.unescape("\\X0D\\ and \\H\\") == "\\X0D\\ and \\H\\"
    d = h.Delimiters("#", "$", "%", "*", "@")
    assert h.unescape(h.escape("x#y$z", d), d) == "x#y$z"
