"""HL7 v2 batches (HL7 v2.5 2.10.3): FHS/BHS ... BTS/FTS over MLLP and through `medrelay import`.

Each message of a batch is checked, stored, de-duplicated and routed on its own, so a bad one
fails alone; the sender gets one batch back whose BHS-12 / FHS-12 reference its batch and file
and whose messages are the ACKs of the messages in error. The batch ACK is read here with a
few lines of our own, not with medrelay's reader.
"""

import os
import subprocess
import sys

import pytest
from mllp_peers import MLLPReceiver, RawClient, adt
from sqlalchemy import select

from engine.hl7.batch import build_batch_ack, is_batch, read_batch
from engine.hl7.message import split_file
from engine.store import schema

FHS = b"FHS|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||nightly.hl7||F0001\r"
FTS = b"FTS|1\r"


def bhs(control="B0001"):
    return f"BHS|^~\\&|HIS|HOSP|RIS|RAD|20240102030405|||nightly|{control}\r".encode()


def bts(n):
    return f"BTS|{n}\r".encode()


def bad(control_id):
    """MSH-9 empty: the receiver refuses it with AE 101."""
    return adt(control_id).replace(b"ADT^A01^ADT_A01", b"")


def segments(data: bytes) -> list[list[str]]:
    return [s.split("|") for s in data.decode("latin-1").split("\r") if s]


def acks_in(reply: bytes) -> list[tuple[str, str]]:
    """(MSA-1, MSA-2) of every ACK message in a batch ACK."""
    return [(s[1], s[2]) for s in segments(reply) if s[0] == "MSA"]


# -- the shared reader -----------------------------------------------------------------
def test_read_batch_structure_counts_and_split_file():
    one, two = adt("M1"), adt("M2")
    data = FHS + bhs() + one + two + bts(2) + FTS
    bf = read_batch(data)
    assert bf.envelope and bf.control_id == "F0001" and len(bf.batches) == 1
    assert bf.batches[0].messages == [one, two] and bf.all_problems() == []
    assert split_file(data) == [one, two]  # medrelay import's splitter leaves the envelope out
    assert split_file(data.replace(b"\r", b"\r\n")) == [m.replace(b"\r", b"\r\n") for m in (one, two)]
    assert is_batch(b"\xef\xbb\xbf\r\n" + data) and is_batch(bhs() + one) and not is_batch(one)
    # counts that do not add up and missing trailers: a truncated file is named, messages kept
    cut = read_batch(FHS + bhs() + one + bts(3) + bhs("B2") + two)
    assert cut.batches[1].messages == [two]
    assert cut.all_problems() == ["no FTS (file trailer): the file may be truncated",
                                  "batch 1 (BHS-11 B0001): BTS-1 says 3 messages, 1 received",
                                  "batch 2 (BHS-11 B2): no BTS (batch trailer): the batch may be truncated"]
    assert read_batch(FHS + bhs() + one + bts(1) + b"FTS|2\r").problems == ["FTS-1 says 2 batches, 1 received"]
    # messages without BHS form a batch of their own; junk between segments is an item of its own
    loose = read_batch(FHS + b"junk line\r" + one + FTS)
    assert [m[:4] for m in loose.batches[0].messages] == [b"junk", b"MSH|"]


def test_batch_ack_references_the_request_and_swaps_addressees():
    req = read_batch(FHS + bhs("B9") + adt("M1") + bts(1) + FTS)
    err = b"MSH|^~\\&|RIS|RAD|HIS|HOSP|20240102||ACK^A01^ACK|X1|P|2.5\rMSA|AE|M1\rERR||PID^1^3|101^x^HL70357|E\r"
    segs = segments(build_batch_ack(req, [[err]], comments=["1 messages, 0 accepted, 1 in error"]))
    assert [s[0] for s in segs] == ["FHS", "BHS", "MSH", "MSA", "ERR", "BTS", "FTS"]
    fhs, bh = segs[0], segs[1]
    assert fhs[2:6] == ["RIS", "RAD", "HIS", "HOSP"] and fhs[11] == "F0001" and fhs[10] not in ("", "F0001")
    assert bh[2:6] == ["RIS", "RAD", "HIS", "HOSP"] and bh[11] == "B9" and bh[9].startswith("1 messages")
    assert segs[5][:2] == ["BTS", "1"] and segs[6][:2] == ["FTS", "1"]
    # all accepted: an empty batch acknowledges every message (2.10.3)
    assert [s[0] for s in segments(build_batch_ack(req, [[]]))] == ["FHS", "BHS", "BTS", "FTS"]


# -- over MLLP -------------------------------------------------------------------------
YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0, max_frame_bytes: 65536{extra}}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 2, connect_timeout: 1}}
        retry: {{max_attempts: 5, initial_delay: 0.05, max_delay: 0.2}}
"""


@pytest.fixture
def rx():
    r = MLLPReceiver().start()
    yield r
    r.stop()


def stored(eng):
    m = schema.messages
    with eng.store.engine.connect() as c:
        return [dict(r) for r in c.execute(select(m.c.id, m.c.headers).order_by(m.c.received_at)).mappings()]


def test_batch_over_mllp_bad_message_fails_alone_and_ack_lists_it(engine_factory, rx):
    eng = engine_factory(YAML.format(rx=rx.port, extra=""))
    # bytes that are not a message (before the batch's first MSH) are an item of their own
    batch = FHS + bhs() + b"not hl7 at all\r" + adt("BA1") + bad("BA2") + adt("BA3") + adt("BA4") + bts(4) + FTS
    with RawClient(*eng.address("adt")) as c:
        reply = c.request(batch)
    segs = segments(reply)
    assert [s[0] for s in segs if s[0] in ("FHS", "BHS", "BTS", "FTS")] == ["FHS", "BHS", "BTS", "FTS"]
    fhs, bh = segs[0], segs[1]
    assert fhs[11] == "F0001" and bh[11] == "B0001" and bh[2:6] == ["RIS", "RAD", "HIS", "HOSP"]
    assert bh[9] == "5 messages, 3 accepted, 2 in error" and segs[-1] == ["FTS", "1"]
    # the two errors, each an ACK of its own: AR for the bytes that are not HL7, AE 101 for BA2
    assert acks_in(reply) == [("AR", ""), ("AE", "BA2")]
    errs = [s for s in segs if s[0] == "ERR"]
    assert errs[0][3].startswith("100^") and errs[1][3].startswith("101^")
    assert [s for s in segs if s[0] == "BTS"][0][1] == "2"
    # the good ones are stored and routed, in batch order, each with the batch's control id
    assert [m.split(b"\r")[0].split(b"|")[9] for m in rx.wait_for(3)] == [b"BA1", b"BA3", b"BA4"]
    rows = stored(eng)
    assert [r["headers"]["MSH-10"] for r in rows] == ["BA1", "BA3", "BA4"]
    assert {r["headers"]["batch"] for r in rows} == {"B0001"}
    # the same batch again: every message a duplicate of the stored one, an empty batch back
    with RawClient(*eng.address("adt")) as c:
        again = c.request(FHS + bhs() + adt("BA1") + adt("BA3") + bts(2) + FTS)
    assert acks_in(again) == [] and [s[:2] for s in segments(again) if s[0] == "BTS"] == [["BTS", "0"]]
    assert len(stored(eng)) == 3


def test_batch_ack_all_count_mismatch_and_bare_bhs(engine_factory, rx):
    eng = engine_factory(YAML.format(rx=rx.port, extra=", batch_ack: all"))
    with RawClient(*eng.address("adt")) as c:
        reply = c.request(bhs("B7") + adt("AL1") + adt("AL2") + bts(3))  # a batch without a file
    segs = segments(reply)
    assert segs[0][0] == "BHS" and segs[0][11] == "B7" and not any(s[0] in ("FHS", "FTS") for s in segs)
    assert acks_in(reply) == [("AA", "AL1"), ("AA", "AL2")]
    bt = [s for s in segs if s[0] == "BTS"][0]
    assert bt[1] == "2" and bt[2] == "BTS-1 says 3 messages, 2 received"
    assert len(stored(eng)) == 2


def test_batch_over_the_frame_limit_is_refused_whole_as_a_batch(engine_factory, rx):
    eng = engine_factory(YAML.format(rx=rx.port, extra=""))
    big = FHS + bhs() + b"".join(adt(f"BIG{i}", extra="NTE|1||" + "x" * 1000) for i in range(80)) + bts(80) + FTS
    assert len(big) > 65536
    with RawClient(*eng.address("adt")) as c:
        reply = c.request(big)
        assert acks_in(reply) == [("AR", "")] and segments(reply)[1][11] == "B0001"
        assert "limit of 65536 bytes" in reply.decode()
        # the connection stays in sync: the next batch is answered normally
        assert acks_in(c.request(bhs("B8") + adt("OK1") + bts(1))) == []
    assert [r["headers"]["MSH-10"] for r in stored(eng)] == ["OK1"]


# -- medrelay import -------------------------------------------------------------------
def medrelay_import(eng, *paths):
    return subprocess.run([sys.executable, "-m", "engine.cli", "import", "-c", str(eng.config_path), "--channel",
                           "adt", "--port", str(eng.address("adt")[1]), *map(str, paths)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ))


def test_medrelay_import_of_batch_files(engine_factory, rx, tmp_path):
    eng = engine_factory(YAML.format(rx=rx.port, extra=""))
    text = tmp_path / "nightly.hl7"  # as a text file, lines ending in LF, one bad message
    text.write_bytes((FHS + bhs() + adt("IM1") + bad("IM2") + adt("IM3") + bts(3) + FTS).replace(b"\r", b"\n"))
    r = medrelay_import(eng, text)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert "2 accepted, 1 rejected, 0 skipped" in r.stdout, r.stdout
    assert f"rejected: {text} message 2 (MSH-10 IM2): AE 101" in r.stdout
    truncated = tmp_path / "cut.hl7"
    truncated.write_bytes(FHS + bhs("B2") + adt("IM4") + bts(2))
    r = medrelay_import(eng, truncated)
    assert r.returncode == 1 and "1 accepted, 2 rejected" in r.stdout, r.stdout
    assert f"rejected: {truncated} batch envelope: no FTS (file trailer): the file may be truncated" in r.stdout
    assert f"rejected: {truncated} batch envelope: batch 1 (BHS-11 B2): BTS-1 says 2 messages, 1 received" in r.stdout
    framed = tmp_path / "framed.mllp"  # an MLLP-framed batch goes over as the frame it is
    framed.write_bytes(b"\x0b" + FHS + bhs("B3") + adt("IM5") + bad("IM6") + bts(2) + FTS + b"\x1c\r")
    r = medrelay_import(eng, framed)
    assert r.returncode == 1 and "1 accepted, 1 rejected" in r.stdout, r.stdout
    assert f"rejected: {framed} batch message 2 (MSH-10 IM6): AE 101" in r.stdout
    assert [r["headers"]["MSH-10"] for r in stored(eng)] == ["IM1", "IM3", "IM4", "IM5"]
    assert len(rx.wait_for(4)) == 4
