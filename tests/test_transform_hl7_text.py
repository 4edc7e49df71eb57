"""HL7 escaping, unescaping, charset decoding and the segment reader."""

from __future__ import annotations

import pytest

from engine.hl7.message import Delimiters
from transforms.hl7_escape import delimiters_of, escape, unescape
from transforms.hl7_text import V2Message, decode_hl7


@pytest.mark.parametrize("plain, escaped", [
    ("a|b", "a\\F\\b"),
    ("a^b", "a\\S\\b"),
    ("a~b", "a\\R\\b"),
    ("a&b", "a\\T\\b"),
    ("a\\b", "a\\E\\b"),
    ("\\F\\", "\\E\\F\\E\\"),  # a literal escape sequence must not be read back as a delimiter
    ("|^~\\&", "\\F\\\\S\\\\R\\\\E\\\\T\\"),
    ("line1\nline2", "line1\\.br\\line2"),
    ("", ""),
    ("Müller", "Müller"),
])
def test_escape_roundtrip(plain, escaped):
    assert escape(plain) == escaped
    assert unescape(escaped) == plain


def test_escape_with_custom_delimiters():
    d = Delimiters("#", "$", "*", "/", "%")
    assert escape("a#b$c*d/e%f", d) == "a/F/b/S/c/R/d/E/e/T/f"
    assert unescape("a/F/b/S/c/R/d/E/e/T/f", d) == "a#b$c*d/e%f"
    assert delimiters_of("MSH#$*/%#APP") == d


def test_unescape_hex_formatting_and_unknown():
    assert unescape("\\X4D\\") == "M"
    assert unescape("\\XC3BC\\") == "ü"  # UTF-8 bytes
    assert unescape("\\XFC\\") == "ü"  # not UTF-8: ISO 8859-1
    assert unescape("\\H\\bold\\N\\") == "bold"
    assert unescape("a\\.br\\b") == "a\nb"
    assert unescape("keep \\Zcustom\\ as is") == "keep \\Zcustom\\ as is"
    assert unescape("trailing \\") == "trailing \\"


@pytest.mark.parametrize("charset, encoding", [("8859/1", "latin-1"), ("UNICODE UTF-8", "utf-8"),
                                               ("8859/15", "iso8859-15"), ("", "utf-8")])
def test_decode_by_msh18(charset, encoding):
    msg = f"MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5.1||||||{charset}\rPID|1||1||Müller€"
    if encoding == "latin-1":
        msg = msg.replace("€", "")
    assert decode_hl7(msg.encode(encoding)) == msg


def test_decode_falls_back_to_latin1_when_bytes_contradict_msh18():
    msg = "MSH|^~\\&|A|B|C|D|20240101||ADT^A01|1|P|2.5.1||||||UNICODE UTF-8\rPID|1||1||Müller"
    assert decode_hl7(msg.encode("latin-1")) == msg


def test_reader_components_repetitions_and_nulls():
    m = V2Message("MSH|^~\\&|A|B|C|D|20240101||ADT^A08^ADT_A01|1|P|2.5.1\n"
                  "PID|1||1^^^H&1.2&ISO^MR~2^^^X||\"\"|A\\S\\B\n")
    pid = m.first("PID")
    assert m.message_type == ("ADT", "A08") and m.version == "2.5.1"
    assert pid.get(3, 4, 2) == "1.2" and pid.get(3, 1, rep=1) == "2"
    assert pid.reps(5) == [] and pid.get(6) == "A^B"
    assert pid.get(99) == "" and m.first("ZZZ") is None
    with pytest.raises(ValueError):
        V2Message("PID|1")
