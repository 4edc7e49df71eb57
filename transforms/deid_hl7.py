"""HL7 v2 de-identification by segment and field rules, with the DICOM pseudonyms.

There is no Table E.1-1 for HL7 v2, so this module carries the same intent as a
table of its own: per segment, what happens to each field. Segments we do not
know are removed (we cannot know what a Z-segment carries; ZDS, which carries the
Study Instance UID, is the exception), PID is a whitelist (unlisted fields are
blanked), other known segments keep unlisted fields and blank the people in them
(XCN/XPN), addresses and phone numbers. Identifiers become the same HMAC
pseudonyms DICOM uses (PID-3 = PatientID, OBR-18 = AccessionNumber, ZDS-1/IPC-3 =
StudyInstanceUID), and dates move by the same per-patient shift.

Parsing is hand-rolled on purpose: it keeps every byte we do not touch (escapes,
unknown fields, the encoding characters of MSH-1/MSH-2) exactly as received.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from transforms.deid_config import DeidentifyConfig
from transforms.deid_pseudonym import Pseudonymizer, shift_compact

# field number -> action. Actions: keep, blank, pid, name, date, birth, pc (patient
# characteristic), inst (institution identity), uid, id:<namespace>.
Rules = dict[int, str]
SEGMENTS: dict[str, tuple[str, Rules]] = {
    "MSH": ("keep", {7: "date"}),
    "SFT": ("keep", {}),
    "MSA": ("keep", {}),
    "ERR": ("keep", {}),
    "EVN": ("keep", {2: "date", 3: "date", 5: "blank", 6: "date"}),
    "PID": ("blank", {1: "keep", 2: "pid", 3: "pid", 4: "pid", 5: "name", 7: "birth", 8: "pc", 10: "pc",
                      18: "id:acct", 22: "pc", 29: "date", 30: "keep", 33: "date"}),
    "MRG": ("blank", {1: "pid", 2: "pid", 3: "id:acct", 5: "id:visit", 6: "id:visit"}),
    "PV1": ("keep", {3: "inst", 6: "inst", 7: "blank", 8: "blank", 9: "blank", 11: "inst", 17: "blank",
                     19: "id:visit", 39: "inst", 42: "inst", 43: "inst", 44: "date", 45: "date",
                     50: "id:visit", 52: "blank"}),
    "PV2": ("keep", {3: "blank", 8: "date", 9: "date", 12: "blank", 13: "blank", 16: "date", 23: "inst",
                     26: "date", 29: "date", 33: "date"}),
    "ORC": ("keep", {2: "id:order", 3: "id:order", 4: "id:order", 7: "blank", 9: "date", 10: "blank",
                     11: "blank", 12: "blank", 13: "inst", 15: "date", 17: "inst", 19: "blank", 21: "inst",
                     22: "blank", 23: "blank", 24: "blank", 27: "date"}),
    "OBR": ("keep", {2: "id:order", 3: "id:order", 6: "date", 7: "date", 8: "date", 10: "blank", 13: "blank",
                     14: "date", 16: "blank", 17: "blank", 18: "id:acc", 19: "id:reqproc", 20: "id:sps",
                     21: "blank", 22: "date", 27: "blank", 28: "blank", 32: "blank", 33: "blank",
                     34: "blank", 35: "blank", 36: "date"}),
    "OBX": ("keep", {14: "date", 15: "inst", 16: "blank", 19: "date", 23: "inst", 24: "blank", 25: "blank"}),
    "NTE": ("keep", {}),
    "TQ1": ("keep", {7: "date", 8: "date"}),
    "SPM": ("keep", {2: "id:specimen", 3: "id:specimen", 17: "date", 18: "date", 19: "date"}),
    "DG1": ("keep", {5: "date", 16: "blank", 19: "date"}),
    "AL1": ("keep", {6: "date"}),
    "PR1": ("keep", {5: "date", 8: "blank", 11: "blank", 12: "blank"}),
    "TXA": ("keep", {4: "date", 5: "blank", 6: "date", 7: "date", 8: "date", 9: "blank", 10: "blank",
                     11: "blank", 12: "id:doc", 13: "id:doc", 16: "id:doc", 22: "blank", 23: "blank"}),
    "IPC": ("keep", {1: "id:acc", 2: "id:reqproc", 3: "uid", 4: "id:sps"}),
    "ZDS": ("blank", {1: "uid"}),
}
PEOPLE_TYPES = {"XPN", "XAD", "XTN", "CX", "PN", "AD", "TN", "XCN", "CN"}
DATE_TYPES = {"DT", "DTM", "TS"}
FREE_TEXT_TYPES = {"TX", "FT"}
_DATE = re.compile(r"^\d{4}(\d{2}){0,2}")
_ESCAPES = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}


class Hl7Deidentifier:
    """A configured HL7 v2 de-identifier; ``apply`` maps message bytes to message bytes."""

    def __init__(self, config: DeidentifyConfig, pseudo: Pseudonymizer) -> None:
        self.config = config
        self.pseudo = pseudo
        self.opts = config.option_set

    def apply(self, payload: bytes) -> bytes:
        """De-identify one message; ``ValueError`` when it does not start with MSH."""
        text = payload.decode("utf-8", errors="surrogateescape")
        trailing = text.endswith(("\r", "\n"))
        segments = [s for s in re.split(r"\r\n|\r|\n", text) if s]
        if not segments or not segments[0].startswith("MSH") or len(segments[0]) < 8:
            raise ValueError("not an HL7 v2 message (no MSH segment)")
        msh = segments[0]
        self.fs = msh[3]
        enc = msh[4 : msh.index(self.fs, 4)] if self.fs in msh[4:] else msh[4:]
        self.comp, self.rep = (enc + "^~\\&")[0], (enc + "^~\\&")[1]
        self.esc, self.sub = (enc + "^~\\&")[2], (enc + "^~\\&")[3]
        self.patient_key = self._patient_key(segments)
        self.shift = self.pseudo.date_shift_days(self.patient_key, self.config.date_shift_max_days)
        out = [s for s in (self._segment(seg) for seg in segments) if s is not None]
        return ("\r".join(out) + ("\r" if trailing else "")).encode("utf-8", errors="surrogateescape")

    # -- parsing helpers -------------------------------------------------------
    def _unescape(self, value: str) -> str:
        if self.esc not in value:
            return value
        return re.sub(
            re.escape(self.esc) + r"([FSTRE])" + re.escape(self.esc),
            lambda m: _ESCAPES[m.group(1)], value,
        )

    def _first_id(self, field: str) -> str:
        return self._unescape(field.split(self.rep)[0].split(self.comp)[0]).strip()

    def _patient_key(self, segments: list[str]) -> str:
        """The MRN: PID-3.1 of the first repetition, as DICOM PatientID would carry it."""
        for seg in segments:
            if seg.startswith("PID" + self.fs):
                fields = seg.split(self.fs)
                for n in (3, 2, 4):
                    if len(fields) > n and self._first_id(fields[n]):
                        return self._first_id(fields[n])
        return ""

    # -- segments ---------------------------------------------------------------
    def _segment(self, seg: str) -> str | None:
        name = seg[:3]
        if name not in SEGMENTS:
            return None
        if self.config.remove_free_text and name == "NTE":
            return None
        fields = seg.split(self.fs)
        if name == "OBX" and len(fields) > 2 and fields[2].split(self.comp)[0].upper() in FREE_TEXT_TYPES:
            if self.config.remove_free_text:
                return None
        default, rules = SEGMENTS[name]
        # MSH-1 is the separator itself, so fields[i] is MSH-(i+1) and MSH-2 stays untouched.
        offset, first = (1, 2) if name == "MSH" else (0, 1)
        for i in range(first, len(fields)):
            n = i + offset
            action = rules.get(n, default)
            if name == "OBX" and n == 5:
                action = self._obx_value_action(fields)
            fields[i] = self._field(fields[i], action)
        return self.fs.join(fields).rstrip(self.fs) if default == "blank" else self.fs.join(fields)

    def _obx_value_action(self, fields: list[str]) -> str:
        vtype = fields[2].split(self.comp)[0].upper() if len(fields) > 2 else ""
        if vtype in DATE_TYPES:
            return "date"
        if vtype in PEOPLE_TYPES:
            return "blank"
        return "keep"

    def _field(self, value: str, action: str) -> str:
        if not value or action == "keep":
            return value
        handler: Callable[[str], str] | None = {
            "blank": lambda v: "",
            "pid": self._pid,
            "name": self._name,
            "date": self._date,
            "birth": self._birth,
            "pc": lambda v: v if "retain_patient_characteristics" in self.opts else "",
            "inst": lambda v: v if "retain_institution_identity" in self.opts else "",
            "uid": self._uid,
        }.get(action)
        if handler is not None:
            return handler(value)
        if action.startswith("id:"):
            ns = action[3:]
            return self.rep.join(
                self.pseudo.ident(ns, self._first_id(r)) if self._first_id(r) else ""
                for r in value.split(self.rep)
            )
        raise ValueError(f"unknown HL7 de-identification action {action!r}")

    # -- actions -------------------------------------------------------------------
    def _pid(self, value: str) -> str:
        """CX: the id becomes its pseudonym, the identifier type (CX.5) stays, the rest goes."""
        reps = []
        for rep in value.split(self.rep):
            comps = rep.split(self.comp)
            ident = self._unescape(comps[0]).strip()
            if not ident:
                continue
            cx = [self.pseudo.patient_id(ident), "", "", ""]
            if len(comps) > 4 and comps[4]:
                cx.append(comps[4])
            reps.append(self.comp.join(cx).rstrip(self.comp))
        return self.rep.join(reps)

    def _name(self, value: str) -> str:
        family, given = self.pseudo.patient_name(self.patient_key)
        return f"{family}{self.comp}{given}"

    def _shift_all(self, value: str) -> str:
        def one(part: str) -> str:
            return shift_compact(part, self.shift) if _DATE.match(part) else part

        return self.rep.join(
            self.comp.join(self.sub.join(one(s) for s in c.split(self.sub)) for c in r.split(self.comp))
            for r in value.split(self.rep)
        )

    def _date(self, value: str) -> str:
        return value if self.config.date_mode() == "keep" else self._shift_all(value)

    def _birth(self, value: str) -> str:
        mode = self.config.birth_date_mode()
        if mode == "keep":
            return value
        if mode == "shift":
            return self._shift_all(value)
        if mode == "year":
            return value.split(self.comp)[0][:4]
        return ""

    def _uid(self, value: str) -> str:
        if "retain_uids" in self.opts:
            return value
        comps = value.split(self.rep)[0].split(self.comp)
        comps[0] = self.pseudo.uid(self._unescape(comps[0]))
        return self.comp.join(comps)
