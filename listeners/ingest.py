"""Bytes that arrive whole (a file, an HTTP body) into intake, by what they are.

The file and http sources hand a payload here; what it is comes from its content, never
from a file name or an extension:

- DICOM Part 10 (``DICM`` at offset 128) goes through the Storage SCP of the DICOM
  listener (listeners/dicom_store.py): the same checks and the same indexing tx_hook as a
  C-STORE, so a file dropped in a folder and an instance sent by a modality are one thing
  in the archive (a SOP Instance UID seen before is a duplicate, at any age);
- FHIR JSON (a resource, or a transaction/batch Bundle) goes through the FHIR store's
  write operations (engine/store/fhir/bundle.py), the same ones the FHIR listener's
  create, update and transaction use, inside intake's transaction; or, with
  ``fhir: route``, is only stored as a message and routed;
- HL7 v2 (one message, several, an FHS/BHS batch, MLLP-framed) goes through
  listeners/hl7_receive.py.

``marking`` adds a source's own mark (engine/store/sources.py) to any of these hooks: an
item committed once is answered as a duplicate of what it became when it is submitted
again after a crash.
"""

from __future__ import annotations

import asyncio
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from pydantic import Field
from sqlalchemy import Connection

from engine.components import ComponentConfig
from engine.context import ComponentContext
from engine.envelope import KINDS, Envelope, Kind
from engine.hl7.batch import is_batch
from engine.hl7.message import wide_encoding
from engine.hl7.mllp import Frame, FrameParser
from engine.intake import Duplicate, TxHook
from engine.store import sources
from engine.store.fhir import jsontext
from engine.store.fhir.bundle import (
    EntryResult,
    Op,
    check_op,
    op_from_entry,
    parse_batch,
    parse_bundle,
    precheck,
    prepare,
    run_batch,
    run_transaction,
)
from engine.store.fhir.params import FhirError, operation_outcome
from engine.store.fhir.resources import FhirStore

log = structlog.get_logger()

FhirMode = Literal["create", "route"]
_HAS_MSH = re.compile(rb"(?:^|[\r\n])(?:\xef\xbb\xbf)?[ \t\r\n]*MSH[^A-Za-z0-9\r\n]")
JSON_DEPTH = 64
PARSE_COST_PER_BYTE = 16  # as the FHIR listener: parsed objects at most 16x the body


class IngestConfig(ComponentConfig):
    """The keys of a source whose payloads come here (file, http): which kinds it takes and how
    each is filed. A source states only what differs: what happens to a refused kind (its
    ``accept`` description) and the Calling AE Title it records (``field_of``)."""

    accept: list[Kind] = Field(default_factory=lambda: list(KINDS), min_length=1,
                               description="kinds taken (hl7v2, dicom, fhir); others are refused")
    fhir: FhirMode = Field(
        "create", description="FHIR JSON: create = written to medrelay's FHIR store as a REST create/update/"
        "transaction would be (and routed), route = only stored as a message and routed")
    ae_title: str = Field("MEDRELAY", min_length=1, max_length=16,
                          description="DICOM: the Called AE Title instances are filed under")
    calling_ae_title: str = Field(min_length=1, max_length=16,
                                  description="DICOM: the Calling AE Title recorded for them")
    accept_versions: list[str] = Field(default_factory=list, description="HL7: MSH-12 versions taken (empty: all)")
    accept_processing_ids: list[str] = Field(default_factory=list,
                                             description="HL7: MSH-11 processing ids taken (empty: any)")

    @property
    def message_kind(self) -> str | None:
        """The one kind of message this source gives (for `medrelay check`), when ``accept`` has one."""
        return self.accept[0] if len(self.accept) == 1 else None


def detect(data: bytes) -> Kind | None:
    """What a payload is, from its bytes: dicom, fhir (JSON), hl7v2, or None."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    body = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if body[:1] == b"{":
        return "fhir"
    if body[:1] == b"\x0b" or is_batch(data) or wide_encoding(data) is not None or _HAS_MSH.search(data[:65536]):
        return "hl7v2"
    return None


def describe(data: bytes) -> str:
    """A few words on a payload that is none of the three (for an error report; no content)."""
    if not data:
        return "empty"
    body = data.lstrip(b"\xef\xbb\xbf \t\r\n")
    if body[:1] == b"[":
        return "JSON that is not an object (FHIR JSON is one resource or Bundle)"
    if body[:1] == b"<":
        return "XML (FHIR XML is not taken: use JSON)"
    try:
        data[:65536].decode("utf-8")
    except UnicodeDecodeError:
        return "binary, not DICOM Part 10 (no DICM prefix at offset 128)"
    return "text without an MSH segment"


def unframe(data: bytes) -> bytes:
    """An MLLP-framed dump (``<VT>msg<FS><CR>`` ...) as plain messages, one after another."""
    if not data.lstrip(b" \t\r\n").startswith(b"\x0b"):
        return data
    frames = [ev.payload for ev in FrameParser(len(data) + 1).feed(data) if isinstance(ev, Frame)]
    return b"\r".join(f.rstrip(b"\r\n") + b"\r" for f in frames) if frames else data


def marking(channel: str, key: str | None, inner: TxHook | None = None) -> TxHook | None:
    """``inner`` (may be None) preceded by the source's mark: a marked key is a ``Duplicate``."""
    if key is None:
        return inner

    def hook(conn: Connection, env: Envelope) -> Any:
        mid = sources.marked(conn, channel, key)
        if mid is not None:
            return Duplicate(mid)
        result = inner(conn, env) if inner is not None else None
        sources.mark(conn, channel, key, result.message_id if isinstance(result, Duplicate) else env.id)
        return result

    return hook


# -- DICOM -------------------------------------------------------------------------
@dataclass(frozen=True)
class DicomAnswer:
    ok: bool
    status: int  # the PS3.4 C-STORE status the Storage SCP gave
    comment: str | None = None
    retryable: bool = False


class DicomIngest:
    """A Part 10 file through the DICOM listener's Storage SCP (same checks, same index hook)."""

    def __init__(self, ctx: ComponentContext, *, ae_title: str, calling_aet: str) -> None:
        from listeners.dicom_store import StoreSCP

        self.ctx = ctx
        self.calling_aet = calling_aet
        self.scp = StoreSCP(ctx, ae_title=ae_title, replace=False)

    def request(self, data: bytes, peer: str) -> Any:
        """The C-STORE request a file stands for: SOP class/instance and transfer syntax from its meta,
        or from the data set where the meta names other UIDs (``data_set_uids``: the file is then
        stored with a file meta written anew, as STOW-RS does)."""
        from pydicom.filereader import _read_file_meta_info, read_preamble

        from listeners.dicom_store import StoreRequest, data_set_uids, file_meta

        fp = io.BytesIO(data)
        read_preamble(fp, False)
        info = _read_file_meta_info(fp)
        meta = {k: str(info.get(k, "") or "").strip("\x00 ") for k in
                ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")}
        end = fp.tell()
        sop_class, sop_uid, ts = data_set_uids(meta, memoryview(data)[end:]) if meta["TransferSyntaxUID"] else (
            meta["MediaStorageSOPClassUID"], meta["MediaStorageSOPInstanceUID"], "")
        if (sop_class, sop_uid) != (meta["MediaStorageSOPClassUID"], meta["MediaStorageSOPInstanceUID"]):
            head = file_meta(sop_class, sop_uid, ts)
            data, end = head + memoryview(data)[end:], len(head)
        return StoreRequest(sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=ts,
                            calling_aet=self.calling_aet, peer=peer, part10=data, meta_end=end)

    def store(self, data: bytes, peer: str) -> DicomAnswer:
        """Blocking (the Storage SCP's own path): run it in a thread."""
        from listeners.dicom_status import STORE

        try:
            req = self.request(data, peer)
        except Exception as e:
            log.info("file.dicom_meta_unreadable", channel=self.ctx.channel, error=type(e).__name__)
            return self.refuse(data, peer, "file meta information unreadable")
        if not req.transfer_syntax:
            return self.refuse(data, peer, "no Transfer Syntax UID in the file meta")
        status, comment = self.scp.handle(req)
        ok = status == STORE["success"].code or 0xB000 <= status <= 0xBFFF
        return DicomAnswer(ok, status, comment, retryable=status == STORE["out_of_resources"].code)

    def refuse(self, data: bytes, peer: str, reason: str) -> DicomAnswer:
        """A file refused before the Storage SCP (0xC000), logged and audited as the SCP refuses one (a
        failed ``message.receive`` through ``intake_check.refuse``, the same fields: the UIDs its file
        meta names where it can be read, "" otherwise). The audit row is queued, not waited on."""
        from engine.store.dicom import intake_check
        from listeners.dicom_status import STORE
        from listeners.dicom_store import StoreRequest

        sop_class, sop_uid, ts = (intake_check.uid_as_given(v) for v in intake_check.meta_uids(data))
        seen = StoreRequest(sop_class=sop_class, sop_uid=sop_uid, transfer_syntax=ts, calling_aet=self.calling_aet,
                            peer=peer, part10=b"", meta_end=0)
        code, comment = self.scp.refuse(seen, intake_check.refusal(STORE["cannot_understand"].code, reason))
        return DicomAnswer(False, code, comment)


# -- FHIR --------------------------------------------------------------------------
@dataclass
class FhirAnswer:
    """``status`` is an HTTP status (201 created, 200 updated or batch, 4xx/5xx refused)."""

    ok: bool
    status: int
    outcome: dict[str, Any] | None = None  # OperationOutcome when refused
    results: list[EntryResult] = field(default_factory=list)
    bundle_type: str | None = None
    message_id: str | None = None
    duplicate: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def retryable(self) -> bool:
        return not self.ok and self.status >= 500


class FhirIngest:
    """FHIR JSON into intake: applied to medrelay's FHIR store (``create``) or only routed."""

    def __init__(self, ctx: ComponentContext, *, mode: FhirMode = "create", max_bytes: int = 16 * 2**20) -> None:
        self.ctx = ctx
        self.mode = mode
        self.max_cost = PARSE_COST_PER_BYTE * max_bytes
        self.fs = FhirStore(ctx.store, ctx.keyring)

    async def submit(self, raw: bytes, peer: str, *, mark: str | None = None,
                     tx_hook: TxHook | None = None) -> FhirAnswer:
        """``mark``: the source's mark (a duplicate when present); ``tx_hook``: the source's own step in
        the same transaction (a database source's cursor), run before the FHIR store's write."""
        try:
            return await self._submit(raw, peer, mark, tx_hook)
        except FhirError as e:
            log.info("fhir.refused", channel=self.ctx.channel, status=e.status, code=e.code)
            return FhirAnswer(False, e.status, e.outcome(), headers=dict(e.headers or {}))

    async def _submit(self, raw: bytes, peer: str, mark: str | None, extra: TxHook | None) -> FhirAnswer:
        doc = await asyncio.to_thread(jsontext.loads, raw, max_depth=JSON_DEPTH, max_cost=self.max_cost)
        if not isinstance(doc, dict) or not isinstance(doc.get("resourceType"), str):
            raise FhirError(400, "invalid", "not a FHIR resource (a JSON object with resourceType)")
        if self.mode == "route":
            headers = {"resourceType": doc["resourceType"][:64], "interaction": "receive"}
            return await self._commit(raw, peer, headers, None, mark, None, extra)
        if doc["resourceType"] == "Bundle":
            btype, entries = parse_bundle(doc)
            headers = {"resourceType": "Bundle", "interaction": btype}
            if btype == "transaction":
                ops = [op_from_entry(e, i) for i, e in enumerate(entries)]
                await asyncio.to_thread(self._read_only, lambda conn: prepare(self.fs, conn, ops))
                return await self._commit(raw, peer, headers,
                                          lambda conn, mid: run_transaction(self.fs, conn, ops, message_id=mid),
                                          mark, btype, extra)
            parsed = await asyncio.to_thread(parse_batch, entries)
            return await self._commit(raw, peer, headers,
                                      lambda conn, mid: run_batch(self.fs, conn, parsed, message_id=mid), mark, btype,
                                      extra)
        rtype, rid = doc["resourceType"], doc.get("id")
        op = Op("PUT", rtype, rid, resource=doc) if isinstance(rid, str) and rid else Op("POST", rtype, resource=doc)
        if op.method == "POST":
            op.assigned_id = self.fs.new_id()
        await asyncio.to_thread(check_op, op)
        done = await asyncio.to_thread(self._read_only, lambda conn: precheck(self.fs, conn, op))
        if done is not None:
            return FhirAnswer(True, done.status, results=[done])
        headers = {"resourceType": rtype, "interaction": "update" if op.method == "PUT" else "create",
                   "id": op.id or op.assigned_id or ""}
        return await self._commit(raw, peer, headers,
                                  lambda conn, mid: run_transaction(self.fs, conn, [op], message_id=mid), mark, None,
                                  extra)

    def _read_only(self, fn: Callable[[Connection], Any]) -> Any:
        with self.ctx.store.engine.connect() as conn:
            return fn(conn)

    async def _commit(self, raw: bytes, peer: str, headers: dict[str, str],
                      apply: Callable[[Connection, str], list[EntryResult]] | None, mark: str | None,
                      btype: str | None, extra: TxHook | None = None) -> FhirAnswer:
        intake = self.ctx.intake
        if intake is None:
            raise FhirError(503, "transient", "this source has no intake")
        failure: dict[str, FhirError] = {}

        def applied(conn: Connection, env: Envelope) -> Any:
            if extra is not None:
                extra(conn, env)
            if apply is None:
                return []
            try:
                return apply(conn, env.id)
            except FhirError as e:
                failure["error"] = e
                raise

        env = Envelope(channel=self.ctx.channel, kind="fhir", payload=raw, headers=headers, peer=peer)
        outcome = await intake.submit(env, tx_hook=marking(self.ctx.channel, mark, applied))
        if outcome.ok:
            results = outcome.result if isinstance(outcome.result, list) else []
            log.info("fhir.accepted", channel=self.ctx.channel, message_id=outcome.message_id,
                     resource_type=headers["resourceType"], interaction=headers["interaction"],
                     duplicate=outcome.status == "duplicate")
            status = 200 if btype or outcome.status == "duplicate" or not results else results[0].status
            return FhirAnswer(True, status, results=results, bundle_type=btype, message_id=outcome.message_id,
                              duplicate=outcome.status == "duplicate")
        if "error" in failure:
            raise failure["error"]
        log.error("fhir.not_stored", channel=self.ctx.channel, message_id=env.id, status=outcome.status,
                  error=outcome.error)
        return FhirAnswer(False, 503, operation_outcome("fatal", "transient", "could not be stored; retry later"),
                          headers={"Retry-After": "5"})
