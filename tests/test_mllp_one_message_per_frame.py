"""Two HL7 v2 messages in one MLLP frame without a batch envelope (probe session 7b finding 4).

MLLP carries one message per block (HL7 v2.5 Appendix C); several messages travel only as a
batch (2.10.3, BHS ... BTS). Before, the frame was answered AA for the first message and stored
as one message, the second lost. Now the frame is refused whole with AR and ERR 100 and nothing
is stored; a batch of the same two messages and each message in its own frame are still taken.
Real raw-socket MLLP client against a running engine.
"""

from mllp_peers import MLLPReceiver, RawClient, adt, msa, segment
from sqlalchemy import func, select

from engine.store import schema

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0{extra}}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 2, connect_timeout: 1}}
"""


def stored(eng) -> int:
    with eng.store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(schema.messages)).scalar()


def start(engine_factory, extra=""):
    rx = MLLPReceiver().start()
    return engine_factory(YAML.format(rx=rx.port, extra=extra)), rx


def test_two_messages_in_one_frame_are_refused_whole(engine_factory):
    eng, rx = start(engine_factory)
    try:
        one, two = adt("TWO1", name="TWO^FIRST"), adt("TWO2", name="TWO^SECOND")
        with RawClient(*eng.address("adt")) as c:
            ack = c.request(one + two)
            assert msa(ack)[1:3] == ["AR", "TWO1"]
            err = segment(ack, "ERR")
            assert err[2] == "MSH^2" and err[3].startswith("100^Segment sequence error")
            assert "2 messages" in ack.decode() and "BHS" in ack.decode()
            assert stored(eng) == 0
            # LF line ends and a CRLF before the second MSH are the same frame of two messages
            assert msa(c.request(one.replace(b"\r", b"\n") + two))[1] == "AR"
            assert msa(c.request(one.replace(b"\r", b"\r\n") + two))[1] == "AR"
            assert stored(eng) == 0
            # the connection goes on: each message in its own frame is taken
            assert msa(c.request(one))[1:3] == ["AA", "TWO1"]
            assert msa(c.request(two))[1:3] == ["AA", "TWO2"]
            # the same two in a batch: one batch ACK, both taken (batch_ack: errors, none listed)
            b1, b2 = adt("TWO3"), adt("TWO4")
            reply = c.request(b"BHS|^~\\&|HIS|HOSP|RIS|RAD|20240102030405|||||B1\r" + b1 + b2 + b"BTS|2\r")
            assert reply.startswith(b"BHS|") and b"MSA|" not in reply
        assert sorted(rx.wait_for(4)) == sorted([one, two, b1, b2])
        assert stored(eng) == 4
    finally:
        rx.stop()


def test_msh_inside_a_field_value_is_not_a_second_message(engine_factory):
    eng, rx = start(engine_factory)
    try:
        msg = adt("ONE1", extra="NTE|1||see MSH|^~ in the old feed")
        with RawClient(*eng.address("adt")) as c:
            assert msa(c.request(msg))[1:3] == ["AA", "ONE1"]
        assert rx.wait_for(1) == [msg]
    finally:
        rx.stop()


def test_enhanced_mode_gets_ce(engine_factory):
    eng, rx = start(engine_factory)
    try:
        one, two = adt("EN1", msh15="AL", msh16="NE"), adt("EN2", msh15="AL", msh16="NE")
        with RawClient(*eng.address("adt")) as c:
            ack = c.request(one + two)
        assert msa(ack)[1:3] == ["CE", "EN1"] and segment(ack, "ERR")[3].startswith("100^")
        assert stored(eng) == 0
    finally:
        rx.stop()
