"""routes/mllp.MLLPSender and routes/file against real peers (a threaded MLLP receiver, the disk)."""

import asyncio
import os
import socket
import time

import pytest
from mllp_peers import MLLPReceiver, adt, make_ack

from engine.components import DeliveryError
from engine.envelope import Envelope
from routes.file import FileDestination, FileDestinationConfig
from routes.mllp import MLLPDestinationConfig, MLLPSender


def env(payload: bytes, kind="hl7v2") -> Envelope:
    return Envelope(channel="c", kind=kind, payload=payload)


def sender(port, **kw) -> MLLPSender:
    return MLLPSender(MLLPDestinationConfig(type="mllp", host="127.0.0.1", port=port, **kw))


def run(coro):
    return asyncio.run(coro)


def test_aa_and_persistent_connection():
    with MLLPReceiver() as rx:
        async def go():
            s = sender(rx.port)
            out = [await s.send(env(adt(f"M{i}"))) for i in range(5)]
            await s.close()
            return out
        assert run(go()) == ["AA"] * 5
        assert rx.received == [adt(f"M{i}") for i in range(5)]  # byte-exact
        assert rx.connections == 1


def test_utf8_payload_byte_exact():
    raw = adt("U1", name="Müller^Jürgen", charset="UNICODE UTF-8", encoding="utf-8")
    with MLLPReceiver() as rx:
        async def go():
            s = sender(rx.port)
            try:
                return await s.send(env(raw))
            finally:
                await s.close()
        assert run(go()) == "AA"
        assert rx.received == [raw]


@pytest.mark.parametrize("code", ["AE", "AR", "CE", "CR"])
def test_negative_ack_raises(code):
    with MLLPReceiver(lambda m, n: make_ack(m, code)) as rx:
        async def go():
            s = sender(rx.port)
            try:
                await s.send(env(adt("N1")))
            finally:
                await s.close()
        with pytest.raises(DeliveryError) as e:
            run(go())
        assert code in str(e.value) and e.value.permanent is False


def test_permanent_codes():
    with MLLPReceiver(lambda m, n: make_ack(m, "AE")) as rx:
        async def go():
            s = sender(rx.port, permanent_codes=["AE"])
            try:
                await s.send(env(adt("P1")))
            finally:
                await s.close()
        with pytest.raises(DeliveryError) as e:
            run(go())
        assert e.value.permanent is True


def test_ae_then_aa_on_retry_same_sender():
    with MLLPReceiver(lambda m, n: make_ack(m, "AE" if n == 0 else "AA")) as rx:
        async def go():
            s = sender(rx.port)
            try:
                with pytest.raises(DeliveryError):
                    await s.send(env(adt("R1")))
                return await s.send(env(adt("R1")))
            finally:
                await s.close()
        assert run(go()) == "AA"
        assert len(rx.received) == 2


def test_wrong_control_id_and_malformed_ack():
    answers = [lambda m: make_ack(adt("OTHER")), lambda m: b"not an ack", lambda m: make_ack(m)]
    with MLLPReceiver(lambda m, n: answers[n](m)) as rx:
        async def go():
            s = sender(rx.port)
            try:
                for _ in range(2):
                    with pytest.raises(DeliveryError):
                        await s.send(env(adt("W1")))
                return await s.send(env(adt("W1")))
            finally:
                await s.close()
        assert run(go()) == "AA"
        assert rx.connections == 3  # a bad answer never leaves the connection in use


def test_ack_timeout():
    with MLLPReceiver(lambda m, n: None) as rx:
        async def go():
            s = sender(rx.port, timeout=0.3)
            t0 = time.monotonic()
            try:
                with pytest.raises(DeliveryError, match="no ACK"):
                    await s.send(env(adt("T1")))
            finally:
                await s.close()
            return time.monotonic() - t0
        assert run(go()) < 3


def test_receiver_down_then_up():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def go():
        s = sender(port, connect_timeout=1)
        try:
            with pytest.raises(DeliveryError, match="connect"):
                await s.send(env(adt("D1")))
            rx = MLLPReceiver(port=port).start()
            try:
                return await s.send(env(adt("D1"))), rx.received
            finally:
                rx.stop()
        finally:
            await s.close()
    code, received = run(go())
    assert code == "AA" and received == [adt("D1")]


def test_stale_connection_resend():
    """A receiver that closes after each ACK (idle timeout on its side): the next send
    notices the dead connection, reconnects and sends once more, without an error."""
    with MLLPReceiver(close_after=1) as rx:
        async def go():
            s = sender(rx.port)
            try:
                first = await s.send(env(adt("S1")))
                await asyncio.sleep(0.1)  # let the receiver's FIN arrive
                return first, await s.send(env(adt("S2")))
            finally:
                await s.close()
        assert run(go()) == ("AA", "AA")
        assert rx.received == [adt("S1"), adt("S2")]
        assert rx.connections == 2


def test_not_hl7_is_permanent():
    async def go():
        s = sender(1)
        await s.send(env(b"{}", kind="fhir"))
    with pytest.raises(DeliveryError) as e:
        run(go())
    assert e.value.permanent


def test_file_destination(tmp_path):
    d = FileDestination(FileDestinationConfig(type="file", path=str(tmp_path / "out")))
    e1 = env(adt("F1", name="Müller^Jürgen", charset="UNICODE UTF-8", encoding="utf-8"))
    e2 = env(b"DICM", kind="dicom")
    e3 = env(b'{"resourceType":"Patient"}', kind="fhir")
    names = [run(d.send(e)) for e in (e1, e2, e3)]
    assert names == [f"{e1.id}.hl7", f"{e2.id}.dcm", f"{e3.id}.json"]
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(names)  # no tmp files left
    assert (tmp_path / "out" / names[0]).read_bytes() == e1.payload
    assert oct(os.stat(tmp_path / "out" / names[0]).st_mode & 0o777) == "0o600"
    assert run(d.send(e1)) == names[0]  # a retry overwrites the same file
    assert len(list((tmp_path / "out").iterdir())) == 3
