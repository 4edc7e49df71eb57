"""Lineage for the `fhir` destination: a Provenance with what it sends, and the outputs it made.

With ``provenance: true`` a delivery goes as one transaction Bundle holding the resources
and a Provenance whose targets point at them (``urn:uuid`` fullUrls the server resolves,
or ``Type/id`` for a PUT), so the server commits both or neither. A batch Bundle cannot
carry references between its entries: it is sent as it is and the Provenance follows in
a second request naming what the batch-response says was written (if that second request
fails the delivery is retried; the batch's own entries are as idempotent as they are
without provenance).

Whatever the server answers it created or updated (Location, transaction/batch-response
locations) is recorded as the stored message's outputs (engine/store/outputs.py).
"""

from __future__ import annotations

import copy
import uuid
from typing import Any

import httpx
import structlog
from sqlalchemy import Connection

from engine import provenance
from engine.envelope import Envelope
from engine.store import outputs

log = structlog.get_logger()


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def with_provenance(doc: dict[str, Any], method: str, url: str, base: str) -> tuple[dict[str, Any], list[str]]:
    """The transaction to send instead of ``method url doc`` (a resource or a transaction Bundle) and
    the references its Provenance targets (``urn:uuid`` fullUrls the server resolves, ``Type/id``)."""
    if doc.get("resourceType") == "Bundle":
        bundle = copy.deepcopy(doc)
        targets = []
        for e in bundle.get("entry") or []:
            req = e.get("request") or {}
            m = str(req.get("method") or "").upper()
            if m not in ("POST", "PUT") or not isinstance(e.get("resource"), dict):
                continue
            rel = str(req.get("url") or "")
            if not e.get("fullUrl"):
                e["fullUrl"] = urn()
            full = str(e["fullUrl"])
            targets.append(full if full.startswith("urn:") or m == "POST" or "?" in rel else rel)
        return bundle, targets
    rel = url[len(base) + 1:] if url.startswith(base + "/") else url
    entry: dict[str, Any] = {"fullUrl": urn(), "resource": doc, "request": {"method": method, "url": rel}}
    if method == "PUT":
        entry["fullUrl"] = f"{base}/{rel}"
    return {"resourceType": "Bundle", "type": "transaction", "entry": [entry]}, [
        entry["fullUrl"] if method == "POST" else rel]


FOLLOW_UP = "provenance_after"  # a batch: the Provenance is posted once the batch-response is in


async def traced(dest: Any, envelope: Envelope) -> Envelope:
    """The envelope to send: a transaction with the resources and their Provenance; a batch as it is,
    marked for a Provenance afterwards."""
    import asyncio
    import json
    from dataclasses import replace

    try:
        doc = json.loads(envelope.payload)
    except ValueError:
        return envelope  # _request refuses it (permanent) as without provenance
    if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
        return envelope
    if doc["resourceType"] == "Bundle" and doc.get("type") == "batch":
        return replace(envelope, headers={**envelope.headers, FOLLOW_UP: True})
    if doc["resourceType"] == "Bundle" and doc.get("type") != "transaction":
        return envelope
    method = "PUT" if doc["resourceType"] != "Bundle" and doc.get("id") else "POST"
    url = f"{dest.base}/{doc['resourceType']}" + (f"/{doc['id']}" if method == "PUT" else "")
    bundle, targets = with_provenance(doc, method, url, dest.base)
    src = await asyncio.to_thread(source, dest.ctx.store, envelope)
    if src is None or not targets:
        return replace(envelope, payload=json.dumps(bundle).encode())
    add_provenance(bundle, provenance.build(targets, src, provenance.route_info(dest.ctx)))
    return replace(envelope, payload=json.dumps(bundle, separators=(",", ":"), ensure_ascii=False).encode())


async def after(dest: Any, envelope: Envelope, resp: httpx.Response, bundle: bool) -> None:
    """Once the server answered success: the batch's Provenance if one is due, then the outputs."""
    import asyncio

    from engine.components import DeliveryError

    targets = written(resp, dest.base, bundle)
    if envelope.headers.get(FOLLOW_UP) and targets:
        src = await asyncio.to_thread(source, dest.ctx.store, envelope)
        if src is not None:
            prov = provenance.build(targets, src, provenance.route_info(dest.ctx))
            try:
                async with asyncio.timeout(dest.config.timeout):
                    r = await dest.client.post(f"{dest.base}/Provenance", json=prov,
                                               headers={"X-Request-ID": envelope.id})
            except (TimeoutError, httpx.HTTPError) as e:
                raise DeliveryError(f"FHIR Provenance POST failed: {type(e).__name__}") from None
            if r.status_code >= 300:
                raise DeliveryError(f"FHIR Provenance POST HTTP {r.status_code}",
                                    permanent=400 <= r.status_code < 500 and r.status_code not in (408, 429))
            targets.extend(written(r, dest.base, False))
    await asyncio.to_thread(record, dest.ctx.store, dest.ctx, envelope, targets)


def add_provenance(bundle: dict[str, Any], prov: dict[str, Any]) -> None:
    bundle.setdefault("entry", []).append({"fullUrl": urn(), "resource": prov,
                                           "request": {"method": "POST", "url": "Provenance"}})


def relative(location: str, base: str) -> str:
    """``Patient/1/_history/2`` from an absolute or relative Location."""
    loc = location.strip()
    if loc.startswith(base + "/"):
        return loc[len(base) + 1:]
    if "://" in loc:
        parts = loc.split("/")
        for i in range(len(parts) - 1):
            if parts[i][:1].isupper() and i + 1 < len(parts):
                return "/".join(parts[i:])
    return loc.lstrip("/")


def written(resp: httpx.Response, base: str, bundle: bool) -> list[str]:
    """What the server says it wrote: Location, or each entry's response.location."""
    if not bundle:
        loc = resp.headers.get("location") or resp.headers.get("content-location")
        return [relative(loc, base)] if loc else []
    try:
        body = resp.json()
    except ValueError:
        return []
    out = []
    for e in body.get("entry") or [] if isinstance(body, dict) else []:
        r = e.get("response") or {} if isinstance(e, dict) else {}
        if isinstance(r, dict) and r.get("location") and str(r.get("status", "")).startswith(("200", "201")):
            out.append(relative(str(r["location"]), base))
    return out


def source(store: Any, envelope: Envelope) -> provenance.Source | None:
    with store.engine.connect() as conn:
        return provenance.source_of(conn, envelope)


def record(store: Any, ctx: Any, envelope: Envelope, targets: list[str]) -> None:
    """Record the outputs (best effort: the delivery happened whether or not this row is written)."""
    prov = next((t for t in targets if t.startswith("Provenance/")), None)
    data = [t for t in targets if not t.startswith("Provenance/")]
    if not data:
        return
    try:
        with store.engine.begin() as conn:
            _record(conn, ctx, envelope, data, prov)
    except Exception as e:
        log.warning("fhir.outputs_not_recorded", channel=ctx.channel, route=ctx.route, message_id=envelope.id,
                    error=type(e).__name__)


def _record(conn: Connection, ctx: Any, envelope: Envelope, targets: list[str], prov: str | None) -> None:
    src = provenance.source_of(conn, envelope)
    if src is not None:
        outputs.record(conn, message_id=src.message_id, channel=ctx.channel, route=ctx.route, targets=targets,
                       where="remote", provenance=prov)
