"""The DIMSE status codes medrelay answers with, one table citing PS3.4 / PS3.7.

Handlers return codes from here only, and the conformance statement is generated
from this same table, so what the statement promises is what the code sends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Status:
    code: int
    category: str  # Success | Pending | Warning | Failure | Cancel
    meaning: str
    reference: str
    when: str  # what makes medrelay send it


def _s(code: int, category: str, meaning: str, reference: str, when: str) -> Status:
    return Status(code, category, meaning, reference, when)


STORE = {
    "success": _s(0x0000, "Success", "Success", "PS3.4 B.2.3",
                  "instance and its index rows committed (or a recognised re-send)"),
    "out_of_resources": _s(0xA700, "Failure", "Refused: Out of Resources", "PS3.4 B.2.3",
                           "the store could not commit (disk, database, engine shutting down)"),
    "mismatch": _s(0xA900, "Failure", "Error: Data Set does not match SOP Class", "PS3.4 B.2.3",
                   "SOP Class/Instance UID missing, malformed (not digits and dots, > 64 chars) "
                   "or different from the command's Affected SOP Class/Instance UID, or a "
                   "Study/Series Instance UID missing"),
    "cannot_understand": _s(0xC000, "Failure", "Error: Cannot understand", "PS3.4 B.2.3",
                            "the data set cannot be decoded"),
}

FIND = {
    "success": _s(0x0000, "Success", "Matching is complete", "PS3.4 C.4.1.1.4", "all matches sent"),
    "pending": _s(0xFF00, "Pending", "Matches are continuing", "PS3.4 C.4.1.1.4", "one per match"),
    "cancel": _s(0xFE00, "Cancel", "Matching terminated due to Cancel request", "PS3.4 C.4.1.1.4",
                 "C-CANCEL received"),
    "out_of_resources": _s(0xA700, "Failure", "Refused: Out of Resources", "PS3.4 C.4.1.1.4",
                           "the index could not be read"),
    "mismatch": _s(0xA900, "Failure", "Identifier does not match SOP Class", "PS3.4 C.4.1.1.4",
                   "Query/Retrieve Level missing or not valid for the information model"),
    "unable": _s(0xC000, "Failure", "Unable to process", "PS3.4 C.4.1.1.4",
                 "unexpected error while matching"),
}

MOVE = {
    "success": _s(0x0000, "Success", "Sub-operations Complete - No Failures", "PS3.4 C.4.2.1.5",
                  "every C-STORE sub-operation succeeded"),
    "pending": _s(0xFF00, "Pending", "Sub-operations are continuing", "PS3.4 C.4.2.1.5",
                  "after each sub-operation"),
    "cancel": _s(0xFE00, "Cancel", "Sub-operations terminated due to Cancel Indication",
                 "PS3.4 C.4.2.1.5", "C-CANCEL received"),
    "warning": _s(0xB000, "Warning", "Sub-operations Complete - One or more Failures",
                  "PS3.4 C.4.2.1.5", "some sub-operations failed"),
    "out_of_resources_count": _s(0xA701, "Failure", "Refused: Out of Resources - Unable to calculate "
                                 "number of matches", "PS3.4 C.4.2.1.5", "the index could not be read"),
    "out_of_resources_subops": _s(0xA702, "Failure", "Refused: Out of Resources - Unable to perform "
                                  "sub-operations", "PS3.4 C.4.2.1.5",
                                  "all sub-operations failed or the destination could not be reached"),
    "unknown_destination": _s(0xA801, "Failure", "Refused: Move Destination unknown", "PS3.4 C.4.2.1.5",
                              "Move Destination not in `move_destinations`"),
    "mismatch": _s(0xA900, "Failure", "Identifier does not match SOP Class", "PS3.4 C.4.2.1.5",
                   "Query/Retrieve Level missing or not valid for the information model"),
    "unable": _s(0xC000, "Failure", "Unable to process", "PS3.4 C.4.2.1.5", "unexpected error"),
}

GET = {k: v for k, v in MOVE.items() if k != "unknown_destination"}
GET["success"] = _s(0x0000, "Success", "Sub-operations Complete - No Failures", "PS3.4 C.4.3.1.4",
                    "every C-STORE sub-operation succeeded")

ECHO = {"success": _s(0x0000, "Success", "Success", "PS3.7 9.1.5.1.4", "always")}

TABLES = {"C-ECHO": ECHO, "C-STORE": STORE, "C-FIND": FIND, "C-MOVE": MOVE, "C-GET": GET}
