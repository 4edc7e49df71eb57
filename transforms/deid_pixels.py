"""Burned-in text: quarantine the instances that may carry it, blank the known regions.

Header de-identification cannot see text written into the pixels (ultrasound
banners, screen captures, scanned forms). Like RSNA CTP's DicomPixelAnonymizer we
only clean what a rule describes: rectangles for one manufacturer/model/size. An
instance flagged by BurnedInAnnotation=YES, its SOP class or its modality with no
matching rule is stopped (``Quarantine``) rather than passed on: no OCR guesswork.
Blanking edits uncompressed pixel bytes in place, so it needs no numpy; compressed
pixel data would need a decode/re-encode round trip we do not trust yet, so those
instances are quarantined too.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID

from engine.envelope import Drop
from transforms.deid_config import DeidentifyConfig, PixelRule


class Quarantine(Drop):
    """A message stopped because it may hold PHI we cannot remove; its delivery becomes `quarantined`."""

    state = "quarantined"


def _risk(ds: Dataset, config: DeidentifyConfig) -> str | None:
    """Why this instance may carry burned-in text (non-PHI wording), or None."""
    q = config.quarantine
    if q.burned_in_annotation and str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
        return "BurnedInAnnotation YES"
    sop = str(ds.get("SOPClassUID", ""))
    if sop and sop in q.sop_classes:
        return f"SOP class {sop}"
    modality = str(ds.get("Modality", "")).upper()
    if modality and modality in {m.upper() for m in q.modalities}:
        return f"modality {modality}"
    return None


def _norm(v: object) -> str:
    return str(v or "").strip().upper()


def _matches(rule: PixelRule, ds: Dataset) -> bool:
    if rule.manufacturer and _norm(rule.manufacturer) != _norm(ds.get("Manufacturer")):
        return False
    if rule.model and _norm(rule.model) != _norm(ds.get("ManufacturerModelName")):
        return False
    if rule.rows is not None and rule.rows != ds.get("Rows"):
        return False
    return rule.columns is None or rule.columns == ds.get("Columns")


def _compressed(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    tsuid = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(tsuid) and UID(str(tsuid)).is_compressed


def blank(ds: Dataset, rectangles: list[tuple[int, int, int, int]]) -> None:
    """Zero the rectangles in every frame and sample plane of uncompressed PixelData."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    bits = int(ds.BitsAllocated)
    if bits % 8:
        raise Quarantine("quarantined: burned-in annotation (bit-packed pixel data, cannot clean)")
    bps = bits // 8
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    planar = int(ds.get("PlanarConfiguration", 0) or 0) == 1 and spp > 1
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    data = bytearray(ds.PixelData)
    plane = rows * cols * bps
    frame_len = plane * spp
    if len(data) < frame_len * frames:
        raise Quarantine("quarantined: burned-in annotation (pixel data shorter than header says)")
    for x0, y0, x1, y1 in rectangles:
        x0, x1 = max(0, min(x0, cols)), max(0, min(x1, cols))
        y0, y1 = max(0, min(y0, rows)), max(0, min(y1, rows))
        if x1 <= x0 or y1 <= y0:
            continue
        for f in range(frames):
            base = f * frame_len
            if planar:
                for s in range(spp):
                    for y in range(y0, y1):
                        start = base + s * plane + (y * cols + x0) * bps
                        data[start : start + (x1 - x0) * bps] = bytes((x1 - x0) * bps)
            else:
                px = bps * spp
                for y in range(y0, y1):
                    start = base + (y * cols + x0) * px
                    data[start : start + (x1 - x0) * px] = bytes((x1 - x0) * px)
    ds.PixelData = bytes(data)


def screen(ds: Dataset, config: DeidentifyConfig) -> bool:
    """Raise Quarantine, or clean by a pixel rule; True when pixels were cleaned (code 113101)."""
    risk = _risk(ds, config)
    if risk is None:
        return False
    rule = next((r for r in config.pixel_rules if _matches(r, ds)), None)
    if rule is None or "PixelData" not in ds:
        raise Quarantine(f"quarantined: burned-in annotation ({risk})")
    if _compressed(ds):
        raise Quarantine(f"quarantined: burned-in annotation ({risk}; compressed pixel data)")
    blank(ds, list(rule.rectangles))
    ds.BurnedInAnnotation = "NO"
    return True
