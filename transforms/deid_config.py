"""Config model of the ``deidentify`` transform, and the policies derived from it.

Kept apart from ``deidentify.py`` so the DICOM, HL7 and FHIR helpers can import it
without importing the component registration.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.components import ComponentConfig
from transforms.deid_table import Option

DEFAULT_QUARANTINE_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
]
DEFAULT_QUARANTINE_MODALITIES = ["US", "SC", "OT", "XC", "DOC"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SafePrivate(_Strict):
    """One private attribute that Retain Safe Private may keep (PS3.15 E.3.10)."""

    creator: str = Field(description="Private Creator value of the block, e.g. 'SIEMENS CSA HEADER'.")
    element: str = Field(
        description="Group and element with the block byte as xx, e.g. '0029,xx08' (hex).",
        examples=["0029,xx08"],
    )

    @field_validator("element")
    @classmethod
    def _check(cls, v: str) -> str:
        if not re.fullmatch(r"\(?[0-9A-Fa-f]{4},[0-9A-Fa-fxX]{2}[0-9A-Fa-f]{2}\)?", v.strip()):
            raise ValueError("element must look like 'gggg,xxee' (hex)")
        return v.strip().strip("()")

    @property
    def group(self) -> int:
        return int(self.element[:4], 16)

    @property
    def low(self) -> int:
        return int(self.element[-2:], 16)


class QuarantineConfig(_Strict):
    """Which instances may carry burned-in text and so must not leave unless cleaned."""

    burned_in_annotation: bool = Field(True, description="Quarantine when BurnedInAnnotation is YES.")
    sop_classes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_QUARANTINE_SOP_CLASSES),
        description="SOP Class UIDs always quarantined (screen captures, ultrasound, PDF).",
    )
    modalities: list[str] = Field(
        default_factory=lambda: list(DEFAULT_QUARANTINE_MODALITIES),
        description="Modality values always quarantined.",
    )


class PixelRule(_Strict):
    """Rectangles known to hold burned-in text for one device and image size (as CTP does)."""

    manufacturer: str | None = Field(None, description="Manufacturer (case-insensitive); empty: any.")
    model: str | None = Field(None, description="ManufacturerModelName (case-insensitive); empty: any.")
    rows: int | None = Field(None, description="Rows the rule applies to; empty: any.")
    columns: int | None = Field(None, description="Columns the rule applies to; empty: any.")
    rectangles: list[tuple[int, int, int, int]] = Field(
        description="[x0, y0, x1, y1] boxes to blank, x1/y1 exclusive.", min_length=1
    )


class DeidentifyConfig(ComponentConfig):
    """De-identify DICOM (PS3.15 Table E.1-1), HL7 v2 and FHIR with shared keyed pseudonyms."""

    type: Literal["deidentify"] = Field(description="De-identification transform.")
    profile: Literal["basic"] = Field(
        "basic", description="Basic Application Level Confidentiality Profile (PS3.15 E.2)."
    )
    options: list[Option] = Field(
        default_factory=list, description="PS3.15 Annex E profile options, by their column names."
    )
    safe_private: list[SafePrivate] = Field(
        default_factory=list, description="Private attributes kept under retain_safe_private."
    )
    quarantine: QuarantineConfig = Field(
        default_factory=QuarantineConfig, description="When to stop instances that may have burned-in text."
    )
    pixel_rules: list[PixelRule] = Field(
        default_factory=list, description="Known burned-in text regions; matching instances are blanked."
    )
    date_shift_max_days: int = Field(
        365, ge=1, le=36500, description="Per-patient date shift is in [-max, -1] days."
    )
    remove_free_text: bool = Field(
        True, description="HL7: drop NTE and OBX of type TX/FT; FHIR: drop notes."
    )

    @model_validator(mode="after")
    def _dates(self) -> DeidentifyConfig:
        if {"retain_long_full_dates", "retain_long_modified_dates"} <= set(self.options):
            raise ValueError("retain_long_full_dates and retain_long_modified_dates exclude each other")
        return self

    @property
    def option_set(self) -> frozenset[str]:
        return frozenset(self.options)

    def date_mode(self) -> Literal["keep", "shift"]:
        """HL7/FHIR dates: kept with full dates, else shifted (there is no Table E.1-1 for them)."""
        return "keep" if "retain_long_full_dates" in self.options else "shift"

    def birth_date_mode(self) -> Literal["keep", "shift", "year", "remove"]:
        """Birth dates: DICOM zeroes them (Z, no option column); HL7/FHIR follow the options."""
        opts = self.option_set
        if {"retain_long_full_dates", "retain_patient_characteristics"} <= opts:
            return "keep"
        if "retain_long_modified_dates" in opts:
            return "shift"
        if "retain_patient_characteristics" in opts:
            return "year"
        return "remove"
