"""Render an audit_events row as a DICOM PS3.15 A.5 audit message (the IHE ATNA format).

The XML follows the A.5.1 RELAX NG schema: coded values carry ``csd-code``,
``codeSystemName`` and ``originalText``; element order is EventIdentification,
ActiveParticipant+, AuditSourceIdentification, ParticipantObjectIdentification*.
Event ids are the DCM codes of A.5.3 (110100 Application Activity ... 110114 User
Authentication); which one an engine action maps to is decided in ``classify`` so
listener helpers can keep naming their actions freely (``dicom.find``, ``fhir.read``).

Audit rows never carry patient names or ids (the engine keeps PHI out of headers),
so no message rendered here contains PHI beyond UIDs and message ids.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree as ET

DCM = "DCM"


@dataclass(frozen=True, slots=True)
class Code:
    code: str
    system: str
    text: str

    def attrs(self) -> dict[str, str]:
        return {"csd-code": self.code, "codeSystemName": self.system, "originalText": self.text}


# PS3.16 CID 400 (Audit Event ID), CID 401 (Audit Event Type Code), CID 402 (Role ID)
APPLICATION_ACTIVITY = Code("110100", DCM, "Application Activity")
INSTANCES_ACCESSED = Code("110103", DCM, "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", DCM, "DICOM Instances Transferred")
EXPORT = Code("110106", DCM, "Export")
IMPORT = Code("110107", DCM, "Import")
PATIENT_RECORD = Code("110110", DCM, "Patient Record")
PROCEDURE_RECORD = Code("110111", DCM, "Procedure Record")
QUERY = Code("110112", DCM, "Query")
SECURITY_ALERT = Code("110113", DCM, "Security Alert")
USER_AUTHENTICATION = Code("110114", DCM, "User Authentication")

APPLICATION_START = Code("110120", DCM, "Application Start")
APPLICATION_STOP = Code("110121", DCM, "Application Stop")
LOGIN = Code("110122", DCM, "Login")
NODE_AUTHENTICATION = Code("110126", DCM, "Node Authentication")
SECURITY_CONFIGURATION = Code("110129", DCM, "Security Configuration")
SOFTWARE_CONFIGURATION = Code("110131", DCM, "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = Code("110132", DCM, "Use of Restricted Function")

ROLE_APPLICATION = Code("110150", DCM, "Application")
ROLE_DESTINATION = Code("110152", DCM, "Destination Role ID")
ROLE_SOURCE = Code("110153", DCM, "Source Role ID")

STUDY_UID = Code("110180", DCM, "Study Instance UID")
SOP_CLASS_UID = Code("110181", DCM, "SOP Class UID")
SEARCH_CRITERIA = Code("10", "RFC-3881", "Search Criteria")
MESSAGE_ID = Code("message-id", "medrelay", "medrelay message id")

OUTCOME = {"success": "0", "failure": "4", "error": "8", "serious": "8", "major": "12"}


@dataclass(frozen=True, slots=True)
class Event:
    """How one engine action reads in PS3.15 terms."""

    event_id: Code
    action_code: str  # C R U D E
    types: tuple[Code, ...] = ()
    direction: str = "in"  # in: the peer asked/sent; out: we sent; local: CLI or engine itself
    lifecycle: str | None = None  # ParticipantObjectDataLifeCycle


def classify(action: str, kind: str | None = None) -> Event:
    """Map an engine action name to its DICOM audit event (see docs/notes/issue-5-security.md)."""
    a = action.lower()
    if a == "engine.start":
        return Event(APPLICATION_ACTIVITY, "E", (APPLICATION_START,), "local")
    if a == "engine.stop":
        return Event(APPLICATION_ACTIVITY, "E", (APPLICATION_STOP,), "local")
    if a.startswith("keys.") or a.startswith("tls."):
        return Event(SECURITY_ALERT, "E", (SECURITY_CONFIGURATION,), "local")
    # The imaging workflow (issue 12), before the generic rules below ("reject" would read as a
    # security alert): a performed procedure step, storage commitment, patient reconciliation, IOCM.
    if a.startswith("dicom.mpps"):
        return Event(PROCEDURE_RECORD, "C" if a.endswith("create") else "U", (), "in", "2")
    if a.startswith("dicom.prefetch") or a.startswith("dicom.scu"):  # we asked another archive
        if a.endswith("find"):
            return Event(QUERY, "E", (), "out")
        return Event(INSTANCES_TRANSFERRED, "R", (), "out", "6")
    if a.startswith("dicom.commitment"):
        return Event(INSTANCES_ACCESSED, "R", (), "in", "6")
    if a.startswith("dicom.patient"):
        return Event(PATIENT_RECORD, "U", (), "in", "3")
    if a.startswith("dicom.iocm"):
        return Event(INSTANCES_ACCESSED, "D" if a.endswith("delete") else "U", (), "in", "3")
    if a.startswith("security.") or "integrity" in a:
        return Event(SECURITY_ALERT, "E", (), "local")
    if a.startswith("config."):
        return Event(SECURITY_ALERT, "E", (SOFTWARE_CONFIGURATION,), "local")
    if "login" in a or "auth" in a:
        return Event(USER_AUTHENTICATION, "E", (LOGIN,), "in")
    if a.endswith("association") or "reject" in a or "denied" in a:
        return Event(SECURITY_ALERT, "E", (NODE_AUTHENTICATION,), "in")
    if a == "message.receive":
        if kind == "dicom":
            return Event(INSTANCES_TRANSFERRED, "C", (), "in", "2")
        return Event(IMPORT, "C", (), "in", "2")
    if a in ("message.send", "delivery.dead_letter"):
        if kind == "dicom":
            return Event(INSTANCES_TRANSFERRED, "R", (), "out", "10")
        return Event(EXPORT, "R", (), "out", "10")
    if a in ("message.export", "message.replay"):
        return Event(EXPORT, "R", (USE_OF_RESTRICTED_FUNCTION,), "local", "11")
    if "deid" in a:
        return Event(EXPORT, "E", (), "local", "7")
    if any(w in a for w in ("find", "query", "search", "worklist")):
        return Event(QUERY, "E", (), "in")
    if any(w in a for w in ("move", "retrieve", "c_get", "dicom.get")):
        return Event(INSTANCES_TRANSFERRED, "R", (), "in", "6")
    if "read" in a or "history" in a:
        return Event(PATIENT_RECORD, "R", (), "in", "6")
    if a.startswith("fhir.") and any(w in a for w in ("create", "update", "delete", "transaction", "batch")):
        code = "D" if "delete" in a else ("U" if "update" in a else "C")
        return Event(PATIENT_RECORD, code, (), "in", "2")
    if a.startswith("dicom.instance"):
        return Event(INSTANCES_TRANSFERRED, "C", (), "in", "2")
    return Event(APPLICATION_ACTIVITY, "E", (), "local")


def _nap(peer: str) -> tuple[str, str] | None:
    """NetworkAccessPointID and its type (1 machine name, 2 IP address) from 'host:port'."""
    if not peer:
        return None
    host = peer
    if peer.startswith("["):
        host = peer[1:].split("]", 1)[0]
    elif peer.count(":") == 1:
        host = peer.rsplit(":", 1)[0]
    try:
        ipaddress.ip_address(host)
        return host, "2"
    except ValueError:
        return (host, "5") if "://" in host else (host, "1")


def _participant(root: ET.Element, user: str, requestor: bool, role: Code | None,
                 nap: tuple[str, str] | None, alt: str | None = None) -> None:
    attrs = {"UserID": user or "unknown", "UserIsRequestor": "true" if requestor else "false"}
    if alt:
        attrs["AlternativeUserID"] = alt
    if nap is not None:
        attrs["NetworkAccessPointID"], attrs["NetworkAccessPointTypeCode"] = nap
    el = ET.SubElement(root, "ActiveParticipant", attrs)
    if role is not None:
        ET.SubElement(el, "RoleIDCode", role.attrs())


def _b64(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return base64.b64encode(text.encode()).decode("ascii")


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def render(row: dict[str, Any], *, source_id: str, site_id: str | None = None, app: str = "medrelay",
           host: str = "localhost") -> bytes:
    """One audit row -> one UTF-8 ``<AuditMessage>`` document (no XML declaration, as ATNA sends it)."""
    entity = row.get("entity") or {}
    if isinstance(entity, str):
        try:
            entity = json.loads(entity)
        except ValueError:
            entity = {"entity": entity}
    kind = entity.get("kind") if isinstance(entity, dict) else None
    ev = classify(str(row["action"]), kind)
    root = ET.Element("AuditMessage")
    ident = ET.SubElement(root, "EventIdentification", {
        "EventActionCode": ev.action_code, "EventDateTime": _iso(float(row["at"])),
        "EventOutcomeIndicator": OUTCOME.get(str(row.get("outcome") or "success"), "4")})
    ET.SubElement(ident, "EventID", ev.event_id.attrs())
    for t in ev.types:
        ET.SubElement(ident, "EventTypeCode", t.attrs())
    ET.SubElement(ident, "EventTypeCode", Code(str(row["action"]), "medrelay", str(row["action"])).attrs())
    if row.get("detail"):
        ET.SubElement(ident, "EventOutcomeDescription").text = str(row["detail"])[:1000]

    me = f"{app}@{host}" + (f"/{row['channel']}" if row.get("channel") else "")
    peer, actor = str(row.get("peer") or ""), str(row.get("actor") or "")
    pid = str(os.getpid())
    if ev.direction == "in":
        _participant(root, actor or peer, True, ROLE_SOURCE, _nap(peer))
        _participant(root, me, False, ROLE_DESTINATION, (host, "1"), alt=pid)
    elif ev.direction == "out":
        _participant(root, me, True, ROLE_SOURCE, (host, "1"), alt=pid)
        _participant(root, peer or str(entity.get("route", "")), False, ROLE_DESTINATION, _nap(peer))
    else:
        if actor and actor != app:
            _participant(root, actor, True, None, _nap(peer))
        _participant(root, me, not actor or actor == app, ROLE_APPLICATION, (host, "1"), alt=pid)

    src_attrs = {"AuditSourceID": source_id, **({"AuditEnterpriseSiteID": site_id} if site_id else {})}
    src = ET.SubElement(root, "AuditSourceIdentification", src_attrs)
    ET.SubElement(src, "AuditSourceTypeCode", {"csd-code": "4"})  # application server process

    if isinstance(entity, dict) and ev.event_id == QUERY:
        obj = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(entity.get("SOPClassUID") or entity.get("type") or row["action"]),
            "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "24"})
        ET.SubElement(obj, "ParticipantObjectIDTypeCode",
                      (SOP_CLASS_UID if entity.get("SOPClassUID") else SEARCH_CRITERIA).attrs())
        ET.SubElement(obj, "ParticipantObjectQuery").text = _b64(entity)
    if row.get("message_id"):
        obj = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": str(row["message_id"]), "ParticipantObjectTypeCode": "2",
            "ParticipantObjectTypeCodeRole": "3",
            **({"ParticipantObjectDataLifeCycle": ev.lifecycle} if ev.lifecycle else {})})
        ET.SubElement(obj, "ParticipantObjectIDTypeCode", MESSAGE_ID.attrs())
        ET.SubElement(obj, "ParticipantObjectName").text = str(kind or "message")
        if isinstance(entity, dict):
            flat = {k: v for k, v in entity.items() if k != "headers"}
            flat.update({f"header.{k}": v for k, v in (entity.get("headers") or {}).items() if v not in ("", None)})
            for k, v in sorted(flat.items()):
                ET.SubElement(obj, "ParticipantObjectDetail", {"type": str(k), "value": _b64(v)})
    study = _study_uid(entity)
    if study:
        obj = ET.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": study, "ParticipantObjectTypeCode": "2", "ParticipantObjectTypeCodeRole": "3"})
        ET.SubElement(obj, "ParticipantObjectIDTypeCode", STUDY_UID.attrs())
        ET.SubElement(obj, "ParticipantObjectName").text = "study"
        sop = (entity.get("SOPClassUID") or (entity.get("headers") or {}).get("SOPClassUID")
               if isinstance(entity, dict) else None)
        if sop:
            desc = ET.SubElement(obj, "ParticipantObjectDescription")
            ET.SubElement(desc, "SOPClass", {"UID": str(sop), "NumberOfInstances": "1"})
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _study_uid(entity: Any) -> str | None:
    if not isinstance(entity, dict):
        return None
    v = entity.get("StudyInstanceUID") or (entity.get("headers") or {}).get("StudyInstanceUID")
    return str(v) if v else None
