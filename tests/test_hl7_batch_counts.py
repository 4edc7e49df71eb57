"""BTS-1 / FTS-1 counts of an HL7 v2 batch (HL7 v2.5 2.10.3) that do not add up or are not counts.

A count that disagrees (3 for 2), a negative one (``-5``), one of 25 digits or a Latin-1
superscript digit (which ``str.isdigit`` takes and ``int`` refuses: that was a traceback) is
named in the acknowledgment batch's BTS-2 / FTS-2; the messages themselves are accepted (each
one is checked on its own). Driven with a raw MLLP client and through a file source folder;
the batch ACK is read with a few lines of our own.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import test_hl7_batch
from mllp_peers import RawClient, adt
from sqlalchemy import select
from test_hl7_batch import FHS, YAML, bhs, segments

from engine.hl7.batch import build_batch_ack, read_batch
from engine.store import schema

BHS = bhs()
rx = test_hl7_batch.rx  # the receiving MLLP peer fixture (the routes' destination)


def trailer(reply: bytes, name: str) -> list[str]:
    return next(s for s in segments(reply) if s[0] == name)


def stored_ids(eng) -> list[str]:
    m = schema.messages
    with eng.store.engine.connect() as c:
        return [h["MSH-10"] for (h,) in c.execute(select(m.c.headers).order_by(m.c.received_at))]


BAD_BTS = [
    (b"3", "BTS-1 says 3 messages, 2 received"),
    (b"-5", "BTS-1 '-5' is not a message count, 2 received"),
    (b"1234567890123456789012345", "BTS-1 '123456789012...' is not a message count, 2 received"),
    (b"\xb2", "BTS-1 '\xb2' is not a message count, 2 received"),
    (b"2.0", "BTS-1 '2.0' is not a message count, 2 received"),
]


@pytest.mark.parametrize(("count", "problem"), BAD_BTS)
def test_reader_names_a_bts1_that_is_wrong_or_not_a_count(count, problem):
    bf = read_batch(BHS + adt("M1") + adt("M2") + b"BTS|" + count + b"\r")
    assert bf.all_problems() == [f"batch 1 (BHS-11 B0001): {problem}"]
    assert len(bf.messages) == 2


def test_reader_accepts_right_empty_and_padded_counts_and_checks_fts1():
    for count in (b"2", b"", b"0002", b" 2 ", b"2^x"):
        assert read_batch(BHS + adt("M1") + adt("M2") + b"BTS|" + count + b"\r").all_problems() == [], count
    body = BHS + adt("M1") + b"BTS|1\r"
    assert read_batch(FHS + body + b"FTS|-1\r").problems == ["FTS-1 '-1' is not a batch count, 1 received"]
    assert read_batch(FHS + body + b"FTS|" + b"9" * 25 + b"\r").problems == [
        "FTS-1 '999999999999...' is not a batch count, 1 received"]
    assert read_batch(FHS + body + b"FTS|2\r").problems == ["FTS-1 says 2 batches, 1 received"]
    assert read_batch(FHS + body + b"FTS|1\r").problems == []


def test_ack_comment_is_cut_between_escape_sequences():
    """BTS-2 is ST(80): a problem full of delimiters is cut before an escape, never inside one
    (cutting the escaped text left a dangling backslash the peer reads as an open escape)."""
    bf = read_batch(BHS + adt("M1") + b"BTS|1\r")
    bf.batches[0].problems.append("x" + "|" * 50)
    bts = trailer(build_batch_ack(bf, [[]]), "BTS")
    assert bts[:2] == ["BTS", "0"] and bts[2] == "x" + "\\F\\" * 26
    quoted = read_batch(BHS + adt("M1") + b"BTS|" + b"\\" * 40 + b"\r").all_problems()
    assert quoted == ["batch 1 (BHS-11 B0001): BTS-1 '" + "\\" * 12 + "...' is not a message count, 1 received"]


@pytest.mark.parametrize(("count", "problem"), BAD_BTS)
def test_batch_over_mllp_with_a_bad_count_is_accepted_and_the_ack_names_the_count(
        engine_factory, rx, count, problem):
    eng = engine_factory(YAML.format(rx=rx.port, extra=""))
    tag = count[:3].hex()
    m1, m2 = f"C{tag}1", f"C{tag}2"
    with RawClient(*eng.address("adt")) as c:
        reply = c.request(FHS + BHS + adt(m1) + adt(m2) + b"BTS|" + count + b"\rFTS|1\r")
        # the connection stays in sync after it
        assert trailer(c.request(BHS + adt("NEXT") + b"BTS|1\r"), "BTS") == ["BTS", "0"]
    segs = segments(reply)
    assert [s[0] for s in segs] == ["FHS", "BHS", "BTS", "FTS"]  # all accepted: an empty batch
    assert segs[1][9] == "2 messages, 2 accepted, 0 in error"
    assert trailer(reply, "BTS") == ["BTS", "0", problem]
    assert trailer(reply, "FTS") == ["FTS", "1"]
    assert wait_until_ids(eng, 3) == [m1, m2, "NEXT"]
    assert len(rx.wait_for(3)) == 3


def test_fts1_not_a_count_over_mllp(engine_factory, rx):
    eng = engine_factory(YAML.format(rx=rx.port, extra=""))
    with RawClient(*eng.address("adt")) as c:
        reply = c.request(FHS + BHS + adt("F1") + b"BTS|1\rFTS|-5\r")
    assert trailer(reply, "BTS") == ["BTS", "0"]
    assert trailer(reply, "FTS") == ["FTS", "1", "FTS-1 '-5' is not a batch count, 1 received"]
    assert wait_until_ids(eng, 1) == ["F1"]


def wait_until_ids(eng, n: int) -> list[str]:
    def enough() -> list[str] | None:
        ids = stored_ids(eng)
        return ids if len(ids) >= n else None

    return eng.wait_for(enough, timeout=60)


def test_file_source_batch_with_a_bad_count_is_stored_and_the_error_report_names_it(engine_factory, tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    eng = engine_factory(f"""
    channels:
      drop:
        source: {{type: file, path: {drop}, ready: immediate, poll_interval: 0.1}}
    """)
    (drop / "nightly.hl7").write_bytes(FHS + BHS + adt("D1") + adt("D2") + b"BTS|-5\rFTS|1\r")
    report = eng.wait_for(lambda: next(iter(Path(drop, "error").glob("*.error.txt")), None), timeout=60)
    text = report.read_text()
    assert "batch: batch 1 (BHS-11 B0001): BTS-1 '-5' is not a message count, 2 received" in text, text
    assert wait_until_ids(eng, 2) == ["D1", "D2"]
