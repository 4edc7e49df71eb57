"""Storage Commitment Push Model SCP (PS3.4 J.3): N-ACTION in, N-EVENT-REPORT out.

A modality that has sent its images asks, with N-ACTION (Action Type 1, a Transaction UID and
the instances it sent), whether the archive takes responsibility for them. The request is
checked and answered at once (PS3.4 J.3.2.1.1), and the result follows as an N-EVENT-REPORT
(Event Type 1: all committed, 2: some failed) listing, per instance, whether it is durably
archived. "Durably archived" means: its index row is committed (which happens only with the
message that holds it, after the fsync) *and* its stored bytes open now (the blob exists and
passes the AES-GCM check, so a file lost or damaged since is not promised). Failures carry
their reason (0x0112 not in the archive, 0x0110 stored bytes unreadable, 0x0119 stored under
another SOP class).

The result is computed on a worker thread and sent on the requester's association while it
is open (pynetdicom pauses the association's reactor for it, after the N-ACTION response is
out), otherwise on a new association to the AE configured for the requester's title in
``storage_commitment.peers``, proposing the SCP role (SCP/SCU Role Selection, PS3.4 J.3.3), with
bounded retries. Both the request and the result are audited, with counts and UIDs, never PHI.

Not kept across a restart: a result not delivered when the engine stops is not sent later;
the modality asks again after its own timeout, as PS3.4 J.3.3 lets it.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from pydicom import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.presentation import build_context, build_role

from engine.store.dicom import index as idx
from listeners.dicom_contexts import QUERY_TRANSFER_SYNTAXES, STORAGE_COMMITMENT
from listeners.dicom_dimse import valid_uid
from listeners.dicom_status import COMMIT_ACTION, COMMIT_RESULT

if TYPE_CHECKING:
    from engine.context import ComponentContext

log = structlog.get_logger()

COMMIT_CLASS = STORAGE_COMMITMENT[0]
# PS3.4 J.3.2: the one well-known SOP Instance of the Storage Commitment Push Model.
COMMIT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMIT = 1  # Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # Event Type IDs
MAX_PENDING = 64  # requests waiting for their result at once; more are refused (0x0213)
RELEASE_GRACE = 0.3  # seconds to see whether the requester releases before answering on its association
SAME_ASSOCIATION_TIMEOUT = 10.0  # seconds to wait for the N-EVENT-REPORT response there


@dataclass
class Request:
    transaction_uid: str
    refs: list[tuple[str, str]]  # (SOP Class UID, SOP Instance UID)
    calling_aet: str
    peer: str
    assoc: Any
    done: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str, int]] = field(default_factory=list)


def read_request(info: Dataset) -> tuple[str, list[tuple[str, str]]] | str:
    """(Transaction UID, referenced instances) of an N-ACTION, or what is wrong with it."""
    tx = str(info.get("TransactionUID", "") or "").strip()
    seq = info.get("ReferencedSOPSequence")
    if not tx or seq is None:
        return "missing"
    if not valid_uid(tx):
        return "invalid_value"
    refs = []
    for item in seq:
        cls = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        uid = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not (valid_uid(cls) and valid_uid(uid)):
            return "invalid_value"
        refs.append((cls, uid))
    return tx, refs


def check_instances(ctx: ComponentContext, refs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]],
                                                                              list[tuple[str, str, int]]]:
    """Split ``refs`` into committed and failed (with the PS3.4 J.3.2.1.2 Failure Reason)."""
    done: list[tuple[str, str]] = []
    failed: list[tuple[str, str, int]] = []
    with ctx.store.engine.connect() as conn:
        for cls, uid in refs:
            row = idx.existing_instance(conn, uid)
            if row is None:
                failed.append((cls, uid, COMMIT_RESULT["no_such_instance"].code))
                continue
            if row["sop_class_uid"] != cls:
                failed.append((cls, uid, COMMIT_RESULT["class_conflict"].code))
                continue
            ref = idx.InstanceRef(row["sop_uid"], row["sop_class_uid"], row["transfer_syntax"], row["message_id"],
                                  row["blob_id"])
            try:
                idx.load_instance(conn, ctx.store, ref)  # decrypts and checks: the bytes are there and whole
            except Exception as e:
                log.error("dicom.commitment_unreadable", channel=ctx.channel, sop_uid=uid, error=type(e).__name__)
                failed.append((cls, uid, COMMIT_RESULT["processing"].code))
                continue
            done.append((cls, uid))
    return done, failed


def event_information(req: Request, retrieve_aet: str) -> Dataset:
    """The N-EVENT-REPORT Event Information of PS3.4 Table J.3-2."""
    ds = Dataset()
    ds.TransactionUID = req.transaction_uid
    ds.RetrieveAETitle = retrieve_aet
    ok = []
    for cls, uid in req.done:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        ok.append(item)
    if ok:
        ds.ReferencedSOPSequence = Sequence(ok)
    bad = []
    for cls, uid, reason in req.failed:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        item.FailureReason = reason
        bad.append(item)
    if bad:
        ds.FailedSOPSequence = Sequence(bad)
    return ds


class CommitmentSCP:
    """The EVT_N_ACTION handler of one DICOM listener and the senders of its results."""

    def __init__(self, ctx: ComponentContext, config: Any, *, ae: Any, ae_title: str) -> None:
        self.ctx = ctx
        self.config = config
        self.ae_title = ae_title
        self.listener_ae = ae
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="commitment")
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- N-ACTION ------------------------------------------------------------------------
    def on_n_action(self, event: Any) -> tuple[int, None]:
        r = event.assoc.requestor
        aet, peer = str(r.ae_title).strip(), f"{r.address}:{r.port}"
        try:
            if event.request.ActionTypeID != REQUEST_COMMIT:
                return self._refuse(aet, peer, "no_such_action", "")
            try:
                info = event.action_information
                got = read_request(info)
            except Exception:
                return self._refuse(aet, peer, "processing", "")
            if isinstance(got, str):
                return self._refuse(aet, peer, got, "")
            tx, refs = got
            if len(refs) > self.config.max_instances:
                return self._refuse(aet, peer, "resources", tx)
            with self._lock:
                if self._pending >= MAX_PENDING or self._closed.is_set():
                    return self._refuse(aet, peer, "resources", tx)
                self._pending += 1
            req = Request(tx, refs, aet, peer, event.assoc)
            self.ctx.audit.record("dicom.commitment.request", actor=aet, peer=peer, channel=self.ctx.channel,
                                  entity={"transaction_uid": tx, "instances": len(refs)})
            log.info("dicom.commitment_requested", channel=self.ctx.channel, transaction_uid=tx,
                     instances=len(refs), calling_aet=aet)
            try:
                self._pool.submit(self._result, req)
            except RuntimeError:  # shutting down
                with self._lock:
                    self._pending -= 1
                return self._refuse(aet, peer, "resources", tx)
            return COMMIT_ACTION["success"].code, None
        except Exception as e:  # the boundary: a failure status, never a traceback
            log.error("dicom.commitment_failed", channel=self.ctx.channel, error=type(e).__name__)
            return COMMIT_ACTION["processing"].code, None

    def _refuse(self, aet: str, peer: str, key: str, tx: str) -> tuple[int, None]:
        status = COMMIT_ACTION[key]
        log.warning("dicom.commitment_refused", channel=self.ctx.channel, calling_aet=aet,
                    status=f"0x{status.code:04X}", reason=status.when)
        self.ctx.audit.record("dicom.commitment.request", outcome="failure", actor=aet, peer=peer,
                              channel=self.ctx.channel, entity={"transaction_uid": tx, "status": status.code},
                              detail=status.meaning)
        return status.code, None

    # -- the result ------------------------------------------------------------------------
    def _result(self, req: Request) -> None:
        try:
            req.done, req.failed = check_instances(self.ctx, req.refs)
            info = event_information(req, self.ae_title)
            event_type = SOME_FAILED if req.failed else ALL_COMMITTED
            via = self._deliver(req, info, event_type)
            self.ctx.audit.record(
                "dicom.commitment.report", outcome="success" if via != "undelivered" else "failure",
                actor=req.calling_aet, peer=req.peer, channel=self.ctx.channel,
                entity={"transaction_uid": req.transaction_uid, "committed": len(req.done),
                        "failed": len(req.failed), "reasons": sorted({f"0x{r:04X}" for _, _, r in req.failed}),
                        "delivered": via})
            log.info("dicom.commitment_reported", channel=self.ctx.channel, transaction_uid=req.transaction_uid,
                     committed=len(req.done), failed=len(req.failed), delivered=via, calling_aet=req.calling_aet)
        except Exception as e:
            log.error("dicom.commitment_report_failed", channel=self.ctx.channel, error=type(e).__name__,
                      transaction_uid=req.transaction_uid)
        finally:
            with self._lock:
                self._pending -= 1
            req.assoc = None

    def _deliver(self, req: Request, info: Dataset, event_type: int) -> str:
        """Same association when open, else a new one to the requester's configured AE, with retries."""
        assoc = req.assoc
        if self.config.same_association and assoc is not None and not self._releasing(assoc):
            previous = assoc.dimse_timeout
            assoc.dimse_timeout = min(previous or SAME_ASSOCIATION_TIMEOUT, SAME_ASSOCIATION_TIMEOUT)
            try:
                if _sent(assoc.send_n_event_report(info, event_type, COMMIT_CLASS, COMMIT_INSTANCE)):
                    return "same_association"
            except Exception as e:  # released or aborted meanwhile: a new association instead
                log.info("dicom.commitment_same_association_gone", channel=self.ctx.channel, error=type(e).__name__)
            finally:
                assoc.dimse_timeout = previous
            log.info("dicom.commitment_same_association_failed", channel=self.ctx.channel,
                     transaction_uid=req.transaction_uid)
        dest = self.config.peers.get(req.calling_aet)
        if dest is None:
            log.warning("dicom.commitment_no_peer", channel=self.ctx.channel, calling_aet=req.calling_aet,
                        transaction_uid=req.transaction_uid,
                        note="add the AE title to storage_commitment.peers to send results on a new association")
            return "undelivered"
        for attempt in range(self.config.retries + 1):
            if attempt and self._closed.wait(self.config.retry_delay):
                break
            try:
                if self._send_new(req, dest, info, event_type):
                    return "new_association"
            except Exception as e:
                log.warning("dicom.commitment_send_failed", channel=self.ctx.channel, error=type(e).__name__,
                            attempt=attempt + 1)
        return "undelivered"

    def _releasing(self, assoc: Any) -> bool:
        """Whether the requester has ended (or is ending) its association: many modalities release
        right after the N-ACTION response and expect the result on a new one. Looked at for a
        short grace period, by peeking at the next PDU without taking it (the association's own
        reactor answers the A-RELEASE-RQ)."""
        deadline = time.monotonic() + RELEASE_GRACE
        while True:
            if not assoc.is_established or isinstance(assoc.dul.peek_next_pdu(), A_RELEASE):
                return True
            if time.monotonic() >= deadline or self._closed.wait(0.02):
                return not assoc.is_established

    def _send_new(self, req: Request, dest: Any, info: Dataset, event_type: int) -> bool:
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.maximum_pdu_size = dest.max_pdu
        kwargs: dict[str, Any] = {
            "ae_title": req.calling_aet,
            "contexts": [build_context(COMMIT_CLASS, list(QUERY_TRANSFER_SYNTAXES))],
            "ext_neg": [build_role(COMMIT_CLASS, scu_role=False, scp_role=True)],
            "max_pdu": dest.max_pdu,
        }
        if dest.tls is not None:
            from engine.security.tls import client_context

            kwargs["tls_args"] = (client_context(dest.tls), dest.tls.server_name or dest.host)
        assoc = ae.associate(dest.host, dest.port, **kwargs)
        if not assoc.is_established:
            return False
        try:
            return _sent(assoc.send_n_event_report(info, event_type, COMMIT_CLASS, COMMIT_INSTANCE))
        finally:
            if assoc.is_established:
                assoc.release()


def _sent(answer: Any) -> bool:
    """The peer answered the N-EVENT-REPORT with success (pynetdicom gives (status, reply); an
    empty status Dataset means no answer)."""
    status = answer[0] if isinstance(answer, tuple) else answer
    code = getattr(status, "Status", None)
    return code is not None and (code == 0x0000 or 0xB000 <= code <= 0xBFFF)

