"""A structural walk of a whole encoded data set: every element's tag and length, no value read.

Why: a data set can arrive complete by its protocol (the last PDV with its last-fragment bit, a
STOW-RS part closed by its delimiter, a whole file) and still be cut short inside: its last
element, or a sequence, an item or an encapsulated fragment, declares more bytes than the data
set holds. The index reads only the header (the elements before the pixel data), so such an
instance was stored with success and failed later, in every reader after it (retrieval, WADO,
conversions, de-identification). The walk refuses it before anything is stored.

``StructureWalk`` is fed the data set in pieces of any size (the P-DATA fragments or STOW-RS
chunks of a streamed 1 GiB instance as they are written to the blob: no second read) and skips
values by arithmetic, never copying them: only an element header that straddles two pieces is
copied (at most 12 bytes). Sequences and items of defined or undefined length, encapsulated
pixel data fragments, explicit and implicit VR Little Endian (and an explicit VR data set's UN
sequences in implicit VR) and Explicit VR Big Endian (its UN sequences too) are followed with a
stack bounded at ``scan.MAX_SEQUENCE_DEPTH``.

What it refuses (``Malformed``): a value, item, fragment or sequence that runs past the end of
the data set or past the defined length that holds it, an undefined-length sequence/item/pixel
data without its delimiter, a delimiter where none belongs, an element header cut off at the end.
What it does not judge: an explicit VR it does not know (pydicom's reader guesses there; the walk
stops checking and lets the existing readers decide), and, in Big Endian, a UN sequence whose items
are in big-endian order (see below).

Big Endian (Explicit VR Big Endian, retired but still accepted from old modalities): every tag
(items and delimiters included: PS3.5 7.5 encodes them in the transfer syntax's byte order) and
length is read big-endian; the file meta before the data set stays little-endian and is not the
walk's business. Without this a Big Endian data set cut short was stored with success.

A UN of undefined length is a sequence whose value "shall remain in Implicit VR form" and "shall
not be byte-swapped" (PS3.5 6.2.2: UN comes from data first encoded in Implicit VR Little Endian;
note 2 there: Little Endian Implicit VR "irrespective of the current Transfer Syntax"). So an
implicit VR frame is read little-endian in a Big Endian data set too: its items, their elements
and its closing Sequence Delimitation Item, as DCMTK reads it (CP-246: "reading a sequence with
transfer syntax LittleEndianImplicit"; a big-endian delimiter there is its parse error) and as the
Little Endian path already walked it. pydicom 3.0 reads such a UN in the data set's byte order and
cannot read the standard's encoding; where a UN's first item or its delimiter is big-endian (what
pydicom would read), the walk stops judging rather than refuse what pydicom takes.
"""

from __future__ import annotations

import struct
import zlib

from engine.store.dicom.scan import (
    _SQ_TAGS,
    ITEM,
    ITEM_END,
    LONG_VRS,
    MAX_SEQUENCE_DEPTH,
    PIXEL_DATA,
    SEQUENCE_END,
    SHORT_VRS,
    UNDEFINED,
    NestingTooDeep,
)

_HEAD = struct.Struct("<HHI")
_EXPLICIT = struct.Struct("<HH2sH")
_U32 = struct.Struct("<I")
_HEAD_BE = struct.Struct(">HHI")
_EXPLICIT_BE = struct.Struct(">HH2sH")
_U32_BE = struct.Struct(">I")
_TAG_BE = struct.Struct(">HH")
_OB_OW = (b"OB", b"OW")
_UN, _SQ = b"UN", b"SQ"

# frame kinds
_ELEMENTS = 0  # a data set or an item: elements follow
_ITEMS = 1  # a sequence: items follow
_FRAGMENTS = 2  # encapsulated pixel data: fragment items follow
_OPEN = 1 << 62  # the stop of an undefined-length frame: never reached


class Malformed(ValueError):
    """The data set is cut short or its lengths do not nest: it cannot be understood."""


class StructureWalk:
    """Feed the encoded data set (``feed``), then ``close``; either raises ``Malformed`` (or
    ``NestingTooDeep``) at the first fault it can see."""

    __slots__ = ("pos", "total", "carry", "frame", "stack", "unsure", "max_depth", "little")

    def __init__(self, *, implicit: bool, max_depth: int = MAX_SEQUENCE_DEPTH, little: bool = True) -> None:
        self.pos = 0  # absolute offset of the next header to read (may lie beyond what was fed)
        self.total = 0  # bytes fed so far
        self.carry = b""  # the start of a header cut by the end of the last piece (< 12 bytes)
        # the open frame (kind, stop: absolute offset, _OPEN for an undefined length; implicit;
        # sequence depth) and the frames that hold it; the data set itself is the bottom frame
        self.frame: tuple[int, int, bool, int] = (_ELEMENTS, _OPEN, implicit, 0)
        self.stack: list[tuple[int, int, bool, int]] = []
        self.unsure = False  # an encoding this walk does not follow: it stops judging
        self.max_depth = max_depth
        self.little = little  # False: Explicit VR Big Endian

    def feed(self, data: bytes | memoryview | bytearray) -> None:
        """The next bytes of the data set."""
        n = len(data)
        base = self.total
        self.total = base + n
        if self.unsure or self.pos >= self.total:
            return  # inside a value (the pixel data of a large instance: nearly every call)
        if self.carry:
            joined = self.carry + bytes(data[:16])
            jbase = base - len(self.carry)
            self.carry = b""
            self._run(joined, jbase, base)  # only the header(s) that start in the carried bytes
            if self.unsure or self.pos >= self.total:
                return
            if self.pos < base:  # still not a whole header (the new piece was tiny)
                self.carry = joined[self.pos - jbase:]
                return
        self._run(data, base, _OPEN)
        if not self.unsure and self.pos < self.total:
            self.carry = bytes(data[self.pos - base:])

    def close(self) -> None:
        """The data set ended: it must end exactly after its last element, every structure closed."""
        if self.unsure:
            return
        pos = self.pos
        while self.stack and self.frame[1] != _OPEN and pos >= self.frame[1]:
            if pos > self.frame[1]:
                raise Malformed(f"a value runs past the defined length that holds it at {pos}")
            self.frame = self.stack.pop()
        if pos > self.total:
            raise Malformed(f"an element runs {pos - self.total} bytes past the end of the data set")
        if self.carry and (self.stack or self.carry.strip(b"\x00")):
            # fewer than 8 zero bytes after the last top-level element are padding some writers add
            # (pydicom's reader ignores them too); anything else is a header cut off
            raise Malformed("the data set ends inside an element header")
        if self.stack:
            raise Malformed("the data set ends inside a sequence, an item or the pixel data fragments")

    def _run(self, buf: bytes | memoryview | bytearray, base: int, before: int) -> None:
        """Read the headers within ``buf`` (absolute offset ``base``) that start before ``before``."""
        stack = self.stack
        end = base + len(buf)
        pos = self.pos
        limit = self.max_depth
        kind, fstop, fimplicit, depth = self.frame
        little = self.little
        # an implicit VR frame is Little Endian whatever the syntax: the data set of an Implicit VR
        # Little Endian syntax, or a UN of undefined length (PS3.5 6.2.2, in Big Endian too)
        head_le = _HEAD.unpack_from
        if little:
            head, explicit, u32 = head_le, _EXPLICIT.unpack_from, _U32.unpack_from
        else:
            head, explicit, u32 = _HEAD_BE.unpack_from, _EXPLICIT_BE.unpack_from, _U32_BE.unpack_from
        while True:
            while pos >= fstop:  # the defined-length frames that end here
                if pos > fstop:
                    raise Malformed(f"a value runs past the defined length that holds it at {pos}")
                kind, fstop, fimplicit, depth = stack.pop()
            if pos >= before or pos + 8 > end:
                break
            i = pos - base
            if kind:  # the items of a sequence, or pixel data fragments
                group, elem, length = (head_le if fimplicit else head)(buf, i)
                tag = (group << 16) | elem
                if tag == SEQUENCE_END:
                    if fstop != _OPEN:
                        raise Malformed(f"a sequence delimiter inside a defined length at {pos}")
                    pos += 8
                    kind, fstop, fimplicit, depth = stack.pop()
                    continue
                if tag != ITEM:
                    if fimplicit and not little and _be_tag(buf, i) in (ITEM, SEQUENCE_END):
                        self.unsure = True  # a UN's items in the data set's byte order: not the standard's
                        break  # encoding (nor DCMTK's reading), but pydicom's: its reader decides
                    raise Malformed(f"expected an item at {pos}, found {tag:08x}")
                pos += 8
                if kind == _FRAGMENTS:
                    if length == UNDEFINED:
                        raise Malformed(f"a pixel data fragment without a length at {pos}")
                    pos += length
                elif length == UNDEFINED:
                    stack.append((kind, fstop, fimplicit, depth))
                    kind, fstop = _ELEMENTS, _OPEN
                elif length:
                    stack.append((kind, fstop, fimplicit, depth))
                    kind, fstop = _ELEMENTS, pos + length
                continue
            # an element (or an item delimiter) in a data set or an item
            if fimplicit:
                group, elem, length = head_le(buf, i)
                vr = None
                start = pos + 8
            else:
                group, elem, vr, length = explicit(buf, i)
                if group == 0xFFFE:
                    vr, length = None, u32(buf, i + 4)[0]
                    start = pos + 8
                elif vr in SHORT_VRS:
                    start = pos + 8
                elif vr in LONG_VRS:
                    if pos + 12 > end:
                        break
                    length, start = u32(buf, i + 8)[0], pos + 12
                else:
                    self.unsure = True  # pydicom's reader guesses here; not this walk's call
                    break
            if group == 0xFFFE:
                if (group << 16) | elem == ITEM_END and stack and fstop == _OPEN:
                    pos = start
                    kind, fstop, fimplicit, depth = stack.pop()
                    continue
                raise Malformed(f"a delimiter ({group:04X},{elem:04X}) where an element belongs at {pos}")
            if length == UNDEFINED:
                stack.append((kind, fstop, fimplicit, depth))
                if vr in _OB_OW or (group << 16) | elem == PIXEL_DATA:
                    kind, fstop = _FRAGMENTS, _OPEN
                else:  # SQ, or UN holding a sequence in Implicit VR Little Endian
                    if depth + 1 > limit:
                        raise NestingTooDeep(f"DICOM sequences nested more than {limit} levels deep")
                    kind, fstop, fimplicit, depth = _ITEMS, _OPEN, fimplicit or vr == _UN, depth + 1
                pos = start
                continue
            if length and (vr == _SQ or (vr is None and (group << 16) | elem in _SQ_TAGS)):
                if depth + 1 > limit:
                    raise NestingTooDeep(f"DICOM sequences nested more than {limit} levels deep")
                stack.append((kind, fstop, fimplicit, depth))
                kind, fstop, depth = _ITEMS, start + length, depth + 1
                pos = start
                continue
            pos = start + length
        self.pos = pos
        self.frame = (kind, fstop, fimplicit, depth)


def _be_tag(buf: bytes | memoryview | bytearray, i: int) -> int:
    group, elem = _TAG_BE.unpack_from(buf, i)
    return (group << 16) | elem


def check(data_set: bytes | memoryview | bytearray, *, implicit: bool, little: bool = True) -> None:
    """Walk a whole data set held in memory; ``Malformed`` when it is cut short."""
    w = StructureWalk(implicit=implicit, little=little)
    w.feed(data_set)
    w.close()


class InflatingWalk:
    """The walk of a Deflated Explicit VR Little Endian data set: fed the deflated bytes, walks
    the inflated stream in bounded pieces (never held whole)."""

    PIECE = 1 << 20

    def __init__(self) -> None:
        self.walk = StructureWalk(implicit=False)
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)

    def feed(self, data: bytes | memoryview | bytearray) -> None:
        try:
            out = self._z.decompress(data, self.PIECE)
            while True:
                self.walk.feed(out)
                tail = self._z.unconsumed_tail
                if not tail:
                    return
                out = self._z.decompress(tail, self.PIECE)
        except zlib.error as e:
            raise Malformed(f"the deflated data set cannot be inflated ({e})") from None

    def close(self) -> None:
        try:
            self.walk.feed(self._z.flush())
        except zlib.error as e:
            raise Malformed(f"the deflated data set cannot be inflated ({e})") from None
        if not self._z.eof:
            raise Malformed("the deflated data set ends before its deflate stream does")
        self.walk.close()


def walker(transfer_syntax_is_deflated: bool, implicit: bool, little: bool = True) -> StructureWalk | InflatingWalk:
    """The walk for a data set of this kind (``little`` False: Explicit VR Big Endian)."""
    return InflatingWalk() if transfer_syntax_is_deflated else StructureWalk(implicit=implicit, little=little)
