"""A top-level element scan of Little Endian data sets (PS3.5 7.1), up to Pixel Data.

Why not pydicom's ``read_dataset``: the index needs ~45 attributes of an instance
on every C-STORE, and pydicom's reader costs ~4 us per element walked (a CT has
~100 before its pixels), which was a fifth of the listener's own CPU. This scan
only walks element headers and keeps the raw values of the wanted tags, as
``RawDataElement`` in a pydicom ``Dataset``, so conversion (fast or through pydicom)
is unchanged. Anything it does not expect (big endian, a VR it does not know, a
length past the end, a wanted tag with undefined length) raises ``ScanError`` and
the caller reads with pydicom instead; ``test_scan_matches_pydicom`` holds both
equal over every bundled test file.
"""

from __future__ import annotations

import struct
from collections.abc import Collection

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag

PIXEL_DATA = 0x7FE00010
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# VRs with a 2-byte reserved field and a 4-byte length in Explicit VR (PS3.5 Table 7.1-1)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_HEAD = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")


class ScanError(ValueError):
    """The data set is not one this scan handles; read it with pydicom."""


def scan(data: bytes | memoryview, wanted: Collection[int], *, implicit: bool) -> Dataset:
    """Raw values of the wanted top-level tags, stopping at Pixel Data."""
    buf = data
    found: dict[BaseTag, RawDataElement] = {}
    pos, end = 0, len(buf)
    while pos + 8 <= end:
        tag, vr, length, start = _header(buf, pos, implicit)
        if tag >= PIXEL_DATA:
            break
        if length == UNDEFINED:
            if tag in wanted:
                raise ScanError(f"wanted tag {tag:08x} has an undefined length")
            pos = _skip_sequence(buf, start, implicit or vr == "UN", 0)
            continue
        stop = start + length
        if stop > end:
            raise ScanError(f"element {tag:08x} runs past the end")
        if tag in wanted:
            key = BaseTag(tag)
            found[key] = RawDataElement(key, vr, length, bytes(buf[start:stop]), start, implicit, True)
        pos = stop
    if pos < end and pos + 8 > end:
        raise ScanError("trailing bytes after the last element")
    return Dataset(found)


def _header(buf: bytes | memoryview, pos: int, implicit: bool) -> tuple[int, str | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if implicit:
        group, elem, length = _HEAD.unpack_from(buf, pos)
        return (group << 16) | elem, None, length, pos + 8
    group, elem, vr, short = _EXPLICIT.unpack_from(buf, pos)
    tag = (group << 16) | elem
    if group == 0xFFFE:  # item and delimiters carry no VR
        return tag, None, _U32.unpack_from(buf, pos + 4)[0], pos + 8
    if vr in SHORT_VRS:
        return tag, vr.decode(), short, pos + 8
    if vr in LONG_VRS:
        if pos + 12 > len(buf):
            raise ScanError("truncated element header")
        return tag, vr.decode(), _U32.unpack_from(buf, pos + 8)[0], pos + 12
    raise ScanError(f"unknown VR {vr!r} at {pos}")


def _skip_sequence(buf: bytes | memoryview, pos: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length sequence's delimiter, starting at its first item."""
    if depth > 32:
        raise ScanError("sequences nested too deep")
    end = len(buf)
    while pos + 8 <= end:
        group, elem, length = _HEAD.unpack_from(buf, pos)
        tag = (group << 16) | elem
        if tag == SEQUENCE_END:
            return pos + 8
        if tag != ITEM:
            raise ScanError(f"expected an item at {pos}, found {tag:08x}")
        if length != UNDEFINED:
            pos += 8 + length
            continue
        pos = _skip_item(buf, pos + 8, implicit, depth)
    raise ScanError("sequence without its delimiter")


def _skip_item(buf: bytes | memoryview, pos: int, implicit: bool, depth: int) -> int:
    """Offset after an undefined-length item's delimiter."""
    end = len(buf)
    while pos + 8 <= end:
        tag, vr, length, start = _header(buf, pos, implicit)
        if tag == ITEM_END:
            return start
        if length == UNDEFINED:
            pos = _skip_sequence(buf, start, implicit or vr == "UN", depth + 1)
        else:
            pos = start + length
    raise ScanError("item without its delimiter")
