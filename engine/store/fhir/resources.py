"""The FHIR resource store: versions, encrypted bodies and the search index.

Every write runs inside a caller's transaction: the FHIR listener's intake tx_hook
(so a client's create is durable together with its message and deliveries) or the
`store` destination's. Resource JSON is PHI and is kept only as an encrypted blob
(AAD ``fhir:{type}/{id}/{version}``); the tables hold what search needs in clear.

Tables:
  fhir_resources  one row per logical resource (current version; ``rid`` orders search pages)
  fhir_versions   one row per version (history, vread), DELETE versions without a body
  fhir_index      search keys of the current version (see engine.store.fhir.params)
  fhir_binary_data  a Binary version's bytes: a blob of their own (engine.store.fhir.binary), the
                  resource JSON is kept without ``data``
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy import (
    Connection,
    delete,
    insert,
    select,
    update,
)

from engine.store.fhir import binary
from engine.store.fhir.params import FhirError, index_entries
from engine.store.fhir.tables import fhir_index, fhir_resources, fhir_versions

if TYPE_CHECKING:
    pass

log = structlog.get_logger()
# Types whose ``data`` is kept as a blob of its own (engine.store.fhir.binary), not in the JSON.
DATA_TYPES = ("Binary",)
# Inline attachment data (base64 characters) above this moves into a Binary of its own on write.
EXTERNAL_DATA_MIN = 256 * 1024
HMAC_KEY_NAME = "fhir-index"


def iso_instant(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def blob_aad(rtype: str, rid: str, version: int) -> str:
    """AAD binding a body to its version; hashed when it would not fit the 64-char column."""
    aad = f"fhir:{rtype}/{rid}/{version}"
    return aad if len(aad) <= 64 else "fhir:" + hashlib.sha256(aad.encode()).hexdigest()[:59]


def etag(version: int | str) -> str:
    return f'W/"{version}"'


# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE; If-Match = "*" / #entity-tag.
_ENTITY_TAG = r'\s*(?:W/)?"([\x21\x23-\x7e]*)"\s*'
_IF_MATCH_RE = re.compile(rf"^{_ENTITY_TAG}(?:,{_ENTITY_TAG})*$")
_ONE_TAG = re.compile(_ENTITY_TAG)


def parse_if_match(value: str) -> tuple[str, ...] | None:
    """The versions an If-Match names (None: ``*``, any current version).

    FHIR ETags are weak (``W/"3"``) and a client may echo them with or without ``W/``:
    both name version 3 (FHIR http.html#concurrency compares them weakly). An empty value
    or one that is not ``*`` or a list of quoted entity-tags is the client's error (400),
    not a mismatch: it would otherwise be a 412 that retrying with a fresh read cannot fix.
    """
    v = value.strip()
    if v == "*":
        return None
    if not _IF_MATCH_RE.match(v):
        raise FhirError(400, "invalid", 'If-Match must be * or an entity-tag such as W/"3"')
    return tuple(_ONE_TAG.findall(v))


def check_if_match(value: str | None, row: Row | None, what: str) -> None:
    """The one If-Match check of every write (update, delete, conditional ones, Bundle entries):
    400 when malformed, 412 when the resource has no current version (never created, or
    deleted: RFC 9110 13.1.1, even ``*`` fails) or none of the tags names the current one."""
    if value is None:
        return
    wanted = parse_if_match(value)
    have = None if row is None or row.deleted else str(row.version)
    if have is None:
        raise FhirError(412, "conflict", f"If-Match: {what} has no current version")
    if wanted is not None and have not in wanted:
        raise FhirError(412, "conflict", f"If-Match does not match the current version of {what} ({have})")


@dataclass(frozen=True)
class Written:
    """What one write did; the listener builds Location/ETag/status from it."""

    type: str
    id: str
    version: int
    last_updated: float
    created: bool
    resource: dict[str, Any] | None  # None for DELETE
    changed: bool = True  # False: conditional create matched, or delete of a deleted resource

    @property
    def etag(self) -> str:
        return etag(self.version)

    @property
    def last_modified(self) -> str:
        return iso_instant(self.last_updated)

    def summary(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "versionId": str(self.version),
                "lastUpdated": self.last_modified, "created": self.created}


@dataclass(frozen=True)
class Row:
    rid: int
    type: str
    id: str
    version: int
    last_updated: float
    deleted: bool
    blob_id: str | None


class FhirStore:
    """Reads and writes FHIR resources through a caller-provided connection."""

    def __init__(self, store: Any, keyring: Any) -> None:
        self.store = store
        self.hash_key: bytes = keyring.hmac_key(HMAC_KEY_NAME)

    # -- reads -----------------------------------------------------------
    def current(self, conn: Connection, rtype: str, rid: str) -> Row | None:
        r = fhir_resources
        row = conn.execute(select(r).where(r.c.type == rtype, r.c.id == rid)).mappings().first()
        if row is None:
            return None
        return Row(row["rid"], row["type"], row["id"], row["version"], row["last_updated"],
                   bool(row["deleted"]), row["blob_id"])

    def body(self, conn: Connection, rtype: str, rid: str, version: int, blob_id: str) -> dict[str, Any]:
        data = self.store.get_blob(conn, blob_id, aad=blob_aad(rtype, rid, version))
        return json.loads(data)

    def read(self, conn: Connection, rtype: str, rid: str) -> tuple[Row, dict[str, Any]]:
        row = self.current(conn, rtype, rid)
        if row is None:
            raise FhirError(404, "not-found", f"{rtype}/{rid} is not known")
        if row.deleted or row.blob_id is None:
            raise FhirError(410, "deleted", f"{rtype}/{rid} was deleted",
                            headers={"ETag": etag(row.version)})
        return row, self.body(conn, rtype, rid, row.version, row.blob_id)

    def vread(self, conn: Connection, rtype: str, rid: str, version: int) -> tuple[dict[str, Any], float]:
        v = fhir_versions
        row = conn.execute(select(v).where(v.c.type == rtype, v.c.id == rid, v.c.version == version)
                           ).mappings().first()
        if row is None:
            raise FhirError(404, "not-found", f"{rtype}/{rid} has no version {version}")
        if row["blob_id"] is None:
            raise FhirError(410, "deleted", f"version {version} of {rtype}/{rid} is a deletion")
        return self.body(conn, rtype, rid, version, row["blob_id"]), row["last_updated"]

    def has_version(self, conn: Connection, rtype: str, rid: str, version: int) -> bool:
        """Whether that version exists and is not a deletion (a versioned reference's target)."""
        v = fhir_versions
        blob = conn.execute(select(v.c.blob_id).where(v.c.type == rtype, v.c.id == rid, v.c.version == version)
                            ).first()
        return blob is not None and blob[0] is not None

    # -- writes ----------------------------------------------------------
    def new_id(self) -> str:
        return uuid.uuid4().hex

    def data_of(self, conn: Connection, rtype: str, rid: str, version: int) -> binary.StoredData | None:
        """Where a Binary version's bytes are (None: not a data type, or a Binary without data)."""
        return binary.stored(conn, rtype, rid, version) if rtype in DATA_TYPES else None

    def write(self, conn: Connection, rtype: str, rid: str | None, resource: dict[str, Any], *,
              if_match: str | None = None, message_id: str | None = None, method: str = "PUT",
              data: binary.SealedData | None = None) -> Written:
        """Create (``rid`` None or unknown) or update; checks If-Match before writing anything.

        A Binary's bytes come either as ``data`` (sealed already, by the listener's raw upload)
        or in the resource's ``data`` element; either way they are stored apart from the JSON."""
        if rid is None:
            rid, method = self.new_id(), "POST"
        row = self.current(conn, rtype, rid)
        check_if_match(if_match, row, f"{rtype}/{rid}")
        body = dict(resource)
        body["id"] = rid
        if rtype in DATA_TYPES and "data" in body:
            raw = binary.decode_data(body.pop("data"), f"{rtype}.data")
            data = binary.seal_pieces(self.store, [raw], binary.data_aad(rtype, rid), self.hash_key)
            del raw
        if rtype in binary.ATTACHMENTS:
            body = self._externalise(conn, rtype, rid, body, message_id)
        if row is not None and not row.deleted and row.blob_id is not None:
            current = self.body(conn, rtype, rid, row.version, row.blob_id)
            old = self.data_of(conn, rtype, rid, row.version)
            same_data = (old.digest if old else None) == (data.digest if data else None)
            if _without_meta(current) == _without_meta(body) and same_data:  # no-op update: no new version
                if data is not None and data.file_written:
                    self.store.delete_blob_files([data.blob_id])
                return Written(rtype, rid, row.version, row.last_updated, False, current, changed=False)
        version = 1 if row is None else row.version + 1
        now = round(time.time(), 3)
        meta = dict(body.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = iso_instant(now)
        body["meta"] = meta
        body = {"resourceType": rtype, **{k: v for k, v in body.items() if k != "resourceType"}}
        doc = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        blob_id = self.store.put_blob(conn, doc, aad=blob_aad(rtype, rid, version))
        created = row is None or row.deleted
        pk = self._set_current(conn, row, rtype, rid, version, now, blob_id)
        self._add_version(conn, pk, rtype, rid, version, now, method, blob_id, message_id)
        if data is not None:
            binary.record(conn, self.store, rtype, rid, version, str(body.get("contentType") or ""), data)
        conn.execute(delete(fhir_index).where(fhir_index.c.rid == pk))
        entries = index_entries(body, self.hash_key)
        if entries:
            conn.execute(insert(fhir_index), [{"rid": pk, "type": rtype, **e} for e in entries])
        log.debug("fhir.stored", type=rtype, version=version)
        return Written(rtype, rid, version, now, created, body)

    def _externalise(self, conn: Connection, rtype: str, rid: str, body: dict[str, Any],
                     message_id: str | None) -> dict[str, Any]:
        """Large inline attachment ``data`` (``binary.ATTACHMENTS``) becomes a Binary and the
        attachment its ``url``.

        So a 50 MiB document sent inline is stored like one sent as a Binary: bytes in a blob of
        their own, the resource JSON small, the content streamed from ``Binary/{id}``. The
        Binary's id is a keyed hash of the resource, the position and the bytes, so the same
        resource sent again names the same Binary (a no-op) and changes nothing."""
        big = [(i, att) for i, att in binary.attachments(rtype, body)
               if len(str(att.get("data") or "")) > EXTERNAL_DATA_MIN]
        if not big:
            return body
        replaced: dict[int, dict[str, Any]] = {}
        for i, att in big:
            where = binary.attachment_path(rtype, i)
            raw = binary.decode_data(att["data"], where)
            digest = hmac.new(self.hash_key, f"{rtype}/{rid}/{i}".encode() + hashlib.sha256(raw).digest(),
                              hashlib.sha256).hexdigest()[:40]
            bid = f"att-{digest}"
            ctype = str(att.get("contentType") or "application/octet-stream")
            sealed = binary.seal_pieces(self.store, [raw], binary.data_aad("Binary", bid), self.hash_key)
            self.write(conn, "Binary", bid, {"resourceType": "Binary", "contentType": ctype,
                                             "securityContext": {"reference": f"{rtype}/{rid}"}},
                       message_id=message_id, data=sealed)
            new_att = {k: v for k, v in att.items() if k != "data"}
            new_att["url"] = f"Binary/{bid}"
            new_att.setdefault("size", len(raw))
            replaced[i] = new_att
        return binary.with_attachments(rtype, body, replaced)

    def delete(self, conn: Connection, rtype: str, rid: str, *, if_match: str | None = None,
               message_id: str | None = None) -> Written:
        """Delete (a new version without a body); checks If-Match on the row it deletes, inside
        the write's transaction, as ``write`` does."""
        row = self.current(conn, rtype, rid)
        if row is None:
            raise FhirError(404, "not-found", f"{rtype}/{rid} is not known")
        check_if_match(if_match, row, f"{rtype}/{rid}")
        if row.deleted:
            return Written(rtype, rid, row.version, row.last_updated, False, None, changed=False)
        now = round(time.time(), 3)
        version = row.version + 1
        self._set_current(conn, row, rtype, rid, version, now, None)
        self._add_version(conn, row.rid, rtype, rid, version, now, "DELETE", None, message_id)
        conn.execute(delete(fhir_index).where(fhir_index.c.rid == row.rid))
        return Written(rtype, rid, version, now, False, None)

    def _set_current(self, conn: Connection, row: Row | None, rtype: str, rid: str, version: int,
                     now: float, blob_id: str | None) -> int:
        r = fhir_resources
        values = {"version": version, "last_updated": now, "deleted": int(blob_id is None), "blob_id": blob_id}
        if row is None:
            res = conn.execute(insert(r).values(type=rtype, id=rid, **values))
            return int(res.inserted_primary_key[0])
        # Optimistic: a concurrent writer (another transaction) makes this match nothing.
        res = conn.execute(update(r).where(r.c.rid == row.rid, r.c.version == row.version).values(**values))
        if res.rowcount != 1:
            raise FhirError(409, "conflict", f"{rtype}/{rid} was changed concurrently; retry")
        return row.rid

    @staticmethod
    def _add_version(conn: Connection, pk: int, rtype: str, rid: str, version: int, now: float,
                     method: str, blob_id: str | None, message_id: str | None) -> None:
        conn.execute(insert(fhir_versions).values(
            rid=pk, type=rtype, id=rid, version=version, last_updated=now, method=method,
            blob_id=blob_id, message_id=message_id))


def _without_meta(resource: dict[str, Any]) -> dict[str, Any]:
    """The resource without what the server sets (versionId, lastUpdated), for no-op detection."""
    out = {k: v for k, v in resource.items() if k not in ("meta", "resourceType")}
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    if meta:
        out["meta"] = meta
    return out
