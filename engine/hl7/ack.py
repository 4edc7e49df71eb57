"""Building HL7 v2 acknowledgments (ACK) and reading the ones peers send back.

Rules applied (HL7 v2.5 chapter 2, 2.9 and 2.15 MSA/ERR):
- the ACK's MSH swaps sender and receiver: MSH-3/4 of the ACK are MSH-5/6 of the
  message and the other way round, copied verbatim (all HD components);
- MSH-9 is ``ACK^<trigger>^ACK`` (``ACK^<trigger>`` before v2.3.1, which has no
  MSH-9.3), MSH-10 a new control id, MSH-11 and MSH-12 echo the message's, MSH-18
  echoes its charset and the ACK is encoded in that charset;
- the ACK is written in the message's version when that is an HL7 v2 version (table
  0104); otherwise (MSH-12 ``9.9``, empty, ``V2.5``) in v2.5, with MSH-12 ``2.5``: an
  ACK must be readable as some real version, and echoing a version we refused would
  claim the ACK is in it;
- MSA-1 is the table 0008 code, MSA-2 the message's MSH-10;
- on AE/AR/CE/CR an ERR segment carries the table 0357 code: ERR-3 as CWE
  ``code^text^HL70357`` with ERR-4 severity in v2.5 and later, ERR-1 (ELD, the
  code as a CE in its 4th component) in v2.2 to v2.4, where MSA-3 also gets the text;
  v2.1's ERR-1 is a plain ID, so it carries the bare 0357 code.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime

from engine.hl7.message import (
    DEFAULT_DELIMITERS,
    REJECT_CODES,
    Delimiters,
    Header,
    HL7Error,
    delimiters_of,
    escape,
    is_hl7_version,
    read_header,
)

ORIGINAL_CODES = ("AA", "AE", "AR")
ENHANCED_CODES = ("CA", "CE", "CR")
DEFAULT_VERSION = "2.5"


def new_control_id() -> str:
    """20 characters: the MSH-10 length limit of v2.5 (ST, 20); random, so never reused."""
    return secrets.token_hex(10)


def _version_tuple(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split("."):
        if not part.isdigit():
            break
        out.append(int(part))
    return tuple(out) or (2, 5)


def ack_code(*, enhanced: bool, ok: bool, error: HL7Error | None = None) -> str:
    """Table 0008 code for an outcome.

    Reject (AR/CR) when the receiver will not take this kind of message at all or
    failed for reasons unrelated to content (unsupported type/version/processing
    id, framing, internal error: the sender may try again later); error (AE/CE)
    when the content is wrong (missing or badly typed fields, failed validation).
    In enhanced mode an internal failure is CE: CR is reserved for interaction,
    version or processing id mismatches.
    """
    if ok:
        return "CA" if enhanced else "AA"
    code = error.code if error is not None else 207
    if error is not None and error.reject:  # not one message at all: nothing of it was taken
        return "CE" if enhanced else "AR"
    if enhanced:
        return "CR" if code in (200, 201, 202, 203) else "CE"
    return "AR" if code in REJECT_CODES else "AE"


def should_send(header: Header | None, code: str) -> bool:
    """Whether MSH-15 asks for this accept acknowledgment (table 0155: AL, NE, ER, SU).

    Original mode always answers. In enhanced mode an empty MSH-15 (only MSH-16
    valued) is treated as AL: a sender on a synchronous MLLP connection waits for
    an answer, and an unexpected ACK is cheaper than a sender stuck until timeout.
    """
    if header is None or not header.enhanced_mode:
        return True
    cond = header.accept_ack_type or "AL"
    if cond == "NE":
        return False
    if cond == "ER":
        return code != "CA"
    if cond == "SU":
        return code == "CA"
    return True


def build_ack(header: Header | None, code: str, *, error: HL7Error | None = None,
              detail: str | None = None, control_id: str | None = None,
              now: datetime | None = None, accept_ack: str = "") -> bytes:
    """The ACK for ``header``'s message, as bytes in the message's charset.

    ``header`` None (no readable MSH) gives an ACK with default delimiters,
    version 2.5, no addressees and an empty MSA-2: the best answer possible to
    bytes that are not HL7. ``detail`` (never PHI) goes in ERR-8 / MSA-3.
    ``accept_ack`` (MSH-15) is for an application ACK sent as a message of its own
    (enhanced mode): AL asks the original sender's listener to commit-accept it, with
    MSH-16 NE so the ACK is never itself application-acknowledged.
    """
    d = header.delimiters if header is not None else DEFAULT_DELIMITERS
    fs, cs = d.field, d.component
    known = header is not None and is_hl7_version(header.version)
    version = header.version if known else DEFAULT_VERSION  # type: ignore[union-attr]
    vt = _version_tuple(version)
    trigger = header.trigger_event if header is not None else ""
    msh9 = "ACK"
    if trigger:
        msh9 = f"ACK{cs}{escape(trigger, d)}" + (f"{cs}ACK" if vt >= (2, 3, 1) else "")
    ts = (now or datetime.now().astimezone()).strftime("%Y%m%d%H%M%S%z")

    def g(n: int) -> str:
        return header.get(n) if header is not None else ""

    msh = [
        "MSH", d.encoding_characters,
        g(5), g(6), g(3), g(4),  # MSH-3..6: receiver becomes sender
        ts, "", msh9, control_id or new_control_id(),
        g(11) or "P", g(12) if known and g(12).split(cs, 1)[0] == version else version,
        "", "",  # MSH-13, MSH-14
        accept_ack, "NE" if accept_ack else "",  # MSH-15, MSH-16: an ACK is never application-acknowledged
        "",  # MSH-17
        g(18),
    ]
    while msh and msh[-1] == "":
        msh.pop()
    segments = [fs.join(msh)]

    orig_id = header.get(10) if header is not None else ""
    text = None
    if error is not None or detail:
        text = detail or (error.text if error is not None else "")
    msa = ["MSA", code, orig_id]
    if text and vt < (2, 5):
        msa.append(escape(text, d)[:80])
    segments.append(fs.join(msa))

    if error is not None and code not in ("AA", "CA"):
        sc = d.subcomponent
        if vt >= (2, 5):
            err = ["ERR", "", _erl(error.location, d), cs.join((str(error.code), error.code_text, "HL70357")),
                   "E", "", "", "", escape(text or "", d)[:250]]
            while err[-1] == "":
                err.pop()
        elif vt >= (2, 2):
            loc = (error.location or "").split("^")
            loc = (loc + ["", "", ""])[:3]
            ce = sc.join((str(error.code), error.code_text, "HL70357"))
            err = ["ERR", cs.join([*loc, ce])]
        else:
            err = ["ERR", str(error.code)]
        segments.append(fs.join(err))
    body = "\r".join(segments) + "\r"
    return header.encode(body) if header is not None else body.encode("ascii", errors="replace")


def _erl(location: str | None, d: object) -> str:
    """ERR-2 (ERL): ``MSH^1^12`` written with the message's component separator."""
    if not location:
        return ""
    return location.replace("^", d.component)  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class Ack:
    """An acknowledgment a peer sent us (what the MLLP destination checks)."""

    code: str  # MSA-1
    control_id: str  # MSA-2: the MSH-10 it acknowledges
    error_code: str  # ERR-3.1 (or ERR-1.4.1), "" when absent
    header: Header | None  # None when ``read_ack`` did not need to read the MSH

    @property
    def ok(self) -> bool:
        return self.code in ("AA", "CA")


def parse_ack(payload: bytes) -> Ack:
    """Read MSA (and ERR) from an ACK; ``HL7Error`` when it is not a usable ACK.

    Segments are located by splitting the decoded text; no full parse. The MSH is read
    (``Ack.header``) and must be valid, charset included: for readers that use the header.
    """
    header = read_header(payload, require=False)
    return _answer(header.decode(payload), header.delimiters, header)


def read_ack(payload: bytes) -> Ack:
    """What a sender checks in the ACK of each message it delivers (MSA-1, MSA-2, the ERR code),
    without reading the ACK's MSH when its bytes make that safe; ``HL7Error`` as ``parse_ack``.

    An ACK that starts with MSH, has a delimiter in MSH-1 and is plain ASCII (no ESC, so no
    ISO 2022 shift) decodes to the same text in every charset MSH-18 could name, so MSH-1/2
    are all that is needed: ``Ack.header`` is then None and MSH-18 is not checked (MSA-1 and
    MSA-2 are read the same whatever it says). Anything else (a BOM, blank lines, non-ASCII
    bytes) is read by ``parse_ack``. About a third of ``parse_ack``'s cost on a typical ACK.
    """
    if payload[:3] == b"MSH" and len(payload) >= 8 and payload.isascii() and b"\x1b" not in payload:
        fs = payload[3:4]
        if not fs.isalnum() and fs not in b" \r\n":
            return _answer(payload.decode("ascii"), delimiters_of(payload), None)
    return parse_ack(payload)


def _answer(text: str, d: Delimiters, header: Header | None) -> Ack:
    """MSA-1, MSA-2 and the ERR code of an ACK's text (its first MSA and first coded ERR)."""
    msa: list[str] | None = None
    err_code = ""
    for seg in text.replace("\r\n", "\r").replace("\n", "\r").split("\r"):
        if seg.startswith("MSA" + d.field) and msa is None:
            msa = seg.split(d.field)
        elif seg.startswith("ERR" + d.field) and not err_code:
            f = seg.split(d.field)
            if len(f) > 3 and f[3]:
                err_code = f[3].split(d.component)[0]
            elif len(f) > 1 and f[1]:
                comps = f[1].split(d.component)
                if len(comps) > 3:
                    err_code = comps[3].split(d.subcomponent)[0]
    if msa is None or len(msa) < 2 or not msa[1]:
        raise HL7Error(100, "ACK has no MSA segment with an acknowledgment code", header=header)
    code = msa[1].strip().upper()
    if code not in ORIGINAL_CODES + ENHANCED_CODES:
        raise HL7Error(103, f"MSA-1 {code[:8]!r} is not a table 0008 code", header=header)
    return Ack(code=code, control_id=msa[2].strip() if len(msa) > 2 else "", error_code=err_code.strip(),
               header=header)
