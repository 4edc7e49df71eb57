"""WADO-RS (PS3.18 10.4) and WADO-URI (PS3.18 9): stored instances, metadata, bulk data, frames.

A study or series is resolved with the C-MOVE/C-GET matching (``QueryRetrieve.instances``),
one instance by its UIDs with one prepared statement (``index.locate``); ``fetch`` reads
it: from ``STREAM_FROM`` bytes, when it goes out as stored, chunk by chunk from
``Store.blob_chunks`` (the response is written part by part, memory about one chunk),
else whole (``read_part10`` for the rest: metadata, rendered). An instance goes out in
its stored syntax when the client accepts it (``transfer-syntax=*`` or that UID): the
stored bytes, not re-encoded. Otherwise it is converted by ``transforms.dicom_codec``: a large one
(``STREAM_MIN``) frame by frame as it is read (decoded and/or encoded one frame at a time), streamed
like a stored one (``transforms.dicom_transcode_stream``), the rest whole in memory; one that cannot be
converted is left out of a study/series response and counted as a failure in the log
and the audit row, or answered 406 when it was asked for alone.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from engine.dimse import stream_send
from engine.store.db import STREAM_MIN
from engine.store.dicom import index as idx
from listeners.dicom_store import file_meta
from listeners.dicomweb_json import MAX_DEPTH, dataset_json
from listeners.dicomweb_media import ANY, EXPLICIT_LE, FRAME_MEDIA, MediaRange, NotAcceptable, wanted_parts
from listeners.dicomweb_media import single as single_type
from transforms import dicom_codec as codec
from transforms import dicom_transcode_stream as transcode_stream

if TYPE_CHECKING:
    from engine.context import ComponentContext

log = structlog.get_logger()
OCTET = "application/octet-stream"
MAX_FRAMES_PER_REQUEST = 4096
PIXEL_DATA = 0x7FE00010
STREAM_FROM = 4 * 1024 * 1024  # stored instances from this size go out chunk by chunk
_BYTE_RANGE = re.compile(r"^([0-9]{0,18})-([0-9]{0,18})$")  # first-pos "-" last-pos, or "-" suffix-length


@dataclass(frozen=True)
class Stored:
    """One stored instance: where it is (ref) and its Part-10 bytes."""

    ref: idx.InstanceRef
    part10: bytes

    @property
    def transfer_syntax(self) -> str:
        return self.ref.transfer_syntax

    def data_set(self) -> bytes:
        return self.part10[144 + int.from_bytes(self.part10[140:144], "little"):]


def read_part10(ctx: ComponentContext, ref: idx.InstanceRef) -> Stored:
    """The one read of the archive for DICOMweb (decrypted, checked against its message id)."""
    with ctx.store.engine.connect() as conn:
        return Stored(ref, idx.load_instance(conn, ctx.store, ref))


@dataclass(frozen=True)
class Fetched:
    """An instance on its way out: in one piece (``whole``), or chunk by chunk (``chunks``:
    decrypted and authenticated as they are read, memory about one chunk) as stored or, when
    ``converted_to`` is set, converted to that syntax frame by frame."""

    ref: idx.InstanceRef
    whole: Stored | None
    chunks: Iterator[bytes] | None
    converted_to: str | None = None

    @property
    def transfer_syntax(self) -> str:
        """The syntax of what goes out (the stored one unless converted)."""
        return self.converted_to or self.ref.transfer_syntax


class _TooLarge(Stored):
    """A large instance that cannot be converted frame by frame and is past the whole-conversion
    cap: converting it raises TranscodeError as an unencodable one does (406 / a failed part)."""

    def data_set(self) -> bytes:
        raise codec.TranscodeError(f"instance larger than {codec.MAX_WHOLE_BYTES} bytes cannot be converted "
                                   "in memory (no frame-by-frame conversion for it)")


def fetch(ctx: ComponentContext, sop_uid: str, accepted: Sequence[str], *, study_uid: str | None = None,
          series_uid: str | None = None) -> Fetched | None:
    """Locate an instance and read it: streamed when it goes out as stored (``*`` or its own
    syntax accepted) and is at least STREAM_FROM bytes, else read whole (small ones: one read is
    cheaper than a hop per chunk; converted ones: the codec needs the data set). None: no such
    instance (in that series of that study)."""
    with ctx.store.engine.connect() as conn:
        found = idx.locate(conn, sop_uid, study_uid, series_uid)
        if found is None:
            return None
        if found.size >= STREAM_MIN and not found.revised and not as_stored(found.ref, accepted):
            converted = _converted(ctx, found, accepted)
            if converted is not None:
                return converted
        chunks = idx.instance_chunks(conn, ctx.store, found)
        if as_stored(found.ref, accepted) and found.size >= STREAM_FROM and not found.revised:
            return Fetched(found.ref, None, chunks)
        return Fetched(found.ref, Stored(found.ref, b"".join(chunks)), None)


def _converted(ctx: ComponentContext, found: idx.Located, accepted: Sequence[str]) -> Fetched | None:
    """A large instance converted frame by frame as it is read
    (transforms/dicom_transcode_stream.py); one it cannot plan is read whole, or refused when it
    is past ``MAX_WHOLE_BYTES``; None: read whole as before (another target, or nothing fits)."""
    stored = found.ref.transfer_syntax
    target = codec.choose(stored, accepted)
    if target is None:
        return None

    try:
        plan = transcode_stream.plan(_data_set_opener(ctx, found), stored, target)
    except codec.TranscodeError:
        return None  # the whole path says why (406, or a part left out)
    if plan is None:
        return Fetched(found.ref, _TooLarge(found.ref, b""), None) if found.size > codec.MAX_WHOLE_BYTES else None
    log.info("dicom.transcoded", stored=stored, sent=target, streamed=True, frames=plan.frames)
    head = file_meta(found.ref.sop_class_uid, plan.sop_instance_uid or found.ref.sop_uid, target)
    return Fetched(found.ref, None, itertools.chain((head,), plan.open()), target)


def _data_set_opener(ctx: ComponentContext, found: idx.Located) -> Callable[[], Iterator[bytes]]:
    """Opens the stored instance's data set chunks afresh (a conversion plan reads it more than once)."""

    def open_dataset() -> Iterator[bytes]:
        with ctx.store.engine.connect() as c:
            return stream_send.split_part10(idx.instance_chunks(c, ctx.store, found))[1]

    return open_dataset


def accepted_syntaxes(wanted: Sequence[tuple[str, str | None]]) -> list[str]:
    """Transfer syntaxes acceptable for application/dicom parts ("*" = as stored)."""
    out = []
    for part, ts in wanted:
        if part in ("application/dicom", "*/*", "application/*", "*"):
            out.append(ts or EXPLICIT_LE)
    if not out:
        raise NotAcceptable("instances are given as multipart/related; type=\"application/dicom\"")
    return out


def as_stored(ref: idx.InstanceRef, accepted: Sequence[str]) -> bool:
    """The instance goes out in its stored syntax, bytes unchanged (``*`` or that syntax accepted)."""
    return ANY in accepted or ref.transfer_syntax in accepted


def as_part10(inst: Stored, accepted: Sequence[str]) -> tuple[bytes, str]:
    """The instance in the first acceptable syntax: (Part-10 bytes, transfer syntax).

    Raises TranscodeError when no acceptable syntax can be produced.
    """
    stored = inst.transfer_syntax
    if as_stored(inst.ref, accepted):
        return inst.part10, stored
    target = codec.send_plan(stored, accepted)
    raw = codec.convert(inst.data_set(), stored, target)
    return file_meta(inst.ref.sop_class_uid, inst.ref.sop_uid, target) + raw, target


def full_dataset(inst: Stored) -> Dataset:
    return dcmread(io.BytesIO(inst.part10))


def metadata_json(inst: Stored, instance_url: str) -> dict[str, Any]:
    """The instance's attributes as DICOM JSON, bulk values as BulkDataURI (PS3.18 10.4.1.1.2)."""
    ds = dcmread(io.BytesIO(inst.part10))  # pixel data is read as bytes, never decoded here
    return dataset_json(ds, bulk_uri=lambda path: f"{instance_url}/bulkdata/{path}")


def parse_bulk_path(text: str) -> list[int]:
    """``7FE00010`` or ``54000100/0/54001010`` (tag, item index, tag...) as numbers; ValueError
    for anything else (8-digit hex tags, decimal item numbers, at most MAX_DEPTH levels)."""
    parts = text.split("/")
    if len(parts) % 2 != 1 or len(parts) > 2 * MAX_DEPTH + 1:
        raise ValueError("bulk data is addressed by tag[/item/tag...]")
    out = []
    for n, part in enumerate(parts):
        if n % 2 == 0:
            if len(part) != 8 or not all(c in "0123456789abcdefABCDEF" for c in part):
                raise ValueError("bulk data tags are 8 hex digits")
            out.append(int(part, 16))
        else:
            if not part.isascii() or not part.isdigit() or len(part) > 6:
                raise ValueError("sequence items are numbered from 0")
            out.append(int(part))
    return out


def bulk_value(inst: Stored, path: int | Sequence[int]) -> tuple[bytes, str]:
    """The value of an element, top-level (a tag) or in sequence items (tag, item, tag...):
    (bytes, VR); KeyError when the instance lacks it or it is not a binary value."""
    steps = [path] if isinstance(path, int) else list(path)
    ds = dcmread(io.BytesIO(inst.part10))
    while len(steps) > 1:
        seq = ds.get(steps[0])
        if seq is None or seq.VR != "SQ" or not 0 <= steps[1] < len(seq.value):
            raise KeyError(steps[0])
        ds, steps = seq.value[steps[1]], steps[2:]
    elem = ds.get(steps[0])
    if elem is None or elem.VR == "SQ":
        raise KeyError(steps[0])
    value = elem.value
    if isinstance(value, bytes):
        return value, elem.VR
    raise KeyError(steps[0])


@dataclass(frozen=True)
class Bulk:
    """Bulk data on its way out: ``parts`` of ``media_type`` (with ``transfer_syntax`` for Pixel
    Data, None for other values), ``single`` when Accept asked for no multipart response."""

    parts: list[bytes]
    media_type: str
    transfer_syntax: str | None
    single: bool


def bulk(inst: Stored, path: Sequence[int], ranges: Sequence[MediaRange]) -> Bulk:
    """The bulk data at ``path`` in the form Accept asks for (PS3.18 8.7.3.3.2, Table 8.7.3-5).

    Pixel Data of an encapsulated instance goes through ``frames`` (the /frames resource's one
    mechanism): application/octet-stream is the decoded native pixel data in Explicit VR Little
    Endian, one part of all frames; a compressed media type (image/jp2, image/jpeg...) or
    ``type="*/*"; transfer-syntax=*`` gives the frames as stored, one part per frame with its
    ``transfer-syntax``; never the item-tag encoding. Any other value goes as stored, as
    application/octet-stream. Raises KeyError, NotAcceptable, TranscodeError.
    """
    wanted, single = bulk_wanted(ranges)
    if list(path) == [PIXEL_DATA] and UID(inst.transfer_syntax).is_compressed:
        count = _frame_count(dcmread(io.BytesIO(inst.part10), stop_before_pixels=True))
        got, media_type, ts = frames(inst, range(1, count + 1), wanted)
        if media_type == OCTET:
            got = [b"".join(got)]  # the native value is one part (the frames back to back)
        elif single:
            raise NotAcceptable("compressed pixel data is given as multipart/related, one part per frame")
        return Bulk(got, media_type, ts, single)
    value, _vr = bulk_value(inst, path)
    if not any(p in (OCTET, "*/*", "*", "application/*") for p, _ts in wanted):
        raise NotAcceptable("bulk data is given as application/octet-stream")
    return Bulk([value], OCTET, None, single)


def bulk_wanted(ranges: Sequence[MediaRange]) -> tuple[list[tuple[str, str | None]], bool]:
    """The parts bulk data may go in, and whether Accept asked for a single part (octet-stream)."""
    try:
        return wanted_parts(ranges, OCTET), False
    except NotAcceptable:
        single_type(ranges, (OCTET,))  # a single part: application/octet-stream, else 406
        return [(OCTET, None)], True


@dataclass(frozen=True)
class StreamedBulk:
    """A large encapsulated instance's Pixel Data decoded frame by frame as it is read: the whole
    native value (``length`` bytes), or only the byte range ``span`` (first, last) of it."""

    ref: idx.InstanceRef
    chunks: Iterator[bytes]
    length: int
    single: bool
    span: tuple[int, int] | None = None


class RangeNotSatisfiable(ValueError):
    """A valid byte range past the end of a value of ``size`` bytes (416)."""

    def __init__(self, size: int) -> None:
        super().__init__("range not satisfiable")
        self.size = size


def streamed_pixels(ctx: ComponentContext, sop_uid: str, ranges: Sequence[MediaRange], *, study_uid: str,
                    series_uid: str, range_header: str | None = None) -> StreamedBulk | None:
    """Pixel Data bulk data of a large (``STREAM_MIN``) encapsulated instance asked for as
    application/octet-stream: its native value decoded frame by frame as the blob is read
    (``transforms.dicom_transcode_stream``, the conversion WADO-RS instances use), memory about a
    frame. ``range_header`` (a Range the single part may answer): only that byte range of the
    value, as one application/octet-stream part; frames before it are read past undecoded, and
    reading stops after its last frame; RangeNotSatisfiable for one past the end. None: not that
    case, or no frame-by-frame plan for it (``bulk`` reads it whole)."""
    wanted, single = bulk_wanted(ranges)
    with ctx.store.engine.connect() as conn:
        found = idx.locate(conn, sop_uid, study_uid, series_uid)
    if found is None or found.size < STREAM_MIN or found.revised:
        return None
    stored = UID(found.ref.transfer_syntax)
    if not stored.is_compressed or frame_form(stored, wanted)[0] != "decoded":
        return None

    try:
        plan = transcode_stream.plan(_data_set_opener(ctx, found), stored, EXPLICIT_LE)
    except codec.TranscodeError:
        return None  # the whole path says why (406)
    if plan is None:
        return None
    try:
        span = byte_range(range_header, plan.length)
    except ValueError:
        raise RangeNotSatisfiable(plan.length) from None
    log.info("dicom.transcoded", stored=str(stored), sent=EXPLICIT_LE, streamed=True, frames=plan.frames,
             what="bulkdata", range=span)
    if span is None:
        return StreamedBulk(found.ref, plan.pixel_value(), plan.length, single)
    return StreamedBulk(found.ref, plan.pixel_value(*span), plan.length, True, span)


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def parse_frame_list(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part.isascii() or not part.isdigit() or int(part) < 1 or len(part) > 9:
            raise ValueError("frame numbers are positive integers separated by commas")
        out.append(int(part))
    if not out or len(out) > MAX_FRAMES_PER_REQUEST:
        raise ValueError(f"1-{MAX_FRAMES_PER_REQUEST} frame numbers")
    return out


def _native_frames(ds: Dataset, numbers: Sequence[int]) -> list[bytes]:
    rows, cols = int(ds.Rows), int(ds.Columns)
    spp, bits = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.BitsAllocated)
    frame_bits = rows * cols * spp * bits
    if frame_bits % 8:
        raise NotAcceptable("frames of 1-bit pixel data do not fall on byte boundaries")
    size = frame_bits // 8
    data = ds.PixelData
    return [bytes(data[(n - 1) * size:n * size]) for n in numbers]


def frames(inst: Stored, numbers: Sequence[int], wanted: Sequence[tuple[str, str | None]]
           ) -> tuple[list[bytes], str, str]:
    """The frames in the first acceptable form: (frames, part media type, transfer syntax).

    Native frames (application/octet-stream, Explicit VR Little Endian) are sliced from
    uncompressed pixel data or decoded from compressed; compressed frames go as stored
    (image/jpeg, image/jp2, image/jls...) when their media type or ``*`` is accepted.
    Raises KeyError (no such frame / no pixel data), NotAcceptable, TranscodeError.
    """
    ts = UID(inst.transfer_syntax)
    ds = dcmread(io.BytesIO(inst.part10))
    if "PixelData" not in ds:
        raise KeyError("PixelData")
    count = _frame_count(ds)
    if any(n > count for n in numbers):
        raise KeyError("frame")
    form, media_type, out_ts = frame_form(ts, wanted)
    if form == "native":
        return _native_frames(ds, numbers), media_type, out_ts
    if form == "stored":
        from pydicom.encaps import generate_frames

        all_frames = list(generate_frames(ds.PixelData, number_of_frames=count))
        return [all_frames[n - 1] for n in numbers], media_type, out_ts
    return _decoded_frames(inst, ds, numbers, count), media_type, out_ts


def frame_form(ts: UID, wanted: Sequence[tuple[str, str | None]]) -> tuple[str, str, str]:
    """How frames of a ``ts`` instance go for ``wanted``: ("native", octet-stream, ts) sliced from
    uncompressed little endian pixel data, ("stored", its media type, ts) compressed as stored, or
    ("decoded", octet-stream, Explicit VR Little Endian). Raises NotAcceptable."""
    stored_media = FRAME_MEDIA.get(ts, OCTET) if ts.is_compressed else OCTET
    for part, want_ts in wanted:
        as_stored = want_ts in (ANY, str(ts)) and part in (stored_media, "*/*", "*")
        if as_stored and not ts.is_compressed and not ts.is_little_endian:
            as_stored = False
        if as_stored or (part == stored_media and want_ts is None and ts.is_compressed):
            return ("stored", stored_media, str(ts)) if ts.is_compressed else ("native", OCTET, str(ts))
        if part in (OCTET, "*/*", "*", "application/*") and want_ts in (None, EXPLICIT_LE, ANY):
            if not ts.is_compressed and ts.is_little_endian:
                return "native", OCTET, EXPLICIT_LE
            return "decoded", OCTET, EXPLICIT_LE
    raise NotAcceptable("the frames cannot be given in any media type of Accept")


def _decoded_frames(inst: Stored, ds: Dataset, numbers: Sequence[int], count: int) -> list[bytes]:
    from pydicom.pixels import pixel_array

    out = []
    native = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated) // 8
    if native * len(numbers) > codec.MAX_WHOLE_BYTES:
        raise codec.TranscodeError(f"more than {codec.MAX_WHOLE_BYTES} bytes of decoded frames in one response")
    try:
        if count > 1 and list(numbers) == list(range(1, count + 1)):  # all of them: one decode, not one each
            arr = pixel_array(io.BytesIO(inst.part10))
            whole = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
            size = len(whole) // count
            return [whole[n * size:(n + 1) * size] for n in range(count)]
        for n in numbers:
            arr = pixel_array(io.BytesIO(inst.part10), index=n - 1 if count > 1 else None)
            out.append(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
    except Exception as e:
        raise codec.TranscodeError(f"frames cannot be decoded ({type(e).__name__})") from None
    return out


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """One ``bytes=a-b`` range (RFC 9110 14.2) within ``size``, or None for the whole value (no
    Range, another unit, several ranges, or an invalid one such as ``bytes=5-3``, which RFC 9110
    14.1.1 says to ignore). Raises ValueError for a valid range that cannot be satisfied (416:
    starting at or past the end, or a zero suffix)."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # other units and multiple ranges: the whole value (allowed by RFC 9110)
    m = _BYTE_RANGE.match(spec.strip())
    if m is None or m.group(0) == "-":
        return None  # not a byte-range-spec (RFC 9110 14.1.1: digits only): ignored
    start_s, end_s = m.groups()
    if start_s == "":
        n = int(end_s)
        start, end = max(0, size - n), size - 1
        if n == 0:
            raise ValueError("range not satisfiable")  # a zero suffix selects nothing
    else:
        start = int(start_s)
        if end_s and int(end_s) < start:
            return None  # invalid (last-pos before first-pos), not unsatisfiable
        end = int(end_s) if end_s else size - 1
    end = min(end, size - 1)
    if start >= size:
        raise ValueError("range not satisfiable")
    return start, end
