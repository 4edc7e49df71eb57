"""HL7 v2 receiving: the steps every HL7 source takes (MLLP, file, http, database).

One implementation of the receiver's checks and of storing, on the shared pieces
(engine.hl7.message for the header, charset and version; engine.hl7.ack for the ACK;
engine.hl7.batch for FHS/BHS batches; intake for the commit). The MLLP listener adds its
framing, MSH-15 (``should_send``) and hl7apy validation around these; the others their
transport:

1. read the MSH without a full parse, cut a BOM or blank lines before it;
2. the receiver checks of HL7 v2.5 2.9.2.1 that need no parse: every repetition of MSH-18
   a character set of table 0211 (``check_charsets``), the whole message valid in its
   MSH-18 charset, a real HL7 v2 version (and ``accept_versions``), processing id
   (``accept_processing_ids``), MSH-15/16 from table 0155;
3. build the positive ACK first, so a duplicate gets back exactly what the original got;
4. submit to intake (de-duplicated by MSH-3/4/10 like MLLP, plus whatever ``tx_hook`` the
   source adds, e.g. a file claim's mark) and answer from the outcome.

A refusal is an AE/AR (CE/CR) with ERR built by ``engine.hl7.ack.build_ack``; no
exception text reaches a peer. The messages of one file or batch are checked in order
and submitted together (bounded), so they share group commits and keep their order.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.hl7.ack import ack_code, build_ack
from engine.hl7.batch import BatchFile, build_batch_ack, is_batch, read_batch
from engine.hl7.message import (
    APPLICATION_INTERNAL_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_PROCESSING_ID,
    UNSUPPORTED_VERSION_ID,
    Header,
    HL7Error,
    check_charsets,
    is_hl7_version,
    message_count,
    read_header,
    split_file,
)
from engine.intake import TxHook

log = structlog.get_logger()

SUBMIT_CHUNK = 256  # messages of one file in flight to intake at once
ACK_TYPES = frozenset({"AL", "NE", "ER", "SU"})  # HL7 table 0155


@dataclass(frozen=True, slots=True)
class Hl7Answer:
    """One message's fate: its ACK, whether it was taken, and (taken) the message id."""

    ack: bytes
    ok: bool
    message_id: str | None = None
    status: str = ""  # accepted / duplicate / refused / error
    control_id: str = ""
    reason: str = ""  # why it was refused (no PHI: codes and field positions)
    retryable: bool = False  # not stored for the engine's reasons (store, shutdown): send again later
    code: str = ""  # the ACK's MSA-1 (table 0008)
    header: Header | None = None  # the message's MSH when it could be read (MLLP: MSH-15 decides)


@dataclass
class Hl7Result:
    """Every message of one payload (a message, a batch, a file of messages)."""

    answers: list[Hl7Answer] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # batch envelope counts that do not add up
    batch: BatchFile | None = None

    @property
    def ok(self) -> bool:
        return bool(self.answers) and all(a.ok for a in self.answers) and not self.problems

    @property
    def retryable(self) -> bool:
        return any(a.retryable for a in self.answers)


class Hl7Receiver:
    """The receiving steps of one channel; ``hook(i)`` gives the tx_hook of the i-th message."""

    def __init__(self, ctx: ComponentContext, *, accept_versions: Sequence[str] = (),
                 accept_processing_ids: Sequence[str] = ()) -> None:
        if ctx.intake is None:
            raise ValueError("an HL7 source needs the engine intake")
        self.ctx = ctx
        self.channel = ctx.channel
        self._versions = frozenset(accept_versions)
        self._pids = frozenset(p.upper() for p in accept_processing_ids)

    # -- a whole payload ---------------------------------------------------------
    def messages(self, data: bytes) -> tuple[list[bytes], BatchFile | None]:
        """The messages of a payload: a batch's (its envelope read too), or every MSH in it."""
        if is_batch(data):
            b = read_batch(data)
            return b.messages, b
        return split_file(data), None

    async def receive_all(self, data: bytes, peer: str, *, hook: Callable[[int], TxHook | None] | None = None,
                          extra_headers: dict[str, str] | None = None) -> Hl7Result:
        """Every message of ``data`` through the steps; the batch envelope's problems reported."""
        msgs, batch = self.messages(data)
        result = Hl7Result(batch=batch, problems=batch.all_problems() if batch is not None else [])
        label = ""
        if batch is not None:
            label = batch.control_id or next((b.control_id for b in batch.batches if b.control_id), "")
        checked = [self.check(m) for m in msgs]
        todo = [(i, c) for i, c in enumerate(checked) if isinstance(c, _Checked)]
        stored: dict[int, Hl7Answer] = {}
        headers = dict(extra_headers or {})
        if label:
            headers["batch"] = label[:64]
        for k in range(0, len(todo), SUBMIT_CHUNK):
            chunk = todo[k:k + SUBMIT_CHUNK]
            done = await asyncio.gather(*(self.store(c, peer, hook(i) if hook else None, headers)
                                          for i, c in chunk))
            stored.update((i, a) for (i, _), a in zip(chunk, done, strict=True))
        result.answers = [stored[i] if isinstance(c, _Checked) else c for i, c in enumerate(checked)]
        return result

    def batch_ack(self, result: Hl7Result, *, keep_all: bool = False) -> bytes:
        """The answer to a batch (HL7 v2.5 2.10.3): the ACKs of the messages in error (or all)."""
        assert result.batch is not None
        per_batch: list[list[bytes]] = []
        comments: list[str] = []
        answers = iter(result.answers)
        for b in result.batch.batches:
            mine = [next(answers) for _ in b.messages]
            bad = sum(1 for a in mine if not a.ok)
            per_batch.append([a.ack for a in mine if keep_all or not a.ok])
            comments.append(f"{len(mine)} messages, {len(mine) - bad} accepted, {bad} in error")
        return build_batch_ack(result.batch, per_batch, comments=comments)

    # -- one message ----------------------------------------------------------------
    def check(self, payload: bytes, peer: str = "") -> _Checked | Hl7Answer:
        """Steps 1-2; a refusal is an ``Hl7Answer``. The header read here is the one every later
        step uses (the ACK, the envelope headers that intake's search terms read)."""
        t0 = time.perf_counter()
        header: Header | None = None
        try:
            header = read_header(payload)
            if header.start:
                # A UTF-8 BOM or blank lines before MSH: not part of the HL7 message. Stored,
                # routed and de-duplicated from MSH on, so every reader and every downstream
                # system sees the message itself (docs/notes/issue-9-hl7.md).
                payload = payload[header.start:]
            self._check(header, payload)
        except HL7Error as e:
            return self.refuse(e.header or header, e, peer=peer)
        except Exception:
            log.exception("hl7.check_failed", channel=self.channel, peer=peer or None)
            return self.refuse(header, HL7Error(APPLICATION_INTERNAL_ERROR, "message could not be checked"),
                               peer=peer)
        return _Checked(header, payload, t0)

    async def store(self, checked: _Checked, peer: str, tx_hook: TxHook | None = None,
                    extra_headers: dict[str, str] | None = None) -> Hl7Answer:
        """Steps 3-4."""
        header, payload = checked.header, checked.payload
        ok_code = ack_code(enhanced=header.enhanced_mode, ok=True)
        ok_ack = build_ack(header, ok_code)
        headers: dict[str, Any] = header.as_headers()
        if header.bom:
            headers["received_bom"] = "utf-8"
        headers.update(extra_headers or {})
        env = Envelope(channel=self.channel, kind="hl7v2", payload=payload, headers=headers, peer=peer)
        dedupe_key = f"{header.sending_application}|{header.sending_facility}|{header.control_id}"
        assert self.ctx.intake is not None
        try:
            outcome = await self.ctx.intake.submit(env, dedupe_key=dedupe_key, response=ok_ack, tx_hook=tx_hook)
        except Exception:
            log.exception("hl7.submit_failed", channel=self.channel, peer=peer)
            return self.refuse(header, HL7Error(APPLICATION_INTERNAL_ERROR, "message could not be stored"),
                               peer=peer, retryable=True)
        cid = header.control_id
        if outcome.status == "accepted":
            log.info("hl7.accepted", channel=self.channel, message_id=outcome.message_id, msh_10=cid,
                     message_type=header.message_code, peer=peer, routes=len(outcome.routes),
                     ms=round((time.perf_counter() - checked.t0) * 1000, 2) if checked.t0 else None)
            return Hl7Answer(ok_ack, True, outcome.message_id, "accepted", cid, code=ok_code, header=header)
        if outcome.status == "duplicate":
            log.info("hl7.duplicate", channel=self.channel, message_id=outcome.message_id, msh_10=cid,
                     message_type=header.message_code, peer=peer)
            return Hl7Answer(outcome.response or ok_ack, True, outcome.message_id, "duplicate", cid,
                             code=ok_code, header=header)
        # rejected / error: not stored, the sender must keep the message and may retry.
        shutting_down = "shutting down" in (outcome.error or "")
        text = "receiver is shutting down, resend later" if shutting_down else "message could not be stored"
        if outcome.status == "rejected":
            text = "message rejected by the engine"
        return self.refuse(header, HL7Error(APPLICATION_INTERNAL_ERROR, text), peer=peer,
                           internal=outcome.error or outcome.status, retryable=outcome.status == "error")

    def _check(self, header: Header, payload: bytes) -> None:
        """Receiver checks of HL7 v2.5 2.9.2.1 that need no parse: charset, version, processing
        id, acknowledgment types. Cheap on purpose: every message on the hot path goes through."""
        count = message_count(payload, header.delimiters.field)
        if count > 1:
            # One payload, one message (MLLP carries one per block, HL7 v2.5 Appendix C); several
            # travel only as a batch (2.10.3, BHS ... BTS). The first MSH's ACK would acknowledge
            # bytes that are not that message, so it is refused whole: nothing is stored.
            raise HL7Error(SEGMENT_SEQUENCE_ERROR, f"this frame holds {count} messages (MSH segments); a frame "
                           "holds one message: send each in its own frame, or several as a batch (BHS ... BTS)",
                           location="MSH^2", header=header, reject=True)
        check_charsets(header)  # every repetition of MSH-18 names a charset (table 0211)
        header.decode(payload)  # the whole message must be valid in its MSH-18 charset
        version = header.version
        if not version:
            raise HL7Error(REQUIRED_FIELD_MISSING, "MSH-12 version id is empty", location="MSH^1^12",
                           header=header)
        if not is_hl7_version(version):
            raise HL7Error(UNSUPPORTED_VERSION_ID, f"MSH-12 {version[:16]!r} is not an HL7 v2 version",
                           location="MSH^1^12", header=header)
        if self._versions and version not in self._versions:
            raise HL7Error(UNSUPPORTED_VERSION_ID, f"MSH-12 version {version[:16]!r} is not accepted",
                           location="MSH^1^12", header=header)
        if self._pids and header.processing_id.upper() not in self._pids:
            raise HL7Error(UNSUPPORTED_PROCESSING_ID,
                           f"MSH-11 processing id {header.processing_id[:8]!r} is not accepted",
                           location="MSH^1^11", header=header)
        for n, value in ((15, header.accept_ack_type), (16, header.application_ack_type)):
            if value and value not in ACK_TYPES:
                raise HL7Error(TABLE_VALUE_NOT_FOUND, f"MSH-{n} {value[:8]!r} is not an acknowledgment "
                               "type of table 0155 (AL, NE, ER, SU)", location=f"MSH^1^{n}", header=header)

    def refuse(self, header: Header | None, err: HL7Error, *, peer: str = "", internal: str | None = None,
               retryable: bool = False) -> Hl7Answer:
        """An AE/AR (CE/CR) with ERR for ``err``; no readable MSH is a reject (AR): not even HL7."""
        enhanced = header is not None and header.enhanced_mode
        code = ack_code(enhanced=enhanced, ok=False, error=err) if header is not None else "AR"
        cid = header.control_id if header is not None else ""
        log.warning("hl7.refused", channel=self.channel, peer=peer or None, ack=code, err_code=err.code,
                    msh_10=cid or None, message_type=header.message_code if header is not None else None,
                    internal=internal)
        # PHI-bearing detail (validator messages may quote values) only at debug.
        log.debug("hl7.refused_detail", channel=self.channel, detail=err.text)
        reason = f"{code} {err.code} {err.code_text}" + (f" at {err.location}" if err.location else "")
        return Hl7Answer(build_ack(header, code, error=err), False, None, "error" if retryable else "refused",
                         cid, reason, retryable, code=code, header=header)


@dataclass(frozen=True, slots=True)
class _Checked:
    """A message that passed the receiver's checks, ready for intake."""

    header: Header
    payload: bytes
    t0: float = 0.0  # perf_counter when it was received (the accepted log line's ms)
