"""HL7 v2 positions for mapping rules, and the light message the rules change.

Paths are medrelay's usual ``SEG-f.c.s`` (``PID-3.1``, ``OBX-3.1.2``), with ``SEG[n]``
for the n-th occurrence of a segment (``OBX[2]-5``) and ``-f(r)`` (or ``-f[r]``, as
``engine.hl7.message.parse_path`` writes it) for the r-th repetition of a field
(``PID-3(2).1``). A bare segment name (``ZPI``, ``OBX[2]``) names whole segments.

Why not python-hl7 or hl7apy: a map runs on every message of a feed, and a full parse
per message (let alone per rule) would cost more than everything else the route does.
The message is split into segments and raw (still escaped) field strings once; a
rule splits only the one field it touches, and the text is joined once at the end.
Untouched segments come out byte for byte as they came in, with the sender's own
segment terminator.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine.hl7.message import Delimiters, escape, unescape
from engine.mapping.base import MappingError, Scope

_PATH = re.compile(
    r"^([A-Z][A-Z0-9]{2})(?:\[(\d+)\])?(?:-(\d+)(?:\((\d+)\)|\[(\d+)\])?(?:\.(\d+)(?:\.(\d+))?)?)?$")

MAX_INDEX = 9999
# Segments whose fields identify a patient: their values never go into an error text.
PHI_SEGMENTS = frozenset({"PID", "PD1", "NK1", "GT1", "IN1", "IN2", "IN3", "MRG", "PV2", "ACC", "DB1", "ROL",
                          "AL1", "DG1", "NTE"})


@dataclass(frozen=True, slots=True)
class Hl7Path:
    """A parsed position. ``occurrence``/``repetition`` None: not pinned down; 0 parts: the whole."""

    text: str
    segment: str
    occurrence: int | None
    field: int
    repetition: int | None
    component: int
    subcomponent: int

    @property
    def group(self) -> str | None:
        return None if self.occurrence is not None else self.segment

    @property
    def is_segment(self) -> bool:
        return self.field == 0


@lru_cache(maxsize=4096)
def parse_hl7_path(text: str) -> Hl7Path:
    """``OBX[2]-5.1`` -> Hl7Path; ``ValueError`` naming the expected form when it is not one."""
    m = _PATH.match(text.strip())
    if not m:
        raise ValueError(f"not an HL7 position: {text!r} (expected e.g. PID-3.1, OBX[2]-5, PID-3(2).1, ZPI)")
    seg, occ, fld, rep_paren, rep_bracket, comp, sub = m.groups()
    rep = rep_paren or rep_bracket
    nums = [int(x) for x in (occ, fld, rep, comp, sub) if x is not None]
    if any(n == 0 for n in nums):
        raise ValueError(f"{text}: positions count from 1")
    if any(n > MAX_INDEX for n in nums):  # a write creates what it names: keep that bounded
        raise ValueError(f"{text}: positions go up to {MAX_INDEX}")
    return Hl7Path(text.strip(), seg, int(occ) if occ else None, int(fld or 0), int(rep) if rep else None,
                   int(comp or 0), int(sub or 0))


# -- the standard's shape (hl7apy's definitions), to catch typos at `medrelay check` -----------------
@lru_cache(maxsize=1)
def _definitions() -> dict[str, list[tuple[str, int]]]:
    """Segment -> [(datatype, number of components)] per field, the widest of v2.5.1 and v2.8.2."""
    from hl7apy.v2_5_1 import segments as s251
    from hl7apy.v2_8_2 import segments as s282

    out: dict[str, list[tuple[str, int]]] = {}
    for lib in (s251, s282):
        for name, (_, fields) in lib.SEGMENTS.items():
            if name.startswith("ANY"):
                continue
            shape = out.setdefault(name, [])
            for f in fields:
                n = int(f[0].rsplit("_", 1)[1])  # by number: a version's list may skip a withdrawn field
                kind, children, dtype = (f[1][0], f[1][1], f[1][2]) if f[1] and len(f[1]) >= 3 else ("", (), "varies")
                size = len(children) if kind == "sequence" else 1
                shape.extend([("varies", 1)] * (n - len(shape)))
                if size >= shape[n - 1][1]:
                    shape[n - 1] = (dtype, size)
    return out


def check_position(p: Hl7Path) -> None:
    """Unknown segment, a field the segment does not have, a component its type does not have."""
    if p.segment.startswith("Z"):
        return  # site-defined segments: any shape
    defs = _definitions()
    shape = defs.get(p.segment)
    if shape is None:
        raise ValueError(f"{p.text}: unknown segment {p.segment} (not in HL7 v2.5.1 or v2.8.2; "
                         "site segments start with Z)")
    if p.field > len(shape):
        raise ValueError(f"{p.text}: {p.segment} has {len(shape)} fields")
    if p.field and p.component:
        dtype, ncomp = shape[p.field - 1]
        if ncomp > 1 and p.component > ncomp:
            raise ValueError(f"{p.text}: {p.segment}-{p.field} is {dtype}, which has {ncomp} components")


class Hl7Kind:
    """The HL7 v2 path grammar for the interpreter."""

    name = "hl7v2"

    def compile_path(self, text: str, *, write: bool = False) -> Hl7Path:
        p = parse_hl7_path(str(text))
        check_position(p)
        if write and p.segment == "MSH" and p.field in (1, 2):
            raise ValueError(f"{p.text}: MSH-1 and MSH-2 are the message's delimiters and cannot be changed")
        if write and p.segment == "MSH" and p.is_segment:
            raise ValueError("the MSH segment cannot be deleted or replaced")
        return p

    def group_path(self, text: str) -> str:
        p = parse_hl7_path(str(text))
        if not p.is_segment or p.occurrence is not None:
            raise ValueError(f"foreach takes a segment name such as OBX, not {text!r}")
        check_position(p)
        return p.segment

    def phi_path(self, path: Any) -> bool:
        return path.segment in PHI_SEGMENTS

    def check_value(self, p: Hl7Path, value: Any) -> None:
        """A `set` value is text (or a number, a bool, null) or a list of them (components).

        Caught at `medrelay check` so that a nested list or a mapping is a config error with
        its line, not a Python repr written into every message (or a dead letter for each).
        """
        if isinstance(value, list | tuple):
            if p.subcomponent:
                raise ValueError(f"{p.text}: a list value needs a field or component position")
            if any(not _scalar(v) for v in value):
                raise ValueError(f"{p.text}: a list value holds text values (components); "
                                 "nested lists and mappings are no HL7 value")
        elif not _scalar(value):
            raise ValueError(f"{p.text}: the value must be text, a number, a bool, null or a list of them")


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float)


HL7 = Hl7Kind()


# -- the message ------------------------------------------------------------------------------
class Segment:
    """One segment as raw field strings; ``fields[n]`` is SEG-n (for MSH, [1] is MSH-1)."""

    __slots__ = ("fields", "name", "orig")

    def __init__(self, name: str, fields: list[str]) -> None:
        self.name = name
        self.fields = fields
        self.orig = len(fields)  # trailing empty fields are trimmed back to this, never below

    def raw(self, n: int) -> str:
        f = self.fields
        return f[n] if n < len(f) else ""

    def put(self, n: int, raw: str) -> None:
        f = self.fields
        if n >= len(f):
            if not raw:
                return
            f.extend([""] * (n + 1 - len(f)))
        f[n] = raw
        while len(f) > self.orig and len(f) > 1 and not f[-1]:
            f.pop()


_SEG_END = re.compile(r"\r\n|\r|\n")


def _trim(parts: list[str]) -> list[str]:
    while len(parts) > 1 and not parts[-1]:
        parts.pop()
    return parts


class Hl7Document:
    """A message for the rules: segments of raw fields, delimiters and terminator kept."""

    kind = HL7

    def __init__(self, text: str) -> None:
        start = 0
        while start < len(text) and text[start] in " \t\r\n\ufeff\x00":
            start += 1
        self.prefix = text[:start]  # a BOM or blank lines before MSH are kept as they were
        body = text[start:]
        if not body.startswith("MSH") or len(body) < 8:
            raise MappingError("not an HL7 v2 message: it does not start with an MSH segment")
        m = _SEG_END.search(body)
        self.terminator = m.group(0) if m else "\r"
        self.trailing = body.endswith(("\r", "\n"))
        fs = body[3]
        enc = body[4:].split(fs, 1)[0]
        if len(enc) < 4:
            enc = enc + "^~\\&"[len(enc):]
        self.d = Delimiters(fs, enc[0], enc[1], enc[2], enc[3])
        self.segments: list[Segment] = []
        for line in _SEG_END.split(body):
            if not line:
                continue
            parts = line.split(fs)
            if parts[0] == "MSH":
                parts = ["MSH", fs, *parts[1:]]
            self.segments.append(Segment(parts[0], parts))

    # -- serialising ----------------------------------------------------------
    def text(self) -> str:
        fs = self.d.field
        lines = [fs.join(["MSH", *s.fields[2:]]) if s.name == "MSH" else fs.join(s.fields) for s in self.segments]
        out = self.terminator.join(lines)
        return self.prefix + out + (self.terminator if self.trailing else "")

    # -- finding segments ------------------------------------------------------
    def _all(self, name: str) -> list[Segment]:
        return [s for s in self.segments if s.name == name]

    def _targets(self, p: Hl7Path, scope: Scope, *, create: bool) -> list[Segment]:
        if p.occurrence is None:
            cur = scope.get(p.segment)
            if cur is not None:
                return [cur]
            found = self._all(p.segment)
            if found or not create:
                return found
            return [self._create(p.segment, 1)]
        found = self._all(p.segment)
        if p.occurrence <= len(found):
            return [found[p.occurrence - 1]]
        if not create:
            return []
        return [self._create(p.segment, p.occurrence)]

    def _after_last(self, found: list[Segment]) -> int:
        """Where a new segment of a kind goes: after the last one and the NTE notes that follow
        it (an NTE belongs to the segment before it: OBX {NTE}, OBR {NTE}, PID {NTE}), so a new
        OBX does not take the previous OBX's comment; at the end when there is none."""
        if not found:
            return len(self.segments)
        at = self.segments.index(found[-1]) + 1
        if found[-1].name != "NTE":
            while at < len(self.segments) and self.segments[at].name == "NTE":
                at += 1
        return at

    def _create(self, name: str, occurrence: int) -> Segment:
        """Append empty segments until ``name`` has ``occurrence`` of them, after its last one
        (and that one's notes, ``_after_last``)."""
        found = self._all(name)
        at = self._after_last(found)
        seg = None
        for _ in range(occurrence - len(found)):
            seg = Segment(name, [name])
            seg.orig = 1
            self.segments.insert(at, seg)
            at += 1
        assert seg is not None
        return seg

    # -- reading ------------------------------------------------------------------
    def _leaves(self, seg: Segment, p: Hl7Path, all_reps: bool) -> list[str]:
        raw = seg.raw(p.field)
        if seg.name == "MSH" and p.field in (1, 2):
            return [raw]
        if not raw:
            return []
        d = self.d
        reps = raw.split(d.repetition)
        if p.repetition is not None:
            reps = reps[p.repetition - 1:p.repetition]
        elif not all_reps:
            reps = reps[:1]
        out = []
        for r in reps:
            s = _part(_part(r, d.component, p.component or 1), d.subcomponent, p.subcomponent or 1)
            out.append(unescape(s, d) if s != '""' else "")
        return out

    def values(self, p: Hl7Path, scope: Scope) -> list[Any]:
        if p.is_segment:
            return [s.name for s in self._targets(p, scope, create=False)]
        out: list[Any] = []
        for seg in self._targets(p, scope, create=False):
            out.extend(self._leaves(seg, p, True))
        return out

    def value(self, p: Hl7Path, scope: Scope) -> str:
        if p.is_segment:
            return p.segment if self._targets(p, scope, create=False) else ""
        for seg in self._targets(p, scope, create=False)[:1]:
            got = self._leaves(seg, p, False)
            return got[0] if got else ""
        return ""

    def raw(self, p: Hl7Path, scope: Scope) -> str:
        """The encoded content at ``p`` in its first occurrence (structure kept, still escaped)."""
        segs = self._targets(p, scope, create=False)
        if not segs or p.is_segment:
            return ""
        raw = segs[0].raw(p.field)
        d = self.d
        if p.repetition is None and not p.component:
            return raw
        r = _part(raw, d.repetition, p.repetition or 1)
        if not p.component:
            return r
        c = _part(r, d.component, p.component)
        return _part(c, d.subcomponent, p.subcomponent) if p.subcomponent else c

    # -- writing ---------------------------------------------------------------------
    def encode(self, p: Hl7Path, value: Any) -> str:
        """A rule's plain value as escaped text for ``p``; a list is components (or subcomponents)."""
        d = self.d
        if isinstance(value, list | tuple):
            if p.subcomponent:
                raise MappingError(f"{p.text}: a list value needs a field or component position")
            sep = d.subcomponent if p.component else d.component
            return "".join(_trim([sep.join(escape(_text(v), d) for v in value)])) if value else ""
        return escape(_text(value), d)

    def write(self, p: Hl7Path, value: Any, scope: Scope) -> None:
        self.write_raw(p, self.encode(p, value), scope)

    def write_raw(self, p: Hl7Path, raw: str, scope: Scope) -> None:
        d = self.d
        # what fits at the target's level: a field value into a component keeps its first component
        if p.subcomponent:
            raw = raw.split(d.repetition, 1)[0].split(d.component, 1)[0].split(d.subcomponent, 1)[0]
        elif p.component:
            raw = raw.split(d.repetition, 1)[0].split(d.component, 1)[0]
        elif p.repetition is not None:
            raw = raw.split(d.repetition, 1)[0]
        for seg in self._targets(p, scope, create=True):
            old = seg.raw(p.field)
            if p.repetition is None and not p.component:
                seg.put(p.field, raw)
                continue
            reps = old.split(d.repetition) if old else [""]
            ri = (p.repetition or 1) - 1
            reps.extend([""] * (ri + 1 - len(reps)))
            if not p.component:
                reps[ri] = raw
            else:
                comps = reps[ri].split(d.component)
                ci = p.component - 1
                comps.extend([""] * (ci + 1 - len(comps)))
                if not p.subcomponent:
                    comps[ci] = raw
                else:
                    subs = comps[ci].split(d.subcomponent)
                    si = p.subcomponent - 1
                    subs.extend([""] * (si + 1 - len(subs)))
                    subs[si] = raw
                    comps[ci] = d.subcomponent.join(_trim(subs))
                reps[ri] = d.component.join(_trim(comps))
            seg.put(p.field, d.repetition.join(_trim(reps)))

    def add(self, p: Hl7Path, value: Any, scope: Scope) -> None:
        """A new repetition of the field (``PID-3``); for a segment name, a new segment."""
        d = self.d
        if p.is_segment:
            fields = [p.segment, *(self.encode(p, v) if not isinstance(v, list) else
                                   d.component.join(escape(_text(x), d) for x in v) for v in (value or []))]
            seg = Segment(p.segment, fields)
            self.segments.insert(self._after_last(self._all(p.segment)), seg)
            return
        if p.repetition is not None or p.component:
            raise MappingError(f"{p.text}: add takes a field position (a new repetition) or a segment name")
        enc = self.encode(p, value)
        for seg in self._targets(p, scope, create=True):
            old = seg.raw(p.field)
            seg.put(p.field, old + d.repetition + enc if old else enc)

    def remove(self, p: Hl7Path, scope: Scope) -> None:
        if p.is_segment:
            gone = {id(s) for s in self._targets(p, scope, create=False)}
            if gone:
                self.segments = [s for s in self.segments if id(s) not in gone]
            return
        for seg in self._targets(p, scope, create=False):
            if p.field < len(seg.fields) and seg.fields[p.field]:
                self.write_raw(p, "", {p.segment: seg})

    def copy(self, source: Hl7Path, target: Hl7Path, scope: Scope) -> None:
        if source.is_segment or target.is_segment:
            raise MappingError("copy takes field positions, not whole segments")
        if not self._targets(source, scope, create=False):
            return  # nothing to copy: the target stays as it is
        self.write_raw(target, self.raw(source, scope), scope)

    def occurrences(self, group: str, scope: Scope) -> Iterable[Segment]:
        return self._all(group)

    def scope_for(self, group: str, occurrence: Segment) -> dict[str, Any]:
        return {group: occurrence}


def _part(text: str, sep: str, n: int) -> str:
    parts = text.split(sep)
    return parts[n - 1] if n <= len(parts) else ""


def _text(v: Any) -> str:
    if v is None:
        return ""
    if not _scalar(v):  # never a Python repr in a message (`check_value` refuses it at check)
        raise MappingError(f"not an HL7 value: a {type(v).__name__} (text, a number or a list of them)")
    if isinstance(v, bool):
        return "Y" if v else "N"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def read_values(text: str, key: str) -> list[str]:
    """Every value at ``key`` in ``text`` (all occurrences and repetitions it leaves open).

    What a route ``when:`` on a payload field sees: ``OBX-3.1: X`` is true when any OBX
    has it, ``OBX[1]-3.1`` asks the first one only.
    """
    return Hl7Document(text).values(parse_hl7_path(key), {})
