"""A top-level element scan of Little Endian and Explicit VR Big Endian data sets (PS3.5 7.1), up to Pixel Data.

Why not pydicom's ``read_dataset``: the index needs ~45 attributes of an instance
on every C-STORE, and pydicom's reader costs ~4 us per element walked (a CT has
~100 before its pixels), which was a fifth of the listener's own CPU. This scan
only walks element headers and keeps the raw values of the wanted tags, as
``RawDataElement`` in a pydicom ``Dataset``, so conversion (fast or through pydicom)
is unchanged. Anything it does not expect (a VR it does not know, a
length past the end, a wanted tag with undefined length) raises ``ScanError`` and
the caller reads with pydicom instead; ``test_scan_matches_pydicom`` holds both
equal over every bundled test file.

It also bounds how deep a data set nests sequences (``MAX_SEQUENCE_DEPTH``), walking every
sequence's items (defined or undefined length) with a stack, never recursion: a peer's data
set 5 000 sequences deep is refused with ``NestingTooDeep`` (the listener answers a failure
status) rather than stored for every reader after it (pydicom, de-identification,
conversions) to recurse into. Encapsulated fragments are skipped, not walked.

Big Endian (``little=False``): tags and lengths big-endian, but a UN of undefined length is a
sequence in Implicit VR *Little* Endian whatever the syntax (PS3.5 6.2.2; DCMTK reads it so), so
an implicit frame is always read little-endian, as engine/store/dicom/walk.py does. pydicom 3.0
cannot read that encoding in a Big Endian data set (it reads the UN's items big-endian); the scan
is what lets the index read such an instance.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from typing import Any

from pydicom.datadict import DicomDictionary
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
MAX_SEQUENCE_DEPTH = 64  # sequences within sequences (a top-level SQ is depth 1); real data: a few dozen at most
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# VRs with a 2-byte reserved field and a 4-byte length in Explicit VR (PS3.5 Table 7.1-1)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_HEAD = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")
_HEAD_BE = struct.Struct(">HHI")
_EXPLICIT_BE = struct.Struct(">HH2sH")
_U32_BE = struct.Struct(">I")


class ScanError(ValueError):
    """The data set is not one this scan handles; read it with pydicom."""


class NestingTooDeep(ValueError):
    """Sequences nested deeper than ``MAX_SEQUENCE_DEPTH``: refuse the data set (not a ScanError:
    pydicom's reader must not be tried on it)."""


# Standard tags whose VR is SQ: how an implicit VR data set says "sequence" (private ones cannot).
_SQ_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


def scan(data: bytes | memoryview, wanted: Collection[int], *, implicit: bool, little: bool = True) -> Dataset:
    """Raw values of the wanted top-level tags, stopping at Pixel Data (``little`` False: Explicit
    VR Big Endian)."""
    return scan_to_pixels(data, wanted, implicit=implicit, little=little)[0]


def scan_to_pixels(data: bytes | memoryview, wanted: Collection[int], *, implicit: bool,
                   little: bool = True) -> tuple[Dataset, int]:
    """``scan``, and the offset where it stopped (the Pixel Data element, or the end): every
    element before it was checked to lie within the data set, sequences walked, so the
    structural walk (engine/store/dicom/walk.py) starts there instead of walking them again."""
    buf = data
    found: dict[BaseTag, RawDataElement] = {}
    pos, end = 0, len(buf)
    while pos + 8 <= end:
        tag, vr, length, start = _header(buf, pos, implicit, little)
        if tag >= PIXEL_DATA:
            break
        if length == UNDEFINED:
            if tag in wanted:
                raise ScanError(f"wanted tag {tag:08x} has an undefined length")
            pos = sequence_end(buf, start, None, implicit or vr == "UN", little=little)
            continue
        stop = start + length
        if stop > end:
            raise ScanError(f"element {tag:08x} runs past the end")
        if tag in wanted:
            key = BaseTag(tag)
            found[key] = RawDataElement(key, vr, length, bytes(buf[start:stop]), start, implicit, little)
        elif length and (vr == "SQ" or (vr is None and tag in _SQ_TAGS)):
            sequence_end(buf, start, stop, implicit, little=little)  # its items are walked for their depth
        pos = stop
    if pos < end and pos + 8 > end:
        raise ScanError("trailing bytes after the last element")
    return Dataset(found), min(pos, end)


def _header(buf: bytes | memoryview, pos: int, implicit: bool, little: bool = True) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``; implicit VR is
    always Little Endian (a Big Endian data set's UN sequences included)."""
    if implicit:
        group, elem, length = _HEAD.unpack_from(buf, pos)
        return (group << 16) | elem, None, length, pos + 8
    explicit, u32 = (_EXPLICIT, _U32) if little else (_EXPLICIT_BE, _U32_BE)
    group, elem, vr, short = explicit.unpack_from(buf, pos)
    tag = (group << 16) | elem
    if group == 0xFFFE:  # item and delimiters carry no VR
        return tag, None, u32.unpack_from(buf, pos + 4)[0], pos + 8
    if vr in SHORT_VRS:
        return tag, vr.decode(), short, pos + 8
    if vr in LONG_VRS:
        if pos + 12 > len(buf):
            raise ScanError("truncated element header")
        return tag, vr.decode(), u32.unpack_from(buf, pos + 8)[0], pos + 12
    raise ScanError(f"unknown VR {vr!r} at {pos}")


def sequence_end(buf: bytes | memoryview, pos: int, stop: int | None, implicit: bool,
                 limit: int = MAX_SEQUENCE_DEPTH, *, little: bool = True) -> int:
    """Offset after a sequence's value that starts at ``pos`` (its first item); ``stop`` is where a
    defined length says it ends, None for an undefined length (up to its delimiter).

    Walks the items and their elements with a stack of open sequences and items, so any depth
    costs no recursion; raises ``NestingTooDeep`` past ``limit`` levels, ``ScanError`` for a
    structure it cannot follow. Undefined-length OB/OW (encapsulated fragments) is skipped.
    """
    end = len(buf)
    # frames: [kind, stop, implicit, depth]; kind "seq" (expects items), "item" (elements), "frags"
    stack: list[list[Any]] = [["seq", stop, implicit, 1]]
    if limit < 1:
        raise NestingTooDeep(f"DICOM sequences nested more than {limit} levels deep")
    while stack:
        kind, fstop, fimplicit, depth = stack[-1]
        if fstop is not None and pos >= fstop:
            if pos != fstop:
                raise ScanError(f"a {kind} overruns its length at {pos}")
            stack.pop()
            continue
        if pos + 8 > end:
            raise ScanError("sequence without its end")
        if kind != "item":
            group, elem, length = (_HEAD if fimplicit or little else _HEAD_BE).unpack_from(buf, pos)
            tag = (group << 16) | elem
            if tag == SEQUENCE_END:
                if fstop is not None:
                    raise ScanError(f"sequence delimiter inside a defined length at {pos}")
                pos += 8
                stack.pop()
                continue
            if tag != ITEM:
                raise ScanError(f"expected an item at {pos}, found {tag:08x}")
            pos += 8
            if kind == "frags" or (length != UNDEFINED and length == 0):
                if length == UNDEFINED:
                    raise ScanError(f"a fragment without a length at {pos}")
                pos += length
                continue
            stack.append(["item", None if length == UNDEFINED else pos + length, fimplicit, depth])
            continue
        tag, vr, length, start = _header(buf, pos, fimplicit, little)
        if tag == ITEM_END:
            if fstop is not None:
                raise ScanError(f"item delimiter inside a defined length at {pos}")
            pos = start
            stack.pop()
            continue
        if length == UNDEFINED:
            if vr in ("OB", "OW") or tag == PIXEL_DATA:
                stack.append(["frags", None, fimplicit, depth])
            else:  # SQ, or UN holding a sequence in implicit VR
                if depth + 1 > limit:
                    raise NestingTooDeep(f"DICOM sequences nested more than {limit} levels deep")
                stack.append(["seq", None, fimplicit or vr == "UN", depth + 1])
            pos = start
            continue
        if start + length > end:
            raise ScanError(f"element {tag:08x} runs past the end")
        if length and (vr == "SQ" or (vr is None and tag in _SQ_TAGS)):
            if depth + 1 > limit:
                raise NestingTooDeep(f"DICOM sequences nested more than {limit} levels deep")
            stack.append(["seq", start + length, fimplicit, depth + 1])
            pos = start
            continue
        pos = start + length
    return pos


def _skip_sequence(buf: bytes | memoryview, pos: int, implicit: bool, depth: int = 0) -> int:
    """Offset after an undefined-length sequence's delimiter, starting at its first item (the former
    recursive helper's signature, kept for callers such as ``engine.store.message_terms``)."""
    return sequence_end(buf, pos, None, implicit, MAX_SEQUENCE_DEPTH - depth)


BULK_START = 0x7FE00008  # Float Pixel Data, Double Float Pixel Data, Pixel Data: the bulk of an image


def header_length(buf: bytes | memoryview, *, implicit: bool, last_wanted: int) -> int | None:
    """Where the header of a data set ends within ``buf``, its first bytes: the offset of the
    first top-level element that is pixel data (tag >= ``BULK_START``), or of one past
    ``last_wanted`` (the highest tag the index reads) whose value runs past ``buf`` (a large
    encapsulated document or waveform). None when ``buf`` ends before either: the header is
    longer than what was kept of it.

    A large instance is streamed to its blob as it arrives (listeners/dicom_store_stream.py) and
    only its first bytes are kept; the index attributes are read from ``buf[:header_length]``,
    which holds every element before the bulk whole (their sequences walked for their depth, as
    ``scan`` does), so the index gets what a read of the whole instance would give.
    """
    pos, end = 0, len(buf)
    while pos + 8 <= end:
        try:
            tag, vr, length, start = _header(buf, pos, implicit)
        except (ScanError, struct.error):  # cut off in an element header, or a VR this scan does not know
            return None
        if tag >= BULK_START:
            return pos
        if length == UNDEFINED:
            try:
                pos = sequence_end(buf, start, None, implicit or vr == "UN")
            except ScanError:
                return None  # its end is past what was kept
            continue
        stop = start + length
        if stop > end:
            return pos if tag > last_wanted else None
        if length and (vr == "SQ" or (vr is None and tag in _SQ_TAGS)):
            sequence_end(buf, start, stop, implicit)
        pos = stop
    return None
