"""Bytes to text for HL7 v2, and a small segment reader for the conversions.

``decode_hl7`` honours MSH-18 (through ``engine.hl7.message``) because the MLLP frame carries
bytes and only the message itself says how they are encoded; guessing wrong turns
"Müller" into mojibake that then sits in a FHIR server forever. The reader
(`V2Message`) exists because python-hl7 nests its containers differently depending on
which separators a field happens to contain; every mapping here wants one shape:
repetitions -> components -> subcomponents, unescaped, cached per field.
"""

from __future__ import annotations

from collections.abc import Iterator

import hl7

from engine.hl7.message import Delimiters, HL7Error, read_header
from transforms.hl7_escape import delimiters_of, unescape


def decode_hl7(payload: bytes) -> str:
    """Decode an HL7 v2 message according to MSH-18 (``engine.hl7.message``'s reading of it).

    The listener has already refused messages whose bytes contradict MSH-18; this
    fallback is for payloads from other sources (files, replays of old data): when the
    header is unreadable or the bytes do not match, UTF-8 if valid, else ISO 8859-1,
    which never fails, rather than rejecting a clinical message over a labelling error.
    """
    try:
        return read_header(payload, require=False).decode(payload)
    except HL7Error:
        try:
            return payload.decode("utf-8")
        except UnicodeDecodeError:
            return payload.decode("latin-1")


def normalise_segments(text: str) -> str:
    """Segments end with CR; accept LF and CRLF from files and hand-written tests."""
    return "\r".join(s for s in text.replace("\r\n", "\r").replace("\n", "\r").split("\r") if s.strip())


Reps = list[list[list[str]]]  # repetitions -> components -> subcomponents


class Segment:
    """One segment as raw field strings, with unescaping accessors. Field numbers are HL7's (1-based)."""

    __slots__ = ("_cache", "_d", "_fields", "name")

    def __init__(self, name: str, fields: list[str], d: Delimiters) -> None:
        self.name = name
        self._fields = fields
        self._d = d
        self._cache: dict[int, Reps] = {}  # mappings read the same field several times

    def raw(self, n: int) -> str:
        return self._fields[n] if 0 < n < len(self._fields) else ""

    def reps(self, n: int) -> Reps:
        """All repetitions of field n, split into components and subcomponents, unescaped.

        The result is cached and shared: callers must not modify it.
        """
        hit = self._cache.get(n)
        if hit is not None:
            return hit
        self._cache[n] = reps = self._split(n)
        return reps

    def _split(self, n: int) -> Reps:
        raw = self.raw(n)
        if not raw:
            return []
        d = self._d
        if self.name == "MSH" and n == 2:
            return [[[raw]]]
        if raw == '""':  # HL7 explicit null: "delete the value"; for a conversion that is no value
            return []
        return [[[unescape(s, d) if s != '""' else "" for s in c.split(d.subcomponent)]
                 for c in r.split(d.component)] for r in raw.split(d.repetition)]

    def get(self, n: int, comp: int = 1, sub: int = 1, rep: int = 0) -> str:
        """One value, ``PID-3.4.2`` style (all 1-based except ``rep``, 0-based); '' when absent."""
        reps = self.reps(n)
        try:
            return reps[rep][comp - 1][sub - 1].strip()
        except IndexError:
            return ""

    def comps(self, n: int, rep: int = 0) -> list[str]:
        """Components of one repetition, each as its text (subcomponents re-joined with '&')."""
        reps = self.reps(n)
        if rep >= len(reps):
            return []
        return [self._d.subcomponent.join(c) if len(c) > 1 else c[0] for c in reps[rep]]


class V2Message:
    """A parsed HL7 v2 message with the few lookups the mappings need.

    Segments are split here directly rather than through ``hl7.parse``: python-hl7's
    tree had to be serialised back to text per segment to get one uniform shape, and
    parse + re-serialise was over half of a whole ORU-to-FHIR conversion (profiled,
    see docs/notes/issue-4-conversions.md). ``parsed`` still gives python-hl7's tree,
    built on first use, for code that wants its API.
    """

    def __init__(self, text: str) -> None:
        text = normalise_segments(text)
        if not text.startswith("MSH"):
            raise ValueError("not an HL7 v2 message: does not start with MSH")
        self.text = text
        self.delims = delimiters_of(text)
        self._parsed: hl7.Message | None = None
        f = self.delims.field
        self.segments: list[Segment] = []
        for line in text.split("\r"):
            parts = line.split(f)
            if parts[0] == "MSH":  # MSH-1 is the separator itself: shift so numbering matches HL7
                parts = ["MSH", f, *parts[1:]]
            self.segments.append(Segment(parts[0].strip(), parts, self.delims))

    @property
    def parsed(self) -> hl7.Message:
        if self._parsed is None:
            self._parsed = hl7.parse(self.text)
        return self._parsed

    @classmethod
    def from_bytes(cls, payload: bytes) -> V2Message:
        return cls(decode_hl7(payload))

    def all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def first(self, name: str) -> Segment | None:
        for s in self.segments:
            if s.name == name:
                return s
        return None

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    @property
    def message_type(self) -> tuple[str, str]:
        """(MSH-9.1, MSH-9.2), e.g. ("ADT", "A01")."""
        return self.msh.get(9, 1).upper(), self.msh.get(9, 2).upper()

    @property
    def version(self) -> str:
        return self.msh.get(12, 1)
