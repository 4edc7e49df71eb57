"""Golden pairs: HL7 v2 input -> expected FHIR transaction bundle (semantic comparison)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from conformance.golden import cases  # noqa: E402
from conformance.golden.compare import diff_fhir  # noqa: E402

HL7_INPUTS = list(cases.hl7_inputs())
TYPES = {"adt_a01", "adt_a04", "adt_a08", "adt_a40", "oru_r01", "orm_o01", "omi_o23"}


def test_every_message_type_has_two_goldens_in_both_versions():
    by_type: dict[str, list[Path]] = {}
    for p in HL7_INPUTS:
        by_type.setdefault("_".join(p.stem.split("_")[:2]), []).append(p)
    assert set(by_type) == TYPES
    assert all(len(v) >= 2 for v in by_type.values())
    versions = {p.stem.rsplit("_", 1)[1] for p in HL7_INPUTS}
    assert {"23", "251"} <= versions


@pytest.mark.parametrize("src", HL7_INPUTS, ids=lambda p: p.stem)
def test_hl7_to_fhir_golden(src: Path):
    expected = json.loads((cases.HERE / "hl7_to_fhir" / f"{src.stem}.json").read_text(encoding="utf-8"))
    actual = cases.run_hl7_to_fhir(src)
    diff = diff_fhir(expected, actual)
    assert not diff, f"{src.name} differs from its golden:\n{diff}"
    Bundle.model_validate(actual)


@pytest.mark.parametrize("src", HL7_INPUTS, ids=lambda p: p.stem)
def test_bundle_is_idempotent_and_self_consistent(src: Path):
    bundle = cases.run_hl7_to_fhir(src)
    # re-sending the same message yields the same conditional requests: nothing new on the server
    assert bundle == cases.run_hl7_to_fhir(src)
    full_urls = {e["fullUrl"] for e in bundle["entry"]}
    assert len(full_urls) == len(bundle["entry"])
    for e in bundle["entry"]:
        req = e["request"]
        assert (req["method"] == "PUT" and "?identifier=" in req["url"]) or \
            (req["method"] == "POST" and req["ifNoneExist"].startswith("identifier="))
    refs = [m for m in json.dumps(bundle).split('"reference": "')[1:]]
    for r in refs:
        target = r.split('"', 1)[0]
        if target.startswith("urn:uuid:"):
            assert target in full_urls, f"dangling reference {target}"
