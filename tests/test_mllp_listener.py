"""The mllp source end to end: real clients (python-hl7's MLLPClient, raw sockets) against a
running engine that forwards to an in-test MLLP receiver."""

import socket
import subprocess
import sys
import threading
import time

import hl7.client
import pytest
from mllp_peers import MLLPReceiver, RawClient, adt, make_ack, msa, segment, wrap
from sqlalchemy import func, select

from engine.store import schema

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0, idle_timeout: {idle}, max_frame_bytes: {maxb}{extra}}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 2, connect_timeout: 1}}
        retry: {{max_attempts: {attempts}, initial_delay: 0.05, max_delay: 0.2}}
"""


def config(rx_port, *, idle=30, maxb=65536, extra="", attempts=5):
    return YAML.format(rx=rx_port, idle=idle, maxb=maxb, extra=extra, attempts=attempts)


@pytest.fixture
def rx():
    r = MLLPReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def eng(engine_factory, rx):
    return engine_factory(config(rx.port, maxb=8192))


def deliveries(eng):
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return [dict(r) for r in c.execute(select(d)).mappings()]


def message_count(eng):
    with eng.store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(schema.messages)).scalar()


def test_python_hl7_client_gets_aa_and_downstream_gets_bytes(eng, rx):
    host, port = eng.address("adt")
    with hl7.client.MLLPClient(host, port) as c:
        for i in range(3):
            ack = c.send_message(adt(f"PY{i}"))
            assert ack.startswith(b"\x0b") and ack.endswith(b"\x1c\r")
            m = msa(ack[1:-2])
            assert m[1:3] == ["AA", f"PY{i}"]
    assert rx.wait_for(3) == [adt(f"PY{i}") for i in range(3)]


def test_ack_msh_swaps_and_echoes(eng):
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("SW1", sender="HIS^1.2.3^ISO", facility="HOSP", version="2.5.1"))
    msh = segment(ack, "MSH")
    assert msh[2:6] == ["RIS", "RAD", "HIS^1.2.3^ISO", "HOSP"]
    assert msh[8] == "ACK^A01^ACK" and msh[9] != "SW1" and msh[10] == "P" and msh[11] == "2.5.1"


def test_split_and_merged_frames(eng, rx):
    with RawClient(*eng.address("adt")) as c:
        data = wrap(adt("SP1"))
        for part in (data[:1], data[1:30], data[30:-1], data[-1:]):
            c.send_raw(part)
            time.sleep(0.05)
        assert msa(c.recv_frame())[1:3] == ["AA", "SP1"]
        c.send_raw(wrap(adt("MG1")) + wrap(adt("MG2")) + wrap(adt("MG3")))
        got = [msa(c.recv_frame())[2] for _ in range(3)]
        assert got == ["MG1", "MG2", "MG3"]
    received = rx.wait_for(4)
    assert [m for m in received] == [adt(x) for x in ("SP1", "MG1", "MG2", "MG3")]


@pytest.mark.parametrize("charset,encoding", [("UNICODE UTF-8", "utf-8"), ("UTF-8", "utf-8"),
                                              ("8859/1", "latin-1")])
def test_charsets_round_trip_byte_exact(eng, rx, charset, encoding):
    raw = adt("CS1", name="Müller^Jürgen", charset=charset, encoding=encoding, sender="KLINIKÜ")
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(raw)
    msh = segment(ack, "MSH", encoding)
    assert msh[17] == charset and msh[4] == "KLINIKÜ"  # echoed, encoded in the same charset
    assert "KLINIKÜ".encode(encoding) in ack
    assert msa(ack, encoding)[1] == "AA"
    assert rx.wait_for(1) == [raw]


def test_bad_bytes_for_declared_charset_is_ae(eng):
    raw = adt("CS2", name="Müller", charset="UNICODE UTF-8", encoding="latin-1")
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(raw)
    assert msa(ack)[1] == "AE" and segment(ack, "ERR")[3].startswith("102^")
    unknown = adt("CS3", charset="KLINGON")
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(unknown)
    assert msa(ack)[1:3] == ["AE", "CS3"] and segment(ack, "ERR")[3].startswith("103^")


def test_enhanced_mode(eng, rx):
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("EN1", msh15="AL", msh16="AL"))
        assert msa(ack)[1:3] == ["CA", "EN1"]
        ack = c.request(adt("EN2", msh15="SU", msh16="NE"))
        assert msa(ack)[1] == "CA"
        c.send(adt("EN3", msh15="NE", msh16="NE"))  # never acknowledge
        c.send(adt("EN4", msh15="ER", msh16="AL"))  # acknowledge errors only
        with pytest.raises(TimeoutError):
            c.recv_frame(timeout=1.0)
        ack = c.request(adt("EN5", msh15="", msh16="AL"))  # MSH-15 empty in enhanced mode: as AL
        assert msa(ack)[1:3] == ["CA", "EN5"]
    assert len(rx.wait_for(5)) == 5  # all stored and forwarded, acknowledged or not


def test_enhanced_mode_reject_is_cr(engine_factory, rx):
    eng = engine_factory(config(rx.port, extra=", accept_versions: ['2.5']"))
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("ENR", version="2.3", msh15="AL", msh16="NE"))
    assert msa(ack)[1:3] == ["CR", "ENR"]
    assert segment(ack, "ERR")[1].startswith("MSH^1^12^203")  # ERR-1 for a v2.3 message


def test_duplicate_gets_original_ack_and_is_routed_once(eng, rx):
    with RawClient(*eng.address("adt")) as c:
        first = c.request(adt("DUP1"))
        second = c.request(adt("DUP1"))
        other_sender = c.request(adt("DUP1", sender="LIS"))
    assert first == second  # byte-identical: same ACK control id and timestamp
    assert msa(other_sender)[1] == "AA" and other_sender != first
    rx.wait_for(2)
    time.sleep(0.5)
    assert len(rx.received) == 2
    assert message_count(eng) == 2


def test_framed_garbage_gets_ar_and_connection_survives(eng, rx):
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(b"hello, this is not HL7")
        m = msa(ack)
        assert m[1] == "AR" and m[2] == ""
        assert segment(ack, "ERR")[3].startswith("100^Segment sequence error")
        ack = c.request(b"MSH|^~\\&|A|B|C|D|1||ADT^A01||P|2.5\r")  # no MSH-10
        assert msa(ack)[1] == "AE" and segment(ack, "ERR")[3].startswith("101^")
        assert segment(ack, "MSH")[4] == "A"  # still addressed to the sender
        assert msa(c.request(adt("AFTER")))[1:3] == ["AA", "AFTER"]
    assert rx.wait_for(1) == [adt("AFTER")]


def test_unframed_garbage_closes_only_that_connection(eng):
    host, port = eng.address("adt")
    with RawClient(host, port) as good, RawClient(host, port) as bad:
        bad.send_raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert bad.is_closed(timeout=5)
        assert msa(good.request(adt("GOOD")))[1] == "AA"
    with RawClient(host, port) as again:
        assert msa(again.request(adt("GOOD2")))[1] == "AA"


def test_oversized_frame_is_rejected_and_connection_resyncs(eng, rx):
    big = adt("BIG1", extra="NTE|1||" + "X" * 20000)
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(big)
        m = msa(ack)
        assert m[1:3] == ["AR", "BIG1"]  # addressed to the oversized message's MSH-10
        err = segment(ack, "ERR")
        assert err[3].startswith("207^Application internal error") and "8192" in err[8]
        assert msa(c.request(adt("SMALL")))[1:3] == ["AA", "SMALL"]
    assert rx.wait_for(1) == [adt("SMALL")]
    assert message_count(eng) == 1


def test_validation_ae(engine_factory, rx):
    eng = engine_factory(config(rx.port, extra=", validate: structure"))
    no_name = adt("V1").replace(b"||DOE^JOHN||", b"||||")
    no_pid = b"\r".join(s for s in adt("V2").split(b"\r") if not s.startswith(b"PID"))
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(no_name)
        assert msa(ack)[1:3] == ["AE", "V1"]
        err = segment(ack, "ERR")
        assert err[2] == "PID^1^5" and err[3].startswith("101^Required field missing")
        ack = c.request(no_pid)
        assert msa(ack)[1:3] == ["AE", "V2"] and segment(ack, "ERR")[3].startswith("100^")
        ack = c.request(adt("V3", version="9.9"))
        assert msa(ack)[1] == "AR" and segment(ack, "ERR")[3].startswith("203^")
        assert msa(c.request(adt("V4")))[1] == "AA"
    assert rx.wait_for(1) == [adt("V4")]
    assert message_count(eng) == 1


def test_accept_versions_and_processing_ids(engine_factory, rx):
    eng = engine_factory(config(rx.port, extra=", accept_versions: ['2.5'], accept_processing_ids: [P]"))
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("AV1", version="2.6"))
        assert msa(ack)[1] == "AR" and segment(ack, "ERR")[3].startswith("203^")
        ack = c.request(adt("AV2").replace(b"|P|2.5", b"|T|2.5"))
        assert msa(ack)[1] == "AR" and segment(ack, "ERR")[3].startswith("202^")
        assert msa(c.request(adt("AV3")))[1] == "AA"


def test_idle_timeout_closes(engine_factory, rx):
    eng = engine_factory(config(rx.port, idle=0.5))
    with RawClient(*eng.address("adt")) as c:
        assert msa(c.request(adt("ID1")))[1] == "AA"
        t0 = time.monotonic()
        assert c.is_closed(timeout=5)
        assert 0.3 < time.monotonic() - t0 < 4


def test_many_connections_in_parallel(eng, rx):
    host, port = eng.address("adt")
    errors = []

    def client(n):
        try:
            with RawClient(host, port) as c:
                for i in range(20):
                    assert msa(c.request(adt(f"P{n}-{i}")))[1:3] == ["AA", f"P{n}-{i}"]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(rx.wait_for(160)) == 160


def test_downstream_ae_then_aa_is_retried(engine_factory):
    with MLLPReceiver(lambda m, n: make_ack(m, "AE" if n == 0 else "AA")) as rx:
        eng = engine_factory(config(rx.port))
        with RawClient(*eng.address("adt")) as c:
            assert msa(c.request(adt("RT1")))[1] == "AA"
        rx.wait_for(2)
        eng.wait_for(lambda: [d["state"] for d in deliveries(eng)] == ["done"])
        d = deliveries(eng)[0]
        assert d["attempts"] >= 1 and rx.received == [adt("RT1")] * 2


def test_downstream_down_dead_letter_then_replay(engine_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    eng = engine_factory(config(port, attempts=3))
    with RawClient(*eng.address("adt")) as c:
        assert msa(c.request(adt("DL1")))[1] == "AA"  # stored: the sender is done with it
    eng.wait_for(lambda: [d["state"] for d in deliveries(eng)] == ["dead"], timeout=20)
    d = deliveries(eng)[0]
    assert d["attempts"] == 3 and "connect" in d["last_error"]
    with MLLPReceiver(port=port) as rx:
        out = subprocess.run([sys.executable, "-m", "engine.cli", "replay", "-c", str(eng.config_path),
                              "--channel", "adt", "--timeout", "30"],
                             cwd=eng.data_dir, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert rx.wait_for(1) == [adt("DL1")]
    assert [d["state"] for d in deliveries(eng)] == ["done"]


def test_no_phi_in_info_logs(eng, rx):
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        with RawClient(*eng.address("adt")) as c:
            c.request(adt("PHI1", name="SECRETNAME^GIVEN"))
            c.request(adt("PHI2", name="SECRETNAME^GIVEN").replace(b"EVN", b"EVN|\xff"))
            c.request(b"SECRETNAME garbage")
        rx.wait_for(1)
        time.sleep(0.3)
    info = [e for e in logs if e.get("log_level") != "debug"]
    assert any(e["event"] == "hl7.accepted" for e in info)
    assert "SECRETNAME" not in repr(info) and "12345" not in repr(info) and "19800101" not in repr(info)


# -- issue 9: real senders' starts, versions and acknowledgment types -------------------------
BOM = b"\xef\xbb\xbf"


def test_utf8_bom_is_accepted_stripped_and_forwarded_without_it(eng, rx):
    raw = adt("BOM1", name="Müller^Jürgen", sender="KLINIKÜ", encoding="utf-8")
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(BOM + raw)
    assert msa(ack, "utf-8")[1:3] == ["AA", "BOM1"]
    assert ack.startswith(b"MSH|") and "KLINIKÜ".encode() in ack  # UTF-8, as the BOM said; no BOM back
    assert segment(ack, "MSH", "utf-8")[4] == "KLINIKÜ"
    assert rx.wait_for(1) == [raw]  # downstream gets the message from MSH on
    with eng.store.engine.connect() as conn:
        row = conn.execute(select(schema.messages.c.headers, schema.messages.c.size)).one()
    assert row.size == len(raw) and row.headers["received_bom"] == "utf-8"


def test_bom_and_crlf_and_leading_blank_line(eng, rx):
    raw = adt("BOM2").replace(b"\r", b"\r\n")
    with RawClient(*eng.address("adt")) as c:
        assert msa(c.request(BOM + raw))[1:3] == ["AA", "BOM2"]
        assert msa(c.request(b"\r\n" + adt("BL1")))[1:3] == ["AA", "BL1"]
        # the same message with and without a BOM is one message: the second is a duplicate
        assert msa(c.request(adt("BL1")))[1:3] == ["AA", "BL1"]
    assert rx.wait_for(2) == [raw, adt("BL1")]
    time.sleep(0.3)
    assert message_count(eng) == 2


def test_bom_contradicting_msh18_is_ae_102(eng):
    latin = adt("BOM3", name="Müller", charset="8859/1", encoding="latin-1")
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(BOM + latin)
        assert msa(ack, "latin-1")[1:3] == ["AE", "BOM3"]
        err = segment(ack, "ERR", "latin-1")
        assert err[2] == "MSH^1^18" and err[3].startswith("102^") and "byte order mark" in err[8]
        ascii_only = adt("BOM4", charset="8859/1")  # no byte that the two charsets read differently
        assert msa(c.request(BOM + ascii_only))[1:3] == ["AA", "BOM4"]
    assert message_count(eng) == 1


def test_utf16_is_ar_with_a_reason(eng):
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("W1").decode().encode("utf-16"))
        assert msa(ack)[1] == "AR"
        err = segment(ack, "ERR")
        assert err[3].startswith("103^") and "UTF-16" in err[8]
        assert msa(c.request(adt("W2")))[1:3] == ["AA", "W2"]


def test_no_msh18_with_utf8_below_msh_is_accepted(eng, rx):
    raw = adt("NC1", name="Łukasz^Żółć", encoding="utf-8")
    with RawClient(*eng.address("adt")) as c:
        assert msa(c.request(raw))[1:3] == ["AA", "NC1"]
    assert rx.wait_for(1) == [raw]


@pytest.mark.parametrize("version,code,err", [
    ("9.9", "AR", "203^"), ("3.0", "AR", "203^"), ("V2.5", "AR", "203^"), ("2.0", "AR", "203^"),
    ("", "AE", "101^"), ("2.3", "AA", None), ("2.9.1", "AA", None), (" 2.5.1 ", "AA", None),
])
def test_version_must_be_hl7_v2_by_default(eng, version, code, err):
    raw = adt("VER1").replace(b"|P|2.5", f"|P|{version}".encode())
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(raw)
    assert msa(ack)[1:3] == [code, "VER1"]
    if err:
        assert segment(ack, "ERR")[3].startswith(err) and segment(ack, "ERR")[2] == "MSH^1^12"
        assert segment(ack, "MSH")[11] == "2.5"  # an ACK in a real version, not in the refused one
    else:
        assert segment(ack, "MSH")[11] == version.strip()


def test_accept_versions_still_narrows(engine_factory, rx):
    eng = engine_factory(config(rx.port, extra=", accept_versions: ['2.3', '2.5']"))
    with RawClient(*eng.address("adt")) as c:
        assert msa(c.request(adt("AN1", version="2.3")))[1] == "AA"
        ack = c.request(adt("AN2", version="2.4"))
        assert msa(ack)[1] == "AR" and segment(ack, "ERR")[1].startswith("MSH^1^12^203")  # v2.4: ERR-1
        ack = c.request(adt("AN3", version="9.9"))
        assert msa(ack)[1] == "AR" and segment(ack, "ERR")[3].startswith("203^")


@pytest.mark.parametrize("msh15,msh16,answer", [
    ("XX", "AL", ("CE", "103^")), ("AL", "MAYBE", ("CE", "103^")), ("al", "ne", ("CA", None)),
    (" AL", "NE", ("CA", None)),
])
def test_acknowledgment_types_are_table_0155(eng, msh15, msh16, answer):
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(adt("AT1", msh15=msh15, msh16=msh16))
    assert msa(ack)[1:3] == [answer[0], "AT1"]
    if answer[1]:
        assert segment(ack, "ERR")[3].startswith(answer[1])
