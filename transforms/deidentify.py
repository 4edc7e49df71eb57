"""``type: deidentify``: one transform for DICOM, HL7 v2 and FHIR.

One component rather than three so a channel that carries several kinds (or a
study converted DICOM -> HL7 -> FHIR on the way) de-identifies every message with
the same secret and options: the same patient gets one pseudonym and one date
shift everywhere. DICOM follows PS3.15 Table E.1-1 (``deid_dicom``), HL7 v2 and
FHIR follow the same intent segment by segment / resource by resource
(``deid_hl7``, ``deid_fhir``); the pseudonyms come from ``deid_pseudonym``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.registry import component
from transforms import deid_dicom, deid_fhir, deid_hl7
from transforms.deid_config import DeidentifyConfig, PixelRule, QuarantineConfig, SafePrivate
from transforms.deid_limits import TooDeep
from transforms.deid_pixels import Quarantine
from transforms.deid_pseudonym import Pseudonymizer

__all__ = [
    "DeidentifyConfig", "PixelRule", "QuarantineConfig", "SafePrivate", "Quarantine", "TooDeep", "build",
    "deidentify_dicom",
]

log = structlog.get_logger()

UID_HEADERS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID")
# Headers never carry PHI by contract, but one that could (say an accession number) is dropped.
DROP_HEADERS = {"AccessionNumber", "PatientID", "PatientName", "StudyDate", "PID-3"}


def deidentify_dicom(payload: bytes, config: DeidentifyConfig, pseudo: Pseudonymizer) -> bytes:
    """De-identify one DICOM instance given as bytes; raises ``Quarantine`` for burned-in risk,
    ``TooDeep`` for sequences nested past ``deid_limits.MAX_SEQUENCE_DEPTH``."""
    try:
        ds = deid_dicom.read(payload)
        deid_dicom.DicomDeidentifier(config, pseudo).apply(ds)
        return deid_dicom.write(ds)
    except RecursionError:  # the depth check should make this unreachable; never let it pass as anything else
        raise TooDeep("DICOM data set nested too deep to de-identify") from None


def _headers(headers: Mapping[str, Any], config: DeidentifyConfig, pseudo: Pseudonymizer) -> dict[str, Any]:
    out = {k: v for k, v in headers.items() if k not in DROP_HEADERS}
    if "retain_uids" not in config.options:
        for key in UID_HEADERS:
            if isinstance(out.get(key), str) and out[key]:
                out[key] = pseudo.uid(out[key])
    out["deidentified"] = True
    return out


def _audit(ctx: ComponentContext | None, src: Envelope, out: Envelope | None, outcome: str,
           detail: str | None) -> None:
    """Every de-identification is on record: which message, into which derived id, with what profile."""
    if ctx is None:
        return
    ctx.audit.record("deid.apply", outcome=outcome, actor="medrelay", channel=src.channel, message_id=src.id,
                     entity={"kind": src.kind, "derived_id": out.id if out else None, "route": ctx.route},
                     detail=detail)


@component("transform", "deidentify", config=DeidentifyConfig, kinds=("dicom", "hl7v2", "fhir"))
def build(
    config: DeidentifyConfig, ctx: ComponentContext | None = None, *, secret: bytes | None = None
) -> Callable[[Envelope], Envelope]:
    """De-identify DICOM (PS3.15 Basic Profile + options), HL7 v2 and FHIR with shared HMAC pseudonyms."""
    if secret is None:
        if ctx is None:
            raise ValueError("deidentify needs a context (key ring) or an explicit secret")
        secret = ctx.keyring.hmac_key("deid")
    pseudo = Pseudonymizer(secret)
    logger = ctx.log if ctx is not None else log

    def transform(envelope: Envelope) -> Envelope:
        try:
            if envelope.kind == "dicom":
                payload = deidentify_dicom(envelope.payload, config, pseudo)
            elif envelope.kind == "hl7v2":
                # one de-identifier per message: they hold per-message state, transforms run in threads
                payload = deid_hl7.Hl7Deidentifier(config, pseudo).apply(envelope.payload)
            elif envelope.kind == "fhir":
                payload = deid_fhir.FhirDeidentifier(config, pseudo).apply(envelope.payload)
            else:  # pragma: no cover - Kind is closed
                raise ValueError(f"deidentify cannot handle kind {envelope.kind!r}")
        except Quarantine as q:
            logger.info("deid.quarantined", message_id=envelope.id, kind=envelope.kind, reason=q.reason)
            _audit(ctx, envelope, None, "failure", q.reason)
            raise
        except TooDeep as e:  # the route dead-letters this one message; the worker goes on
            logger.warning("deid.refused", message_id=envelope.id, kind=envelope.kind, reason=str(e))
            _audit(ctx, envelope, None, "failure", str(e))
            raise
        out = envelope.derive(payload=payload, headers=_headers(envelope.headers, config, pseudo))
        logger.info("deid.done", message_id=envelope.id, derived_id=out.id, kind=envelope.kind)
        _audit(ctx, envelope, out, "success", None)
        return out

    return transform
