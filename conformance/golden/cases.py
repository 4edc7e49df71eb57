"""The golden cases: which input goes through which transform with which config.

Shared by ``regen`` (writes expected files) and tests/test_golden_*.py (compares).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG: dict[str, dict[str, Any]] = json.loads((HERE / "config.json").read_text())
HL7_DIR = HERE / "hl7"
DICOM_FILES = {"ct_small": "CT_small.dcm", "mr_small": "MR_small.dcm"}
DICOM_HL7_CASES = {"ct_small_oru": ("ct_small", "ORU^R01"), "mr_small_oru": ("mr_small", "ORU^R01"),
                   "ct_small_omi": ("ct_small", "OMI^O23"), "mr_small_orm": ("mr_small", "ORM^O01")}
FIXED_MSH7, FIXED_MSH10 = "20240101000000+0000", "GOLDEN0000000000000"


def hl7_inputs() -> Iterator[Path]:
    return iter(sorted(HL7_DIR.glob("*.hl7")))


def is_order(path: Path) -> bool:
    return path.name.startswith(("orm_", "omi_"))


def dicom_bytes(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file(DICOM_FILES[name])).read_bytes()


def run_hl7_to_fhir(path: Path) -> dict[str, Any]:
    from transforms.hl7_to_fhir import Hl7ToFhirConfig, convert

    return convert(path.read_bytes(), Hl7ToFhirConfig(**CONFIG["hl7_to_fhir"]))


def run_hl7_to_worklist(path: Path) -> list[dict[str, Any]]:
    from engine.envelope import Envelope
    from engine.store.dicom.worklist import read_item
    from transforms.hl7_to_worklist import Hl7ToWorklistConfig, build

    t = build(Hl7ToWorklistConfig(**CONFIG["hl7_to_worklist"]))
    out = t(Envelope(channel="golden", kind="hl7v2", payload=path.read_bytes()))
    envs = out if isinstance(out, list) else [out]
    return [{"headers": {k: v for k, v in e.headers.items() if k != "MSH-10"},
             "item": read_item(e.payload).to_json_dict()} for e in envs]


def run_dicom_to_fhir(name: str) -> dict[str, Any]:
    from transforms.dicom_common import read_dataset
    from transforms.dicom_to_fhir import DicomToFhirConfig, convert

    return convert(read_dataset(dicom_bytes(name)), DicomToFhirConfig(**CONFIG["dicom_to_fhir"]))


def run_dicom_to_hl7(case: str) -> str:
    from transforms.dicom_common import read_dataset
    from transforms.dicom_to_hl7 import DicomToHl7Config, build_message

    name, message = DICOM_HL7_CASES[case]
    cfg = DicomToHl7Config(**CONFIG["dicom_to_hl7"], message=message)
    text, _ = build_message(read_dataset(dicom_bytes(name)), cfg, FIXED_MSH10, FIXED_MSH7)
    return text.replace("\r", "\n") + "\n"
