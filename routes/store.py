"""`to: {type: store}`: file the message in medrelay's own archive.

DICOM goes to the archive index (answers C-FIND/C-MOVE/C-GET), FHIR resources to
the FHIR store (answers the REST API), worklist items to the Modality Worklist.
The handler for each lives in its room of engine/store/ (dicom/, fhir/).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Literal

from pydantic import Field

from engine.components import ComponentConfig, DeliveryError
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.registry import component
from engine.store.dicom import index as _dicom_index  # noqa: F401  (registers the "dicom" handler)
from engine.store.dicom import worklist as _worklist  # noqa: F401  ("worklist")
from engine.store.fhir import handler as _fhir_handler  # noqa: F401  ("fhir")
from engine.store.handlers import handler_for


class StoreDestinationConfig(ComponentConfig):
    """Archive into medrelay's own store (encrypted)."""

    type: Literal["store"]
    as_: str | None = Field(None, alias="as", description="force a handler (dicom, fhir, worklist)")
    provenance: bool = Field(False, description="FHIR: write a Provenance with the resources (target, recorded, "
                             "agents medrelay and the source system, entity the source message, channel, route, "
                             "transforms and config hash), in the same transaction")


class StoreDestination:
    def __init__(self, config: StoreDestinationConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx

    def _store(self, envelope: Envelope) -> str:
        if self.config.as_:
            envelope = envelope.derive(headers={**envelope.headers, "store_as": self.config.as_})
        if self.config.provenance:  # the fhir handler writes the Provenance (engine/store/fhir/handler.py)
            envelope = replace(envelope, headers={**envelope.headers, "store_provenance": True})
        name, handler = handler_for(envelope)
        if handler is None:
            raise DeliveryError(f"no store handler for {name!r}", permanent=True)
        with self.ctx.store.engine.begin() as conn:
            return handler(self.ctx, conn, envelope)

    async def send(self, envelope: Envelope) -> str | None:
        return await asyncio.to_thread(self._store, envelope)

    async def close(self) -> None:
        return None


@component("destination", "store", config=StoreDestinationConfig)
def build(config: StoreDestinationConfig, ctx: ComponentContext) -> StoreDestination:
    """Archive the (transformed) message in medrelay's own encrypted store."""
    return StoreDestination(config, ctx)
