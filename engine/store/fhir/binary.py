"""The bytes of FHIR ``Binary`` resources: sealed as a blob of their own, streamed back.

A Binary's ``data`` never goes into the resource JSON that ``resources.FhirStore`` seals
per version: a 50 MiB PDF would be base64 text (67 MiB) inside one JSON document, parsed
and re-serialised on every read. Instead the bytes are a separate encrypted blob, always
in the chunked STREAM format (engine/security/stream.py), so a read decrypts and sends
one chunk at a time (``Store.blob_chunks``), and ``fhir_binary_data`` names the blob per
version together with the contentType, the size and a keyed HMAC of the bytes (to see
that a re-sent PUT changes nothing, without keeping anything that reveals the content).

``seal_pieces`` seals bytes given in pieces; ``PieceSealer`` runs it in a worker thread fed
while the listener is still receiving (a raw upload). Past ``inline_max`` the pieces go to a
``BlobStream`` (engine/store/blob_writer.py, the writer large DICOM instances stream to): each
is sealed and written to the blob file as it arrives, so neither the plaintext nor the
ciphertext is ever held whole. Small bytes (and a ``BlobFiles`` that cannot stream) are
sealed in memory into the same ``blobs`` row ``Store.seal_blob`` builds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import queue
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select

from engine.security import stream
from engine.store.blob_writer import BlobStream, can_stream
from engine.store.db import blob_address
from engine.store.fhir.params import FhirError
from engine.store.fhir.tables import fhir_binary_data

B64_PIECE = 3 * 256 * 1024
# Envelope header of a raw Binary write: its message holds the resource without ``data``, the
# bytes are in the FHIR store (the `store` destination leaves it alone, the `fhir` destination
# streams the bytes from there).
HELD_DATA_HEADER = "binary_data"  # base64 encodes 3 bytes to 4: a multiple of 3 leaves no padding mid-stream


@dataclass
class SealedData:
    """Bytes sealed and (when file-backed) written durably; the row is inserted with the version."""

    row: dict[str, Any]
    digest: str
    size: int
    file_written: bool

    @property
    def blob_id(self) -> str:
        return str(self.row["id"])


@dataclass(frozen=True)
class StoredData:
    blob_id: str
    aad: str
    content_type: str
    size: int
    digest: str


def data_aad(rtype: str, rid: str) -> str:
    """The AAD of a resource's data blob (hashed to fit the 64-character column)."""
    return "fhirbin:" + hashlib.sha256(f"{rtype}/{rid}".encode()).hexdigest()[:56]


def seal_pieces(store: Any, pieces: Iterable[bytes] | deque[bytes], aad: str, hash_key: bytes) -> SealedData:
    """Seal the bytes given in pieces (a deque is emptied as it goes) and write the blob file.

    Runs in a worker thread: AES-GCM over 50 MiB takes tens of milliseconds of CPU."""
    kid, wrapped, dek = store.keyring.new_data_key()
    header = stream.new_header(stream.CHUNK_SIZE)
    mac = hmac.new(hash_key, digestmod=hashlib.sha256)
    size = 0

    def feed() -> Iterator[bytes]:
        nonlocal size
        if isinstance(pieces, deque):
            while pieces:
                p = pieces.popleft()
                mac.update(p)
                size += len(p)
                yield p
        else:
            for p in pieces:
                mac.update(p)
                size += len(p)
                yield p

    source = feed()
    head = bytearray()
    if can_stream(store):  # past inline_max the blob is a file: streamed there as it comes
        for p in source:
            head += p
            if len(head) > store.inline_max:
                return _streamed(store, aad, head, source, mac)
    ct = bytearray()
    for c in stream.seal_chunks(dek, header, aad.encode(), itertools.chain([bytes(head)] if head else [], source)):
        ct += c
    blob_id = blob_address(header, ct)
    in_file = len(ct) > store.inline_max
    row = {"id": blob_id, "aad": aad, "kek_id": kid, "wrapped_key": wrapped, "nonce": header, "size": size,
           "data": None if in_file else bytes(ct), "in_file": int(in_file)}
    if in_file:
        store.write_blob_files([(blob_id, ct)])
    return SealedData(row, mac.hexdigest(), size, in_file)


def _streamed(store: Any, aad: str, head: bytearray, rest: Iterator[bytes], mac: Any) -> SealedData:
    """The rest of ``seal_pieces`` through a ``BlobStream``: durable under its address when it
    returns; an error (``Aborted`` included) removes the file."""
    blob = BlobStream(store, aad, chunk_size=stream.CHUNK_SIZE)
    try:
        blob.write(head)
        del head[:]
        for p in rest:
            blob.write(p)
        row = blob.finish()
    except BaseException:
        blob.abort()
        raise
    return SealedData(row, mac.hexdigest(), int(row["size"]), True)


class Aborted(Exception):
    """The upload was given up (413, a disconnect): the sealing thread stops, nothing is written."""


_END, _ABORT = object(), object()


class PieceSealer:
    """``seal_pieces`` over pieces handed in from another thread (the event loop) as they arrive.

    ``run`` is the worker thread's side; ``put``/``close``/``abort`` never block the caller."""

    def __init__(self, store: Any, aad: str, hash_key: bytes) -> None:
        self.store, self.aad, self.hash_key = store, aad, hash_key
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.received = 0

    def put(self, piece: bytes) -> None:
        self.received += len(piece)
        self._q.put(piece)

    def close(self) -> None:
        self._q.put(_END)

    def abort(self) -> None:
        self._q.put(_ABORT)

    def _pieces(self) -> Iterator[bytes]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if item is _ABORT:
                raise Aborted()
            yield item

    def run(self) -> SealedData:
        return seal_pieces(self.store, self._pieces(), self.aad, self.hash_key)


# Where a stored type keeps Attachments: (list element, key of the Attachment in each item or None
# when the item is the Attachment). Large inline ``data`` there moves into a Binary on write.
ATTACHMENTS: dict[str, tuple[str, str | None]] = {
    "DocumentReference": ("content", "attachment"),
    "DiagnosticReport": ("presentedForm", None),
}


def attachments(rtype: str, resource: dict[str, Any]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(position, Attachment) of every Attachment of ``resource`` listed in ATTACHMENTS."""
    where = ATTACHMENTS.get(rtype)
    items = resource.get(where[0]) if where else None
    if not where or not isinstance(items, list):
        return
    for i, item in enumerate(items):
        att = item.get(where[1]) if where[1] and isinstance(item, dict) else item
        if isinstance(att, dict):
            yield i, att


def attachment_path(rtype: str, i: int) -> str:
    """The FHIRPath of attachment ``i``'s data, for error messages."""
    element, key = ATTACHMENTS[rtype]
    return f"{rtype}.{element}[{i}]" + (f".{key}" if key else "") + ".data"


def with_attachments(rtype: str, resource: dict[str, Any], replaced: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A copy of ``resource`` with attachment i replaced by ``replaced[i]`` (the input is not changed)."""
    element, key = ATTACHMENTS[rtype]
    items = list(resource[element])
    for i, att in replaced.items():
        items[i] = {**items[i], key: att} if key else att
    return {**resource, element: items}


def decode_data(value: Any, expression: str) -> bytes:
    """A ``base64Binary`` element's bytes; 400 naming the element (not the value) when malformed."""
    if not isinstance(value, str):
        raise FhirError(400, "invalid", f"{expression} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FhirError(400, "invalid", f"{expression} is not valid base64") from None


def record(conn: Connection, store: Any, rtype: str, rid: str, version: int, content_type: str,
           sealed: SealedData) -> None:
    """The data blob's row and its ``fhir_binary_data`` row, in the version's transaction."""
    store.insert_blob_rows(conn, [sealed.row])
    conn.execute(insert(fhir_binary_data).values(
        type=rtype, id=rid, version=version, blob_id=sealed.blob_id, aad=sealed.row["aad"],
        content_type=content_type, size=sealed.size, digest=sealed.digest))


def stored(conn: Connection, rtype: str, rid: str, version: int) -> StoredData | None:
    t = fhir_binary_data
    row = conn.execute(select(t).where(t.c.type == rtype, t.c.id == rid, t.c.version == version)
                       ).mappings().first()
    if row is None:
        return None
    return StoredData(row["blob_id"], row["aad"], row["content_type"], int(row["size"]), row["digest"])


def chunks(conn: Connection, store: Any, data: StoredData) -> Iterator[bytes]:
    """The plaintext chunk by chunk; the row is read now, the chunks when iterated (no connection needed)."""
    return store.blob_chunks(conn, data.blob_id, aad=data.aad)


def base64_pieces(plain: Iterable[bytes]) -> Iterator[bytes]:
    """Base64 of a chunk stream, in pieces, without holding the whole text."""
    rest = b""
    for chunk in plain:
        buf = rest + chunk if rest else chunk
        cut = len(buf) - len(buf) % 3
        for i in range(0, cut, B64_PIECE):
            yield base64.b64encode(buf[i:min(cut, i + B64_PIECE)])
        rest = bytes(buf[cut:])
    if rest:
        yield base64.b64encode(rest)


def json_with_data(body: bytes, plain: Iterable[bytes]) -> Iterator[bytes]:
    """``body`` (the resource JSON, an object without ``data``) with ``"data":"<base64>"`` added last."""
    head = body.rstrip()
    assert head.endswith(b"}")
    head = head[:-1].rstrip()
    yield head + (b',"data":"' if not head.endswith(b"{") else b'"data":"')
    yield from base64_pieces(plain)
    yield b'"}'
