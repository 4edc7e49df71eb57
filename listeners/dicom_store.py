"""The Storage SCP: C-STORE answered 0x0000 only once the instance and its index rows commit.

The data set is kept exactly as the peer encoded it (file meta + the received
bytes); only the few attributes the index needs are read, never the pixel data.
Every check that can fail runs before anything touches the store, and UIDs never
become file names (the blob store names files after ciphertext hashes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from pydicom.dataset import Dataset
from sqlalchemy import Connection

from engine.envelope import Envelope
from engine.store import dicom_index as idx
from listeners.dicom_status import STORE

if TYPE_CHECKING:
    from engine.context import ComponentContext

log = structlog.get_logger()

UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")


def valid_uid(value: Any) -> bool:
    """PS3.5 9.1: digits and dots, at most 64 characters (leading zeros tolerated, as peers send them)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and UID_RE.fullmatch(value) is not None


def failure(name: str, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = STORE[name].code
    ds.ErrorComment = comment[:64]
    return ds


def peer_of(event: Any) -> str:
    r = event.assoc.requestor
    return f"{r.ae_title}@{r.address}:{r.port}"


class StoreSCP:
    """EVT_C_STORE handler bound to one channel; one instance per listener."""

    def __init__(self, ctx: ComponentContext, *, ae_title: str, replace: bool) -> None:
        self.ctx = ctx
        self.ae_title = ae_title
        self.replace = replace
        self._hkey = ctx.keyring.hmac_key(idx.HMAC_KEY_NAME)

    def __call__(self, event: Any) -> int | Dataset:
        """The one error boundary: any exception is a failure status, never success."""
        try:
            return self.store(event)
        except Exception as e:
            log.error("dicom.store_failed", channel=self.ctx.channel, error=type(e).__name__,
                      detail=str(e)[:200])
            return failure("out_of_resources", "internal error, not stored")

    def _check(self, event: Any) -> tuple[bytes, memoryview, dict[str, Any]] | Dataset:
        req = event.request
        sop_class, sop_uid = req.AffectedSOPClassUID, req.AffectedSOPInstanceUID
        if not valid_uid(str(sop_uid or "")) or not valid_uid(str(sop_class or "")):
            return failure("mismatch", "invalid Affected SOP Class/Instance UID")
        part10 = event.encoded_dataset(include_meta=True)
        meta_end = 144 + int.from_bytes(part10[140:144], "little")
        dataset = memoryview(part10)[meta_end:]
        try:
            try:  # the data set alone, in the negotiated transfer syntax (no second file-meta parse)
                ds = idx.read_index_data_set(dataset, str(event.context.transfer_syntax))
            except ValueError:  # deflated or unknown transfer syntax: the Part-10 reader inflates
                ds = idx.read_index_dataset(part10)
            attrs = idx.extract(ds)
        except Exception as e:
            log.info("dicom.store_undecodable", channel=self.ctx.channel, error=type(e).__name__)
            return failure("cannot_understand", "data set cannot be decoded")
        im, st, se = attrs["IMAGE"], attrs["STUDY"], attrs["SERIES"]
        if im.get("SOPInstanceUID") != str(sop_uid) or im.get("SOPClassUID") != str(sop_class):
            return failure("mismatch", "SOP Class/Instance UID differ from the command")
        if not valid_uid(st.get("StudyInstanceUID")) or not valid_uid(se.get("SeriesInstanceUID")):
            return failure("mismatch", "Study/Series Instance UID missing or invalid")
        return part10, dataset, attrs

    def store(self, event: Any) -> int | Dataset:
        checked = self._check(event)
        if isinstance(checked, Dataset):
            return checked
        part10, dataset, attrs = checked
        ts = str(event.context.transfer_syntax)
        sop_uid = attrs["IMAGE"]["SOPInstanceUID"]
        digest = hashlib.sha256(dataset).hexdigest()
        channel = self.ctx.channel
        with self.ctx.store.engine.connect() as conn:
            existing = idx.existing_instance(conn, sop_uid)
        if existing is not None and (not self.replace or existing["digest"] == digest):
            log.info("dicom.store_duplicate", channel=channel, message_id=existing["message_id"])
            return STORE["success"].code
        requestor = event.assoc.requestor
        headers = {
            "SOPClassUID": attrs["IMAGE"]["SOPClassUID"], "SOPInstanceUID": sop_uid,
            "StudyInstanceUID": attrs["STUDY"]["StudyInstanceUID"],
            "SeriesInstanceUID": attrs["SERIES"]["SeriesInstanceUID"],
            "Modality": str(attrs["SERIES"].get("Modality", "")), "TransferSyntaxUID": ts,
            "CallingAETitle": str(requestor.ae_title).strip(), "CalledAETitle": self.ae_title,
        }
        env = Envelope(channel=channel, kind="dicom", payload=part10, headers=headers, peer=peer_of(event))
        dedupe = sop_uid if not self.replace else f"{sop_uid}|{digest[:32]}"
        intake = self.ctx.intake
        if intake is None:
            return failure("out_of_resources", "no intake")
        outcome = intake.submit_blocking(env, dedupe_key=dedupe, tx_hook=self._hook(attrs, ts, digest, len(dataset)))
        if outcome.ok:
            log.info("dicom.stored", channel=channel, message_id=outcome.message_id, status=outcome.status,
                     index=outcome.result, routes=len(outcome.routes))
            return STORE["success"].code
        log.warning("dicom.store_refused", channel=channel, message_id=env.id, status=outcome.status,
                    error=outcome.error)
        return failure("out_of_resources", "not stored: " + (outcome.error or outcome.status))

    def _hook(self, attrs: dict[str, Any], ts: str, digest: str, size: int) -> Callable[[Connection, Envelope], str]:
        store, hkey, replace = self.ctx.store, self._hkey, self.replace

        def index_rows(conn: Connection, env: Envelope) -> str:
            # Audit: intake writes the message.receive row (calling AE, SOP class and study UID in
            # its headers) in this same transaction; a second row per instance would only repeat it.
            return idx.index_instance(conn, store, hkey, attrs, message_id=env.id, transfer_syntax=ts,
                                      digest=digest, size=size, channel=env.channel, replace=replace)

        return index_rows
