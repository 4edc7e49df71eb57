"""A large stored instance converted to another transfer syntax frame by frame, never whole (issue 13).

A peer that does not take the stored transfer syntax (a C-GET SCU or C-MOVE destination
proposing other syntaxes, a C-STORE destination with ``transfer_syntax:``, a WADO-RS client
asking for Explicit VR Little Endian) gets a large (chunk-sealed) instance converted here as
its chunks are decrypted:

- the header (the elements before Pixel Data) is read from the first chunks and re-encoded in
  the target syntax, with what a whole conversion changes: decoding sets Photometric
  Interpretation and Planar Configuration as the decode gives them, LossyImageCompression "01"
  for an image that was ever lossy and no Extended Offset Table; encoding lossily gives a new SOP
  Instance UID and the lossy marking (``dicom_codec.decompressed_header``/``compressed_header``,
  shared with the whole path);
- to an uncompressed target, Pixel Data is written with its final length, known from the header
  (frames x rows x columns x samples x bytes per sample); to an encapsulated one (RLE, JPEG 2000,
  JPEG-LS), with undefined length, an empty Basic Offset Table item, one fragment per frame
  (padded to even) and the Sequence Delimitation Item (PS3.5 A.4);
- each frame of encapsulated Pixel Data is decoded alone by the codec the whole path uses
  (pydicom's decoders: pylibjpeg, pyjpegls...), each native frame read at its offset
  (rows x columns x samples x bits / 8); a frame for an encapsulated target is then encoded alone
  by pydicom's encoder with the options ``Dataset.compress`` gets on the whole path
  (``dicom_codec.compress_options``), and goes out before the next is read; native Pixel Data
  to a native target (Explicit <-> Implicit VR Little Endian) goes out as it is read;
- the elements after Pixel Data (trailing padding) are re-encoded like the header.

Frames of encapsulated Pixel Data are found by the Basic Offset Table, else the Extended Offset
Table, else one fragment per frame when a first pass over the blob counts as many fragments as
NumberOfFrames (a single-frame image takes all its fragments), else, for the JPEG family, by
pydicom's marker rule (a frame ends with the fragment holding EOI/EOC) when that first pass finds
it unambiguous (``_count_fragments``). Anything else (big endian or deflated, 1-bit or Float Pixel
Data, fragments that do not map to frames, a header longer than ``HEADER_MAX``) is not planned
here: ``plan`` returns None, says why in the log (``dicom.transcode_whole``), and the caller
converts the joined data set with ``dicom_codec.convert`` if it is at most
``dicom_codec.MAX_WHOLE_BYTES`` (``joined``). ``Plan.pixel_value`` gives the native value alone,
or a byte range of it (WADO-RS bulk data), decoding only the frames the range covers.

Memory: one chunk of input, the fragments of one frame, its decoded and encoded bytes.
"""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom import uid as _uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from engine.store.dicom.scan import header_length
from transforms import dicom_codec as codec

log = structlog.get_logger()

HEADER_MAX = 64 * 1024 * 1024  # bytes searched for the start of Pixel Data
TRAIL_MAX = 16 * 1024 * 1024  # bytes of elements after Pixel Data re-encoded at most
PASS_PIECE = 1 << 20  # bytes of native Pixel Data per piece handed on
_PIXEL_DATA = 0x7FE00010
_ITEM, _SEQ_END = 0xFFFEE000, 0xFFFEE0DD
_PIXEL_KEYWORDS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                   "PixelRepresentation", "PhotometricInterpretation", "PlanarConfiguration")
_J2K = frozenset(u for u in (_uid.JPEG2000Lossless, _uid.JPEG2000, getattr(_uid, "HTJ2KLossless", ""),
                              getattr(_uid, "HTJ2KLosslessRPCL", ""), getattr(_uid, "HTJ2K", "")) if u)
# syntaxes whose frames end with an EOI / EOC marker (FFD9): frames found by markers without an offset table
_MARKED = frozenset((_uid.JPEGBaseline8Bit, _uid.JPEGExtended12Bit, _uid.JPEGLossless, _uid.JPEGLosslessSV1,
                     _uid.JPEGLSLossless, _uid.JPEGLSNearLossless, *_J2K))
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HHI")  # group, element, 32-bit length (item headers, implicit VR elements)

Opener = Callable[[], Iterator[bytes]]


class _Reader:
    """Exact reads from an iterator of chunks, holding one chunk plus what a read asks for."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._it = chunks
        self._buf = bytearray()
        self._pos = 0
        self.offset = 0  # bytes consumed so far

    def available(self) -> int:
        return len(self._buf) - self._pos

    def fill(self, n: int) -> bool:
        """At least ``n`` bytes buffered; False at the end of the data set before that."""
        while len(self._buf) - self._pos < n:
            chunk = next(self._it, None)
            if chunk is None:
                return False
            if self._pos:
                del self._buf[:self._pos]
                self._pos = 0
            self._buf += chunk
        return True

    def view(self) -> memoryview:
        return memoryview(self._buf)[self._pos:]

    def read(self, n: int) -> bytes:
        if not self.fill(n):
            raise codec.TranscodeError("the data set ends inside its pixel data")
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        self.offset += n
        return out

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes, at least one (what is buffered first)."""
        if not self.available() and not self.fill(1):
            raise codec.TranscodeError("the data set ends inside its pixel data")
        return self.read(min(n, self.available()))

    def skip(self, n: int) -> None:
        while n:
            n -= len(self.read_some(min(n, PASS_PIECE)))

    def rest(self, limit: int) -> bytes:
        while self.fill(self.available() + 1):
            if self.available() > limit:
                raise codec.TranscodeError(f"more than {limit} bytes of elements after the pixel data")
        return self.read(self.available())

    def item(self) -> tuple[int, int]:
        """(tag, length) of the item or delimiter header next."""
        group, elem, length = _TAG.unpack(self.read(8))
        return group << 16 | elem, length

    def close(self) -> None:
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


@dataclass
class _Layout:
    header: bytes  # the encoded elements before Pixel Data
    value_start: int  # offset of the first fragment item (encapsulated) or of the native value
    vr: str | None  # Pixel Data's VR in the stored data set (None: implicit VR)
    native_length: int | None  # the stored value length when native
    bot: list[int]  # frame offsets from the Basic or Extended Offset Table (empty: none)


class Plan:
    """How one instance converts to ``target``; ``open()`` gives the converted data set's
    chunks afresh each call (a retry, a second association)."""

    def __init__(self, opener: Opener, stored: UID, target: UID, layout: _Layout, ds: Dataset,
                 frames: int, frame_length: int, starts: list[int] | None, *, lossy: codec.Lossy | None = None,
                 by_markers: bool = False) -> None:
        self._opener, self.stored, self.target = opener, stored, target
        self._layout, self.frames, self.frame_length = layout, frames, frame_length
        self._starts = starts  # offsets (from the first fragment) where frames begin; None: one per fragment
        self._by_markers = by_markers  # frames end at a fragment ending with a JPEG EOI / J2K EOC marker
        # each frame is decoded with the stored image pixel attributes, whatever the output header says
        self._pixel = {kw: ds[kw].value for kw in _PIXEL_KEYWORDS if kw in ds}
        self.length = frames * frame_length  # of the native value (the decoded frames back to back)
        self.encapsulated = target.is_compressed
        self._options = codec.compress_options(target, lossy)
        self._ds = copy.deepcopy(ds)
        if self.encapsulated:  # a lossy target: a new SOP Instance UID, once for every open()
            codec.compressed_header(self._ds, target, lossy)
        self.sop_instance_uid = str(self._ds.get("SOPInstanceUID", ""))

    def open(self) -> Iterator[bytes]:
        reader = _Reader(self._opener())
        try:
            reader.skip(self._layout.value_start)
            if self.stored.is_compressed or self.encapsulated:
                yield from self._converted(reader)
            else:
                yield self._head(None)
                left = self.length
                while left:
                    piece = reader.read_some(min(left, PASS_PIECE))
                    left -= len(piece)
                    yield piece
                if self.length % 2:
                    reader.skip(1)
                    yield b"\x00"
            trail = reader.rest(TRAIL_MAX)
            if trail:
                yield self._trail(trail)
        finally:
            reader.close()

    def pixel_value(self, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Only the converted native Pixel Data value, or its bytes ``start`` to ``end`` (inclusive;
        a byte range): no header, padding or trailing elements (WADO-RS bulk data); afresh each
        call, as ``open``. Frames before the range are read past without being decoded, and the
        blob is not read past the range's last frame."""
        if self.encapsulated:
            raise ValueError("pixel_value is the native value of an uncompressed target")
        last = self.length - 1 if end is None else min(end, self.length - 1)
        if start > last:
            return
        reader = _Reader(self._opener())
        try:
            reader.skip(self._layout.value_start)
            if not self.stored.is_compressed:
                reader.skip(start)
                left = last + 1 - start
                while left:
                    piece = reader.read_some(min(left, PASS_PIECE))
                    left -= len(piece)
                    yield piece
                return
            first, final = start // self.frame_length, last // self.frame_length
            for n, fragments in enumerate(self._frame_fragments(reader, reader.offset, keep_from=first)):
                if n < first:
                    continue
                data, _ = _decode(self._pixel, self.stored, fragments)
                if len(data) != self.frame_length:
                    raise codec.TranscodeError(f"frame {n + 1} decodes to {len(data)} bytes, not {self.frame_length}")
                at = n * self.frame_length
                yield data[max(0, start - at):last + 1 - at]
                if n == final:
                    return
            raise codec.TranscodeError(f"fewer frames than NumberOfFrames ({self.frames})")
        finally:
            reader.close()

    def _native_frames(self, reader: _Reader) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
        """Each frame's native bytes (decoded alone, or read as stored), checked for size and count;
        the first with what its decode says of the image (None: native stored)."""
        if not self.stored.is_compressed:
            for _ in range(self.frames):
                yield reader.read(self.frame_length), None
            assert self._layout.native_length is not None
            reader.skip(self._layout.native_length - self.length)  # the pad byte, if any
            return
        count = 0
        for fragments in self._frame_fragments(reader, reader.offset):
            if count == self.frames:
                raise codec.TranscodeError(f"more frames than NumberOfFrames ({self.frames})")
            data, image_pixel = _decode(self._pixel, self.stored, fragments)
            if len(data) != self.frame_length:
                raise codec.TranscodeError(f"frame {count + 1} decodes to {len(data)} bytes, "
                                           f"not {self.frame_length}")
            count += 1
            yield data, image_pixel
            del data
        if not count:
            raise codec.TranscodeError("encapsulated pixel data without fragments")
        if count != self.frames:
            raise codec.TranscodeError(f"{count} frames found, NumberOfFrames says {self.frames}")

    def _converted(self, reader: _Reader) -> Iterator[bytes]:
        """Header, the frames (decoded and/or encoded one at a time), the end of Pixel Data. The
        first frame is converted before the header goes out: one that cannot be fails cleanly."""
        frames = self._native_frames(reader)
        data, image_pixel = next(frames)
        pixel = dict(self._pixel)
        if image_pixel is not None:  # what the decode made of the image (RGB from YBR JPEG...)
            pixel["PhotometricInterpretation"] = image_pixel["photometric_interpretation"]
            if int(image_pixel["samples_per_pixel"]) > 1:
                pixel["PlanarConfiguration"] = int(image_pixel["planar_configuration"])
        out = self._encoded(pixel, data) if self.encapsulated else data
        yield self._head(image_pixel)
        yield out
        del data, out
        for data, _ in frames:
            yield self._encoded(pixel, data) if self.encapsulated else data
        if self.encapsulated:
            yield _TAG.pack(0xFFFE, 0xE0DD, 0)
        elif self.length % 2:
            yield b"\x00"

    def _encoded(self, pixel: dict[str, Any], data: bytes) -> bytes:
        """One native frame encoded in the target by pydicom's encoder, as one fragment item."""
        frame = _encode(pixel, self.target, data, self._options)
        if len(frame) % 2:
            frame += b"\x00"
        return _TAG.pack(0xFFFE, 0xE000, len(frame)) + frame

    def _frame_fragments(self, reader: _Reader, start: int, keep_from: int = 0) -> Iterator[list[bytes]]:
        """The fragments of each frame in turn, up to the sequence delimiter (those of frames
        before ``keep_from`` are read past and given as an empty list, when the frames are known
        without looking into the fragments)."""
        starts = self._starts
        frame: list[bytes] = []
        k = 1  # the next frame's index in ``starts``
        n = 0  # the frame being gathered
        while True:
            at = reader.offset - start
            tag, length = reader.item()
            if tag == _SEQ_END:
                break
            if tag != _ITEM or length == 0xFFFFFFFF:
                raise codec.TranscodeError("encapsulated pixel data holds something other than items")
            if self._by_markers:
                pass
            elif starts is None:
                if at:
                    yield frame
                    n += 1
                frame = []
            elif k < len(starts) and at >= starts[k]:
                if at != starts[k]:
                    raise codec.TranscodeError("the offset table does not point at fragments")
                yield frame
                frame, k, n = [], k + 1, n + 1
            if n < keep_from and not self._by_markers:
                reader.skip(length)
                continue
            fragment = reader.read(length)
            frame.append(fragment)
            if self._by_markers and _ends_frame(fragment):
                yield frame
                frame, n = [], n + 1
        if frame:
            yield frame

    def _head(self, image_pixel: dict[str, Any] | None) -> bytes:
        ds = copy.deepcopy(self._ds)
        if image_pixel is not None:  # what a whole decode sets (pydicom.pixels.utils.decompress)
            ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
            if int(image_pixel["samples_per_pixel"]) > 1:
                ds.PlanarConfiguration = int(image_pixel["planar_configuration"])
            codec.decompressed_header(ds, self.stored)
        head = codec.encode(ds, self.target)
        if self.encapsulated:  # PS3.5 A.4: undefined length, an empty Basic Offset Table, a fragment per frame
            return head + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + _TAG.pack(0xFFFE, 0xE000, 0)
        length = self.length + self.length % 2
        if self.target.is_implicit_VR:
            return head + _TAG.pack(0x7FE0, 0x0010, length)
        vr = self._layout.vr if self._layout.vr in ("OB", "OW") and not self.stored.is_compressed else \
            ("OB" if int(ds.BitsAllocated) <= 8 else "OW")
        return head + struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr.encode(), 0, length)

    def _trail(self, data: bytes) -> bytes:
        try:
            ds = read_dataset(io.BytesIO(data), self.stored.is_implicit_VR, True)
        except Exception as e:
            raise codec.TranscodeError(f"elements after the pixel data cannot be read ({type(e).__name__})") \
                from None
        return codec.encode(ds, self.target)


def _ends_frame(fragment: bytes) -> bool:
    """pydicom's rule (``encaps.generate_fragmented_frames`` without an offset table): a frame's
    last fragment has the JPEG EOI / JPEG 2000 EOC marker (FFD9) in its last 10 bytes."""
    return b"\xff\xd9" in fragment[-10:]


def _starts_frame(fragment_head: bytes, ts: UID) -> bool:
    """A JPEG / JPEG-LS SOI (FFD8) or a JPEG 2000 codestream SOC SIZ (FF4F FF51) at the start."""
    if ts in _J2K:
        return fragment_head[:4] == b"\xff\x4f\xff\x51"
    return fragment_head[:2] == b"\xff\xd8"


def _pixel_dataset(pixel: dict[str, Any], ts: UID) -> Dataset:
    ds = Dataset()
    for kw, value in pixel.items():
        setattr(ds, kw, value)
    ds.NumberOfFrames = 1
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def _encode(pixel: dict[str, Any], ts: UID, frame: bytes, options: dict[str, Any]) -> bytes:
    """One native frame encoded in ``ts`` by pydicom's encoder, with the options ``Dataset.compress``
    gets on the whole path (``dicom_codec.compress_options``)."""
    from pydicom.pixels import get_encoder
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _pixel_dataset(pixel, ExplicitVRLittleEndian)
    ds.PixelData = frame
    try:
        return get_encoder(ts).encode(ds, index=None, **options)
    except Exception as e:
        raise codec.TranscodeError(f"a frame cannot be encoded in {ts.name} ({type(e).__name__}: "
                                   f"{str(e)[:120]})") from None


def _decode(pixel: dict[str, Any], ts: UID, fragments: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    """One frame's native bytes, decoded by pydicom's decoder for ``ts`` as ``decompress`` does."""
    from pydicom.pixels import get_decoder

    ds = _pixel_dataset(pixel, ts)
    items = [_TAG.pack(0xFFFE, 0xE000, 0)]  # an empty Basic Offset Table
    for f in fragments:
        items += (_TAG.pack(0xFFFE, 0xE000, len(f)), f)
    items.append(_TAG.pack(0xFFFE, 0xE0DD, 0))
    ds.PixelData = b"".join(items)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    try:
        arr, image_pixel = next(get_decoder(ts).iter_array(ds, as_rgb=True))
        return arr.tobytes(), image_pixel
    except Exception as e:
        raise codec.TranscodeError(f"a frame cannot be decoded ({type(e).__name__}: {str(e)[:120]})") from None


def _layout(reader: _Reader, ts: UID) -> tuple[_Layout | None, Dataset | None, str]:
    """The header and the start of Pixel Data, or (None, None, why not)."""
    want = 1 << 20
    while True:
        more = reader.fill(want)
        end = header_length(reader.view(), implicit=ts.is_implicit_VR, last_wanted=0xFFFFFFFF)
        if end is not None:
            break
        if not more:
            return None, None, "no pixel data"
        if want >= HEADER_MAX:
            return None, None, f"no pixel data within {HEADER_MAX} bytes"
        want *= 2
    if not reader.fill(end + 12):
        return None, None, "the data set ends at its pixel data"
    view = reader.view()
    group, elem = struct.unpack_from("<HH", view, end)
    if group << 16 | elem != _PIXEL_DATA:
        return None, None, "not Pixel Data (float or double float pixel data)"
    header = reader.read(end)
    try:
        ds = read_dataset(io.BytesIO(header), ts.is_implicit_VR, True)
    except Exception as e:
        return None, None, f"header unreadable ({type(e).__name__})"
    if ts.is_implicit_VR:
        vr, length = None, _TAG.unpack(reader.read(8))[2]
    else:
        raw = reader.read(8)
        vr = raw[4:6].decode("latin-1")
        length = _U32.unpack(reader.read(4))[0] if vr in ("OB", "OW", "UN") else struct.unpack_from("<H", raw, 6)[0]
    bot: list[int] = []
    if length == 0xFFFFFFFF:
        tag, size = reader.item()
        if tag != _ITEM or size % 4:
            return None, None, "no Basic Offset Table item"
        bot = list(struct.unpack(f"<{size // 4}I", reader.read(size)))
    elif ts.is_compressed:
        return None, None, "compressed syntax with native pixel data"
    return _Layout(header, reader.offset, vr, None if length == 0xFFFFFFFF else length, bot), ds, ""


@dataclass
class _Count:
    fragments: int = 0
    marked: int = 0  # frames by pydicom's EOI/EOC rule (``_ends_frame``)
    marked_ok: bool = True  # every such frame starts with its SOI/SOC and the last fragment ends one


def _count_fragments(opener: Opener, value_start: int, ts: UID) -> _Count:
    """A first pass over the blob, a fragment at a time: the number of fragments after the Basic
    Offset Table and, for the JPEG family, the frames their markers give.

    pydicom's ``generate_fragmented_frames`` has the marker rule, but it needs a seekable buffer
    (it counts the fragments, then goes back), and the blob is a forward-only iterator of
    decrypted chunks read twice by reopening it; so the rule is applied here, to the first and
    last bytes of each fragment, and is taken only when it is unambiguous: every frame begins
    with its SOI (JPEG, JPEG-LS) or SOC+SIZ (JPEG 2000) marker, the last fragment ends a frame,
    and the count equals NumberOfFrames (``plan`` checks that).
    """
    reader = _Reader(opener())
    out = _Count()
    try:
        reader.skip(value_start)
        frame_start = True
        while True:
            tag, length = reader.item()
            if tag != _ITEM:
                out.marked_ok = out.marked_ok and frame_start
                return out
            out.fragments += 1
            if ts not in _MARKED:
                reader.skip(length)
                continue
            if length <= 16:
                head = tail = reader.read(length)
            else:
                head = reader.read(4)
                reader.skip(length - 14)
                tail = reader.read(10)
            if frame_start and not _starts_frame(head, ts):
                out.marked_ok = False
            frame_start = _ends_frame(tail)
            out.marked += frame_start
    finally:
        reader.close()


def plan(opener: Opener, stored: str, target: str, *, lossy: codec.Lossy | None = None) -> Plan | None:
    """How the data set ``opener()`` gives (encoded in ``stored``) streams in ``target``, or None
    when it cannot be (the reason logged): the caller then converts it whole, under the cap.

    Reads the header (one pass over the first chunks; a second whole pass only to count
    fragments when there is no offset table). Raises TranscodeError when the image cannot be
    converted in any way (no decoder or encoder, a lossy target without ``lossy``), so a C-GET /
    C-MOVE counts a failed sub-operation before anything is sent.
    """
    src, dst = UID(stored), UID(target)
    why = ""
    if not dst.is_transfer_syntax or not dst.is_little_endian or dst.is_deflated:
        why = "big endian, deflated or unknown target"
    elif not src.is_little_endian or src.is_deflated or not src.is_transfer_syntax:
        why = "big endian, deflated or unknown stored syntax"
    elif src.is_compressed and not codec.can_decode(src):
        raise codec.TranscodeError(f"no decoder for {src.name}")
    elif dst.is_compressed and dst in codec.LOSSY_METHOD and lossy is None:
        raise codec.TranscodeError(f"{dst.name} is lossy and lossy compression is not configured")
    elif dst.is_compressed and not codec.can_encode(dst):
        raise codec.TranscodeError(f"no encoder for {dst.name}")
    if why:
        return _whole(why)
    reader = _Reader(opener())
    try:
        layout, ds, why = _layout(reader, src)
    finally:
        reader.close()
    if layout is None or ds is None:
        return _whole(why)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
        frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (AttributeError, TypeError, ValueError):
        return _whole("no Rows, Columns or Bits Allocated")
    if bits % 8 or not rows or not cols:
        return _whole("bit-packed or empty pixel data")
    frame_length = rows * cols * spp * bits // 8
    if frames * frame_length + 1 >= 0xFFFFFFFF and not dst.is_compressed:
        raise codec.TranscodeError(f"{frames} frames of {frame_length} bytes are more than a Pixel Data value holds")
    if not src.is_compressed:
        if layout.native_length not in (frames * frame_length, frames * frame_length + 1):
            return _whole("native pixel data of another length than its frames")
        return Plan(opener, src, dst, layout, ds, frames, frame_length, [], lossy=lossy)
    starts: list[int] | None = None
    by_markers = False
    eot = ds.get("ExtendedOffsetTable")
    if len(layout.bot) == frames and layout.bot[0] == 0 and layout.bot == sorted(layout.bot):
        starts = layout.bot
    elif eot and len(eot) == 8 * frames:
        starts = list(struct.unpack(f"<{frames}Q", bytes(eot)))
        if starts[0] != 0 or starts != sorted(starts):
            return _whole("Extended Offset Table out of order")
    elif frames == 1:
        starts = [0]
    else:
        count = _count_fragments(opener, layout.value_start, src)
        if count.fragments == frames:
            starts = None
        elif src in _MARKED and count.marked_ok and count.marked == frames and count.fragments > frames:
            by_markers = True
        else:
            return _whole(f"{count.fragments} fragments for {frames} frames and no offset table"
                          + (f" ({count.marked} ended by EOI/EOC markers)" if src in _MARKED else ""))
    return Plan(opener, src, dst, layout, ds, frames, frame_length, starts, lossy=lossy, by_markers=by_markers)


def _whole(why: str) -> None:
    log.info("dicom.transcode_whole", reason=why, limit=codec.MAX_WHOLE_BYTES)
    return None


def joined(opener: Opener) -> bytes:
    """The whole data set for a conversion in memory; TranscodeError past ``MAX_WHOLE_BYTES``."""
    out = bytearray()
    it = opener()
    try:
        for chunk in it:
            out += chunk
            if len(out) > codec.MAX_WHOLE_BYTES:
                raise codec.TranscodeError(f"instance larger than {codec.MAX_WHOLE_BYTES} bytes cannot be converted "
                                           "in memory (no frame-by-frame conversion for it)")
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()
    return bytes(out)
