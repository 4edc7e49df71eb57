"""Reading a DICOM instance envelope once, cheaply, for the DICOM conversions."""

from __future__ import annotations

from io import BytesIO
from typing import Any

from pydicom import Dataset, dcmread

from engine.store.dicom.study import InstanceRow


def read_dataset(payload: bytes) -> Dataset:
    """Part 10 file or bare dataset; pixel data is never read (conversions need headers only).

    ``force=True`` accepts datasets without the 128-byte preamble, which is how the
    DICOM listener may hand over what a C-STORE delivered.
    """
    return dcmread(BytesIO(payload), force=True, stop_before_pixels=True)


def text(ds: Dataset, keyword: str) -> str:
    """Attribute value as stripped text ('' when absent or empty); multi-valued -> first value."""
    v = ds.get(keyword)
    if v is None or v == "":
        return ""
    if isinstance(v, list | tuple) or type(v).__name__ == "MultiValue":
        v = v[0] if len(v) else ""
    return str(v).strip()


def integer(ds: Dataset, keyword: str) -> int | None:
    t = text(ds, keyword)
    try:
        return int(float(t)) if t else None
    except ValueError:
        return None


def code_item(item: Any) -> tuple[str, str, str]:
    """(value, scheme, meaning) of a code sequence item (CodeValue, or Long/URN code value)."""
    value = text(item, "CodeValue") or text(item, "LongCodeValue") or text(item, "URNCodeValue")
    return value, text(item, "CodingSchemeDesignator"), text(item, "CodeMeaning")


def first_code(ds: Dataset, *keywords: str) -> tuple[str, str, str] | None:
    """The first item of the first present code sequence among ``keywords``."""
    for kw in keywords:
        seq = ds.get(kw)
        if seq:
            got = code_item(seq[0])
            if got[0] or got[2]:
                return got
    return None


def request_attr(ds: Dataset, keyword: str) -> str:
    """An attribute from the dataset or, failing that, its first RequestAttributesSequence item."""
    v = text(ds, keyword)
    if v:
        return v
    seq = ds.get("RequestAttributesSequence")
    return text(seq[0], keyword) if seq else ""


def instance_row(ds: Dataset) -> InstanceRow:
    """The study_aggregate row for this instance; raises ValueError when a UID is missing."""
    study, series, sop = text(ds, "StudyInstanceUID"), text(ds, "SeriesInstanceUID"), text(ds, "SOPInstanceUID")
    if not (study and series and sop):
        raise ValueError("dataset lacks StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID")
    sop_class = text(ds, "SOPClassUID") or str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
    return InstanceRow(study, series, sop, sop_class, integer(ds, "SeriesNumber"), integer(ds, "InstanceNumber"),
                       text(ds, "Modality").upper(), text(ds, "BodyPartExamined").upper(),
                       text(ds, "Laterality").upper() or text(ds, "ImageLaterality").upper())
