"""Keyed pseudonyms shared by DICOM, HL7 v2 and FHIR de-identification.

Every replacement value is an HMAC-SHA256 of the original under one secret
(``ctx.keyring.hmac_key("deid")``), with a namespace prefix so a patient id and a
UID with the same text never collide. Determinism is the point: the same patient
gets the same pseudonym id, name and date shift in every message of every kind,
and a UID maps to the same new UID in every instance, so references between
instances (series, frames of reference, referenced SOP instances) survive. Without
the secret the mapping cannot be reversed or recomputed by a dictionary attack on
MRNs, which a plain hash would allow.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from datetime import date, timedelta

UID_ROOT = "2.25."  # PS3.5 B.2: UID from a 128-bit number, written in decimal
_COMPACT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(.*)$")
_ISO = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(.*)$")


@dataclass
class Pseudonymizer:
    """Deterministic pseudonyms under one secret. Cheap to build; caches UIDs it has mapped."""

    secret: bytes
    _uids: dict[str, str] = field(default_factory=dict, repr=False)

    def digest(self, namespace: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{namespace}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """``2.25.<decimal of the first 128 bits of HMAC(secret, "uid:"+uid)>``: at most 44 chars."""
        original = original.strip().rstrip("\0")
        if not original:
            return original
        new = self._uids.get(original)
        if new is None:
            new = UID_ROOT + str(int.from_bytes(self.digest("uid", original)[:16], "big"))
            if len(self._uids) < 100_000:
                self._uids[original] = new
        return new

    def ident(self, namespace: str, value: str, length: int = 16) -> str:
        """An upper-case hex identifier for an id of kind ``namespace`` (e.g. "acc", "order")."""
        return self.digest(namespace, value.strip()).hex().upper()[:length]

    def patient_id(self, original: str) -> str:
        """Pseudonymous patient id: the one value DICOM, HL7 PID-3 and FHIR identifiers share."""
        return "PSN" + self.ident("pid", original, 13)

    def patient_name(self, patient_key: str) -> tuple[str, str]:
        """(family, given) derived from the patient id, not the name, so spelling variants agree."""
        return "ANON", self.ident("name", patient_key, 10)

    def date_shift_days(self, patient_key: str, max_days: int) -> int:
        """A per-patient offset in [-max_days, -1]: never zero, so no date survives unchanged."""
        n = int.from_bytes(self.digest("date", patient_key.strip())[:8], "big")
        return -(1 + n % max(1, max_days))


def _shift(y: str, m: str | None, d: str | None, days: int) -> tuple[int, int, int] | None:
    try:
        base = date(int(y), int(m or 7), int(d or 1))
    except ValueError:
        return None
    new = base + timedelta(days=days)
    return new.year, new.month, new.day


def shift_compact(value: str, days: int) -> str:
    """Shift a DICOM DA/DT or HL7 DT/DTM/TS (``YYYY[MM[DD]]...``) keeping its precision and time.

    Unparseable input comes back empty: a value we cannot shift is not kept.
    """
    return _shift_match(_COMPACT.match(value.strip()), days, "")


def shift_iso(value: str, days: int) -> str:
    """Shift a FHIR date/dateTime/instant (``YYYY[-MM[-DD]][Thh:mm...]``) keeping its precision."""
    return _shift_match(_ISO.match(value.strip()), days, "-")


def _shift_match(m: re.Match[str] | None, days: int, sep: str) -> str:
    """Shift a matched (year, month, day, rest) date, keeping its precision and separator."""
    if not m:
        return ""
    y, mo, d, rest = m.groups()
    shifted = _shift(y, mo, d, days)
    if shifted is None:
        return ""
    out = f"{shifted[0]:04d}"
    if mo:
        out += f"{sep}{shifted[1]:02d}"
    if d:
        out += f"{sep}{shifted[2]:02d}"
    return out + rest
