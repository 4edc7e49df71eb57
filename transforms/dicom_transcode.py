"""`dicom_transcode`: re-encode each DICOM instance on a route in one transfer syntax.

What a modality sends is archived exactly as received unless a route says otherwise:
``transforms: [{type: dicom_transcode, transfer_syntax: 1.2.840.10008.1.2.4.90}]`` before
``to: {type: store}`` files JPEG 2000 lossless of what came uncompressed (the store
destination replaces the index entry with the converted copy, so C-GET/C-MOVE/WADO serve
it); ``transfer_syntax: 1.2.840.10008.1.2.1`` before a DICOM destination decompresses for
an old RIS. The conversion is transforms/dicom_codec.py's ``convert`` (the one codec path
of retrieve and forward): lossless targets keep the SOP Instance UID, a lossy target is
refused unless ``lossy_ratio`` is set, and then the result gets a new SOP Instance UID and
LossyImageCompression/Ratio/Method (PS3.3 C.7.6.1.1.5).

Kept unchanged, never converted: an instance already in the target syntax, and one
without Pixel Data (an SR or a KOS is not an image; a compressed syntax would only
relabel its explicit VR encoding). An instance the codecs refuse raises ``TranscodeError``
(the route dead-letters it with the reason: ``on_failure: error``) or, with ``on_failure:
keep``, goes on as received, logged ``dicom.transcode_failed`` and audited
``dicom.transcode`` failure (the count of kept ones is the count of those rows).

A transform gets the whole payload (the pipeline decrypts it for the route's transforms), so
this conversion is done in memory and bounded by ``max_instance_bytes``. Retrieval (C-GET,
C-MOVE, WADO) and a DICOM destination's ``transfer_syntax`` convert a large instance frame by
frame instead, to an uncompressed or a compressed syntax (transforms/dicom_transcode_stream.py).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable
from typing import Literal

import structlog
from pydantic import Field, ValidationInfo, field_validator
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.registry import component
from transforms import dicom_codec as codec

log = structlog.get_logger()

_PIXEL_DATA = 0x7FE00010


class DicomTranscodeConfig(ComponentConfig):
    """Re-encode DICOM instances in one transfer syntax (archive JPEG 2000 lossless, decompress for old peers)."""

    type: Literal["dicom_transcode"] = Field(description="Component type.")
    lossy_ratio: float | None = Field(None, gt=1, description=(
        "allow a lossy transfer_syntax (JPEG 2000 .91, JPEG-LS near-lossless .81) at this compression ratio; "
        "LossyImageCompression, its Ratio and Method are set and the result gets a new SOP Instance UID. "
        "Without it a lossy transfer_syntax is a configuration error"))
    transfer_syntax: str = Field(description=(
        "target transfer syntax UID: e.g. 1.2.840.10008.1.2.4.90 (JPEG 2000 lossless) to archive compressed, "
        "1.2.840.10008.1.2.1 (Explicit VR Little Endian) to decompress for an old peer; one medrelay can "
        "encode (see the conformance statement's conversion table)"), examples=["1.2.840.10008.1.2.4.90"])
    max_instance_bytes: int = Field(codec.MAX_WHOLE_BYTES, ge=1, description=(
        "largest instance converted (its Part 10 bytes); this transform gets it whole and the codecs hold "
        "it decoded and encoded, several times its size: a larger one is a failure handled by on_failure. "
        "To send large instances in another syntax (uncompressed, or JPEG 2000 / RLE / JPEG-LS), a DICOM "
        "destination's own transfer_syntax converts them frame by frame instead, without this bound"))
    on_failure: Literal["error", "keep"] = Field("error", description=(
        "an instance that cannot be converted: error = the delivery is dead-lettered with the reason; "
        "keep = it goes on as received (logged dicom.transcode_failed, audited dicom.transcode failure)"))

    @field_validator("transfer_syntax")
    @classmethod
    def _target(cls, v: str, info: ValidationInfo) -> str:
        v = v.strip()
        if not codec.can_encode(v):
            raise ValueError(f"{v}: not a transfer syntax medrelay can encode")
        if v in codec.LOSSY_METHOD and info.data.get("lossy_ratio") is None:
            raise ValueError(f"{UID(v).name} is lossy: set lossy_ratio to allow it (lossy compression is never "
                             "implicit)")
        return v


def split(payload: bytes) -> tuple[str, bytes]:
    """(transfer syntax, encoded data set) of a Part 10 file; ValueError when it is not one."""
    if len(payload) < 144 or payload[128:132] != b"DICM" or payload[132:136] != b"\x02\x00\x00\x00":
        raise ValueError("not a DICOM Part-10 file")
    end = 144 + int.from_bytes(payload[140:144], "little")
    meta = read_dataset(io.BytesIO(payload[132:end]), False, True)
    return str(meta.TransferSyntaxUID), payload[end:]


def has_pixel_data(data_set: bytes, ts: UID) -> bool:
    """Whether the data set has top-level Pixel Data: its elements are read up to it (not its
    value), and the tag that stopped the reading is looked at."""
    fp = io.BytesIO(data_set)
    read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=lambda tag, _vr, _len: tag >= _PIXEL_DATA)
    raw = fp.read(4)  # stop_when leaves the stream at the tag that stopped it
    if len(raw) < 4:
        return False
    order: Literal["little", "big"] = "little" if ts.is_little_endian else "big"
    return (int.from_bytes(raw[:2], order) << 16 | int.from_bytes(raw[2:4], order)) == _PIXEL_DATA


def part10(data_set: bytes, ts: str, sop_class: str, sop_uid: str, like: bytes) -> bytes:
    """A Part 10 file of ``data_set`` in ``ts``: the file meta of ``like`` (implementation,
    source AE) with the new syntax and SOP Instance UID."""
    end = 144 + int.from_bytes(like[140:144], "little")
    meta = FileMetaDataset(read_dataset(io.BytesIO(like[132:end]), False, True))
    meta.TransferSyntaxUID = UID(ts)
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    if "FileMetaInformationGroupLength" in meta:
        del meta.FileMetaInformationGroupLength
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    out = DicomFileLike(buf)
    out.is_little_endian, out.is_implicit_VR = True, False
    write_file_meta_info(out, meta, enforce_standard=True)
    return buf.getvalue() + data_set


def transcode(payload: bytes, target: str, lossy: codec.Lossy | None) -> tuple[bytes, str, str] | None:
    """(new Part 10 bytes, stored syntax, SOP Instance UID) of ``payload`` in ``target``; None when
    it is kept unchanged (already in ``target``, or not an image). Raises codec.TranscodeError."""
    try:
        stored, data_set = split(payload)
        src = UID(stored)
        if stored == target:
            return None
        if not src.is_transfer_syntax:
            raise codec.TranscodeError(f"unknown transfer syntax {stored}")
        plain = zlib.decompress(data_set, -zlib.MAX_WBITS) if src.is_deflated else data_set
        if not has_pixel_data(plain, src):
            return None
    except codec.TranscodeError:
        raise
    except Exception as e:
        raise codec.TranscodeError(f"not a readable DICOM instance ({type(e).__name__})") from None
    out = codec.convert(data_set, stored, target, lossy=lossy)
    try:
        head = codec.sop_head(out, UID(target))
        sop_class, sop_uid = str(head.SOPClassUID), str(head.SOPInstanceUID)
    except Exception as e:
        raise codec.TranscodeError(f"converted data set has no SOP Class/Instance UID ({type(e).__name__})") \
            from None
    return part10(out, target, sop_class, sop_uid, payload), stored, sop_uid


@component("transform", "dicom_transcode", config=DicomTranscodeConfig, kinds=("dicom",))
def build(config: DicomTranscodeConfig, ctx: ComponentContext | None = None) -> Callable[[Envelope], Envelope]:
    """Re-encode DICOM instances in one transfer syntax (JPEG 2000 lossless archive, decompression for old peers)."""
    target = config.transfer_syntax
    lossy = codec.Lossy(config.lossy_ratio) if config.lossy_ratio is not None else None
    logger = ctx.log if ctx is not None else log

    def transform(env: Envelope) -> Envelope:
        if env.kind != "dicom":
            return env
        try:
            if len(env.payload) > config.max_instance_bytes:
                raise codec.TranscodeError(f"instance of {len(env.payload)} bytes is larger than max_instance_bytes "
                                           f"({config.max_instance_bytes})")
            done = transcode(env.payload, target, lossy)
        except codec.TranscodeError as e:
            reason = str(e)
            logger.warning("dicom.transcode_failed", message_id=env.id, target=target, reason=reason,
                           on_failure=config.on_failure)
            if config.on_failure == "error":
                raise
            if ctx is not None:
                ctx.audit.record("dicom.transcode", outcome="failure", actor="medrelay", channel=env.channel,
                                 message_id=env.id, entity={"kind": "dicom", "route": ctx.route,
                                                            "target": target, "kept": True}, detail=reason[:300])
            return env
        if done is None:
            return env
        payload, stored, sop_uid = done
        headers = {**env.headers, "TransferSyntaxUID": target}
        if "SOPInstanceUID" in headers or lossy is not None:
            headers["SOPInstanceUID"] = sop_uid
        logger.debug("dicom.transcoded", message_id=env.id, source=stored, target=target, size=len(payload))
        return env.derive(payload=payload, headers=headers)

    return transform
