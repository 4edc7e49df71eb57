"""Golden pairs for DICOM input (pydicom's CT_small / MR_small) and order -> worklist items."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conformance.golden import cases  # noqa: E402
from conformance.golden.compare import diff_fhir, diff_hl7, normalise_hl7  # noqa: E402
from transforms.dicom_to_hl7 import MESSAGES  # noqa: E402
from transforms.hl7_validate import validate_v2  # noqa: E402


@pytest.mark.parametrize("name", list(cases.DICOM_FILES))
def test_dicom_to_fhir_golden(name):
    expected = json.loads((cases.HERE / "dicom_to_fhir" / f"{name}.json").read_text(encoding="utf-8"))
    actual = cases.run_dicom_to_fhir(name)
    diff = diff_fhir(expected, actual)
    assert not diff, diff
    Bundle.model_validate(actual)


@pytest.mark.parametrize("case", list(cases.DICOM_HL7_CASES))
def test_dicom_to_hl7_golden(case):
    expected = (cases.HERE / "dicom_to_hl7" / f"{case}.hl7").read_text(encoding="utf-8")
    actual = cases.run_dicom_to_hl7(case)
    diff = diff_hl7(expected, actual)
    assert not diff, diff


@pytest.mark.parametrize("case", list(cases.DICOM_HL7_CASES))
def test_dicom_to_hl7_golden_files_validate_with_hl7apy(case):
    text = (cases.HERE / "dicom_to_hl7" / f"{case}.hl7").read_text(encoding="utf-8")
    validate_v2(text.strip().replace("\n", "\r"), MESSAGES[cases.DICOM_HL7_CASES[case][1]][2])


def test_normalisation_only_hides_msh7_and_msh10():
    a = "MSH|^~\\&|A|B|C|D|20240101||ORU^R01|X1|P|2.5.1\nPID|1"
    b = "MSH|^~\\&|A|B|C|D|20250101||ORU^R01|X2|P|2.5.1\nPID|1"
    assert normalise_hl7(a) == normalise_hl7(b)
    assert diff_hl7(a, b.replace("P|2.5.1", "T|2.5.1"))


def test_fhir_normalisation_keeps_reference_structure():
    a = {"entry": [{"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001"},
                   {"ref": "urn:uuid:00000000-0000-4000-8000-000000000001"}]}
    b = {"entry": [{"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000009"},
                   {"ref": "urn:uuid:00000000-0000-4000-8000-000000000009"}]}
    c = {"entry": [{"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000009"},
                   {"ref": "urn:uuid:00000000-0000-4000-8000-000000000008"}]}
    assert not diff_fhir(a, b)
    assert diff_fhir(a, c)


@pytest.mark.parametrize("src", [p for p in cases.hl7_inputs() if cases.is_order(p)], ids=lambda p: p.stem)
def test_hl7_to_worklist_golden(src):
    expected = json.loads((cases.HERE / "hl7_to_worklist" / f"{src.stem}.json").read_text(encoding="utf-8"))
    assert cases.run_hl7_to_worklist(src) == expected
