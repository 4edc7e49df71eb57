"""Cheap HL7 v2 header reading, charset decoding and field access for the whole engine.

Every HL7 message that enters medrelay passes through ``read_header``: the MLLP
listener needs MSH-10 and the ACK fields before it may answer, the router needs
MSH-9 to pick routes, and both must stay fast. So this module reads the MSH
segment only, straight from the bytes, and leaves full parsing (python-hl7 for
``field()``, hl7apy for validation) to the callers that really need it.

It lives in ``engine`` because the router uses it; it imports nothing from
listeners or routes. Error codes follow HL7 table 0357 so that a listener can
turn an ``HL7Error`` into an ERR segment without a lookup table of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import hl7 as _hl7

# -- HL7 table 0357: message error condition codes -------------------------------
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_PROCESSING_ID = 202
UNSUPPORTED_VERSION_ID = 203
UNKNOWN_KEY_IDENTIFIER = 204
DUPLICATE_KEY_IDENTIFIER = 205
APPLICATION_RECORD_LOCKED = 206
APPLICATION_INTERNAL_ERROR = 207

TABLE_0357: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

# Codes that mean "this receiver will not take this kind of message" (answer AR/CR)
# rather than "the content of this message is wrong" (AE/CE); after HL7 v2.5 2.9.2.
REJECT_CODES = frozenset({200, 201, 202, 203, 206, 207})

# -- HL7 table 0104: the HL7 v2 versions (MSH-12.1) ------------------------------------
# 2.1 to 2.9 with their minor releases, as published; 2.0 / 2.0D (1988, before MSH-12 had
# a table) and 2.3.2 (withdrawn, never published) are left out. A receiver answers
# anything else with AR 203 unless a channel narrows the list further (accept_versions).
HL7_VERSIONS: tuple[str, ...] = (
    "2.1", "2.2", "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1",
    "2.8", "2.8.1", "2.8.2", "2.9", "2.9.1",
)
_HL7_VERSION_SET = frozenset(HL7_VERSIONS)


def is_hl7_version(version: str) -> bool:
    """Whether ``version`` (MSH-12.1, already stripped) is a published HL7 v2 version."""
    return version in _HL7_VERSION_SET


class HL7Error(Exception):
    """A problem with an HL7 message, carrying its HL7 table 0357 code.

    ``location`` is an ERR-2 style position (``"MSH^1^12"``: segment, sequence,
    field) when known. ``header`` is whatever of the MSH could be read, so a
    listener can still build an ACK that swaps sender and receiver and echoes
    MSH-10 even when the message is rejected.
    """

    def __init__(self, code: int, text: str, *, location: str | None = None,
                 header: Header | None = None, reject: bool = False) -> None:
        super().__init__(f"{code} {TABLE_0357.get(code, 'Error')}: {text}")
        self.code = code
        self.text = text
        self.location = location
        self.header = header
        # A reject (AR) whatever the code: the payload is not one message at all (e.g. two
        # messages in one MLLP frame), so it was not taken in any part (engine.hl7.ack.ack_code).
        self.reject = reject

    @property
    def code_text(self) -> str:
        """The table 0357 description of ``code`` (what goes in ERR-3.2)."""
        return TABLE_0357.get(self.code, "Error")


# -- character sets (HL7 table 0211, MSH-18) ---------------------------------------
# Only charsets in which the MSH delimiters are single ASCII bytes: the header is
# read from the raw bytes before anything is decoded. UTF-16/32 would break that
# and are refused as "table value not found".
CHARSETS: dict[str, str] = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",  # ISO 646, table 0211's other name for ASCII
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",  # not in table 0211 but sent by many systems
    "8859/1": "iso8859-1",
    "8859/2": "iso8859-2",
    "8859/3": "iso8859-3",
    "8859/4": "iso8859-4",
    "8859/5": "iso8859-5",
    "8859/6": "iso8859-6",
    "8859/7": "iso8859-7",
    "8859/8": "iso8859-8",
    "8859/9": "iso8859-9",
    "8859/15": "iso8859-15",
}


# Every value of HL7 table 0211 (v2.9, with the v2.3 codes JAS2020 and JIS X 0202), as MSH-18
# may name it in any repetition: the first is the message's charset (one of CHARSETS above),
# the others are alternates a sender may switch to (MSH-20, ISO 2022 escapes) and that are
# kept as sent. Compared in upper case, as CHARSETS is: senders write "unicode utf-8".
TABLE_0211 = frozenset({
    "ASCII", "8859/1", "8859/2", "8859/3", "8859/4", "8859/5", "8859/6", "8859/7", "8859/8", "8859/9",
    "8859/15", "ISO IR6", "ISO IR14", "ISO IR87", "ISO IR159", "GB 18030-2000", "KS X 1001",
    "CNS 11643-1992", "BIG-5", "UNICODE", "UNICODE UTF-8", "UNICODE UTF-16", "UNICODE UTF-32",
    "JAS2020", "JIS X 0202",
})


def _charset_problem(value: str) -> str:
    if value.strip().upper() in TABLE_0211:
        return (f"character set {value[:40]!r} is not one this receiver reads (its delimiters must be single "
                "ASCII bytes, without ISO 2022 switching): send UNICODE UTF-8")
    return f"{value[:40]!r} is not a character set of HL7 table 0211"


def codec_for(charset: str) -> str:
    """Python codec for an MSH-18 value; ``HL7Error(103)`` when we do not support it."""
    try:
        return CHARSETS[charset.strip().upper()]
    except KeyError:
        raise HL7Error(TABLE_VALUE_NOT_FOUND, f"MSH-18 {_charset_problem(charset)}",
                       location="MSH^1^18") from None


def check_charsets(header: Header) -> None:
    """Every repetition of MSH-18 must name a character set: the first one this engine reads,
    the others (alternates) any value of table 0211; else ``HL7Error(103)`` at that repetition.

    ``read_header`` holds the first repetition to CHARSETS because it decodes with it; the
    alternates it does not need, so before this check an MSH-18 of ``UNICODE UTF-8~KLINGON``
    was accepted (AA) without a word. Every HL7 source calls this (listeners/hl7_receive.py),
    so MLLP, http, file and ``medrelay import`` answer it alike: AE 103 with ERR-2
    ``MSH^1^18^<repetition>``, as the first repetition's unknown value and a UTF-16 message are.
    Readers of stored messages do not: a message taken before stays readable.
    """
    raw = header.fields[18] if len(header.fields) > 18 else ""
    for n, value in enumerate(raw.split(header.delimiters.repetition), 1):
        v = value.strip().upper()
        if not v or v in CHARSETS or (n > 1 and v in TABLE_0211):
            continue
        raise HL7Error(TABLE_VALUE_NOT_FOUND, f"MSH-18 repetition {n}: {_charset_problem(value)}",
                       location="MSH^1^18" if n == 1 else f"MSH^1^18^{n}", header=header)


# -- encoding characters and escapes --------------------------------------------------
@dataclass(frozen=True, slots=True)
class Delimiters:
    """MSH-1 and MSH-2: field, component, repetition, escape and subcomponent separators."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"

    @property
    def encoding_characters(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent


DEFAULT_DELIMITERS = Delimiters()


def escape(text: str, d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Escape delimiter characters so ``text`` can be put into one HL7 field/component.

    The escape character is replaced first, otherwise the escapes we add would be
    escaped again. Segment terminators in the text become spaces: an escape for a
    carriage return (``\\.br\\``) is formatted-text only and not valid in every type.
    """
    e = d.escape
    out = text.replace(e, f"{e}E{e}")
    out = out.replace(d.field, f"{e}F{e}").replace(d.component, f"{e}S{e}")
    out = out.replace(d.subcomponent, f"{e}T{e}").replace(d.repetition, f"{e}R{e}")
    return out.replace("\r", " ").replace("\n", " ")


def unescape(text: str, d: Delimiters = DEFAULT_DELIMITERS) -> str:
    """Undo ``\\F\\ \\S\\ \\T\\ \\R\\ \\E\\``; other escapes (``\\X..\\``, ``\\H\\``) are left as they are.

    Left alone on purpose: hex data and highlighting need the charset and a
    formatted-text type to mean anything, and the routing values we unescape never
    carry them.
    """
    e = d.escape
    if e not in text:
        return text
    table = {"F": d.field, "S": d.component, "T": d.subcomponent, "R": d.repetition, "E": e}
    pattern = re.compile(re.escape(e) + "([FSTRE])" + re.escape(e))
    return pattern.sub(lambda m: table[m.group(1)], text)


# -- what may come before MSH ------------------------------------------------------------
# Windows tools save "UTF-8 with BOM" and some senders put a blank line before MSH.
# Neither is part of the HL7 message: ``message_start`` finds where MSH begins, and every
# reader (the header, ``decode``, ``field``, the listener before it stores) starts there.
BOM_UTF8 = b"\xef\xbb\xbf"
_BLANK_BEFORE_MSH = frozenset(b" \t\r\n\x00")
# Encodings whose MSH delimiters are not single ASCII bytes: refused with a clear reason
# rather than "does not start with MSH". UTF-32 first: its LE BOM begins with UTF-16's.
_WIDE_ENCODINGS: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xfe\x00\x00", "UTF-32 (byte order mark FF FE 00 00)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (byte order mark 00 00 FE FF)"),
    (b"\xff\xfe", "UTF-16 (byte order mark FF FE)"),
    (b"\xfe\xff", "UTF-16 (byte order mark FE FF)"),
    (b"M\x00S\x00H\x00", "UTF-16LE (no byte order mark)"),
    (b"\x00M\x00S\x00H", "UTF-16BE (no byte order mark)"),
)


def message_start(payload: bytes) -> int:
    """Offset of ``MSH`` in ``payload``: past one leading UTF-8 BOM and blank bytes.

    O(1) for a message that starts with MSH (the usual case): only the preamble is looked at.
    """
    start = 3 if payload[:3] == BOM_UTF8 else 0
    n = len(payload)
    while start < n and payload[start] in _BLANK_BEFORE_MSH:
        start += 1
    if start and payload[start:start + 3] == BOM_UTF8:  # a BOM after a blank line (files joined)
        return message_start(payload[start + 3:]) + start + 3
    return start


def strip_preamble(payload: bytes) -> bytes:
    """``payload`` from its MSH on (the same object when there is nothing before MSH)."""
    if payload[:1] == b"M":
        return payload
    start = message_start(payload)
    return payload[start:] if start else payload


def message_count(payload: bytes, field_separator: str = "|") -> int:
    """How many MSH segments ``payload`` holds: 1 for one message (0 when it has none at its start).

    A segment starts after CR (or LF, which some senders end lines with), so ``MSH|`` inside a
    field value does not count. Two memchr-speed scans, no parse: cheap enough for every frame.
    """
    fs = field_separator.encode("latin-1")
    first = 1 if strip_preamble(payload)[:4] == b"MSH" + fs else 0
    return first + payload.count(b"\rMSH" + fs) + payload.count(b"\nMSH" + fs)


def wide_encoding(payload: bytes) -> str | None:
    """The name of a UTF-16/UTF-32 encoding ``payload`` is in, by its BOM or an ``MSH`` of
    wide characters; None for byte encodings (the only kind HL7 v2 over MLLP can carry)."""
    for prefix, name in _WIDE_ENCODINGS:
        if payload.startswith(prefix):
            return name
    return None


# A line that starts a message (MSH) or is one of the batch protocol's envelope segments (HL7
# v2.5 2.10.3: FHS, BHS, BTS, FTS), optionally after a UTF-8 BOM (files joined with ``cat``).
_FILE_BOUNDARY = re.compile(rb"(?:^|(?<=[\r\n]))(?:\xef\xbb\xbf)?(?=MSH|(?:FHS|BHS|BTS|FTS)[^A-Za-z0-9\r\n])")
ENVELOPE_SEGMENTS = ("FHS", "BHS", "BTS", "FTS")


def file_parts(data: bytes) -> list[tuple[str, bytes]]:
    """The parts of a file of HL7 v2 text in order: ``("MSH", message)``, ``("FHS"|"BHS"|"BTS"|"FTS",
    segment)`` for the batch envelope, ``("", bytes)`` for anything else (not HL7: the receiver
    refuses it with a reason, so it is never silently dropped).

    Each message comes back from its MSH on, BOM and blank lines around it removed, its segment
    ends as in the file; an envelope segment is its one line, without its terminator. A UTF-16
    file comes back whole as one ``""`` part (refused naming its encoding).
    """
    if wide_encoding(data) is not None:
        return [("", data)]
    body = data[message_start(data):]
    starts = [m.start() for m in _FILE_BOUNDARY.finditer(body)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    out: list[tuple[str, bytes]] = []
    for a, b in zip(starts, [*starts[1:], len(body)], strict=True):
        part = body[a:b]
        if part[:3] == BOM_UTF8:
            part = part[3:]
        tag = part[:3].decode("latin-1")
        if tag in ENVELOPE_SEGMENTS:
            end = _SEGMENT_END.search(part)
            line, part = (part[:end.start()], part[end.end():]) if end else (part, b"")
            out.append((tag, line.rstrip(b" \t\x00")))
            tag = ""  # what follows the envelope line up to the next MSH is not a message
        elif tag != "MSH":
            tag = ""
        trimmed = part.rstrip(b" \t\r\n\x00")
        if tag == "":
            trimmed = trimmed.lstrip(b" \t\r\n\x00")
        if trimmed:
            end = _SEGMENT_END.search(part)
            out.append((tag, trimmed + (end.group(0) if end else b"\r")))
    return out


def split_file(data: bytes) -> list[bytes]:
    """The messages in a file of HL7 v2 text (not MLLP-framed), for ``medrelay import``.

    A file may start with a UTF-8 BOM (and so may each message of files joined with
    ``cat``), end its lines with CR, LF or CRLF and hold several messages, each starting
    with MSH at the start of a line, optionally wrapped in the batch protocol's FHS/BHS ...
    BTS/FTS segments, which are left out (``engine.hl7.batch`` reads them). Each message
    comes back from its MSH on, BOM and blank lines around it removed, its segment ends as
    in the file. Bytes before the first MSH that are not a BOM or blank come back as an
    item of their own, so the receiver refuses them with a reason instead of them
    vanishing; a UTF-16 file comes back whole for the same reason.
    """
    return [part for tag, part in file_parts(data) if tag not in ENVELOPE_SEGMENTS]


# -- the header -----------------------------------------------------------------------
_SEGMENT_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class Header:
    """The MSH of one message, read without parsing the rest.

    ``fields[n]`` is MSH-n as decoded text, exactly as sent (still escaped, all
    components), so an ACK can copy MSH-3..6 back verbatim. The convenience
    attributes hold the first component (HD namespace id) and are unescaped.
    """

    delimiters: Delimiters
    fields: tuple[str, ...]
    charset: str  # MSH-18 as sent (first repetition), "" when absent
    codec: str  # the Python codec the payload decodes with
    sending_application: str = ""
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timestamp: str = ""
    message_type: str = ""  # MSH-9.1
    trigger_event: str = ""  # MSH-9.2
    message_structure: str = ""  # MSH-9.3
    control_id: str = ""  # MSH-10
    processing_id: str = ""  # MSH-11.1
    version: str = ""  # MSH-12.1
    accept_ack_type: str = ""  # MSH-15
    application_ack_type: str = ""  # MSH-16
    start: int = 0  # bytes before MSH in the payload read (BOM, blank lines): not part of the message
    bom: bool = False  # the payload started with a UTF-8 byte order mark
    sniffed: bool = False  # no MSH-18 and no BOM: ``codec`` was guessed from the MSH bytes

    def get(self, n: int) -> str:
        """MSH-n as sent ("" when the message has fewer fields)."""
        return self.fields[n] if 0 < n < len(self.fields) else ""

    @property
    def enhanced_mode(self) -> bool:
        """HL7 v2.5 2.9.3: enhanced acknowledgment mode when MSH-15 or MSH-16 is valued."""
        return bool(self.accept_ack_type or self.application_ack_type)

    @property
    def message_code(self) -> str:
        """``ADT^A01`` style: MSH-9.1 and MSH-9.2, for logs and metrics."""
        return f"{self.message_type}^{self.trigger_event}" if self.trigger_event else self.message_type

    def decode(self, payload: bytes) -> str:
        """The whole message as text, from its MSH on (a BOM or blank lines before it dropped).

        The charset is MSH-18's; without MSH-18 it is UTF-8 after a UTF-8 BOM, else
        guessed from the whole message (ASCII, else UTF-8 when valid, else ISO 8859-1).
        Raises ``HL7Error(102)`` when the bytes are not valid in a declared charset (a
        UTF-8 message with Latin-1 bytes in it is a sender bug we must not pass on), and
        when a UTF-8 BOM contradicts a non-UTF-8 MSH-18 for bytes the two read differently.
        """
        body = strip_preamble(payload)
        codec = _sniff_codec(body) if self.sniffed else self.codec
        if self.bom and codec not in ("utf-8", "ascii") and not body.isascii():
            raise HL7Error(DATA_TYPE_ERROR,
                           f"a UTF-8 byte order mark contradicts MSH-18 {self.charset[:20]!r} "
                           "for the non-ASCII bytes of this message", location="MSH^1^18", header=self)
        try:
            return body.decode(codec)
        except UnicodeDecodeError as e:
            raise HL7Error(DATA_TYPE_ERROR,
                           f"message bytes are not valid {self.charset or codec} (offset {e.start} from MSH)",
                           location="MSH^1^18", header=self) from None

    def encode(self, text: str) -> bytes:
        """Encode text (an ACK) in this message's charset; unencodable characters become '?'."""
        return text.encode(self.codec, errors="replace")

    def as_headers(self) -> dict[str, str]:
        """Envelope headers: routing and identity fields from the MSH only, never PHI.

        MSH-7 is left out on purpose: for an ADT it is close to an admission time,
        and dates tied to a patient count as PHI. ``received_at`` carries the time.
        """
        return {
            "MSH-3": self.sending_application,
            "MSH-4": self.sending_facility,
            "MSH-5": self.receiving_application,
            "MSH-6": self.receiving_facility,
            "MSH-9": self.message_code + (f"^{self.message_structure}" if self.message_structure else ""),
            "MSH-9.1": self.message_type,
            "MSH-9.2": self.trigger_event,
            "MSH-9.3": self.message_structure,
            "MSH-10": self.control_id,
            "MSH-11": self.processing_id,
            "MSH-12": self.version,
            "MSH-15": self.accept_ack_type,
            "MSH-16": self.application_ack_type,
            "MSH-18": self.charset,
        }


def _first(value: str, d: Delimiters) -> str:
    """First repetition, first component, unescaped."""
    if d.repetition in value:
        value = value.split(d.repetition, 1)[0]
    if d.component in value:
        value = value.split(d.component, 1)[0]
    return (unescape(value, d) if d.escape in value else value).strip()


def _component(value: str, n: int, d: Delimiters) -> str:
    comps = value.split(d.repetition, 1)[0].split(d.component)
    return unescape(comps[n - 1], d).strip() if len(comps) >= n else ""


def _sniff_codec(data: bytes) -> str:
    """No MSH-18: HL7 says ASCII, real senders send UTF-8 or Latin-1. Take the one that fits.

    Latin-1 decodes any byte string and re-encodes to the same bytes, so an ACK
    built from the decoded fields round-trips exactly.
    """
    if data.isascii():
        return "ascii"
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        return "iso8859-1"


_DELIMITERS: dict[tuple[str, str], Delimiters] = {}


def _delimiters(fs: str, enc: str) -> Delimiters:
    """MSH-1 and MSH-2 checked and made a ``Delimiters``; the few distinct ones seen are kept
    (every message of a feed has the same, and this runs for each message read)."""
    key = (fs, enc[:4])
    d = _DELIMITERS.get(key)
    if d is None:
        if len(enc) < 4 or len(set(enc[:4])) != 4 or fs in enc[:4]:
            raise HL7Error(DATA_TYPE_ERROR, "MSH-2 encoding characters are invalid", location="MSH^1^2")
        d = Delimiters(fs, enc[0], enc[1], enc[2], enc[3])
        if len(_DELIMITERS) < 64:  # bounded: a peer sending odd MSH-2 values cannot grow it
            _DELIMITERS[key] = d
    return d


def delimiters_of(payload: bytes) -> Delimiters:
    """The delimiters of a message that starts with MSH (MSH-1 and MSH-2), without reading the
    rest of the header: for readers of a payload whose header was read and checked at intake."""
    if payload[:3] != b"MSH" or len(payload) < 8:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "message does not start with an MSH segment", location="MSH^1")
    return _delimiters(payload[3:4].decode("latin-1"), payload[4:8].decode("latin-1"))


def sniff_codec(data: bytes) -> str:
    """The codec of a message without MSH-18 and without a BOM (see ``Header.decode``)."""
    return _sniff_codec(data)


def read_header(payload: bytes, *, require: bool = True) -> Header:
    """Read the MSH segment of ``payload`` (raw bytes as received).

    Cost is proportional to the MSH, not the message. A UTF-8 BOM and blank lines
    before MSH are skipped (``Header.start`` says how many bytes); a UTF-16/32 message
    is refused with 103 and a reason. With ``require`` the fields a receiver cannot work
    without (MSH-9.1 message type, MSH-10 control id) must be present, else
    ``HL7Error(101)`` carrying the partial header.
    """
    # A message that starts with "MS" (the usual case) is in a byte encoding: no wide check.
    wide = None if payload[:2] == b"MS" else wide_encoding(payload)
    if wide is not None:
        raise HL7Error(TABLE_VALUE_NOT_FOUND, f"message is encoded in {wide}; HL7 v2 over MLLP needs a "
                       "charset whose delimiters are single bytes: send UTF-8 (MSH-18 UNICODE UTF-8)",
                       location="MSH^1^18")
    start = 0 if payload[:3] == b"MSH" else message_start(payload)
    bom = start >= 3 and BOM_UTF8 in payload[:start]
    if payload[start:start + 3] != b"MSH" or len(payload) < start + 8:
        raise HL7Error(SEGMENT_SEQUENCE_ERROR, "message does not start with an MSH segment",
                       location="MSH^1")
    fs = payload[start + 3:start + 4]
    if fs.isalnum() or fs in b" \r\n":
        raise HL7Error(DATA_TYPE_ERROR, "MSH-1 field separator is not a delimiter character",
                       location="MSH^1^1")
    end = payload.find(b"\r", start)  # the MSH ends at the first CR or LF (memchr, not a regex)
    lf = payload.find(b"\n", start, end if end >= 0 else len(payload))
    if lf >= 0:
        end = lf
    msh_bytes = payload[start:end if end >= 0 else len(payload)]
    raw = msh_bytes.split(fs)
    enc = raw[1].decode("latin-1") if len(raw) > 1 else ""
    d = _delimiters(fs.decode("latin-1"), enc)

    # MSH-18 first, in ASCII: the charset names are ASCII in every charset we accept.
    charset = ""
    if len(raw) > 17:
        charset = raw[17].decode("latin-1").split(d.repetition, 1)[0].strip()
    charset_error: HL7Error | None = None
    try:
        # A UTF-8 BOM is the sender's own statement of the encoding when MSH-18 is silent.
        codec = codec_for(charset) if charset else "utf-8" if bom else _sniff_codec(msh_bytes)
    except HL7Error as e:
        # Read the rest anyway (Latin-1 takes any byte) so the rejection can be addressed.
        charset_error, codec = e, "iso8859-1"
    try:
        text = msh_bytes.decode(codec)
    except UnicodeDecodeError:
        raise HL7Error(DATA_TYPE_ERROR, f"MSH is not valid {charset or codec}", location="MSH^1") from None
    parts = text.split(d.field)
    # fields[n] == MSH-n: parts[0] is "MSH", MSH-1 is the separator itself.
    fields = ("MSH", d.field, *parts[1:])

    def f(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    msh9 = f(9)
    header = Header(
        delimiters=d,
        fields=fields,
        charset=charset,
        codec=codec,
        sending_application=_first(f(3), d),
        sending_facility=_first(f(4), d),
        receiving_application=_first(f(5), d),
        receiving_facility=_first(f(6), d),
        timestamp=_first(f(7), d),
        message_type=_component(msh9, 1, d),
        trigger_event=_component(msh9, 2, d),
        message_structure=_component(msh9, 3, d),
        control_id=unescape(f(10), d).strip(),
        processing_id=_first(f(11), d),
        version=_first(f(12), d),
        accept_ack_type=_first(f(15), d).upper(),
        application_ack_type=_first(f(16), d).upper(),
        start=start,
        bom=bom,
        sniffed=not charset and not bom,
    )
    if charset_error is not None:
        charset_error.header = header
        raise charset_error
    if require:
        if not header.message_type:
            raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-9 message type is empty", location="MSH^1^9",
                           header=header)
        if not header.control_id:
            raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-10 message control id is empty",
                           location="MSH^1^10", header=header)
    return header


def decode(payload: bytes) -> str:
    """The message as text from its MSH on, decoded per its MSH-18 (see ``Header.decode``).

    The one function every reader of a stored or imported payload should use (the
    router's ``field``, the conversions): it agrees with the listener on a BOM, blank
    lines before MSH and the charset.
    """
    return read_header(payload, require=False).decode(payload)


# -- any field, lazily ----------------------------------------------------------------
_PATH = re.compile(r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?-(\d+)(?:\[(\d+)\])?(?:\.(\d+))?(?:\.(\d+))?$")


def parse_path(path: str) -> tuple[str, int, int, int, int, int]:
    """``PID-3[2].1.2`` -> (segment, segment occurrence, field, repetition, component, subcomponent).

    Occurrences and repetitions are 1-based and default to 1; component and
    subcomponent 0 mean "the whole field / component".
    """
    m = _PATH.match(path.strip())
    if not m:
        raise ValueError(f"not an HL7 field path: {path!r} (expected e.g. PID-8, PID-3.1, OBX[2]-5)")
    seg, occ, fld, rep, comp, sub = m.groups()
    return seg, int(occ or 1), int(fld), int(rep or 1), int(comp or 0), int(sub or 0)


def parse(text: str) -> _hl7.Message:
    """Full python-hl7 parse; for callers that read several non-MSH fields of one message."""
    import hl7

    text = text.lstrip("\ufeff \t\r\n\x00")  # a BOM or blank lines before MSH (see message_start)
    return hl7.parse(text.replace("\r\n", "\r").replace("\n", "\r"))


def field(message: str | bytes | _hl7.Message, path: str) -> str:
    """The value at ``path`` (``PID-8``, ``PID-3.1``, ``OBR-4.2``, ``OBX[2]-5``), "" when absent.

    Without a component the first component of the repetition is returned, which
    is what a routing rule on ``PID-8`` or ``PV1-2`` means. MSH paths are answered
    from ``read_header`` without a full parse. Others parse with python-hl7, so
    only routes that ask for them pay for it.
    """
    seg, occ, fld, rep, comp, sub = parse_path(path)
    if seg == "MSH" and occ == 1 and isinstance(message, str | bytes):
        raw = message if isinstance(message, bytes) else message.encode("utf-8")
        h = read_header(raw, require=False)
        value = h.get(fld)
        if fld <= 2:
            return value
        d = h.delimiters
        reps = value.split(d.repetition)
        if rep > len(reps):
            return ""
        comps = reps[rep - 1].split(d.component)
        c = comps[(comp or 1) - 1] if len(comps) >= (comp or 1) else ""
        subs = c.split(d.subcomponent)
        s = subs[(sub or 1) - 1] if len(subs) >= (sub or 1) else ""
        return unescape(s, d)
    import hl7

    if isinstance(message, bytes):
        message = decode(message)
    msg = parse(message) if isinstance(message, str) else message
    key = seg + (str(occ) if occ != 1 else "") + f".F{fld}.R{rep}"
    if comp:
        key += f".C{comp}"
        if sub:
            key += f".S{sub}"
    try:
        value = msg[key]
    except (KeyError, IndexError, hl7.exceptions.HL7Exception):
        return ""
    # python-hl7 returns values still escaped; unescape with the message's own delimiters.
    return msg.unescape(str(value)) if value else ""
