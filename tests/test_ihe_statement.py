"""conformance/ihe-integration-statement.md claims only what the code serves.

Every transaction marked "yes" has a check here on the code that serves it (the SOP class the
listener accepts, the component that is registered, the handler that files it), and every check
here is claimed in the statement: adding a transaction to one without the other fails.
"""

from __future__ import annotations

import re

from conftest import ROOT

from engine import registry
from engine.store.handlers import STORE_HANDLERS

STATEMENT = ROOT / "conformance" / "ihe-integration-statement.md"


def _claims() -> dict[tuple[str, str], str]:
    """(actor, transaction id) -> yes/no, from the table (a cell may name several transactions)."""
    out: dict[tuple[str, str], str] = {}
    for line in STATEMENT.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or not re.search(r"\b(RAD|ITI)-\d+", cells[2]):
            continue
        for tx in re.findall(r"\b(?:RAD|ITI)-\d+", cells[2]):
            out[(cells[1], tx)] = cells[4]
    return out


def _contexts() -> dict[str, bool]:
    from pynetdicom import AE

    from listeners import dicom_contexts as cx
    from listeners.dicom import DicomSourceConfig

    cfg = DicomSourceConfig(type="dicom", allow_any_calling_aet=True)
    ae = AE()
    cx.add_contexts(ae, query_retrieve=cfg.query_retrieve, worklist=cfg.worklist)
    cx.add_workflow_contexts(ae, mpps=cfg.mpps, storage_commitment=cfg.storage_commitment.enabled)
    have = {str(c.abstract_syntax) for c in ae.supported_contexts}
    return {
        "store": all(u in have for u in cx.STORAGE_SOP_CLASSES),
        "commit": all(u in have for u in cx.STORAGE_COMMITMENT),
        "mpps": all(u in have for u in cx.MPPS),
        "find": all(u in have for u in cx.QR_FIND),
        "retrieve": all(u in have for u in (*cx.QR_MOVE, *cx.QR_GET)),
        "mwl": all(u in have for u in cx.WORKLIST_FIND),
    }


def _registered(role: str, name: str) -> bool:
    registry.load_builtins()
    try:
        registry.get(role, name)  # type: ignore[arg-type]
    except Exception:
        return False
    return True


def _tls_everywhere() -> bool:
    from listeners.dicom import DicomSourceConfig
    from listeners.dicomweb import DicomWebSourceConfig
    from listeners.fhir import FhirSourceConfig
    from listeners.mllp import MLLPSourceConfig

    return all("tls" in m.model_fields for m in (DicomSourceConfig, MLLPSourceConfig, FhirSourceConfig,
                                                  DicomWebSourceConfig))


def _checks() -> dict[tuple[str, str], bool]:
    cx = _contexts()
    registry.load_builtins()
    im, of = "Image Manager / Image Archive", "Department System Scheduler / Order Filler"
    from engine.audit import ps3_15, syslog  # noqa: F401  (the exporter and its PS3.15 rendering)

    return {
        (im, "RAD-8"): cx["store"],
        (im, "RAD-10"): cx["commit"],
        (im, "RAD-6"): cx["mpps"],
        (im, "RAD-7"): cx["mpps"],
        (im, "RAD-11"): cx["find"],
        (im, "RAD-14"): cx["find"],
        (im, "RAD-16"): cx["retrieve"],
        (of, "RAD-2"): _registered("transform", "hl7_to_worklist") and "worklist" in STORE_HANDLERS,
        (of, "RAD-3"): _registered("transform", "hl7_to_worklist") and "worklist" in STORE_HANDLERS,
        (of, "RAD-5"): cx["mwl"],
        (of, "RAD-6"): cx["mpps"] and _registered("transform", "mpps_to_hl7"),
        (of, "RAD-7"): cx["mpps"] and _registered("transform", "mpps_to_hl7"),
        (im, "RAD-12"): _registered("transform", "patient_update") and "patient_update" in STORE_HANDLERS,
        (im, "RAD-66"): _registered("transform", "iocm_rejection") and "iocm" in STORE_HANDLERS,
        ("Secure Node", "ITI-19"): _tls_everywhere(),
        ("Secure Node", "ITI-20"): callable(getattr(ps3_15, "render", None)),
    }


def test_every_claimed_transaction_is_served_and_every_served_one_claimed():
    claims = _claims()
    checks = _checks()
    claimed = {k for k, v in claims.items() if v == "yes"}
    assert claimed == set(checks), (sorted(claimed - set(checks)), sorted(set(checks) - claimed))
    failing = sorted(k for k, ok in checks.items() if not ok)
    assert failing == [], f"claimed but not served: {failing}"
    assert {v for v in claims.values()} <= {"yes", "no"}


def test_statement_names_the_profiles():
    text = STATEMENT.read_text()
    for profile in ("SWF", "PIR", "IOCM", "ATNA"):
        assert f"| {profile} |" in text
