"""The HL7 v2 batch protocol (HL7 v2.5 2.10.3): reading FHS/BHS ... BTS/FTS and answering them.

A batch file is ``[FHS] {[BHS] {MSH ...} [BTS]} [FTS]``: a file holds batches, a batch holds
messages, and both envelopes are optional. ``read_batch`` gives that structure from the bytes
(through ``engine.hl7.message.file_parts``, the same splitter ``medrelay import`` uses, so a
file and an MLLP frame are cut the same way) plus what does not add up: a BTS-1 message count
or FTS-1 batch count that disagrees with what is there or is not a count at all, a batch or
file without its trailer (a truncated file). Messages are left as they are: each goes through the receiver's checks and
intake alone, so one bad message fails alone.

``build_batch_ack`` writes the answer 2.10.3 describes: a batch (in a file when the request was
a file) whose BHS-12 / FHS-12 give the request's BHS-11 / FHS-11 and whose messages are the
acknowledgments of the messages in error; a batch with no messages acknowledges every message
of the batch it references. Envelope fields are handled as bytes (Latin-1 round-trips every
byte), so addressees copied back are exactly what the sender wrote, whatever its charset.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from engine.hl7.ack import Ack, new_control_id, parse_ack
from engine.hl7.message import (
    DEFAULT_DELIMITERS,
    Delimiters,
    HL7Error,
    escape,
    file_parts,
    message_start,
)

BATCH_STARTS = (b"FHS", b"BHS")


def is_batch(payload: bytes) -> bool:
    """Whether ``payload`` (a frame, a file) starts with FHS or BHS, after a BOM or blank lines."""
    start = 0 if payload[:3] in BATCH_STARTS else message_start(payload)
    sep = payload[start + 3:start + 4]
    return payload[start:start + 3] in BATCH_STARTS and len(sep) == 1 and not sep.isalnum() and sep not in b"\r\n"


@dataclass(frozen=True, slots=True)
class EnvelopeSegment:
    """One FHS, BHS, BTS or FTS line. ``fields[n]`` is SEG-n as sent (Latin-1 text of the bytes)."""

    name: str
    fields: tuple[str, ...]

    def get(self, n: int) -> str:
        return self.fields[n] if 0 < n < len(self.fields) else ""

    @property
    def delimiters(self) -> Delimiters:
        """FHS-1/2, BHS-1/2 (defaults for a trailer or malformed encoding characters)."""
        enc = self.get(2)
        if self.name in ("FHS", "BHS") and len(enc) >= 4 and len(set(enc[:4])) == 4:
            return Delimiters(self.get(1), enc[0], enc[1], enc[2], enc[3])
        return DEFAULT_DELIMITERS


def _segment(name: str, line: bytes) -> EnvelopeSegment:
    text = line.decode("latin-1")
    fs = text[3:4] or "|"
    parts = text.split(fs)
    # FHS-1 / BHS-1 are the separator itself, as MSH-1 (so FHS-n == fields[n]); trailers have none.
    fields = (name, fs, *parts[1:]) if name in ("FHS", "BHS") else (name, *parts[1:])
    return EnvelopeSegment(name, tuple(fields))


@dataclass
class Batch:
    """One BHS ... BTS (either may be absent: messages outside a BHS form a batch of their own)."""

    header: EnvelopeSegment | None = None
    trailer: EnvelopeSegment | None = None
    messages: list[bytes] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def control_id(self) -> str:
        return self.header.get(11).strip() if self.header is not None else ""

    @property
    def hl7_messages(self) -> int:
        """Items that start with MSH (what BTS-1 counts; other bytes are refused as not HL7)."""
        return sum(1 for m in self.messages if m[:3] == b"MSH")

    def label(self, n: int) -> str:
        return f"batch {n}" + (f" (BHS-11 {self.control_id[:20]})" if self.control_id else "")


@dataclass
class BatchFile:
    """A whole batch file or frame: FHS, batches, FTS, and what does not add up."""

    header: EnvelopeSegment | None = None
    trailer: EnvelopeSegment | None = None
    batches: list[Batch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    envelope: bool = False  # any FHS/BHS/BTS/FTS seen: answer with a batch

    @property
    def messages(self) -> list[bytes]:
        return [m for b in self.batches for m in b.messages]

    @property
    def control_id(self) -> str:
        return self.header.get(11).strip() if self.header is not None else ""

    def all_problems(self) -> list[str]:
        out = list(self.problems)
        for n, b in enumerate(self.batches, start=1):
            out.extend(f"{b.label(n)}: {p}" for p in b.problems)
        return out


COUNT_DIGITS = 10  # a count longer than this is not a count any sender means (and int() stays cheap)


def _shown(value: str) -> str:
    """A count field as quoted in a problem: bounded (a 25-digit or 10 kB field stays short),
    control characters as ``?`` (the problem goes to a log line and a BTS-2 / FTS-2)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in value[:12])
    return f"'{text}...'" if len(value) > 12 else f"'{text}'"


def _count(seg: EnvelopeSegment | None, n: int, field_name: str, unit: tuple[str, str],
           received: int) -> str | None:
    """The problem with ``seg``'s count field (BTS-1, FTS-1), or None when it agrees or is empty.

    The field is optional (empty: nothing to check). Anything else that is not 1-10 ASCII digits
    (``-5``, ``3.0``, 25 digits, a Latin-1 superscript that ``str.isdigit`` would take and
    ``int`` refuse) is reported as not a count rather than skipped: a sender whose count is
    garbage has a bug the receiving engineer wants to see, like a count that disagrees.
    """
    if seg is None:
        return None
    value = seg.get(n).split(seg.delimiters.component, 1)[0].strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= COUNT_DIGITS):
        return f"{field_name} {_shown(value)} is not a {unit[0]} count, {received} received"
    said = int(value)
    if said != received:
        return f"{field_name} says {said} {unit[1]}, {received} received"
    return None


def read_batch(data: bytes) -> BatchFile:
    """The batch structure of ``data`` (see the module docstring); never raises on content."""
    bf = BatchFile()
    current: Batch | None = None
    after_fts = False
    for tag, part in file_parts(data):
        if tag in ("FHS", "BHS", "BTS", "FTS"):
            bf.envelope = True
            seg = _segment(tag, part)
        if after_fts and tag != "FTS":
            bf.problems.append("segments after FTS (the file trailer)")
            after_fts = False  # said once
        if tag == "FHS":
            if bf.header is not None or bf.batches:
                bf.problems.append("an FHS that is not at the start of the file (ignored)")
            else:
                bf.header = seg
        elif tag == "BHS":
            if current is not None and current.header is not None and current.trailer is None:
                current.problems.append("no BTS before the next BHS")
            current = Batch(header=seg)
            bf.batches.append(current)
        elif tag == "BTS":
            if current is None or current.trailer is not None:
                current = Batch()
                bf.batches.append(current)
            current.trailer = seg
        elif tag == "FTS":
            bf.trailer = seg
            after_fts = True
            current = None if current is None or current.trailer is not None else current
        else:
            if current is None or current.trailer is not None:
                current = Batch()
                bf.batches.append(current)
            current.messages.append(part)
    for b in bf.batches:
        if b.header is not None and b.trailer is None:
            b.problems.append("no BTS (batch trailer): the batch may be truncated")
        if (problem := _count(b.trailer, 1, "BTS-1", ("message", "messages"), b.hl7_messages)) is not None:
            b.problems.append(problem)
    if bf.header is not None and bf.trailer is None:
        bf.problems.append("no FTS (file trailer): the file may be truncated")
    if (problem := _count(bf.trailer, 1, "FTS-1", ("batch", "batches"), len(bf.batches))) is not None:
        bf.problems.append(problem)
    return bf


COMMENT_LENGTH = 80  # BHS-10 / BTS-2 / FTS-2 are ST of 80 in v2.5


def _comment(text: str, d: Delimiters) -> str:
    r"""``text`` escaped for a comment field and cut to its 80 characters between escape
    sequences (cutting the escaped text could leave a dangling ``\F`` the peer misreads)."""
    out, size = [], 0
    for ch in text:
        esc = escape(ch, d)
        if size + len(esc) > COMMENT_LENGTH:
            break
        out.append(esc)
        size += len(esc)
    return "".join(out)


def _reply_header(name: str, request: EnvelopeSegment | None, fallback: EnvelopeSegment | None,
                  ts: str, comment: str) -> str:
    """FHS/BHS of the answer: sender and receiver swapped (copied verbatim), a new control id in
    -11, the request's control id in -12 (2.10.3: the reference batch / file control id)."""
    src = request or fallback
    d = src.delimiters if src is not None else DEFAULT_DELIMITERS

    def g(n: int) -> str:
        return src.get(n) if src is not None else ""

    fields = [name, d.encoding_characters, g(5), g(6), g(3), g(4), ts, "", "",
              _comment(comment, d), new_control_id(), request.get(11) if request is not None else ""]
    while fields[-1] == "":
        fields.pop()
    return d.field.join(fields)


def build_batch_ack(request: BatchFile, acks: Sequence[Sequence[bytes]], *,
                    comments: Sequence[str] = (), now: datetime | None = None) -> bytes:
    """The acknowledgment batch (file) for ``request``: ``acks[i]`` are the ACK messages for
    batch i (the errors, or every message when so configured), ``comments[i]`` its BHS-10.

    A request file (FHS) gets a file back (FHS ... FTS, FTS-1 the number of batches); each
    batch gets BHS (BHS-12 = its BHS-11), its ACKs, BTS (BTS-1 = how many ACKs it holds).
    ``request.problems`` (a count that does not add up) go in FTS-2 / BTS-2, never PHI.
    """
    ts = (now or datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")
    out: list[bytes] = []
    d = request.header.delimiters if request.header is not None else DEFAULT_DELIMITERS
    if request.header is not None:
        out.append(_reply_header("FHS", request.header, None, ts, "").encode("latin-1") + b"\r")
    batches = request.batches or [Batch()]
    for i, b in enumerate(batches):
        bd = b.header.delimiters if b.header is not None else d
        comment = comments[i] if i < len(comments) else ""
        out.append(_reply_header("BHS", b.header, request.header, ts, comment).encode("latin-1") + b"\r")
        mine = acks[i] if i < len(acks) else ()
        for ack in mine:
            out.append(ack if ack.endswith(b"\r") else ack + b"\r")
        bts = ["BTS", str(len(mine))]
        if b.problems:
            bts.append(_comment("; ".join(b.problems), bd))
        out.append(bd.field.join(bts).encode("latin-1") + b"\r")
    if request.header is not None or request.trailer is not None:
        fts = ["FTS", str(len(batches))]
        if request.problems:
            fts.append(_comment("; ".join(request.problems), d))
        out.append(d.field.join(fts).encode("latin-1") + b"\r")
    return b"".join(out)


def read_batch_ack(data: bytes) -> list[Ack | HL7Error]:
    """The acknowledgments in an acknowledgment batch (what a sender of a batch reads back), in
    order; an item that is not a readable ACK comes back as the ``HL7Error`` saying why."""
    out: list[Ack | HL7Error] = []
    for msg in read_batch(data).messages:
        try:
            out.append(parse_ack(msg))
        except HL7Error as e:
            out.append(e)
    return out
