"""Regenerate the expected golden outputs: ``python -m conformance.golden.regen``.

Run it only after a deliberate mapping change, then read the diff (``git diff
conformance/golden``) before committing: the goldens are the review of the mapping.
Tests never call this.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conformance.golden import cases


def _write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main() -> int:
    here = cases.HERE
    n = 0
    for src in cases.hl7_inputs():
        _write_json(here / "hl7_to_fhir" / f"{src.stem}.json", cases.run_hl7_to_fhir(src))
        n += 1
        if cases.is_order(src):
            _write_json(here / "hl7_to_worklist" / f"{src.stem}.json", cases.run_hl7_to_worklist(src))
            n += 1
    for name in cases.DICOM_FILES:
        _write_json(here / "dicom_to_fhir" / f"{name}.json", cases.run_dicom_to_fhir(name))
        n += 1
    for case in cases.DICOM_HL7_CASES:
        out = here / "dicom_to_hl7" / f"{case}.hl7"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(cases.run_dicom_to_hl7(case), encoding="utf-8")
        n += 1
    print(f"wrote {n} golden files under {here}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
