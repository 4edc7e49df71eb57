"""DICOM paths for mapping rules, and the data set document they change (pydicom).

A path is one or more steps joined by dots; each step names an attribute by keyword
(``InstitutionName``), by tag (``(0008,0080)``, ``00080080``) or, for a private
attribute, by its creator (``(0009,"ACME 1.0",10)``: group, private creator, element
offset; the block is found, or reserved, by creator, never by a fixed tag). A sequence
step takes an item index, 0-based like dcmodify (``ReferencedStudySequence[0]``); without
one, or with ``[*]``, it means every item. ``ReferencedSeriesSequence.SeriesInstanceUID``
is the UID in every item.

A write creates what is missing (the sequence, the item, the attribute with the VR of
the data dictionary; a private attribute takes ``{vr, value}`` or is LO).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from engine.mapping.base import MappingError, Scope

_TAG = re.compile(r"^\(?([0-9A-Fa-f]{4}),?([0-9A-Fa-f]{4})\)?$")
_PRIVATE = re.compile(r"""^\(([0-9A-Fa-f]{4}),\s*"([^"]{1,64})"\s*,\s*([0-9A-Fa-f]{2})\)$""")
_INDEX = re.compile(r"^(.*?)\[(\d+|\*)\]$")
MAX_ITEMS = 9999
PHI_KEYWORD = re.compile(r"^(Patient|Other(Patient)?|Responsible|Referring|Performing|Operators|Physician|"
                         r"PersonName|InstitutionAddress|.*Name$)")


@dataclass(frozen=True)
class DStep:
    text: str
    tag: int | None  # None for a private attribute (found through its creator)
    keyword: str
    vr: str
    index: int | None = None  # None: every item
    group: int = 0  # private: group, creator, element offset
    creator: str = ""
    offset: int = 0


@dataclass(frozen=True)
class DicomPath:
    text: str
    steps: tuple[DStep, ...]

    @property
    def group(self) -> str | None:
        first = self.steps[0]
        return first.keyword if first.vr == "SQ" and first.index is None and len(self.steps) > 1 else None


def _step(text: str) -> DStep:
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    index: int | None = None
    m = _INDEX.match(text)
    body = text
    if m:
        body = m.group(1)
        index = None if m.group(2) == "*" else int(m.group(2))
        if index is not None and index > MAX_ITEMS:  # a write creates the items up to it
            raise ValueError(f"{text}: item indexes go up to {MAX_ITEMS}")
    p = _PRIVATE.match(body)
    if p:
        group = int(p.group(1), 16)
        if group % 2 == 0:
            raise ValueError(f"{text}: private attributes have an odd group")
        return DStep(text, None, f"({p.group(1)},{p.group(2)!r},{p.group(3)})", "", index, group, p.group(2),
                     int(p.group(3), 16))
    t = _TAG.match(body)
    if t:
        tag = int(t.group(1) + t.group(2), 16)
        if (tag >> 16) % 2 == 1:
            raise ValueError(f"{text}: a private tag is named by its creator: (gggg,\"CREATOR\",ee)")
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            raise ValueError(f"{text}: not in the DICOM data dictionary") from None
        from pydicom.datadict import keyword_for_tag

        return DStep(text, tag, keyword_for_tag(tag) or body, vr, index)
    tag = tag_for_keyword(body)
    if tag is None:
        raise ValueError(f"{text}: unknown DICOM keyword {body!r}")
    return DStep(text, tag, body, dictionary_VR(tag), index)


def _split(text: str) -> list[str]:
    out, cur, quote = [], [], False
    for ch in text:
        if ch == '"':
            quote = not quote
        if ch == "." and not quote:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


@lru_cache(maxsize=4096)
def parse_dicom_path(text: str) -> DicomPath:
    text = text.strip()
    if not text:
        raise ValueError("an empty DICOM path")
    steps = tuple(_step(s.strip()) for s in _split(text))
    for s in steps[:-1]:
        if s.tag is not None and s.vr != "SQ":
            raise ValueError(f"{text}: {s.keyword} is not a sequence")
    for s in steps:
        if s.index is not None and s.tag is not None and s.vr != "SQ":
            raise ValueError(f"{text}: {s.keyword}[{s.index}]: only sequences have items")
    return DicomPath(text, steps)


class DicomKind:
    name = "dicom"

    def compile_path(self, text: str, *, write: bool = False) -> DicomPath:
        p = parse_dicom_path(str(text))
        if write and p.steps[-1].tag is not None and (p.steps[-1].tag >> 16) == 0x0002:
            raise ValueError(f"{p.text}: file meta attributes follow the data set; they are not mapped")
        return p

    def group_path(self, text: str) -> str:
        p = parse_dicom_path(str(text))
        if len(p.steps) != 1 or p.steps[0].vr != "SQ" or p.steps[0].index is not None:
            raise ValueError(f"foreach takes a sequence keyword such as RequestAttributesSequence, not {text!r}")
        return p.steps[0].keyword

    def phi_path(self, path: Any) -> bool:
        return any(PHI_KEYWORD.match(s.keyword) for s in path.steps) or any(s.tag is None for s in path.steps)

    def check_value(self, p: DicomPath, value: Any) -> None:
        if isinstance(value, dict):
            if set(value) - {"vr", "value"} or "value" not in value:
                raise ValueError(f"{p.text}: a value mapping takes {{vr, value}}")
            value = value["value"]
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, bool) or not (v is None or isinstance(v, str | int | float)):
                raise ValueError(f"{p.text}: a DICOM value is text, a number or a list of them "
                                 f"(multi-valued), not {type(v).__name__}")


DICOM = DicomKind()


_BINARY_NUMBER_VRS = frozenset({"US", "UL", "SS", "SL", "SV", "UV", "FL", "FD", "US or SS"})


def _for_vr(v: Any, vr: str, p: DicomPath) -> Any:
    """A rule's value as the element's VR takes it: numbers stay numbers only for binary VRs.

    pydicom cannot write an int into LO (or a float into IS) and fails only when the data
    set is serialised; `check_value` refuses the rest (bool, nested lists) at check.
    """
    if isinstance(v, bool) or not isinstance(v, str | int | float):
        raise MappingError(f"{p.text}: a DICOM value is text, a number or a list of them")
    if vr in _BINARY_NUMBER_VRS:
        return v
    if isinstance(v, float) and v.is_integer() and vr in ("IS", "DS"):
        return str(int(v))
    return str(v)


def _text(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, bytes):
        return v.decode("latin-1", "replace")
    if isinstance(v, int | float | str):
        return v
    return str(v)


class DicomDocument:
    """A pydicom Dataset for the rules; the transform serialises it."""

    kind = DICOM

    def __init__(self, ds: Any) -> None:
        self.ds = ds

    @classmethod
    def from_bytes(cls, payload: bytes, *, headers_only: bool = False) -> DicomDocument:
        from pydicom import dcmread

        try:
            return cls(dcmread(io.BytesIO(payload), force=True, stop_before_pixels=headers_only))
        except RecursionError:
            raise MappingError("DICOM sequences nested too deep to read") from None
        except Exception as e:
            raise MappingError(f"not a readable DICOM data set: {type(e).__name__}") from None

    # -- navigation ----------------------------------------------------------------
    @staticmethod
    def _tag_in(ds: Any, s: DStep, create: bool) -> int | None:
        if s.tag is not None:
            return s.tag
        try:
            block = ds.private_block(s.group, s.creator, create=create)
        except KeyError:
            return None
        return block.get_tag(s.offset)

    def _items(self, ds: Any, s: DStep, create: bool) -> list[Any]:
        from pydicom import Dataset
        from pydicom.sequence import Sequence

        tag = self._tag_in(ds, s, create)
        if tag is None:
            return []
        if tag not in ds:
            if not create:
                return []
            ds.add_new(tag, "SQ", Sequence([]))
        seq = ds[tag].value
        if not isinstance(seq, Sequence):
            return []
        if s.index is None:
            if not seq and create:
                seq.append(Dataset())
            return list(seq)
        if s.index >= len(seq):
            if not create:
                return []
            while len(seq) <= s.index:
                seq.append(Dataset())
        return [seq[s.index]]

    def _parents(self, p: DicomPath, scope: Scope, create: bool) -> list[Any]:
        """The data sets holding the last step of ``p``."""
        steps = p.steps[:-1]
        first = p.steps[0]
        current = [self.ds]
        if steps and first.index is None and first.keyword in scope:
            current, steps = [scope[first.keyword]], steps[1:]
        for s in steps:
            current = [it for ds in current for it in self._items(ds, s, create)]
        return current

    # -- reading -------------------------------------------------------------------
    def values(self, p: DicomPath, scope: Scope) -> list[Any]:
        last = p.steps[-1]
        out: list[Any] = []
        for ds in self._parents(p, scope, False):
            tag = self._tag_in(ds, last, False)
            if tag is None or tag not in ds:
                continue
            elem = ds[tag]
            v = elem.value
            if elem.VR == "SQ":
                out.extend(v)
            elif isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
                out.extend(_text(x) for x in v)
            elif v is not None and v != "":
                out.append(_text(v))
        return out

    def value(self, p: DicomPath, scope: Scope) -> str:
        for v in self.values(p, scope):
            return "" if not isinstance(v, str | int | float) else str(v).strip()
        return ""

    # -- writing ---------------------------------------------------------------------
    def write(self, p: DicomPath, value: Any, scope: Scope) -> None:
        last = p.steps[-1]
        vr = last.vr or "LO"
        if isinstance(value, dict):
            vr, value = str(value.get("vr") or vr), value.get("value")
        if vr == "SQ":
            raise MappingError(f"{p.text}: a sequence is written item by item (add), not set")
        if isinstance(value, list):
            value = [_for_vr(v, vr, p) for v in value]
        elif value is not None:
            value = _for_vr(value, vr, p)
        for ds in self._parents(p, scope, True):
            tag = self._tag_in(ds, last, True)
            assert tag is not None
            if tag in ds:
                ds[tag].value = value
            else:
                ds.add_new(tag, vr, value)

    def add(self, p: DicomPath, value: Any, scope: Scope) -> None:
        """A new sequence item from a mapping of keyword -> value, or one more value of a multi-valued attribute."""
        from pydicom import Dataset
        from pydicom.sequence import Sequence

        last = p.steps[-1]
        for ds in self._parents(p, scope, True):
            tag = self._tag_in(ds, last, True)
            assert tag is not None
            if last.vr == "SQ":
                if not isinstance(value, dict):
                    raise MappingError(f"{p.text}: add to a sequence takes a mapping keyword -> value")
                item = Dataset()
                for k, v in value.items():
                    DicomDocument(item).write(parse_dicom_path(k), v, {})
                if tag not in ds:
                    ds.add_new(tag, "SQ", Sequence([]))
                ds[tag].value.append(item)
            elif tag in ds:
                old = ds[tag].value
                vals = list(old) if isinstance(old, list | tuple) or type(old).__name__ == "MultiValue" else (
                    [old] if old not in (None, "") else [])
                ds[tag].value = [*vals, str(value)]
            else:
                self.write(p, value, scope)

    def remove(self, p: DicomPath, scope: Scope) -> None:
        last = p.steps[-1]
        for ds in self._parents(p, scope, False):
            tag = self._tag_in(ds, last, False)
            if tag is None or tag not in ds:
                continue
            if last.index is not None and ds[tag].VR == "SQ":
                seq = ds[tag].value
                if last.index < len(seq):
                    del seq[last.index]
            else:
                del ds[tag]

    def copy(self, source: DicomPath, target: DicomPath, scope: Scope) -> None:
        import copy as _copy

        for ds in self._parents(source, scope, False):
            tag = self._tag_in(ds, source.steps[-1], False)
            if tag is None or tag not in ds:
                continue
            elem = ds[tag]
            if elem.VR == "SQ":
                for tds in self._parents(target, scope, True):
                    ttag = self._tag_in(tds, target.steps[-1], True)
                    assert ttag is not None
                    tds.add_new(ttag, "SQ", _copy.deepcopy(elem.value))
                return
            value = list(elem.value) if type(elem.value).__name__ == "MultiValue" else elem.value
            vr = target.steps[-1].vr or elem.VR
            self.write(target, {"vr": vr, "value": value}, scope)
            return

    def occurrences(self, group: str, scope: Scope) -> Iterable[Any]:
        elem = self.ds.data_element(group)
        return list(elem.value) if elem is not None and elem.VR == "SQ" else []

    def scope_for(self, group: str, occurrence: Any) -> dict[str, Any]:
        return {group: occurrence}
