"""The one shape every message takes inside medrelay.

Listeners build an Envelope from bytes off the wire; transforms return new ones;
destinations send them. Frozen so a transform can never change what another route
sees: it derives a new envelope and the lineage records where it came from.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal

Kind = Literal["dicom", "hl7v2", "fhir"]
KINDS: tuple[Kind, ...] = ("dicom", "hl7v2", "fhir")


def new_id() -> str:
    """Message ids are random (uuid4 hex): never derived from peer data, safe as file names."""
    return uuid.uuid4().hex


def _freeze(headers: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(headers or {}))


@dataclass(frozen=True, slots=True)
class Envelope:
    """A message and what routing needs to know about it without parsing it again.

    ``headers`` carry routing and identity fields only (HL7 ``MSH-9.1``, ``MSH-10``;
    DICOM ``SOPInstanceUID``, ``Modality``; FHIR ``resourceType``). They are stored in
    clear in the database, so listeners must never put PHI (names, patient ids,
    birth dates) into them.
    """

    channel: str
    kind: Kind
    payload: bytes
    headers: Mapping[str, Any] = field(default_factory=dict)
    peer: str = ""
    id: str = field(default_factory=new_id)
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    lineage: tuple[str, ...] = ()
    # Set only by the pipeline for a destination that ``streams_payload`` (no transforms on the
    # route) when the payload is a large chunk-sealed blob: ``payload`` is then b"" and this gives
    # a fresh iterator of its plaintext chunks per call, so it is never whole in memory.
    payload_chunks: Callable[[], Iterator[bytes]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "headers", _freeze(self.headers))

    def derive(
        self,
        *,
        kind: Kind | None = None,
        payload: bytes | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> Envelope:
        """A new envelope produced from this one (by a transform), with its own id."""
        return replace(
            self,
            id=new_id(),
            kind=kind or self.kind,
            payload=self.payload if payload is None else payload,
            payload_chunks=self.payload_chunks if payload is None else None,
            headers=self.headers if headers is None else headers,
            lineage=(*self.lineage, self.id),
        )


class Drop(Exception):
    """Raised by a transform to stop a message on this route without it being an error.

    ``state`` is what the delivery becomes: ``filtered`` by default; a subclass may name
    another (de-identification's Quarantine uses ``quarantined``) so operators can list
    held-back messages apart from the ones dropped on purpose.
    """

    state = "filtered"

    def __init__(self, reason: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
