"""WADO-URI ``anonymize=yes`` (PS3.18 9.4.2.3): the instance de-identified by the PS3.15 Basic Profile.

The de-identification is the ``deidentify`` transform's own (transforms/deidentify.py
``deidentify_dicom``, Basic Profile, no options): Table E.1-1 on every attribute at every depth,
new UIDs, PatientIdentityRemoved YES with the CID 7050 codes, and the same refusals, so a
WADO-URI client gets what a route's ``deidentify`` would give, never a lighter home-made scrub.
An instance that may carry burned-in text (``Quarantine``: BurnedInAnnotation YES, screen
captures, ultrasound, PDF...) or is nested too deep (``TooDeep``) is refused (``Refused``, 403):
PS3.18 lets the origin server refuse, and returning it identified is what it must not do.

Pseudonyms are HMACs, so the same instance gets the same new UIDs, Patient ID and date shift on
every request and on every replica (PS3.18: the new SOP Instance UID of one source instance is
stable). Their secret is derived from the key ring's ``deid`` secret under its own label: a
DICOMweb user can fetch an instance both identified and anonymized, and so learn the mapping of
what they are shown; with the ``deid`` secret itself that mapping would also re-identify the
research exports of every ``deidentify`` route. Derived, not a new named secret: nothing to
create or back up beyond the key file ``medrelay keys init`` already writes.
"""

from __future__ import annotations

import hashlib
import hmac

from engine.context import ComponentContext
from transforms.deid_pseudonym import Pseudonymizer
from transforms.deidentify import DeidentifyConfig, Quarantine, TooDeep, deidentify_dicom

LABEL = b"medrelay dicomweb anonymize v1"
PROFILE = DeidentifyConfig(type="deidentify")  # Basic Profile, default quarantine rules


class Refused(Exception):
    """The instance cannot be given de-identified (403); the text says why, without PHI."""


class Anonymizer:
    """De-identifies instances for one listener; built on first use (the key ring is read then)."""

    def __init__(self, ctx: ComponentContext) -> None:
        secret = hmac.new(ctx.keyring.hmac_key("deid"), LABEL, hashlib.sha256).digest()
        self.pseudo = Pseudonymizer(secret)  # its UID cache: dict get/set, safe across worker threads

    def apply(self, part10: bytes) -> bytes:
        """The Part-10 instance de-identified (blocking: run it on a worker thread); Refused."""
        try:
            return deidentify_dicom(part10, PROFILE, self.pseudo)
        except Quarantine as q:
            raise Refused(f"the instance is not given de-identified: {q.reason}") from None
        except TooDeep:
            raise Refused("the instance is not given de-identified: its sequences are nested too deep") from None
