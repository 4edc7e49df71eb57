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
                            "the data set cannot be decoded, or it is cut short: an element, item, fragment "
                            "or sequence declares more bytes than the data set holds (Error Comment \"data set "
                            "cut short or its lengths do not nest; not stored\")"),
    "uid_conflict": _s(0xC000, "Failure", "Error: Cannot understand", "PS3.4 B.2.3",
                       "its Series Instance UID is filed under another study, or its SOP Instance UID "
                       "(other content) under another series: never filed there (Error Comment says which)"),
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
                  "PS3.4 C.4.2.1.5", "some sub-operations failed (for any of the reasons of 0xC000 below) "
                  "and others were stored: counted and listed as for 0xC000"),
    "out_of_resources_count": _s(0xA701, "Failure", "Refused: Out of Resources - Unable to calculate "
                                 "number of matches", "PS3.4 C.4.2.1.5", "the index could not be read"),
    "all_failed": _s(0xC000, "Failure", "Unable to process", "PS3.4 C.4.2.3.1, C.4.3.3.1",
                     "every sub-operation was attempted and failed (Failure when all are unsuccessful): "
                     "no storage context the requestor accepted for the class or a syntax the instance can "
                     "be converted to, a conversion that cannot be done, a stored instance that does not "
                     "open, or the peer refusing or aborting the C-STORE; counted in Number of Failed "
                     "Sub-operations, listed in Failed SOP Instance UID List, Error Comment \"all N "
                     "sub-operations failed\""),
    "unknown_destination": _s(0xA801, "Failure", "Refused: Move Destination unknown", "PS3.4 C.4.2.1.5",
                              "Move Destination not in `move_destinations`, or the association to it could not "
                              "be established (nothing attempted)"),
    "mismatch": _s(0xA900, "Failure", "Identifier does not match SOP Class", "PS3.4 C.4.2.1.5",
                   "Query/Retrieve Level missing or not valid for the information model"),
    "unable": _s(0xC000, "Failure", "Unable to process", "PS3.4 C.4.2.1.5", "unexpected error"),
}

GET = {k: v for k, v in MOVE.items() if k != "unknown_destination"}
GET["success"] = _s(0x0000, "Success", "Sub-operations Complete - No Failures", "PS3.4 C.4.3.1.4",
                    "every C-STORE sub-operation succeeded")

ECHO = {"success": _s(0x0000, "Success", "Success", "PS3.7 9.1.5.1.4", "always")}

# Modality Performed Procedure Step SOP Class (PS3.4 F.7.2; codes of PS3.7 C.4 / 10.1.5, 10.1.1).
MPPS_CREATE = {
    "success": _s(0x0000, "Success", "Success", "PS3.4 F.7.2.1", "step recorded (IN PROGRESS) and its "
                  "worklist items started"),
    "invalid_value": _s(0x0106, "Failure", "Invalid attribute value", "PS3.7 C.4.1",
                        "Performed Procedure Step Status not IN PROGRESS, or a UID that is not one"),
    "processing": _s(0x0110, "Failure", "Processing failure", "PS3.7 C.4.1",
                     "the attribute list cannot be decoded, or the store refused the step"),
    "duplicate": _s(0x0111, "Failure", "Duplicate SOP instance", "PS3.7 C.4.1",
                    "a step with this SOP Instance UID exists"),
    "invalid_instance": _s(0x0117, "Failure", "Invalid object instance", "PS3.7 C.4.1",
                           "Affected SOP Instance UID is not a valid UID"),
    "missing": _s(0x0120, "Failure", "Missing attribute", "PS3.7 C.4.1",
                  "a Type 1 attribute of PS3.4 Table F.7.2-1 is absent (named in Error Comment)"),
    "missing_value": _s(0x0121, "Failure", "Missing attribute value", "PS3.7 C.4.1",
                        "a Type 1 attribute is present but empty (named in Error Comment)"),
    "resources": _s(0x0213, "Failure", "Resource limitation", "PS3.7 C.4.1",
                    "the store could not commit (database down, engine shutting down): send again"),
}
MPPS_SET = {
    "success": _s(0x0000, "Success", "Success", "PS3.4 F.7.2.2", "change recorded; the step's worklist "
                  "items follow its state"),
    "invalid_value": _s(0x0106, "Failure", "Invalid attribute value", "PS3.7 C.4.2",
                        "a status other than IN PROGRESS / COMPLETED / DISCONTINUED, or a change to an "
                        "attribute N-SET may not modify (Attribute Identifier List)"),
    "final": _s(0x0110, "Failure", "Processing failure: Performed Procedure Step Object may no longer "
                "be updated", "PS3.4 F.7.2.2.4 (Error ID 0xA710)", "the step is COMPLETED or DISCONTINUED"),
    "processing": _s(0x0110, "Failure", "Processing failure", "PS3.7 C.4.2",
                     "the modification list cannot be decoded, or the step changed meanwhile"),
    "no_such_instance": _s(0x0112, "Failure", "No such object instance", "PS3.7 C.4.2",
                           "no step with this SOP Instance UID"),
    "missing": _s(0x0120, "Failure", "Missing attribute", "PS3.7 C.4.2",
                  "COMPLETED / DISCONTINUED without the final-state attributes (End Date and Time; "
                  "COMPLETED: Performed Series Sequence with Series Instance UIDs)"),
    "resources": _s(0x0213, "Failure", "Resource limitation", "PS3.7 C.4.2",
                    "the store could not commit: send again"),
}
# Storage Commitment Push Model SOP Class (PS3.4 J.3): the N-ACTION answer, then the result.
COMMIT_ACTION = {
    "success": _s(0x0000, "Success", "Request accepted", "PS3.4 J.3.2.1.1",
                  "the request is readable; the result follows as an N-EVENT-REPORT"),
    "invalid_value": _s(0x0106, "Failure", "Invalid attribute value", "PS3.7 C.4.4",
                        "Transaction UID or a referenced UID is not a valid UID"),
    "processing": _s(0x0110, "Failure", "Processing failure", "PS3.7 C.4.4",
                     "the action information cannot be decoded"),
    "no_such_action": _s(0x0123, "Failure", "No such action", "PS3.7 C.4.4", "Action Type ID other than 1"),
    "missing": _s(0x0120, "Failure", "Missing attribute", "PS3.7 C.4.4",
                  "no Transaction UID or no Referenced SOP Sequence"),
    "resources": _s(0x0213, "Failure", "Resource limitation", "PS3.7 C.4.4",
                    "more than `storage_commitment.max_instances` instances in one request"),
}
COMMIT_RESULT = {  # Failure Reason (0008,1197) of each Failed SOP Sequence item (PS3.4 J.3.2.1.2)
    "no_such_instance": _s(0x0112, "Failure", "No such object instance", "PS3.4 J.3.2.1.2",
                           "the instance is not in the archive index (never stored, rejected or deleted)"),
    "processing": _s(0x0110, "Failure", "Processing failure", "PS3.4 J.3.2.1.2",
                     "the instance is indexed but its stored bytes do not open (missing, or failing "
                     "the AES-GCM check)"),
    "class_conflict": _s(0x0119, "Failure", "Class / Instance conflict", "PS3.4 J.3.2.1.2",
                         "the instance is stored under another SOP Class UID than the one referenced"),
}

TABLES = {"C-ECHO": ECHO, "C-STORE": STORE, "C-FIND": FIND, "C-MOVE": MOVE, "C-GET": GET,
          "N-CREATE (MPPS)": MPPS_CREATE, "N-SET (MPPS)": MPPS_SET,
          "N-ACTION (Storage Commitment)": COMMIT_ACTION,
          "N-EVENT-REPORT Failure Reason (Storage Commitment)": COMMIT_RESULT}
