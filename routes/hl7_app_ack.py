"""`to: {type: hl7_app_ack}`: the enhanced-mode application acknowledgment (HL7 v2.5 2.9.3).

In enhanced mode the MLLP listener answers the commit ACK (CA) on the sender's
connection as soon as the message is stored. When MSH-16 asks for an application ACK
(AL always, ER on error, SU on success), it is a message of its own, sent later to the
original sender's receiving endpoint once the application has processed the message.
Here "processed" means the routes named in ``after`` reached a final state: AA when all
of them delivered (or filtered), AE with ERR 207 when any was dead-lettered.

The route that carries this destination waits for those routes by retrying (the
engine's backoff), so give it a retry policy at least as patient as theirs, and no
transforms: it acknowledges the message as received.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import structlog
from pydantic import Field
from sqlalchemy import and_, select

from engine.components import ComponentConfig, DeliveryError, Reference
from engine.context import ComponentContext
from engine.envelope import Envelope
from engine.hl7.ack import build_ack
from engine.hl7.message import HL7Error, read_header
from engine.registry import component
from engine.security.tls import TLSConfig
from engine.store import schema
from routes.mllp import MLLPDestinationConfig, MLLPSender

log = structlog.get_logger()

DELIVERED = frozenset({"done", "filtered", "superseded", "quarantined"})


class AppAckConfig(ComponentConfig):
    """Send the enhanced-mode application ACK (AA/AE) to the original sender once routes finish."""

    type: Literal["hl7_app_ack"]
    host: str = Field(..., description="the original sender's MLLP receiver")
    port: int = Field(..., ge=1, le=65535)
    after: list[str] = Field(..., min_length=1, description="routes of this channel whose outcome the ACK reports")
    tls: TLSConfig | None = Field(None, description="TLS to the sender's receiver")
    timeout: float = Field(30.0, gt=0, description="seconds to send the ACK and receive the receiver's commit "
                           "ACK (CA); then the connection is closed and the delivery retried")
    connect_timeout: float = Field(10.0, gt=0, description="seconds for the TCP connection and TLS handshake")
    wait_for_commit: bool = Field(True, description="ask for and wait for a CA (MSH-15 AL); off: send and "
                                  "count it delivered when written")

    def references(self) -> list[Reference]:
        """Each ``after`` entry must be another route of this channel: a typo would make the
        ACK report AA at once, before (or without) the real route delivering."""
        return [Reference(("after", i), "route", name) for i, name in enumerate(self.after)]


def _wanted(condition: str, ok: bool) -> bool:
    """MSH-16 (table 0155) for an outcome: AL always, NE never, ER on error, SU on success."""
    return {"AL": True, "NE": False, "ER": not ok, "SU": ok}.get(condition or "NE", False)


class AppAckSender:
    def __init__(self, config: AppAckConfig, ctx: ComponentContext) -> None:
        self.config = config
        self.ctx = ctx
        self.mllp = MLLPSender(MLLPDestinationConfig(type="mllp", host=config.host, port=config.port, tls=config.tls,
                                                     timeout=config.timeout, connect_timeout=config.connect_timeout),
                               ctx)

    @property
    def deadline(self) -> float:
        """Seconds one ``send`` may take: the MLLP exchange plus the store read of the outcome."""
        return self.mllp.deadline + 5.0

    def _outcome(self, message_id: str) -> tuple[bool | None, list[str]]:
        """(None, waiting routes) while any is pending; else (all delivered?, failed routes)."""
        d = schema.deliveries
        with self.ctx.store.engine.connect() as conn:
            rows = conn.execute(select(d.c.route, d.c.state).where(and_(
                d.c.message_id == message_id, d.c.channel == self.ctx.channel,
                d.c.route.in_(self.config.after)))).all()
        pending = [r for r, s in rows if s not in DELIVERED and s != "dead"]
        if pending:
            return None, pending
        return all(s in DELIVERED for _, s in rows), [r for r, s in rows if s == "dead"]

    async def send(self, envelope: Envelope) -> str | None:
        if envelope.kind != "hl7v2":
            raise DeliveryError("hl7_app_ack acknowledges HL7 v2 messages only", permanent=True)
        try:
            header = read_header(envelope.payload)
        except HL7Error as e:
            raise DeliveryError(f"not HL7 v2: {e.code}", permanent=True) from None
        ok, routes = await asyncio.to_thread(self._outcome, envelope.id)
        if ok is None:
            raise DeliveryError(f"waiting for routes {', '.join(routes)}")
        if not _wanted(header.application_ack_type, ok):
            return "not requested (MSH-16)"
        code = "AA" if ok else "AE"
        error = None if ok else HL7Error(207, f"not delivered to {', '.join(routes)}")
        ack = build_ack(header, code, error=error, accept_ack="AL" if self.config.wait_for_commit else "")
        out = envelope.derive(payload=ack, headers={})
        if self.config.wait_for_commit:
            answer = await self.mllp.send(out)
        else:
            answer = await self.mllp.write_only(out)
        log.info("hl7.application_ack_sent", channel=self.ctx.channel, msa_1=code, msh_10=header.control_id)
        return f"{code} sent, receiver {answer}"

    async def close(self) -> None:
        await self.mllp.close()


@component("destination", "hl7_app_ack", config=AppAckConfig, kinds=("hl7v2",))
def build(config: AppAckConfig, ctx: ComponentContext) -> Any:
    """Enhanced-mode application ACK to the original sender after the named routes finish."""
    return AppAckSender(config, ctx)
