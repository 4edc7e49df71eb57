"""`when:` conditions: which routes a message takes.

Keys are HL7 positions (`MSH-9.1`, `PID-8`), DICOM keywords (`Modality`,
`SOPClassUID`, `CallingAETitle`) or FHIR fields (`resourceType`). Every key must
match (AND); a list matches any of its values (OR); `*` and `?` are wildcards; operators
(`in`, `not`, `regex`, `exists`, `gt`, `before`, `any`/`all`...) as in engine/mapping/conditions.py.
Header fields answer first, so the common case never parses the payload; a key that
is not a header is read from the payload once, lazily. A header answers with what the
listener wrote (``Header.as_headers``): ``MSH-9`` is the whole message type
(``ORU^R01^ORU_R01``), while a payload read of a field without a component gives its first
component (``ORU``), as in mapping rules; ``MSH-9.1``/``.2``/``.3`` agree everywhere
(docs/mappings.md, Conditions).

This lives in the engine, not routes/, because intake decides at commit time which
deliveries a message gets.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

from engine.envelope import Envelope
from engine.mapping import conditions

# The condition language (operators, any/all/not) is engine.mapping.conditions, shared with
# the filter transform and mapping rules; MISSING is its "no such value".
MISSING = conditions.MISSING
value_matches = conditions.value_matches


def _from_payload(env: Envelope, key: str) -> Any:
    if env.kind == "hl7v2":  # every occurrence and repetition the key leaves open: any may match
        from engine.mapping.hl7 import parse_hl7_path
        from engine.mapping.reader import document_of

        return document_of("hl7v2", env.payload).values(parse_hl7_path(key), {}) or MISSING
    if env.kind == "dicom":
        from pydicom import dcmread

        ds = dcmread(io.BytesIO(env.payload), stop_before_pixels=True, force=True)
        v = ds.get(key, MISSING)
        return v if v is MISSING else (v if isinstance(v, str | int | float) else str(v))
    if env.kind == "fhir":
        # Through lists too (`name.family` is every name's family), as engine.routing_keys checks it.
        nodes: list[Any] = [json.loads(env.payload)]
        for part in key.split("."):
            found = [n[part] for n in nodes if isinstance(n, dict) and part in n]
            nodes = [x for v in found for x in (v if isinstance(v, list) else [v])]
        return MISSING if not nodes else nodes[0] if len(nodes) == 1 else nodes
    return MISSING


def lookup(env: Envelope, key: str) -> Any:
    """The value of ``key`` for this message: a header, else read from the payload; MISSING if absent."""
    if key == "kind":
        return env.kind
    actual = env.headers.get(key, MISSING)
    if actual is MISSING:
        try:
            actual = _from_payload(env, key)
        except Exception:  # an unreadable payload matches nothing rather than failing intake
            actual = MISSING
    return actual


EVENT = "event"  # the header of event messages (an MPPS step's progress: `event: mpps`)


def matches(when: Mapping[str, Any], env: Envelope) -> bool:
    """Whether a route with this ``when:`` takes the message.

    An *event message* (one with an ``event`` header: what a listener reports about the workflow,
    such as a modality's performed procedure step) takes only routes whose ``when:`` names
    ``event`` at its top level (``when: {event: mpps}``). So the routes a channel already has,
    written for its images or orders, never receive a kind of message they were not written for
    when a new one appears on the channel.
    """
    if EVENT in env.headers and EVENT not in when:
        return False
    return conditions.compiled(when).test(lambda key: lookup(env, key))
