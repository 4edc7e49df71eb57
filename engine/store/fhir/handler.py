"""The ``fhir`` handler of the `store` destination: files a resource or a Bundle.

Its own module because it needs both the resource store and the bundle operations, which
themselves build on the resource store: kept in either, it made an import circle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection

from engine.components import DeliveryError
from engine.store.fhir.bundle import apply_payload
from engine.store.fhir.params import FhirError
from engine.store.fhir.resources import FhirStore
from engine.store.handlers import store_handler

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.envelope import Envelope


@store_handler("fhir")
def store_fhir(ctx: ComponentContext, conn: Connection, envelope: Envelope) -> str:
    """File a FHIR resource or a transaction/batch Bundle (e.g. hl7_to_fhir output).

    Any entry failing makes the whole delivery fail permanently (and roll back), so a
    replay after fixing the cause applies the bundle again from a clean state;
    conditional creates/updates make that idempotent.
    """
    fs = FhirStore(ctx.store, ctx.keyring)
    try:
        return apply_payload(fs, conn, envelope.payload, message_id=envelope.id)
    except FhirError as e:
        raise DeliveryError(f"FHIR {e.status} {e.code}", permanent=e.status < 500) from None
