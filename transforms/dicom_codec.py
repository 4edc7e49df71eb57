"""Transfer syntax conversion of stored DICOM instances: what a peer accepts, or a counted failure.

The archive keeps every instance exactly as it was received. When a peer cannot take
the stored transfer syntax (a C-GET SCU proposing only uncompressed syntaxes, a
C-MOVE destination, a C-STORE destination with ``transfer_syntax:``, a WADO-RS client
asking for Explicit VR Little Endian), the data set is converted here with pydicom's
pixel data handlers: decoding by pylibjpeg (libjpeg-turbo, libjpeg for JPEG-LS,
OpenJPEG, RLE), encoding by pylibjpeg-openjpeg (JPEG 2000), pylibjpeg-rle / pydicom
(RLE) and pyjpegls (JPEG-LS) where installed. Nothing here is hand-written codec code.

Rules (PS3.5 8, A.4; PS3.3 C.7.6.1.1.5):

- the stored syntax is sent whenever the peer accepts it (no decode, byte-identical);
- otherwise an uncompressed syntax the peer accepts (Explicit VR Little Endian first),
  then a lossless compressed one we can encode;
- lossy compression only when the caller passes a ``Lossy`` policy (a configured
  destination syntax), and then LossyImageCompression, its Ratio and Method are set;
  an image that was ever lossy keeps LossyImageCompression "01" when decompressed;
- decompressing or lossless compression keeps the SOP Instance UID (the same image);
  lossy compression gives the result a new one (PS3.3 C.7.6.1.1.5: a different image);
- anything that cannot be converted raises ``TranscodeError``: the caller counts and
  logs it as a failed sub-operation or request, never as sent.

Used by listeners (C-GET/C-MOVE through routes/dicom_scu.send_raw, DICOMweb) and by
routes (C-STORE forwarding), which is why it lives in transforms/, below both.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from pydicom import uid as _uid
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID

EXPLICIT_LE = _uid.ExplicitVRLittleEndian
IMPLICIT_LE = _uid.ImplicitVRLittleEndian
UNCOMPRESSED: tuple[str, ...] = (EXPLICIT_LE, IMPLICIT_LE)
NATIVE: frozenset[str] = frozenset((EXPLICIT_LE, IMPLICIT_LE, _uid.ExplicitVRBigEndian,
                                    _uid.DeflatedExplicitVRLittleEndian))
# Encapsulated syntaxes whose output loses information (PS3.5 8.2; PS3.3 C.7.6.1.1.5.1 method codes).
LOSSY_METHOD: dict[str, str] = {
    _uid.JPEGBaseline8Bit: "ISO_10918_1", _uid.JPEGExtended12Bit: "ISO_10918_1",
    _uid.JPEGLSNearLossless: "ISO_14495_1", _uid.JPEG2000: "ISO_15444_1", _uid.HTJ2K: "ISO_15444_15",
}
# Candidate syntaxes we may encode to, lossless ones in order of preference.
LOSSLESS_TARGETS: tuple[str, ...] = (_uid.JPEG2000Lossless, _uid.RLELossless, _uid.JPEGLSLossless)
LOSSY_TARGETS: tuple[str, ...] = (_uid.JPEG2000, _uid.JPEGLSNearLossless)
# Largest data set converted whole in memory (decoded and encoded it takes several times its
# size). A large instance converts frame by frame instead (transforms/dicom_transcode_stream.py);
# this bounds the rest: big endian or deflated, 1-bit pixel data, and fragments whose frames cannot
# be told apart without decoding them.
MAX_WHOLE_BYTES = 512 * 1024 * 1024


class TranscodeError(ValueError):
    """The instance cannot be sent in any syntax the peer accepts (or decoding/encoding failed).

    A ValueError, as pynetdicom's own "no presentation context" is: callers that refuse a
    send for that reason refuse it for this one too."""


@dataclass(frozen=True)
class Lossy:
    """Permission to compress lossily, with the target compression ratio (e.g. 10 for 10:1)."""

    ratio: float


@lru_cache(maxsize=64)
def can_decode(ts: str) -> bool:
    """pydicom has a working decoder for this syntax's pixel data (native syntaxes: always)."""
    if ts in NATIVE:
        return True
    try:
        from pydicom.pixels import get_decoder

        return bool(get_decoder(UID(ts)).is_available)
    except (NotImplementedError, ValueError):
        return False


@lru_cache(maxsize=64)
def can_encode(ts: str) -> bool:
    """pydicom has a working encoder for this syntax (uncompressed little endian: always)."""
    if ts in UNCOMPRESSED:
        return True
    try:
        from pydicom.pixels import get_encoder

        return bool(get_encoder(UID(ts)).is_available)
    except (NotImplementedError, ValueError):
        return False


def convertible(ts: str) -> list[str]:
    """The syntaxes an instance stored in ``ts`` can be sent in, for the conformance statement."""
    if not can_decode(ts):
        return [ts]
    out = [ts, *(t for t in UNCOMPRESSED if t != ts)]
    out += [t for t in (*LOSSLESS_TARGETS, *LOSSY_TARGETS) if t != ts and can_encode(t)]
    return out


def choose(stored: str, accepted: Iterable[str], *, lossy: Lossy | None = None) -> str | None:
    """The syntax to send: the stored one when accepted, else uncompressed, else lossless
    compressed we can encode, else (only with ``lossy``) lossy; None when there is none.

    A data set without pixel data converts freely between any syntaxes (only its
    encoding changes: a compressed syntax encodes it as explicit VR little endian).
    """
    acc = list(dict.fromkeys(str(a) for a in accepted))
    if stored in acc:
        return stored
    if not can_decode(stored):
        return None
    for ts in (*UNCOMPRESSED, *LOSSLESS_TARGETS):
        if ts in acc and can_encode(ts):
            return ts
    if lossy is not None:
        for ts in LOSSY_TARGETS:
            if ts in acc and can_encode(ts):
                return ts
    return None


def _read(raw: bytes, ts: UID) -> Dataset:
    data = zlib.decompress(raw, -zlib.MAX_WBITS) if ts.is_deflated else raw
    ds = read_dataset(io.BytesIO(data), ts.is_implicit_VR, ts.is_little_endian)
    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return ds


def sop_head(data_set: bytes, ts: UID) -> Dataset:
    """The data set's elements up to the SOP Instance UID (no pixel data read): what a caller
    reads back after ``convert``, since a lossy target gives the instance a new UID."""
    return read_dataset(io.BytesIO(data_set), ts.is_implicit_VR, ts.is_little_endian,
                        stop_when=lambda tag, _vr, _len: tag > 0x00080018)


def encode(ds: Dataset, ts: UID) -> bytes:
    """``ds``'s elements encoded in ``ts`` (no file meta)."""
    fp = io.BytesIO()
    from pydicom.filebase import DicomFileLike

    out = DicomFileLike(fp)
    out.is_little_endian = ts.is_little_endian
    out.is_implicit_VR = ts.is_implicit_VR
    write_dataset(out, ds)
    return fp.getvalue()


def mark_lossy(ds: Dataset, method: str, ratio: float | None) -> None:
    """PS3.3 C.7.6.1.1.5: LossyImageCompression "01" and, when this step was lossy, its ratio
    and method appended to those of earlier steps."""
    ds.LossyImageCompression = "01"
    if ratio is None:
        return
    ratios = [float(r) for r in (ds.get("LossyImageCompressionRatio") or [])] if "LossyImageCompressionRatio" in ds \
        else []
    methods = list(ds.get("LossyImageCompressionMethod") or []) if "LossyImageCompressionMethod" in ds else []
    if isinstance(ds.get("LossyImageCompressionMethod"), str):
        methods = [ds.LossyImageCompressionMethod]
    ds.LossyImageCompressionRatio = [*ratios, round(ratio, 2)]
    ds.LossyImageCompressionMethod = [*methods, method]


def decompressed_header(ds: Dataset, src: UID) -> None:
    """What decompressing ``src`` pixel data changes besides Pixel Data (and what pydicom's
    ``decompress`` sets): no Extended Offset Table, which only encapsulated frames have; an image
    that was ever lossy keeps LossyImageCompression "01"."""
    for kw in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if kw in ds:
            del ds[kw]
    if src in LOSSY_METHOD or str(ds.get("LossyImageCompression", "")).strip() == "01":
        mark_lossy(ds, LOSSY_METHOD.get(src, ""), None)


def compress_options(dst: UID, lossy: Lossy | None) -> dict[str, list[float]]:
    """The encoder options a compression to ``dst`` uses (pydicom ``compress`` / ``encode`` keywords)."""
    if dst in (_uid.JPEG2000, _uid.HTJ2K) and lossy is not None:
        return {"j2k_cr": [lossy.ratio]}
    return {}


def compressed_header(ds: Dataset, dst: UID, lossy: Lossy | None) -> None:
    """What compressing to ``dst`` changes besides Pixel Data and the transfer syntax: lossless
    is the same image, so the same SOP Instance UID; lossy is a new image (PS3.3 C.7.6.1.1.5): a
    new SOP Instance UID and LossyImageCompression, its Ratio and Method."""
    if dst not in LOSSY_METHOD:
        return
    assert lossy is not None
    from pydicom.uid import generate_uid

    ds.SOPInstanceUID = generate_uid()
    if getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    mark_lossy(ds, LOSSY_METHOD[dst], lossy.ratio)


def convert(raw: bytes, stored: str, target: str, *, lossy: Lossy | None = None) -> bytes:
    """The encoded data set ``raw`` (in ``stored``) re-encoded in ``target``.

    Raises TranscodeError for a syntax we cannot decode or encode, a lossy target
    without a ``Lossy`` policy, or pixel data the codec refuses.
    """
    src, dst = UID(stored), UID(target)
    if src == dst:
        return raw
    if dst in LOSSY_METHOD and lossy is None:
        raise TranscodeError(f"{dst.name} is lossy and lossy compression is not configured")
    if not can_encode(dst):
        raise TranscodeError(f"no encoder for {dst.name}")
    try:
        ds = _read(raw, src)
    except Exception as e:
        raise TranscodeError(f"data set cannot be read ({type(e).__name__})") from None
    has_pixels = "PixelData" in ds
    try:
        if has_pixels and src.is_compressed:
            if not can_decode(src):
                raise TranscodeError(f"no decoder for {src.name}")
            ds.decompress(generate_instance_uid=False)  # the same image: the same instance
            decompressed_header(ds, src)
        elif has_pixels and not src.is_little_endian:
            ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("<")).tobytes()
        if has_pixels and dst.is_compressed:
            ds.compress(dst, generate_instance_uid=False, **compress_options(dst, lossy))  # type: ignore[arg-type]
            compressed_header(ds, dst, lossy)
        # no pixel data: a compressed syntax is explicit VR little endian for everything else
        ds.file_meta.TransferSyntaxUID = dst
        return encode(ds, dst)
    except TranscodeError:
        raise
    except Exception as e:  # the codec refused this image (bits, photometric interpretation...)
        raise TranscodeError(f"{src.name} -> {dst.name} failed ({type(e).__name__}: {str(e)[:120]})") from None


def send_plan(stored: str, accepted: Sequence[str], *, lossy: Lossy | None = None) -> str:
    """``choose`` that raises TranscodeError when nothing fits (for callers that must send)."""
    target = choose(stored, accepted, lossy=lossy)
    if target is None:
        raise TranscodeError(f"the peer accepts none of the syntaxes {UID(stored).name} converts to")
    return target
