"""Chunked authenticated encryption for large blobs (the STREAM construction over AES-256-GCM).

AES-GCM in one call caps its input at 2^31-1 bytes in the `cryptography` library and needs
the whole plaintext and ciphertext in memory, so one-shot sealing cannot store a 3 GiB
whole-slide image and holds gigabytes for a 1 GiB one. Here the plaintext is cut into
chunks (1 MiB by default), each sealed on its own under the blob's data key, with

    nonce_i = prefix (7 random bytes, per blob) || i (4 bytes, big-endian) || last (1 byte: 1 on the final chunk)
    AAD_i   = header || the blob's AAD (its message id)

This is the nonce-based STREAM of Hoang, Reyhanitabar, Rogaway and Vizár ("Online
Authenticated-Encryption and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015), with the
same nonce layout Tink's AES-GCM-HKDF streaming AEAD uses (7-byte prefix, 32-bit counter,
final flag): a chunk moved to another position fails (its index is in the nonce), dropping
the end fails (no chunk flagged final is found where the data stops), extending past the
final chunk fails (nothing may follow it), a chunk from another blob or message fails
(another key, another AAD). Tink itself was weighed: it brings its own keyset format, while
medrelay's data keys are wrapped per blob under the key file's KEKs (crypto.py); its STREAM
is this construction, so using `cryptography`'s AESGCM per chunk keeps one key scheme.

``header`` (stored where a one-shot blob keeps its 12-byte nonce) is ``MAGIC || chunk size
(4 bytes) || prefix``; its length and magic tell the two formats apart, so blobs sealed
before this still open. The ciphertext is the chunks' ciphertexts back to back, each
``chunk size + 16`` bytes except the last, so chunk ``i`` starts at ``i * (chunk size + 16)``
and can be read by range without reading the rest. Up to 2^32 chunks: 4 PiB at 1 MiB.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterable, Iterator

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAGIC = b"MRS1"
PREFIX_BYTES = 7
TAG_BYTES = 16
HEADER_BYTES = len(MAGIC) + 4 + PREFIX_BYTES
CHUNK_SIZE = 1 << 20
MAX_CHUNKS = 1 << 32


class StreamError(Exception):
    """A chunk failed authentication, or chunks are missing, reordered or appended."""


def is_stream_header(nonce: bytes) -> bool:
    return len(nonce) == HEADER_BYTES and bytes(nonce[:4]) == MAGIC


def new_header(chunk_size: int = CHUNK_SIZE) -> bytes:
    if not 16 <= chunk_size < 1 << 31:
        raise ValueError("chunk size out of range")
    return MAGIC + struct.pack(">I", chunk_size) + os.urandom(PREFIX_BYTES)


def chunk_size_of(header: bytes) -> int:
    return struct.unpack(">I", header[4:8])[0]


def _nonce(header: bytes, index: int, last: bool) -> bytes:
    if index >= MAX_CHUNKS:
        raise StreamError("too many chunks for one blob")
    return bytes(header[8:]) + struct.pack(">IB", index, 1 if last else 0)


def _rechunk(pieces: Iterable[bytes], size: int) -> Iterator[tuple[bytes | memoryview, bool]]:
    """Re-cut pieces of any size into ``size``-byte chunks, flagging the last (an empty input: one
    empty chunk). A large piece is sliced, not copied."""
    buf = bytearray()
    pending: bytes | memoryview | None = None
    for piece in pieces:
        view = memoryview(piece).cast("B")
        if buf:
            take = min(size - len(buf), len(view))
            buf += view[:take]
            view = view[take:]
            if len(buf) < size:
                continue
            if pending is not None:
                yield pending, False
            pending, buf = bytes(buf), bytearray()
        while len(view) >= size:
            if pending is not None:
                yield pending, False
            pending, view = view[:size], view[size:]
        buf += view
    if buf or pending is None:
        if pending is not None:
            yield pending, False
        yield bytes(buf), True
    else:
        yield pending, True


def seal_chunks(dek: bytes, header: bytes, aad: bytes, pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Ciphertext chunks of the plaintext given as ``pieces`` of any size; memory: about one chunk."""
    gcm = AESGCM(dek)
    full_aad = bytes(header) + aad
    size = chunk_size_of(header)
    for i, (chunk, last) in enumerate(_rechunk(pieces, size)):
        yield gcm.encrypt(_nonce(header, i, last), chunk, full_aad)


def stream_length(plain_size: int, chunk_size: int) -> int:
    """Ciphertext length of ``plain_size`` bytes sealed in ``chunk_size`` chunks."""
    return plain_size + max(1, -(-plain_size // chunk_size)) * TAG_BYTES


def open_chunks(dek: bytes, header: bytes, aad: bytes, read: Callable[[int, int], bytes]) -> Iterator[bytes]:
    """Plaintext chunks, each authenticated before it is yielded.

    ``read(offset, length)`` returns up to ``length`` ciphertext bytes from ``offset`` (fewer
    at the end). A caller that stops early has only seen authenticated chunks; one that
    reads to the end has been told (StreamError) of any truncation or extension.
    """
    gcm = AESGCM(dek)
    full_aad = bytes(header) + aad
    step = chunk_size_of(header) + TAG_BYTES
    i = 0
    while True:
        # one read per chunk: a byte past it tells whether anything follows (the final chunk is
        # the one followed by nothing; a full chunk may be final too)
        got = read(i * step, step + 1)
        last = len(got) <= step
        ct = got if last else got[:step]
        if len(ct) < TAG_BYTES:
            raise StreamError("truncated: the final chunk is missing")
        try:
            yield gcm.decrypt(_nonce(header, i, last), ct, full_aad)
        except InvalidTag:
            if last:
                raise StreamError(f"chunk {i} failed authentication (tampered, truncated, reordered "
                                  "or from another blob)") from None
            raise StreamError(f"chunk {i} failed authentication (tampered, reordered, extended "
                              "or from another blob)") from None
        if last:
            return
        i += 1


def seal_bytes(dek: bytes, header: bytes, aad: bytes, data: bytes) -> bytearray:
    """The whole ciphertext of ``data`` in one preallocated buffer (no list of chunks to join)."""
    out = bytearray(stream_length(len(data), chunk_size_of(header)))
    pos = 0
    for ct in seal_chunks(dek, header, aad, [data]):
        out[pos:pos + len(ct)] = ct
        pos += len(ct)
    return out


def open_bytes(dek: bytes, header: bytes, aad: bytes, ciphertext: bytes) -> bytes:
    """The whole plaintext of a stream-sealed blob held in memory (readers that can take chunks
    should: this holds the ciphertext, the chunks and the joined plaintext at once)."""
    view = memoryview(ciphertext)
    return b"".join(open_chunks(dek, header, aad, lambda off, n: view[off:off + n]))
