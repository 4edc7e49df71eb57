"""The ``fhir`` handler of the `store` destination: files a resource or a Bundle.

Its own module because it needs both the resource store and the bundle operations, which
themselves build on the resource store: kept in either, it made an import circle.

Every resource it writes is recorded as an output of the stored message it came from
(engine/store/outputs.py), and with ``provenance: true`` on the destination (the header
``store_provenance`` the destination sets) a Provenance naming them is written in the
same transaction (engine/provenance.py): the resources and their lineage commit together.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import Connection

from engine import provenance
from engine.components import DeliveryError
from engine.store import outputs
from engine.store.fhir import jsontext
from engine.store.fhir.binary import HELD_DATA_HEADER
from engine.store.fhir.bundle import PAYLOAD_MAX_DEPTH, EntryResult, Op, apply_bundle, run_transaction
from engine.store.fhir.params import FhirError, validate_resource
from engine.store.fhir.resources import FhirStore
from engine.store.handlers import store_handler

if TYPE_CHECKING:
    from engine.context import ComponentContext
    from engine.envelope import Envelope

PROVENANCE_HEADER = "store_provenance"


def write_payload(fs: FhirStore, conn: Connection, payload: bytes, *, message_id: str | None = None
                  ) -> tuple[str, list[EntryResult]]:
    """A transaction/batch Bundle, or one resource (PUT if it has an id): (detail, what each entry did)."""
    doc = jsontext.loads(payload, max_depth=PAYLOAD_MAX_DEPTH)
    if isinstance(doc, dict) and doc.get("resourceType") == "Bundle" and doc.get("type") in ("transaction", "batch"):
        btype, results = apply_bundle(fs, conn, doc, message_id=message_id)
        failed = [r.status for r in results if r.status >= 400]
        if failed:
            raise FhirError(max(failed), "processing", f"{len(failed)} batch entries failed")
        return f"fhir {btype} entries={len(results)}", results
    rtype = validate_resource(doc)
    rid = doc.get("id")
    op = Op("PUT" if rid else "POST", rtype, rid, None, doc)
    (res,) = run_transaction(fs, conn, [op], message_id=message_id)
    return f"fhir {rtype} {res.status}", [res]


@store_handler("fhir")
def store_fhir(ctx: ComponentContext, conn: Connection, envelope: Envelope) -> str:
    """File a FHIR resource or a transaction/batch Bundle (e.g. hl7_to_fhir output).

    Any entry failing makes the whole delivery fail permanently (and roll back), so a
    replay after fixing the cause applies the bundle again from a clean state;
    conditional creates/updates make that idempotent.
    """
    fs = FhirStore(ctx.store, ctx.keyring)
    if envelope.headers.get(HELD_DATA_HEADER):
        # A raw Binary upload: the listener wrote it, bytes and all, when it took the message; this
        # payload is the resource without them, and writing it again would make a version with none.
        return "fhir Binary (stored by the listener)"
    try:
        detail, results = write_payload(fs, conn, envelope.payload, message_id=envelope.id)
    except FhirError as e:
        raise DeliveryError(f"FHIR {e.status} {e.code}", permanent=e.status < 500) from None
    written = [r for r in results if r.written is not None and r.written.resource is not None
               and r.written.changed]
    targets = [r.location for r in written if r.location]
    src = provenance.source_of(conn, envelope)
    prov_ref = None
    if envelope.headers.get(PROVENANCE_HEADER) and targets and src is not None:
        doc = provenance.build(targets, src, provenance.route_info(ctx),
                               activity=provenance.activity_of([r.status for r in written]))
        w = fs.write(conn, "Provenance", None, doc, message_id=envelope.id, method="POST")
        prov_ref = f"Provenance/{w.id}/_history/{w.version}"
        detail += " +provenance"
    if src is not None and targets:
        outputs.record(conn, message_id=src.message_id, channel=ctx.channel, route=ctx.route, targets=targets,
                       where="store", provenance=prov_ref)
    return detail
