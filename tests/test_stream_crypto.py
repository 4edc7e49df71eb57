"""Chunked authenticated encryption of large blobs (engine/security/stream.py) and the store's use
of it: round trip, truncation, extension, chunk swap, wrong AAD, a >2 GiB logical size with a
small chunk size, blobs sealed one-shot before this still opening, and a store blob above the
streaming threshold read whole and as chunks."""

from __future__ import annotations

import os

import pytest

from engine.security import stream
from engine.security.crypto import IntegrityError, KeyRing


def _seal(data: bytes, aad: bytes = b"msg-1", chunk: int = 64, pieces: int = 7) -> tuple[bytes, bytes, bytes]:
    dek = os.urandom(32)
    header = stream.new_header(chunk)
    parts = [data[i:i + pieces] for i in range(0, len(data), pieces)] or [b""]
    return dek, header, b"".join(stream.seal_chunks(dek, header, aad, parts))


def _reader(ct: bytes):
    return lambda off, n: ct[off:off + n]


@pytest.mark.parametrize("size", [0, 1, 63, 64, 65, 128, 1000])
def test_round_trip_at_every_boundary(size):
    data = os.urandom(size)
    dek, header, ct = _seal(data)
    assert len(ct) == stream.stream_length(size, 64)
    chunks = list(stream.open_chunks(dek, header, b"msg-1", _reader(ct)))
    assert b"".join(chunks) == data and all(len(c) <= 64 for c in chunks)
    assert stream.open_bytes(dek, header, b"msg-1", ct) == data


def test_truncation_extension_swap_and_aad_are_detected():
    data = os.urandom(64 * 5 + 10)
    dek, header, ct = _seal(data)
    step = 64 + stream.TAG_BYTES
    for cut in (ct[:step * 3], ct[:step * 5], ct[:-1], ct[:10]):  # at a chunk boundary, mid-chunk, tiny
        with pytest.raises(stream.StreamError):
            stream.open_bytes(dek, header, b"msg-1", cut)
    with pytest.raises(stream.StreamError):  # a chunk of another stream appended after the final one
        _, _, other = _seal(os.urandom(64), chunk=64)
        stream.open_bytes(dek, header, b"msg-1", ct + other)
    with pytest.raises(stream.StreamError):  # the final chunk appended twice
        stream.open_bytes(dek, header, b"msg-1", ct + ct[step * 5:])
    swapped = ct[step:step * 2] + ct[:step] + ct[step * 2:]
    with pytest.raises(stream.StreamError):
        stream.open_bytes(dek, header, b"msg-1", swapped)
    with pytest.raises(stream.StreamError):
        stream.open_bytes(dek, header, b"msg-2", ct)  # another message's AAD
    bad_header = header[:4] + (128).to_bytes(4, "big") + header[8:]
    with pytest.raises(stream.StreamError):
        stream.open_bytes(dek, bad_header, b"msg-1", ct)
    # the chunks before a damaged one are yielded authenticated; the damage stops the stream
    damaged = bytearray(ct)
    damaged[step * 2 + 5] ^= 1
    it = stream.open_chunks(dek, header, b"msg-1", _reader(bytes(damaged)))
    assert next(it) + next(it) == data[:128]
    with pytest.raises(stream.StreamError):
        next(it)


def test_more_than_2_gib_round_trip_with_bounded_memory():
    """2^31 + 17 bytes (past AESGCM's single-call cap) sealed from generated pieces and opened
    again by range while it is being sealed: each ciphertext chunk is dropped once read, so the
    test holds a few chunks, never the 2 GiB; 8 MiB chunks keep it to 257 AES-GCM calls a way."""
    dek = os.urandom(32)
    chunk = 8 << 20
    header = stream.new_header(chunk)
    total = (1 << 31) + 17
    piece = b"\xa5" * (3 << 20)  # not a multiple of the chunk size: pieces are re-cut

    def pieces():
        left = total
        while left:
            n = min(left, len(piece))
            yield piece[:n]
            left -= n

    step = chunk + stream.TAG_BYTES
    sealing = stream.seal_chunks(dek, header, b"big", pieces())
    made: dict[int, bytes] = {}
    sealed = [0]

    def read(off: int, n: int) -> bytes:
        i, j = off // step, (off + n - 1) // step  # the chunks this range touches
        while sealed[0] <= j:
            nxt = next(sealing, None)
            if nxt is None:
                break
            made[sealed[0]] = nxt
            sealed[0] += 1
        for old in [k for k in made if k < i - 1]:
            del made[old]
        got = b"".join(made.get(k, b"") for k in range(i, j + 1))
        return got[off - i * step:off - i * step + n]

    seen = 0
    for plain in stream.open_chunks(dek, header, b"big", read):
        assert plain == b"\xa5" * len(plain)
        seen += len(plain)
        assert len(made) <= 3
    assert seen == total and sealed[0] == 257
    assert len(stream._nonce(header, stream.MAX_CHUNKS - 1, True)) == 12
    with pytest.raises(stream.StreamError):
        stream._nonce(header, stream.MAX_CHUNKS, True)


def test_store_seals_large_blobs_in_chunks_and_reads_old_ones(tmp_path, monkeypatch):
    from sqlalchemy import select

    from engine.store import schema
    from engine.store.db import Store

    store = Store(f"sqlite:///{tmp_path}/db.sqlite", tmp_path / "blobs", KeyRing(tmp_path / "keys.json"),
                  inline_max=1024)
    store.migrate()
    with store.engine.begin() as c:
        old = store.put_blob(c, b"o" * 50_000, "m-old")  # below the threshold: one-shot, as before
    monkeypatch.setattr("engine.store.db.STREAM_MIN", 10_000)
    monkeypatch.setattr("engine.store.db.STREAM_CHUNK", 4096)
    data = os.urandom(50_000)
    with store.engine.begin() as c:
        big = store.put_blob(c, data, "m-big")
        small_stream = store.put_blob(c, b"s" * 10_001, "m-s")
    with store.engine.connect() as c:
        rows = {r.id: r for r in c.execute(select(schema.blobs))}
        assert len(rows[old].nonce) == 12 and stream.is_stream_header(rows[big].nonce)
        assert store.get_blob(c, old) == b"o" * 50_000
        assert store.get_blob(c, big) == data
        assert store.get_blob(c, small_stream) == b"s" * 10_001
        chunks = list(store.blob_chunks(c, big))
        assert b"".join(chunks) == data and max(len(x) for x in chunks) == 4096
        assert b"".join(store.blob_chunks(c, old)) == b"o" * 50_000  # old ones iterate too (one piece)
        with pytest.raises(IntegrityError):
            store.get_blob(c, big, aad="m-other")
    # a truncated file fails on read, whole or chunked
    path = store.blob_path(big)
    path.write_bytes(path.read_bytes()[:-4096 - 16])
    with store.engine.connect() as c:
        with pytest.raises(IntegrityError):
            store.get_blob(c, big)
        with pytest.raises(IntegrityError):
            b"".join(store.blob_chunks(c, big))
    store.dispose()
