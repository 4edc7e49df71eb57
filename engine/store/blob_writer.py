"""A blob sealed and written as its plaintext arrives, for payloads too large to hold in memory.

``Store.seal_blob`` needs the whole payload; a 1 GiB DICOM instance would be held once as
received and once as ciphertext. ``BlobStream`` takes the plaintext in pieces of any size
(``write``), cuts it into the STREAM chunks of engine/security/stream.py (each chunk's nonce
holds its index and a final flag, its AAD the header and the message id, so reordering,
truncation and extension are detected on read) and hands each chunk to a writer thread
through a short queue: sealing and the file write overlap the caller's socket reads, and a
slow disk slows the caller (the queue is bounded) instead of growing memory. Memory: about
``depth + 2`` chunks.

The content address (SHA-256 of header and final tag, ``blob_address``) is known after the last
chunk: ``finish`` seals it, fsyncs the file and names it by its address, then returns the
``blobs`` row the commit will insert. Until that commit nothing refers to the file; a caller
that gives up calls ``abort`` (the file goes), and a crash leaves a ``.part`` file that
``store gc`` removes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from engine.security import stream
from engine.store.db import STREAM_CHUNK, Store, blob_address

QUEUE_DEPTH = 8  # chunks between the caller and the writer thread
PUT_WAIT = 600.0  # seconds a full queue may block the caller before the stream is given up


class BlobStreamError(OSError):
    """The streamed blob could not be written (disk full, I/O error): nothing was stored."""


def can_stream(store: Store) -> bool:
    """Whether the store's blob files take a streamed write (``open_stream``: a local folder, an
    S3 bucket; a ``BlobFiles`` of another kind keeps the in-memory path)."""
    return hasattr(store.files, "open_stream")


class BlobStream:
    """One blob being written; ``write`` pieces, then ``finish`` (the row) or ``abort``."""

    def __init__(self, store: Store, aad: str, *, chunk_size: int = STREAM_CHUNK, depth: int = QUEUE_DEPTH) -> None:
        self.store = store
        self.aad = aad
        self.size = 0
        self.chunk_size = chunk_size
        self._kid, self._wrapped, dek = store.keyring.new_data_key()
        self.header = stream.new_header(chunk_size)
        self._file = store.files.open_stream()  # type: ignore[attr-defined]
        self._q: queue.Queue[bytearray | None] = queue.Queue(maxsize=depth)
        self._buf = bytearray()
        self._error: BaseException | None = None
        self._tag: bytes | None = None
        self._ended = False  # the writer took the end marker
        self._closed = False
        self._thread = threading.Thread(target=self._run, args=(dek,), name="blob-stream", daemon=True)
        self._thread.start()

    # -- the caller's side -------------------------------------------------------------
    def write(self, data: bytes | memoryview) -> None:
        """Add plaintext; blocks while the writer is ``depth`` chunks behind."""
        if self._error is not None:
            raise BlobStreamError(f"blob write failed ({type(self._error).__name__})")
        self.size += len(data)
        self._buf += data
        if len(self._buf) >= self.chunk_size:  # whole chunks go; the rest starts the next buffer
            n = len(self._buf) - len(self._buf) % self.chunk_size
            rest = self._buf[n:]
            del self._buf[n:]
            self._put(self._buf)
            self._buf = rest

    def finish(self) -> dict[str, Any]:
        """Seal the last chunk, make the file durable under its address; the ``blobs`` row."""
        if self._closed:
            raise RuntimeError("blob stream already closed")
        self._closed = True
        try:
            if self._buf:
                self._put(self._buf)
                self._buf = bytearray()
            self._put(None)
            self._thread.join()
            if self._error is not None:
                raise BlobStreamError(f"blob write failed ({type(self._error).__name__})") from self._error
            assert self._tag is not None
            blob_id = blob_address(self.header, self._tag)
            self._file.commit(blob_id)
        except BaseException:
            self._file.abort()
            raise
        return {"id": blob_id, "aad": self.aad, "kek_id": self._kid, "wrapped_key": self._wrapped,
                "nonce": self.header, "size": self.size, "data": None, "in_file": 1}

    def abort(self) -> None:
        """Give up: the writer stops and the file is removed. Idempotent; never raises."""
        if self._closed:
            return
        self._closed = True
        self._error = self._error or _Aborted()
        self._buf = bytearray()
        try:
            self._q.put(None, timeout=PUT_WAIT)  # the writer drains once it sees the error
        except queue.Full:
            pass
        self._thread.join(PUT_WAIT)
        self._file.abort()

    def _put(self, item: bytearray | None) -> None:
        try:
            self._q.put(item, timeout=PUT_WAIT)
        except queue.Full:
            self._error = self._error or TimeoutError("blob writer stalled")
            raise BlobStreamError("blob write stalled") from None

    # -- the writer thread -------------------------------------------------------------
    def _pieces(self) -> Iterator[bytearray]:
        while True:
            item = self._q.get()
            if item is None:
                self._ended = True
                return
            if self._error is not None:  # aborted: drop the rest
                continue
            yield item

    def _run(self, dek: bytes) -> None:
        try:
            last = b""
            for ct in stream.seal_chunks(dek, self.header, self.aad.encode(), self._pieces()):
                if self._error is not None:
                    break
                self._file.write(ct)
                last = ct
            if self._error is None:
                self._tag = bytes(last[-stream.TAG_BYTES:])
        except BaseException as e:  # disk full, I/O error: the caller is told on its next call
            self._error = self._error or e
        finally:
            while not self._ended:  # never leave the caller blocked on a full queue
                if self._q.get() is None:
                    self._ended = True


class _Aborted(Exception):
    pass
