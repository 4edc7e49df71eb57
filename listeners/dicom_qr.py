"""Query/Retrieve SCP (C-FIND, C-MOVE, C-GET; Patient and Study Root) and Modality Worklist C-FIND.

Answers come from the archive index, never from opening files; retrieval reads the
encrypted stored instance and sends its data set byte-identical. Each handler has
one error boundary that turns an exception into the failure status of PS3.4 C.4.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from engine.store.dicom import index as idx
from listeners import dicom_match as m
from listeners.dicom_contexts import LEVELS_BY_MODEL, QUERY_TRANSFER_SYNTAXES, model_of
from listeners.dicom_status import FIND, GET, MOVE
from listeners.dicom_stored_stream import open_stored
from routes.dicom_scu import RawInstance, instance_from_part10, make_raw_aware
from transforms import dicom_codec as codec

if TYPE_CHECKING:
    from engine.context import ComponentContext

log = structlog.get_logger()

MAX_MATCHES = 65535  # Number of Remaining Sub-operations is US (PS3.7 C.4.2)


class BadIdentifier(Exception):
    """The identifier has no valid Query/Retrieve Level for the model: 0xA900."""


def _level(identifier: Dataset, model: str) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS_BY_MODEL[model]:
        raise BadIdentifier(level)
    return level


def _level_allows(keyword: str, level: str) -> bool:
    if keyword in idx.DERIVED:
        return idx.LEVELS.index(idx.DERIVED[keyword]) <= idx.LEVELS.index(level)
    for lv, attrs in idx.LEVEL_ATTRS.items():
        if keyword in attrs:
            return idx.LEVELS.index(lv) <= idx.LEVELS.index(level)
    return True


class QueryRetrieve:
    """EVT_C_FIND / EVT_C_MOVE / EVT_C_GET handlers of one listener."""

    def __init__(self, ctx: ComponentContext, *, ae_title: str, fold_pn: bool,
                 move_destinations: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.ae_title = ae_title
        self.fold_pn = fold_pn
        self.move_destinations = move_destinations
        self._hkey = ctx.keyring.hmac_key(idx.HMAC_KEY_NAME)

    # -- matching --------------------------------------------------------
    def _select(self, conn: Any, level: str, keys: list[m.Key], *, decrypt: bool = True
                ) -> tuple[idx.Candidates, list[tuple[int, dict[str, Any]]]]:
        usable = [k for k in keys if _level_allows(k.keyword, level)]
        cands = idx.Candidates(conn, self.ctx.store, level)
        m.narrow(cands, usable, self._hkey)
        out = []
        for pk, attrs in cands.rows(decrypt=decrypt):
            def derived(kw: str, pk: int = pk) -> Any:
                return cands.derived(pk, kw)

            if m.identifier_matches(attrs, usable, fold_pn=self.fold_pn, derived=derived):
                out.append((pk, attrs))
                if len(out) > MAX_MATCHES:
                    break
        return cands, out

    def find_responses(self, identifier: Dataset, model: str) -> list[Dataset]:
        level = _level(identifier, model)
        keys = m.keys_of(identifier)
        extra = {"RetrieveAETitle": self.ae_title, "InstanceAvailability": "ONLINE"}
        out = []
        with self.ctx.store.engine.connect() as conn:
            cands, matches = self._select(conn, level, keys)
            for pk, attrs in matches:

                def derived(kw: str, pk: int = pk) -> Any:
                    return cands.derived(pk, kw)

                out.append(m.response(attrs, keys, level, derived, extra))
        return out

    def instances(self, identifier: Dataset, model: str) -> list[idx.InstanceRef]:
        level = _level(identifier, model)
        keys = m.keys_of(identifier)
        needs_phi = any(not k.universal and k.keyword not in idx.CLEAR_KEYWORDS
                        and k.keyword not in m.NOT_MATCHING for k in keys)
        with self.ctx.store.engine.connect() as conn:
            _cands, matches = self._select(conn, level, keys, decrypt=needs_phi)
            return idx.instances_below(conn, level, [pk for pk, _a in matches])

    def _load(self, ref: idx.InstanceRef) -> RawInstance:
        """The instance as it goes out: a large one (a chunk-sealed blob) from its chunks as they
        are decrypted (listeners/dicom_stored_stream.py), the others whole as stored."""
        store = self.ctx.store
        with store.engine.connect() as conn:
            streamed = open_stored(conn, store, ref)
            if streamed is not None:
                return streamed
            data = idx.load_instance(conn, store, ref)
        return instance_from_part10(data, ref.sop_class_uid, ref.sop_uid)

    # -- C-FIND ------------------------------------------------------------
    def on_find(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        model = model_of(str(event.request.AffectedSOPClassUID))
        try:
            responses = self.find_responses(event.identifier, model)
        except BadIdentifier:
            yield FIND["mismatch"].code, None
            return
        except Exception as e:
            log.error("dicom.find_failed", channel=self.ctx.channel, error=type(e).__name__, detail=str(e)[:200])
            yield FIND["unable"].code, None
            return
        log.info("dicom.find", channel=self.ctx.channel, model=model, matches=len(responses),
                 calling_aet=event.assoc.requestor.ae_title)
        self._audit(event, "dicom.find", {"model": model, "matches": len(responses),
                                          "level": str(event.identifier.get("QueryRetrieveLevel", ""))})
        for ds in responses:
            if event.is_cancelled:
                yield FIND["cancel"].code, None
                return
            yield FIND["pending"].code, ds
        yield FIND["success"].code, None

    # -- Modality Worklist C-FIND -----------------------------------------
    def on_worklist(self, event: Any) -> Iterator[tuple[int, Dataset | None]]:
        try:
            mod = importlib.import_module("engine.store.dicom.worklist")
            matches = mod.find_worklist(self.ctx.store, event.identifier, case_insensitive_names=self.fold_pn)
        except ModuleNotFoundError:
            log.error("dicom.worklist_unavailable", channel=self.ctx.channel)
            yield FIND["unable"].code, None
            return
        except Exception as e:
            log.error("dicom.worklist_failed", channel=self.ctx.channel, error=type(e).__name__)
            yield FIND["unable"].code, None
            return
        self._audit(event, "dicom.worklist_find", {"matches": len(matches)})
        for ds in matches:
            if event.is_cancelled:
                yield FIND["cancel"].code, None
                return
            yield FIND["pending"].code, ds
        yield FIND["success"].code, None

    def _audit(self, event: Any, action: str, entity: dict[str, Any], outcome: str = "success") -> None:
        """Query and retrieve events for the audit trail (DICOM PS3.15 A.5: Query 110112,
        DICOM Instances Transferred 110104); who asked, from where, how much; no PHI."""
        r = event.assoc.requestor
        self.ctx.audit.record(action, outcome=outcome, actor=str(r.ae_title).strip(),
                              peer=f"{r.address}:{r.port}", channel=self.ctx.channel, entity=entity)

    # -- C-MOVE ------------------------------------------------------------
    def on_move(self, event: Any) -> Iterator[Any]:
        dest_aet = event.move_destination
        dest_aet = _printable(dest_aet.decode("ascii", "replace") if isinstance(dest_aet, bytes) else str(dest_aet))
        peer = self.move_destinations.get(dest_aet)
        if peer is None:
            log.warning("dicom.move_unknown_destination", channel=self.ctx.channel, destination=dest_aet,
                        calling_aet=str(event.assoc.requestor.ae_title).strip())
            self._audit(event, "dicom.move", {"destination": dest_aet}, outcome="failure")
            yield None, None
            return
        model = model_of(str(event.request.AffectedSOPClassUID))
        try:
            refs = self.instances(event.identifier, model)
        except BadIdentifier:
            refs, failed_status = [], MOVE["mismatch"].code
        except Exception as e:
            log.error("dicom.move_failed", channel=self.ctx.channel, error=type(e).__name__, detail=str(e)[:200])
            refs, failed_status = [], MOVE["out_of_resources_count"].code
        else:
            failed_status = 0
        tally = Tally(len(refs))
        # the tally rides along to the sub-association (DicomListener's AE.associate counts its C-STOREs)
        kwargs: dict[str, Any] = {"contexts": _store_contexts(refs), "max_pdu": peer.max_pdu, TALLY_KWARG: tally}
        if peer.tls is not None:
            from engine.security.tls import client_context

            kwargs["tls_args"] = (client_context(peer.tls), peer.tls.server_name or peer.host)
        yield peer.host, peer.port, kwargs
        final_status(event, MOVE)
        try:
            if failed_status:
                tally.refused = True
                yield 1
                yield failed_status, None
                return
            yield len(refs)
            yield from self._suboperations(event, refs, MOVE)
        finally:  # also when pynetdicom stops here (destination unreachable): the generator is closed
            self._retrieved(event, "dicom.move", tally, destination=dest_aet)

    # -- C-GET -------------------------------------------------------------
    def on_get(self, event: Any) -> Iterator[Any]:
        model = model_of(str(event.request.AffectedSOPClassUID))
        try:
            refs = self.instances(event.identifier, model)
        except BadIdentifier:
            yield 1
            yield GET["mismatch"].code, None
            return
        except Exception as e:
            log.error("dicom.get_failed", channel=self.ctx.channel, error=type(e).__name__, detail=str(e)[:200])
            yield 1
            yield GET["out_of_resources_count"].code, None
            return
        assoc = make_raw_aware(event.assoc)
        tally = Tally(len(refs))
        restore = count_stores(assoc, tally)
        final_status(event, GET)
        try:
            yield len(refs)
            yield from self._suboperations(event, refs, GET)
        finally:
            restore()
            self._retrieved(event, "dicom.get", tally)

    def _retrieved(self, event: Any, action: str, tally: Tally, **extra: Any) -> None:
        """One log line and audit event per C-MOVE / C-GET, with what was actually sent: a
        retrieve whose destination never answered is not reported as its matches."""
        counts = {"matched": tally.matched, "sent": tally.sent, "warnings": tally.warnings,
                  "failed": tally.failed()}
        log.info(action, channel=self.ctx.channel, **extra, **counts, outcome=tally.outcome())
        self._audit(event, action, {**extra, **counts},
                    outcome="success" if tally.outcome() in ("complete", "nothing matched") else "failure")

    def _suboperations(self, event: Any, refs: list[idx.InstanceRef],
                       table: Mapping[str, Any]) -> Iterator[tuple[int, Dataset | None]]:
        for ref in refs:
            if event.is_cancelled:
                yield table["cancel"].code, None
                return
            try:
                inst: Dataset = self._load(ref)
            except Exception as e:
                log.error("dicom.retrieve_load_failed", channel=self.ctx.channel, error=type(e).__name__)
                inst = Dataset()  # counted as a failed sub-operation by pynetdicom
                inst.SOPInstanceUID = ref.sop_uid
                inst.SOPClassUID = ref.sop_class_uid
            yield table["pending"].code, inst


TALLY_KWARG = "medrelay_tally"  # popped by DicomListener's AE.associate before pynetdicom sees it


@dataclass
class Tally:
    """The C-STORE sub-operations of one retrieve, counted from their responses."""

    matched: int
    sent: int = 0
    warnings: int = 0
    connected: bool = True  # C-MOVE: the association to the destination was established
    refused: bool = False  # identifier or index failure: no sub-operation was started

    def failed(self) -> int:
        """Refused by the peer, or never sent (destination unreachable, cancelled, aborted)."""
        return 0 if self.refused else self.matched - self.sent - self.warnings

    def outcome(self) -> str:
        if self.refused:
            return "refused"
        if not self.connected:
            return "destination unreachable"
        if self.matched == 0:
            return "nothing matched"
        done = self.sent + self.warnings
        return "complete" if done == self.matched else ("partial" if done else "failed")


def count_stores(assoc: Any, tally: Tally) -> Callable[[], None]:
    """Count the C-STOREs pynetdicom sends on ``assoc`` by their response status; returns
    the function that puts the previous ``send_c_store`` back (a C-GET association may
    carry several retrieves)."""
    previous = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        rsp = previous(dataset, *args, **kwargs)  # an exception: not sent, so not counted
        status = getattr(rsp, "Status", None)
        if status == 0x0000:
            tally.sent += 1
        elif status is not None and (0xB000 <= status <= 0xBFFF or status in (0x0001, 0x0107, 0x0116)):
            tally.warnings += 1  # stored by the peer, with a warning (PS3.4 B.2.3)
        return rsp

    assoc.send_c_store = send_c_store

    def restore() -> None:
        assoc.send_c_store = previous

    return restore


def final_status(event: Any, table: Mapping[str, Any]) -> None:
    """Give the final C-GET / C-MOVE response of ``event`` the status PS3.4 C.4.2.3.1 / C.4.3.3.1
    asks for when every sub-operation was attempted and failed: a Failure, ``table["all_failed"]``
    (0xC000, with an Error Comment), where pynetdicom sends 0xA702 "Refused: Out of Resources -
    Unable to perform sub-operations", which says the SCP could not start them. Whatever made them
    fail (no context the requestor accepted for the class or syntax, a conversion that cannot be
    done, a stored blob that does not open, the peer refusing the C-STORE), they are attempted
    sub-operations, in Number of Failed Sub-operations and the Failed SOP Instance UID List.
    Some failed and some not stays pynetdicom's 0xB000. pynetdicom sends the final response after
    the handler's generator has ended, so this wraps the association's ``send_msg`` until that
    response (this request's Message ID, not Pending) has gone, and then puts it back."""
    dimse = event.assoc.dimse
    previous = dimse.send_msg
    msg_id = event.request.MessageID

    def send_msg(primitive: Any, context_id: int) -> Any:
        if getattr(primitive, "MessageIDBeingRespondedTo", None) == msg_id and isinstance(
                getattr(primitive, "Status", None), int) and primitive.Status not in (0xFF00, 0xFF01):
            dimse.send_msg = previous  # the final response: later messages go out unchanged
            failed = primitive.NumberOfFailedSuboperations or 0
            if primitive.Status == 0xA702 and failed and not (primitive.NumberOfCompletedSuboperations
                                                               or primitive.NumberOfWarningSuboperations):
                primitive.Status = table["all_failed"].code
                primitive.ErrorComment = f"all {failed} sub-operations failed"[:64]
        return previous(primitive, context_id)

    dimse.send_msg = send_msg


def _printable(value: str) -> str:
    """A peer-supplied AE title as it may appear in a log line (printable ASCII, 16 at most)."""
    return "".join(ch for ch in value if 32 <= ord(ch) < 127).strip()[:16]


def retrieve_role_contexts(rq: Any, supported: list[Any]) -> list[Any]:
    """The supported contexts for one association, with each storage context the requestor
    proposes in the SCP role (a C-GET SCU receiving its sub-operations, PS3.7 D.3.3.4) ordered
    as the requestor proposed its transfer syntaxes.

    pynetdicom as the acceptor takes the first of *our* syntaxes the proposal names, and ours start
    with Explicit VR Little Endian (right for a C-STORE we receive: kept as sent), so a getscu
    proposing [JPEG 2000 lossless, Explicit LE] for CT got every JPEG 2000 instance decoded. On
    one context per class we cannot know the stored syntax of what will be retrieved; the
    requestor's preference is the rule, restricted to syntaxes any instance can be sent in (the
    uncompressed little endian ones, and lossless ones we can encode: an instance stored in
    another syntax is converted, ``transforms.dicom_codec``); a lossy or unencodable syntax it
    prefers keeps our order. A requestor that proposes each syntax in a context of its own gets
    the stored one anyway (``send_raw`` picks the context of the stored syntax), as does a C-MOVE
    destination (``_store_contexts``)."""
    scp_role = {str(i.sop_class_uid) for i in (rq.user_information or [])
                if isinstance(i, SCP_SCU_RoleSelectionNegotiation) and i.scp_role}
    if not scp_role:
        return supported
    proposed: dict[str, list[str]] = {}
    for cx in rq.presentation_context_definition_list:
        proposed.setdefault(str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
    out = []
    for cx in supported:
        wanted = proposed.get(str(cx.abstract_syntax)) if str(cx.abstract_syntax) in scp_role else None
        if wanted:
            ours = [str(t) for t in cx.transfer_syntax]
            first = [t for t in wanted if t in ours and _deliverable(t)]
            if first and first[0] != ours[0]:
                moved = build_context(cx.abstract_syntax, [*first, *(t for t in ours if t not in first)])
                moved.scu_role, moved.scp_role = cx.scu_role, cx.scp_role
                cx = moved
        out.append(cx)
    return out


def _deliverable(ts: str) -> bool:
    """Whether an instance stored in any syntax can be sent in ``ts`` (no lossy step)."""
    return ts in codec.UNCOMPRESSED or (ts not in codec.LOSSY_METHOD and codec.can_encode(ts))


def _store_contexts(refs: list[idx.InstanceRef]) -> list[Any]:
    """One context per (SOP class, stored transfer syntax), plus an uncompressed fallback per class.

    Each stored syntax gets its own context so the peer cannot pick another one for
    it; the fallback lets a peer that refuses the stored syntax still receive
    uncompressed data sets (converted between little/big endian, explicit/implicit).
    """
    pairs = sorted({(r.sop_class_uid, r.transfer_syntax) for r in refs})
    contexts = []
    for sop, ts in pairs:
        contexts.append(build_context(sop, [ts]))
    for sop in sorted({s for s, _ in pairs}):
        contexts.append(build_context(sop, list(QUERY_TRANSFER_SYNTAXES)))
    return contexts[:128]
