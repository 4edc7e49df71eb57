"""How the `store` destination files an envelope, by what it is.

Feature modules register a handler under a name (``dicom``, ``fhir``, ``worklist``);
the destination picks one from ``headers["store_as"]`` or the envelope kind. A
handler runs inside the destination's transaction and returns a short detail.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.envelope import Envelope

StoreHandler = Callable[["ComponentContext", Connection, "Envelope"], str]
STORE_HANDLERS: dict[str, StoreHandler] = {}


def store_handler(name: str) -> Callable[[StoreHandler], StoreHandler]:
    def register(fn: StoreHandler) -> StoreHandler:
        STORE_HANDLERS[name] = fn
        return fn

    return register


def handler_for(envelope: Envelope) -> tuple[str, Any]:
    name = str(envelope.headers.get("store_as") or envelope.kind)
    return name, STORE_HANDLERS.get(name)
