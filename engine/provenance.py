"""FHIR Provenance for what medrelay writes: which message, from which system, through which route.

A destination that writes FHIR resources (the `store` destination into medrelay's own
FHIR store, the `fhir` destination to a server) builds one Provenance per delivery,
when its route asks for it (``provenance: true`` on the destination), with:

- ``target``: every resource the delivery wrote (versioned references where known);
- ``recorded``: now;
- ``agent``: medrelay (``assembler``: it put the resources together) and the system the
  data came from (``author``): HL7 MSH-3/MSH-4, the DICOM Calling AE Title, or for
  other sources the source type and peer address;
- ``entity`` (role ``source``): the stored message, by its medrelay message id;
- ``policy``: the configuration it was routed under (``urn:medrelay:config:<hash>``), and
  an extension naming the channel, the route and its transforms in order.

Nothing in it is PHI: message ids are random, MSH-3/4 and AE titles name systems.
Every Provenance is validated with the fhir.resources R4B model before it is written.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from engine.envelope import Envelope
from engine.store import schema

PARTICIPANT = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
ROUTE_EXTENSION = "urn:medrelay:fhir:StructureDefinition:provenance-route"
MESSAGE_SYSTEM = "urn:medrelay:message"


class ProvenanceInvalid(ValueError):
    """The Provenance built does not validate (a bug here, never the data's fault)."""


@dataclass(frozen=True)
class Source:
    """The stored message a delivery came from, as Provenance needs it."""

    message_id: str
    channel: str
    kind: str
    peer: str
    headers: dict[str, Any] = field(default_factory=dict)
    received_at: float = 0.0


@dataclass(frozen=True)
class RouteInfo:
    channel: str
    route: str
    transforms: tuple[str, ...]
    config_hash: str
    engine_id: str


def route_info(ctx: Any) -> RouteInfo:
    """The route a destination belongs to, from its component context."""
    settings = getattr(ctx, "settings", None)
    transforms: tuple[str, ...] = ()
    config_hash = ""
    if settings is not None:
        config_hash = settings.config_hash
        ch = settings.channels.get(ctx.channel)
        for r in getattr(ch, "routes", ()) or ():
            if r.name == ctx.route:
                transforms = tuple(t.type for t in r.transforms)
    engine_id = ""
    if settings is not None:
        engine_id = getattr(settings.audit, "source_id", None) or ""
    return RouteInfo(ctx.channel, ctx.route, transforms, config_hash, engine_id or socket.gethostname())


def source_of(conn: Connection, envelope: Envelope) -> Source | None:
    """The stored message behind ``envelope``: itself, or the nearest one in its lineage (a transform
    derives new envelopes that are not stored; the one the route took is the last of the lineage)."""
    m = schema.messages
    candidates = [envelope.id, *reversed(envelope.lineage)]
    rows = {r.id: r for r in conn.execute(select(m.c.id, m.c.channel, m.c.kind, m.c.peer, m.c.headers,
                                                 m.c.received_at).where(m.c.id.in_(candidates)))}
    for c in candidates:
        r = rows.get(c)
        if r is not None:
            return Source(r.id, r.channel, r.kind, r.peer or "", dict(r.headers or {}), r.received_at)
    return None


def _system_agent(src: Source) -> dict[str, Any] | None:
    h = src.headers
    if src.kind == "hl7v2" and (h.get("MSH-3") or h.get("MSH-4")):
        value = f"{h.get('MSH-3', '')}|{h.get('MSH-4', '')}"
        ident = {"system": "urn:medrelay:hl7v2:msh-3-msh-4", "value": value}
        display = f"HL7 v2 sender {value}"
    elif src.kind == "dicom" and h.get("CallingAETitle"):
        ident = {"system": "urn:medrelay:dicom:calling-ae-title", "value": str(h["CallingAETitle"])}
        display = f"DICOM AE {h['CallingAETitle']}"
    elif src.peer:
        ident = {"system": "urn:medrelay:peer", "value": src.peer}
        display = f"{src.kind} peer {src.peer}"
    else:
        return None
    return {"type": {"coding": [{"system": PARTICIPANT, "code": "author", "display": "Author"}]},
            "who": {"identifier": ident, "display": display[:200]}}


def build(targets: list[str], src: Source, route: RouteInfo, *, activity: str | None = None,
          now: datetime | None = None) -> dict[str, Any]:
    """The Provenance resource (validated); ``targets`` are references (``Type/id[/_history/v]``, urn:uuid)."""
    recorded = (now or datetime.now(UTC)).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    agents = [{"type": {"coding": [{"system": PARTICIPANT, "code": "assembler", "display": "Assembler"}]},
               "who": {"identifier": {"system": "urn:medrelay:engine", "value": route.engine_id[:200] or "medrelay"},
                       "display": "medrelay"}}]
    system = _system_agent(src)
    if system is not None:
        agents.append(system)
    ext = [{"url": "channel", "valueString": route.channel}, {"url": "route", "valueString": route.route},
           *({"url": "transform", "valueString": t} for t in route.transforms)]
    if route.config_hash:
        ext.append({"url": "config-hash", "valueString": route.config_hash})
    doc: dict[str, Any] = {
        "resourceType": "Provenance",
        "extension": [{"url": ROUTE_EXTENSION, "extension": ext}],
        "target": [{"reference": t} for t in targets],
        "recorded": recorded,
        "agent": agents,
        "entity": [{"role": "source", "what": {
            "identifier": {"system": MESSAGE_SYSTEM, "value": src.message_id},
            "display": f"{src.kind} message received on channel {src.channel}"}}],
    }
    if route.config_hash:
        doc["policy"] = [f"urn:medrelay:config:{route.config_hash}"]
    if activity:
        doc["activity"] = {"coding": [{"system": DATA_OPERATION, "code": activity}]}
    validate(doc)
    return doc


def validate(doc: dict[str, Any]) -> None:
    try:
        from fhir.resources.R4B.provenance import Provenance
    except ImportError:  # fhir.resources without R4B: its default (R5) models
        from fhir.resources.provenance import Provenance  # type: ignore[no-redef]
    try:
        Provenance.model_validate(doc)
    except Exception as e:
        raise ProvenanceInvalid(f"Provenance does not validate: {type(e).__name__}") from None


def activity_of(statuses: list[int]) -> str | None:
    """CREATE when every write created, UPDATE when every one updated, else none."""
    if statuses and all(s == 201 for s in statuses):
        return "CREATE"
    if statuses and all(s == 200 for s in statuses):
        return "UPDATE"
    return None
