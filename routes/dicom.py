"""`to: {type: dicom}`: C-STORE SCU to a PACS or any Storage SCP.

The instance goes out as it was received: its stored transfer syntax is proposed in
a presentation context of its own and the encoded data set is sent without decoding
(routes/dicom_scu.py); a large one (a chunk-sealed blob) is sent from its chunks as they
are decrypted (engine/dimse/stream_send.py), unless it must be converted. A peer that
refuses that syntax gets it converted to one it accepted (uncompressed first;
transforms/dicom_codec.py), or, with
``transfer_syntax:``, every image goes in that syntax. One association is kept open across
sends and re-opened when an instance needs a context it lacks or the peer dropped it.

Every wait is bounded: the TCP connect and TLS handshake by ``connect_timeout``, the
association answer by ``acse_timeout``, each socket write and read by ``network_timeout``
(pynetdicom leaves the requestor's socket blocking after connect, so a peer that stops
reading would hold the send forever), the C-STORE response by ``dimse_timeout``. The
send runs on a thread of its own (routes/blocking.py); when the engine gives up on it
the association's socket is shut down, so the thread ends and the association is never
reused. A response that did not come in time is a failure retried with the route's
backoff, not resent at once: only an association the peer had dropped while idle is.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any, Literal

import structlog
from pydantic import Field, field_validator, model_validator
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from engine.components import ComponentConfig, DeliveryError
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.registry import component
from engine.security.tls import TLSConfig, client_context
from routes.blocking import BlockingCalls
from routes.dicom_scu import RawInstance, check_ae_title, instance_from_part10, send_raw, streamed_part10, transcoded
from transforms import dicom_codec as codec

log = structlog.get_logger()

UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")
MAX_CONTEXTS = 128  # PS3.8 9.3.2: presentation context ids are odd numbers 1-255
PERMANENT_RANGES = ((0xA900, 0xA9FF), (0xC000, 0xCFFF), (0x0122, 0x0122), (0x0124, 0x0124))


def permanent(code: int) -> bool:
    """A data set the peer cannot understand or does not accept will not improve by resending."""
    return any(lo <= code <= hi for lo, hi in PERMANENT_RANGES)


class DicomDestinationConfig(ComponentConfig):
    """Send DICOM instances with C-STORE (kept in their received transfer syntax)."""

    type: Literal["dicom"]
    host: str = Field(description="host name or address of the Storage SCP")
    port: int = Field(ge=1, le=65535, description="its TCP port")
    called_ae_title: str = Field(description="the peer's AE title")
    ae_title: str = Field("MEDRELAY", description="our (calling) AE title")
    tls: TLSConfig | None = Field(None, description="TLS to the peer")
    max_pdu: int = Field(262144, ge=0, description="Maximum Length we announce for PDUs we receive")
    connect_timeout: float = Field(10.0, gt=0, description="seconds for the TCP connection and TLS handshake")
    acse_timeout: float = Field(30.0, gt=0, description="seconds to wait for association answers")
    dimse_timeout: float = Field(60.0, gt=0, description="seconds to wait for the C-STORE response")
    network_timeout: float = Field(60.0, gt=0, description="seconds a socket read or write may wait (a peer "
                                   "that stops reading or sending) before the association is aborted")
    idle_release: float = Field(30.0, ge=0, description="release the association after this many idle seconds")
    transfer_syntax: str | None = Field(None, description=(
        "send every image in this transfer syntax UID (e.g. 1.2.840.10008.1.2.1 for an old workstation, "
        "1.2.840.10008.1.2.4.90 JPEG 2000 lossless for an archive), converted by transforms/dicom_codec.py; "
        "an instance that cannot be converted fails permanently. Default: as stored"))
    lossy_ratio: float | None = Field(None, gt=1, description=(
        "allow a lossy transfer_syntax (JPEG 2000 .91, JPEG-LS near-lossless .81) at this compression ratio; "
        "LossyImageCompression, its Ratio and Method are set and the result gets a new SOP Instance UID"))

    @field_validator("transfer_syntax")
    @classmethod
    def _ts(cls, v: str | None) -> str | None:
        if v is not None and not codec.can_encode(v):
            raise ValueError(f"{v}: not a transfer syntax medrelay can encode")
        return v

    @model_validator(mode="after")
    def _lossy_needs_ratio(self) -> DicomDestinationConfig:
        if self.transfer_syntax in codec.LOSSY_METHOD and self.lossy_ratio is None:
            raise ValueError("a lossy transfer_syntax needs lossy_ratio (lossy compression is never implicit)")
        return self

    @field_validator("called_ae_title", "ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return check_ae_title(v)


class DicomDestination:
    # The pipeline may hand a large stored instance as ``payload_chunks`` instead of bytes (no
    # transforms on the route): it is sent as it is decrypted, never whole in memory.
    streams_payload = True

    def __init__(self, config: DicomDestinationConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.ae = AE(ae_title=config.ae_title)
        self.ae.acse_timeout = config.acse_timeout
        self.ae.dimse_timeout = config.dimse_timeout
        self.ae.network_timeout = config.network_timeout
        self.ae.connection_timeout = config.connect_timeout
        self.assoc: Any = None
        self.pairs: list[tuple[str, str]] = []  # (SOP class, transfer syntax) proposed
        self.last_used = 0.0
        self.lock = threading.Lock()
        self.calls = BlockingCalls(f"dicom-{getattr(ctx, 'route', '')}")
        self._live: Any = None  # the association whose socket is open, from EVT_CONN_OPEN on
        self._discard = False  # set when a send was abandoned: never reuse that association

    @property
    def deadline(self) -> float:
        """Seconds one ``send`` may take: connect, association, response, one stalled write."""
        c = self.config
        return c.connect_timeout + c.acse_timeout + c.dimse_timeout + c.network_timeout

    def _conn_open(self, event: Any) -> None:
        """EVT_CONN_OPEN: bound every later socket read and write by ``network_timeout``.

        pynetdicom's requestor sets the socket back to blocking after connect; its own reads
        wait for ``select`` first, but a write to a peer that stopped reading would block
        the DUL thread for ever (and with it abort(), which waits for that thread).
        """
        self._live = event.assoc
        with contextlib.suppress(Exception):
            event.assoc.dul.socket.socket.settimeout(self.config.network_timeout)

    def _interrupt(self) -> None:
        """From the event loop, when the engine gives up on a send: unblock the send thread."""
        self._discard = True
        assoc = self._live
        sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _contexts(self) -> list[Any]:
        exact = [build_context(sop, [ts]) for sop, ts in self.pairs]
        fallback = [build_context(sop, list(UNCOMPRESSED)) for sop in dict.fromkeys(s for s, _ in self.pairs)]
        return (exact + fallback)[:MAX_CONTEXTS]

    def _close(self, abort: bool = False) -> None:
        if self.assoc is not None and self.assoc.is_established:
            (self.assoc.abort if abort else self.assoc.release)()
        self.assoc = None
        self._live = None

    def _associate(self) -> None:
        c = self.config
        kwargs: dict[str, Any] = {"ae_title": c.called_ae_title, "max_pdu": c.max_pdu}
        if c.tls is not None:
            kwargs["tls_args"] = (client_context(c.tls), c.tls.server_name or c.host)
        assoc = self.ae.associate(c.host, c.port, self._contexts(), evt_handlers=[(evt.EVT_CONN_OPEN, self._conn_open)],
                                  **kwargs)
        if not assoc.is_established:
            raise DeliveryError(f"association to {c.called_ae_title}@{c.host}:{c.port} "
                                f"{'rejected' if assoc.is_rejected else 'failed'}")
        self.assoc = assoc

    def _ensure(self, inst: RawInstance) -> None:
        pair = (str(inst.SOPClassUID), str(inst.raw_transfer_syntax))
        idle = self.config.idle_release and time.monotonic() - self.last_used > self.config.idle_release
        if self._discard:  # a send on it was abandoned: whatever it holds, it is not ours to reuse
            self._discard = False
            self._close(abort=True)
        if pair not in self.pairs:
            self.pairs.append(pair)
            if len(self.pairs) > MAX_CONTEXTS // 2:
                self.pairs.pop(0)
            self._close()
        elif idle or self.assoc is None or not self.assoc.is_established:
            self._close()
        if self.assoc is None:
            self._associate()

    def _send(self, envelope: Envelope) -> str:
        sop_class = envelope.headers.get("SOPClassUID")
        sop_uid = envelope.headers.get("SOPInstanceUID")
        if envelope.payload_chunks is not None:  # a large stored instance: sent from its blob's chunks
            inst = streamed_part10(envelope.payload_chunks, sop_class and str(sop_class), sop_uid and str(sop_uid))
        else:
            inst = instance_from_part10(envelope.payload, sop_class and str(sop_class), sop_uid and str(sop_uid))
        want = self.config.transfer_syntax
        if want is not None and str(inst.raw_transfer_syntax) != want:
            lossy = codec.Lossy(self.config.lossy_ratio) if self.config.lossy_ratio else None
            try:
                inst = transcoded(inst, [want], lossy=lossy)
            except codec.TranscodeError as e:
                raise DeliveryError(f"cannot convert to {want}: {e}", permanent=True) from e
        with self.lock:
            for attempt in (1, 2):  # a peer may have dropped an idle association: re-open once
                before = self.assoc if self.assoc is not None and self.assoc.is_established else None
                self._ensure(inst)
                reused = before is not None and self.assoc is before
                started = time.monotonic()
                try:
                    status = send_raw(self.assoc, inst)
                except ValueError as e:  # no usable context: the peer refused this SOP class / syntax
                    self._close()
                    raise DeliveryError(f"peer accepts no context for the instance: {e}", permanent=True) from e
                self.last_used = time.monotonic()
                if "Status" in status:
                    break
                timed_out = time.monotonic() - started >= self.config.dimse_timeout
                self._close(abort=True)
                if timed_out:
                    raise DeliveryError(f"no C-STORE response within {self.config.dimse_timeout:g}s")
                if attempt == 2 or not reused:
                    raise DeliveryError("association dropped before the C-STORE response")
        code = int(status.Status)
        if code == 0x0000 or 0xB000 <= code <= 0xBFFF:
            return f"0x{code:04X}"
        raise DeliveryError(f"C-STORE failed with status 0x{code:04X}", permanent=permanent(code))

    async def send(self, envelope: Envelope) -> str | None:
        if envelope.kind != "dicom":
            raise DeliveryError(f"dicom destination cannot send {envelope.kind}", permanent=True)
        return await self.calls.run(lambda: self._send(envelope), timeout=self.deadline, interrupt=self._interrupt)

    async def close(self) -> None:
        def _close() -> None:
            with self.lock:
                self._close()

        try:
            await self.calls.run(_close, timeout=self.config.acse_timeout + self.config.network_timeout,
                                 what="release", interrupt=self._interrupt)
        except DeliveryError:
            log.warning("dicom.release_abandoned", host=self.config.host, port=self.config.port)


@component("destination", "dicom", config=DicomDestinationConfig, kinds=("dicom",))
def build(config: DicomDestinationConfig, ctx: ComponentContext) -> DicomDestination:
    """C-STORE SCU: forward DICOM instances to a PACS, keeping their transfer syntax."""
    return DicomDestination(config, ctx)
