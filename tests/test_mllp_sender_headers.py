"""The MLLP destination takes MSH-10 from the envelope headers the listener wrote, and reads a
peer's ACK without reading its MSH when the bytes allow (routes/mllp.py, engine.hl7.ack.read_ack).

Against a real threaded MLLP receiver and a real engine with an hl7_map route that changes MSH-10
(the case where the headers must not be trusted blindly: the transformed message is read).
"""

from __future__ import annotations

import asyncio

import pytest
from mllp_peers import MLLPReceiver, RawClient, adt, make_ack
from sqlalchemy import select

import engine.hl7.ack
import routes.mllp
from engine.components import DeliveryError
from engine.envelope import Envelope
from engine.hl7.ack import parse_ack, read_ack
from engine.hl7.message import HL7Error, read_header
from engine.store import schema
from routes.mllp import MLLPDestinationConfig, MLLPSender


def stored(payload: bytes) -> Envelope:
    """The envelope of a message as the listener stored it (headers from its one header read)."""
    return Envelope(channel="c", kind="hl7v2", payload=payload, headers=read_header(payload).as_headers())


def send_all(port: int, envs: list[Envelope]) -> list[str]:
    async def go() -> list[str]:
        s = MLLPSender(MLLPDestinationConfig(type="mllp", host="127.0.0.1", port=port, timeout=10))
        try:
            return [await s.send(e) for e in envs]
        finally:
            await s.close()
    return asyncio.run(go())


@pytest.fixture
def header_reads(monkeypatch):
    """How often the sender and the ACK reader read an MSH (a counting wrapper, real reader)."""
    calls = []

    def counting(payload, *a, **kw):
        calls.append(payload[:40])
        return read_header(payload, *a, **kw)

    monkeypatch.setattr(routes.mllp, "read_header", counting)
    monkeypatch.setattr(engine.hl7.ack, "read_header", counting)
    return calls


def test_stored_messages_are_sent_without_reading_a_header_again(header_reads):
    with MLLPReceiver() as rx:
        assert send_all(rx.port, [stored(adt(f"H{i}")) for i in range(5)]) == ["AA"] * 5
        assert rx.received == [adt(f"H{i}") for i in range(5)]
    assert header_reads == []  # was 2 a message: the message's MSH and the ACK's


def test_headers_are_not_trusted_for_a_transformed_message_or_without_msh10(header_reads):
    """A derived envelope whose headers still say the old MSH-10: the payload is read, so the
    peer's ACK of the new MSH-10 is accepted (trusting the headers would refuse it)."""
    original = stored(adt("OLD1"))
    changed = original.derive(payload=adt("NEW1"))
    assert changed.headers["MSH-10"] == "OLD1"
    bare = Envelope(channel="c", kind="hl7v2", payload=adt("BARE1"))
    with MLLPReceiver() as rx:
        assert send_all(rx.port, [changed, bare]) == ["AA", "AA"]
    assert [p[:3] for p in header_reads] == [b"MSH", b"MSH"]  # the two messages, no ACK


def test_ack_mismatch_and_not_hl7_still_fail():
    with MLLPReceiver(lambda m, n: make_ack(adt("OTHER"))) as rx, pytest.raises(DeliveryError, match="MSA-2"):
        send_all(rx.port, [stored(adt("M1"))])
    with pytest.raises(DeliveryError, match="not HL7") as e:
        send_all(1, [Envelope(channel="c", kind="hl7v2", payload=b"not hl7")])
    assert e.value.permanent


ACKS = [
    b"MSH|^~\\&|R|F|S|G|1||ACK^A01^ACK|X|P|2.5\rMSA|AA|C1\r",
    b"MSH|^~\\&|R|F|S|G|1||ACK^A01^ACK|X|P|2.5\rMSA|ae|C2\rERR||PID^1^5|101^Req^HL70357|E\r",
    b"MSH|^~\\&|R|F|S|G|1||ACK|X|P|2.3\rMSA|CR|C3\rERR|MSH^1^12^203&x&HL70357\r",
    b"MSH#$%*@|R|F|S|G|1||ACK|X|P|2.5\nMSA#AA#C4\n",  # other delimiters, LF
    b"MSH|^~\\&|R|F|S|G|1||ACK^A01^ACK|X|P|2.5\r\nMSA|AR| C5 \r\n",
    "MSH|^~\\&|R|F|S|G|1||ACK|X|P|2.5|||||UNICODE UTF-8\rMSA|AA|Ü6\r".encode(),  # not ASCII: read
    b"\xef\xbb\xbfMSH|^~\\&|R|F|S|G|1||ACK|X|P|2.5\rMSA|AA|C7\r",  # a BOM: read
]


@pytest.mark.parametrize("ack", ACKS)
def test_read_ack_answers_as_parse_ack(ack):
    a, b = read_ack(ack), parse_ack(ack)
    assert (a.code, a.control_id, a.error_code) == (b.code, b.control_id, b.error_code)


@pytest.mark.parametrize("bad", [b"not an ack", b"MSH|^~\\&|R\rMSA|\r", b"MSH|^~\\&|R\rMSA|ZZ|C1\r",
                                 b"MSHA^~\\&|R\rMSA|AA|C1\r", b"MSH|^~\\&|R\rNTE|1\r"])
def test_read_ack_refuses_what_parse_ack_refuses(bad):
    with pytest.raises(HL7Error):
        parse_ack(bad)
    with pytest.raises(HL7Error):
        read_ack(bad)


YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0}}
    routes:
      - name: plain
        to: {{type: mllp, host: 127.0.0.1, port: {plain}, timeout: 5, connect_timeout: 2}}
        retry: {{max_attempts: 3, initial_delay: 0.05, max_delay: 0.2}}
      - name: renumbered
        transforms:
          - type: hl7_map
            rules:
              - set: {{MSH-10: RENUMBERED}}
        to: {{type: mllp, host: 127.0.0.1, port: {mapped}, timeout: 5, connect_timeout: 2}}
        retry: {{max_attempts: 3, initial_delay: 0.05, max_delay: 0.2}}
"""


def test_engine_delivers_stored_and_renumbered_messages(engine_factory):
    """End to end: the plain route's ACK matches the listener's MSH-10 (from the headers), the
    hl7_map route's ACK matches the MSH-10 the map wrote (its own header read)."""
    with MLLPReceiver() as plain, MLLPReceiver() as mapped:
        eng = engine_factory(YAML.format(plain=plain.port, mapped=mapped.port))
        with RawClient(*eng.address("adt")) as c:
            assert b"MSA|AA|E2E1" in c.request(adt("E2E1"))
        assert plain.wait_for(1) == [adt("E2E1")]
        got = mapped.wait_for(1)
        assert got[0].split(b"\r")[0].split(b"|")[9] == b"RENUMBERED"
    assert eng.wait_for(lambda: routes_done(eng) == {("plain", "done", 0), ("renumbered", "done", 0)},
                            timeout=60)  # no failed attempt: both ACKs matched


def routes_done(eng) -> set[tuple[str, str, int]]:
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return {(r.route, r.state, r.attempts) for r in c.execute(select(d.c.route, d.c.state, d.c.attempts))}
