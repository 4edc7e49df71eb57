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
    ("ISO IR6", "ascii", "DOE^JOHN"),
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


# -- issue 9: what comes before MSH, charsets from the whole message, versions -----------------
BOM = b"\xef\xbb\xbf"


def test_utf8_bom_is_skipped_and_means_utf8():
    raw = BOM + "MSH|^~\\&|A|B|C|D|1||ADT^A01|B1|P|2.5\rPID|1||1||Müller^Jürgen\r".encode()
    hd = h.read_header(raw)
    assert (hd.start, hd.bom, hd.codec, hd.charset) == (3, True, "utf-8", "")
    assert h.decode(raw).startswith("MSH|") and "Müller" in h.decode(raw)
    assert h.field(raw, "PID-5.2") == "Jürgen" and h.field(raw, "MSH-10") == "B1"
    assert h.strip_preamble(raw) == raw[3:]


def test_bom_with_declared_charset():
    ascii_only = BOM + b"MSH|^~\\&|A|B|C|D|1||ADT^A01|B2|P|2.5||||||8859/1\rPID|1||1||DOE\r"
    assert h.read_header(ascii_only).codec == "iso8859-1"
    assert h.decode(ascii_only).endswith("DOE\r")  # both readings agree: accepted
    latin = BOM + "MSH|^~\\&|A|B|C|D|1||ADT^A01|B3|P|2.5||||||8859/1\rPID|1||1||Müller\r".encode("latin-1")
    with pytest.raises(h.HL7Error) as e:
        h.decode(latin)
    assert e.value.code == 102 and e.value.location == "MSH^1^18" and "byte order mark" in e.value.text
    utf8 = BOM + "MSH|^~\\&|A|B|C|D|1||ADT^A01|B4|P|2.5||||||UNICODE UTF-8\rPID|1||1||Müller\r".encode()
    assert "Müller" in h.decode(utf8)


@pytest.mark.parametrize("prefix", [b"\r\n", b"\n\n", b"  ", b"\x00", BOM + b"\r\n", b"\r\n" + BOM])
def test_blank_lines_before_msh(prefix):
    raw = prefix + b"MSH|^~\\&|A|B|C|D|1||ADT^A01|P1|P|2.5\rPID|1||1||DOE\r"
    assert h.read_header(raw).start == len(prefix)
    assert h.read_header(raw).bom == (BOM in prefix)
    assert h.decode(raw).startswith("MSH|")
    assert h.field(raw, "PID-5") == "DOE"


@pytest.mark.parametrize("raw,name", [
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|U1|P|2.5\r".encode("utf-16"), "UTF-16"),
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|U1|P|2.5\r".encode("utf-16-be"), "UTF-16BE"),
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|U1|P|2.5\r".encode("utf-16-le"), "UTF-16LE"),
    ("MSH|^~\\&|A|B|C|D|1||ADT^A01|U1|P|2.5\r".encode("utf-32"), "UTF-32"),
    (b"\xfe\xff" + "MSH|".encode("utf-16-be"), "UTF-16"),
])
def test_wide_encodings_are_refused_with_a_reason(raw, name):
    with pytest.raises(h.HL7Error) as e:
        h.read_header(raw)
    assert e.value.code == 103 and name in e.value.text and "UTF-8" in e.value.text


def test_no_charset_reads_the_whole_message():
    """MSH in ASCII, a UTF-8 (or Latin-1) name further down: not 'invalid ascii'."""
    utf8 = "MSH|^~\\&|A|B|C|D|1||ADT^A01|S1|P|2.5\rPID|1||1||Müller\r".encode()
    assert h.read_header(utf8).codec == "ascii" and "Müller" in h.decode(utf8)
    latin = "MSH|^~\\&|A|B|C|D|1||ADT^A01|S2|P|2.5\rPID|1||1||Müller\r".encode("latin-1")
    assert "Müller" in h.decode(latin)
    declared = "MSH|^~\\&|A|B|C|D|1||ADT^A01|S3|P|2.5||||||ASCII\rPID|1||1||Müller\r".encode()
    with pytest.raises(h.HL7Error) as e:
        h.decode(declared)  # a declared charset is held to
    assert e.value.code == 102


def test_versions_are_table_0104():
    for v in ("2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1",
              "2.8.2", "2.9", "2.9.1"):
        assert h.is_hl7_version(v), v
    for v in ("9.9", "2.0", "2.3.2", "3.0", "V2.5", "2.5.0", "25", "", "2.10"):
        assert not h.is_hl7_version(v), v
    raw = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|V1|P| 2.5.1 ^DEU\r"
    assert h.read_header(raw).version == "2.5.1"  # first component, blanks around it ignored


def test_split_file():
    one = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|F1|P|2.5\r\nPID|1||1||DOE\r\n"
    two = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|F2|P|2.5\nPID|1||2||ROE\n"
    assert h.split_file(BOM + one + b"\r\n" + BOM + two + b"\n\n") == [one, two]
    assert h.split_file(b"\n\n" + one) == [one]
    assert h.split_file(b"") == [] and h.split_file(BOM + b"\r\n") == []
    assert h.split_file(b"garbage\r" + one) == [b"garbage\r", one]  # not lost: refused by the receiver
    wide = one.decode().encode("utf-16")
    assert h.split_file(wide) == [wide]
    assert h.read_header(h.split_file(BOM + one)[0]).control_id == "F1"
