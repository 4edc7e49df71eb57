"""A large stored instance converted to an uncompressed syntax frame by frame, never whole (issue 13).

A peer that does not take the stored transfer syntax (a C-GET SCU or C-MOVE destination
proposing only uncompressed syntaxes, a C-STORE destination with ``transfer_syntax:``, a
WADO-RS client asking for Explicit VR Little Endian) gets a large (chunk-sealed) instance
converted here as its chunks are decrypted:

- the header (the elements before Pixel Data) is read from the first chunks and re-encoded in
  the target syntax, with what a whole decode changes (Photometric Interpretation, Planar
  Configuration, LossyImageCompression "01" for an image that was ever lossy; no Extended Offset
  Table, which only encapsulated pixel data has);
- the Pixel Data element is written with its final length, known from the header
  (frames x rows x columns x samples x bytes per sample);
- each frame of encapsulated Pixel Data is decoded alone by the codec the whole path uses
  (pydicom's decoders: pylibjpeg, pyjpegls... ``transforms.dicom_codec``) and its native bytes go
  out before the next is read; native Pixel Data (Explicit <-> Implicit VR Little Endian) goes out
  as it is read;
- the elements after Pixel Data (trailing padding) are re-encoded like the header.

Frames are found by the Basic Offset Table, else the Extended Offset Table, else one fragment
per frame when a first pass over the blob counts as many fragments as NumberOfFrames (a
single-frame image takes all its fragments). Anything else (big endian or deflated stored, a
compressed or bit-packed target, Float Pixel Data, fragments that do not map to frames, a
header longer than ``HEADER_MAX``) is not planned here: ``plan`` returns None, says why in the
log (``dicom.transcode_whole``), and the caller converts the joined data set with
``dicom_codec.convert`` if it is at most ``dicom_codec.MAX_WHOLE_BYTES`` (``joined``).

Memory: one chunk of input, the fragments of one frame and its decoded bytes.
"""

from __future__ import annotations

import copy
import io
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import structlog
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
                 frames: int, frame_length: int, starts: list[int] | None) -> None:
        self._opener, self.stored, self.target = opener, stored, target
        self._layout, self._ds, self.frames, self.frame_length = layout, ds, frames, frame_length
        self._starts = starts  # offsets (from the first fragment) where frames begin; None: one per fragment
        # each frame is decoded with the stored image pixel attributes, whatever the output header says
        self._pixel = {kw: ds[kw].value for kw in _PIXEL_KEYWORDS if kw in ds}
        self.length = frames * frame_length

    def open(self) -> Iterator[bytes]:
        reader = _Reader(self._opener())
        try:
            reader.skip(self._layout.value_start)
            if self.stored.is_compressed:
                yield from self._decoded(reader)
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

    def pixel_value(self) -> Iterator[bytes]:
        """Only the converted Pixel Data value, ``length`` bytes (the frames back to back): no
        header, padding or trailing elements (WADO-RS bulk data); afresh each call, as ``open``."""
        chunks = self.open()
        try:
            next(chunks)  # the elements before Pixel Data and its element header
            left = self.length
            while left > 0:
                piece = next(chunks)[:left]
                left -= len(piece)
                yield piece
        finally:
            chunks.close()  # the reader is closed; the trailing elements are never read

    def _decoded(self, reader: _Reader) -> Iterator[bytes]:
        start = reader.offset
        frames = self._frame_fragments(reader, start)
        first = next(frames, None)
        if first is None:
            raise codec.TranscodeError("encapsulated pixel data without fragments")
        data, image_pixel = _decode(self._pixel, self.stored, first)
        yield self._head(image_pixel)
        count = 0
        while True:
            if len(data) != self.frame_length:
                raise codec.TranscodeError(f"frame {count + 1} decodes to {len(data)} bytes, "
                                           f"not {self.frame_length}")
            count += 1
            yield data
            del data
            fragments = next(frames, None)
            if fragments is None:
                break
            if count == self.frames:
                raise codec.TranscodeError(f"more frames than NumberOfFrames ({self.frames})")
            data, _ = _decode(self._pixel, self.stored, fragments)
        if count != self.frames:
            raise codec.TranscodeError(f"{count} frames found, NumberOfFrames says {self.frames}")
        if self.length % 2:
            yield b"\x00"

    def _frame_fragments(self, reader: _Reader, start: int) -> Iterator[list[bytes]]:
        """The fragments of each frame in turn, up to the sequence delimiter."""
        starts = self._starts
        frame: list[bytes] = []
        k = 1  # the next frame's index in ``starts``
        while True:
            at = reader.offset - start
            tag, length = reader.item()
            if tag == _SEQ_END:
                break
            if tag != _ITEM or length == 0xFFFFFFFF:
                raise codec.TranscodeError("encapsulated pixel data holds something other than items")
            if starts is None:
                if frame:
                    yield frame
                frame = []
            elif k < len(starts) and at >= starts[k]:
                if at != starts[k]:
                    raise codec.TranscodeError("the offset table does not point at fragments")
                yield frame
                frame, k = [], k + 1
            frame.append(reader.read(length))
        if frame:
            yield frame

    def _head(self, image_pixel: dict[str, Any] | None) -> bytes:
        ds = copy.deepcopy(self._ds)
        if image_pixel is not None:  # what a whole decode sets (pydicom.pixels.utils.decompress)
            ds.PhotometricInterpretation = image_pixel["photometric_interpretation"]
            if int(image_pixel["samples_per_pixel"]) > 1:
                ds.PlanarConfiguration = int(image_pixel["planar_configuration"])
            for kw in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
                if kw in ds:
                    del ds[kw]
            if self.stored in codec.LOSSY_METHOD or str(ds.get("LossyImageCompression", "")).strip() == "01":
                codec.mark_lossy(ds, codec.LOSSY_METHOD.get(self.stored, ""), None)
        length = self.length + self.length % 2
        head = codec.encode(ds, self.target)
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


def _decode(pixel: dict[str, Any], ts: UID, fragments: list[bytes]) -> tuple[bytes, dict[str, Any]]:
    """One frame's native bytes, decoded by pydicom's decoder for ``ts`` as ``decompress`` does."""
    from pydicom.pixels import get_decoder

    ds = Dataset()
    for kw, value in pixel.items():
        setattr(ds, kw, value)
    ds.NumberOfFrames = 1
    items = [_TAG.pack(0xFFFE, 0xE000, 0)]  # an empty Basic Offset Table
    for f in fragments:
        items += (_TAG.pack(0xFFFE, 0xE000, len(f)), f)
    items.append(_TAG.pack(0xFFFE, 0xE0DD, 0))
    ds.PixelData = b"".join(items)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
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


def _count_fragments(opener: Opener, value_start: int) -> int:
    """A first pass over the blob: the number of fragments after the Basic Offset Table."""
    reader = _Reader(opener())
    try:
        reader.skip(value_start)
        count = 0
        while True:
            tag, length = reader.item()
            if tag != _ITEM:
                return count
            reader.skip(length)
            count += 1
    finally:
        reader.close()


def plan(opener: Opener, stored: str, target: str) -> Plan | None:
    """How the data set ``opener()`` gives (encoded in ``stored``) streams in ``target``, or None
    when it cannot be (the reason logged): the caller then converts it whole, under the cap.

    Reads the header (one pass over the first chunks; a second whole pass only to count
    fragments when there is no offset table). Raises TranscodeError when the image cannot be
    decoded in any way (no decoder), so a C-GET / C-MOVE counts a failed sub-operation before
    anything is sent.
    """
    src, dst = UID(stored), UID(target)
    why = ""
    if dst not in codec.UNCOMPRESSED:
        why = "compressed target"
    elif not src.is_little_endian or src.is_deflated or not src.is_transfer_syntax:
        why = "big endian, deflated or unknown stored syntax"
    elif src.is_compressed and not codec.can_decode(src):
        raise codec.TranscodeError(f"no decoder for {src.name}")
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
    if frames * frame_length + 1 >= 0xFFFFFFFF:
        raise codec.TranscodeError(f"{frames} frames of {frame_length} bytes are more than a Pixel Data value holds")
    if not src.is_compressed:
        if layout.native_length not in (frames * frame_length, frames * frame_length + 1):
            return _whole("native pixel data of another length than its frames")
        return Plan(opener, src, dst, layout, ds, frames, frame_length, [])
    starts: list[int] | None = None
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
        count = _count_fragments(opener, layout.value_start)
        if count != frames:
            return _whole(f"{count} fragments for {frames} frames and no offset table")
    return Plan(opener, src, dst, layout, ds, frames, frame_length, starts)


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
