"""listeners/mllp_framing.FrameParser, byte by byte."""

import random

import pytest

from engine.hl7.mllp import Frame, FrameParser, Oversized, Restarted, Unframed, frame

A = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\rPID|1\r"
B = b"MSH|^~\\&|A|B|C|D|1||ADT^A01|2|P|2.5\rPID|2\r"


def feed_all(p, chunks):
    out = []
    for c in chunks:
        out.extend(p.feed(c))
    return out


def test_one_frame():
    assert FrameParser().feed(frame(A)) == [Frame(A)]


def test_split_every_byte():
    data = frame(A) + frame(B)
    p = FrameParser()
    events = feed_all(p, [data[i:i + 1] for i in range(len(data))])
    assert events == [Frame(A), Frame(B)]
    assert p.buffered == 0 and not p.in_frame


def test_split_between_end_block_and_cr():
    data = frame(A)
    p = FrameParser()
    assert p.feed(data[:-1]) == [Frame(A)]  # FS ends the frame; the CR is skipped later
    assert p.feed(data[-1:] + frame(B)) == [Frame(B)]


def test_merged_frames_and_random_chunks():
    msgs = [A.replace(b"|1|", f"|{i}|".encode()) for i in range(50)]
    data = b"".join(frame(m) for m in msgs)
    rnd = random.Random(7)
    chunks, pos = [], 0
    while pos < len(data):
        n = rnd.randint(1, 200)
        chunks.append(data[pos:pos + n])
        pos += n
    assert feed_all(FrameParser(), chunks) == [Frame(m) for m in msgs]


def test_blank_between_frames_is_ignored():
    assert FrameParser().feed(b"\r\n " + frame(A) + b"\n\x00" + frame(B) + b"\n") == [Frame(A), Frame(B)]


def test_missing_cr_after_end_block():
    assert FrameParser().feed(b"\x0b" + A + b"\x1c" + frame(B)) == [Frame(A), Frame(B)]


def test_unframed_bytes():
    p = FrameParser()
    assert p.feed(b"MSH|hello") == [Unframed(9)]
    p = FrameParser()
    assert p.feed(b"junk" + frame(A)) == [Unframed(4), Frame(A)]


def test_restart_inside_frame():
    p = FrameParser()
    assert p.feed(b"\x0bMSH|partial") == []
    assert p.feed(frame(A)) == [Restarted(len(b"MSH|partial")), Frame(A)]


def test_oversized_keeps_prefix_and_resyncs():
    p = FrameParser(max_frame_bytes=100, prefix_bytes=40)
    big = A + b"X" * 500
    events = feed_all(p, [frame(big)[:50], frame(big)[50:300], frame(big)[300:] + frame(B)])
    assert len(events) == 2
    ov = events[0]
    assert isinstance(ov, Oversized) and ov.prefix == big[:40] and ov.size == len(big)
    assert events[1] == Frame(B)


def test_exactly_at_limit_is_accepted():
    p = FrameParser(max_frame_bytes=len(A))
    assert p.feed(frame(A)) == [Frame(A)]
    p = FrameParser(max_frame_bytes=len(A) - 1)
    assert isinstance(p.feed(frame(A))[0], Oversized)


def test_endless_frame_is_cut_off():
    p = FrameParser(max_frame_bytes=100, max_discard_bytes=1000)
    events = feed_all(p, [b"\x0b" + b"X" * 300] + [b"Y" * 300] * 5)
    assert any(isinstance(e, Unframed) for e in events)


def test_limit_too_small():
    with pytest.raises(ValueError):
        FrameParser(max_frame_bytes=1)
