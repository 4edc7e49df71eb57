"""Where blob ciphertexts too large for the database live: a local folder or an S3 bucket.

One small interface, ``BlobFiles``, for every place that touches blob files: the store's
write before commit (durable when ``write`` returns), reads (``open_blob``), the unlink of
a refused message's written-ahead file, retention, ``store gc`` and backup/restore.

- ``LocalFolder`` (the default) is the folder beside the database, exactly as before:
  ``<dir>/<id[:2]>/<id>``, written under the final name with O_EXCL, the file's fsync and
  its folder's at the same time (both done before ``write`` returns), a partial write removed.
- ``ObjectStore`` keeps the same names (``<prefix>/<id[:2]>/<id>``) in an S3-compatible
  bucket through obstore (the Rust object_store crate: one well-kept client for S3, R2,
  MinIO, Ceph...). A PUT that returned 200 is stored durably by the service, so ``write``
  returns only after every PUT of the call has been answered: the committer waits for it
  just as it waits for a local file's fsync. An object is the whole ciphertext or absent
  (S3 has no torn objects); the name is the content address, so writing the same name twice
  writes the same bytes.

Content addressing and encryption are above this layer (engine/store/db.py): what goes
in and comes out here is ciphertext, so nothing here sees PHI.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import structlog

log = structlog.get_logger()

BLOB_NAME_LEN = 64  # hex SHA-256
PART_SUFFIX = ".part"  # a blob being streamed in (its address is known only after its last chunk)
WRITEBACK_EVERY = 32 << 20  # a streamed file's dirty pages are handed to the disk every this many bytes


class BlobFiles(Protocol):
    """Ciphertext files by blob id."""

    describe: str  # for logs and errors: a folder or s3://bucket/prefix (no credentials)

    def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Store every item durably; on failure remove what this call created, then raise."""

    def read(self, blob_id: str) -> bytes:
        """The whole ciphertext; FileNotFoundError when absent."""

    def read_range(self, blob_id: str, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` (fewer at the end); FileNotFoundError when absent."""

    def size(self, blob_id: str) -> int:
        """Size in bytes; FileNotFoundError when absent."""

    def delete(self, blob_id: str) -> None:
        """Remove one; absent is fine."""

    def exists(self, blob_id: str) -> bool: ...

    def iterate(self, older_than: float = 0.0) -> Iterator[tuple[str, int]]:
        """(blob id, size) of every file last written more than ``older_than`` seconds ago."""

    def is_empty(self) -> bool: ...


class StreamFile(Protocol):
    """A blob file written piece by piece, named once its content address is known."""

    def write(self, data: bytes | memoryview) -> None: ...

    def commit(self, blob_id: str) -> None:
        """Durable under ``blob_id`` when this returns (file and folders fsynced)."""

    def abort(self) -> None:
        """Remove what was written; safe to call twice or after a failed commit."""


def _writeback_starter() -> object | None:
    """libc's sync_file_range (Linux), to start writing a streamed file's pages to disk as it
    grows: the fsync before the commit then waits for the last few MiB, not a whole GiB.
    Python's os module does not expose it; without it the final fsync does all the work."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return fn


_SYNC_FILE_RANGE = _writeback_starter()
SYNC_FILE_RANGE_WRITE = 2


class _LocalStreamFile:
    """A streamed blob in a local folder: written under ``<random>.part`` in one of the fan-out
    folders, then fsynced and renamed to its content address (rename, then fsync of both
    folders). A crash leaves only a ``.part`` file no row can name; ``store gc`` lists and
    removes those like any unreferenced blob file (``LocalFolder.iterate``). The rename follows
    the file's fsync, so a crash leaves a ``.part`` or a whole file under its address, never a
    torn one there (which no row would name, the COMMIT comes after ``commit``, but which only
    the read check and not the name would then tell from a good one)."""

    def __init__(self, folder: LocalFolder) -> None:
        self.folder = folder
        name = _part_name()
        self.tmp = folder.root / name[:2] / name
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
        self.written = 0
        self.flushed = 0

    def write(self, data: bytes | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.written += len(data)
        if _SYNC_FILE_RANGE is not None and self.written - self.flushed >= WRITEBACK_EVERY:
            _SYNC_FILE_RANGE(self.fd, self.flushed, self.written - self.flushed, SYNC_FILE_RANGE_WRITE)
            self.flushed = self.written

    def commit(self, blob_id: str) -> None:
        assert self.fd is not None
        final = self.folder.path(blob_id)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        os.rename(self.tmp, final)  # the address is the hash of fresh random bytes: never taken
        _fsync_dir(final.parent)
        if self.tmp.parent != final.parent:
            _fsync_dir(self.tmp.parent)

    def abort(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None
        self.tmp.unlink(missing_ok=True)


def _is_part(name: str) -> bool:
    return name.endswith(PART_SUFFIX) and len(name) == BLOB_NAME_LEN + len(PART_SUFFIX)


def _part_name() -> str:
    return secrets.token_hex(BLOB_NAME_LEN // 2) + PART_SUFFIX


def _fsync_dir(d: Path) -> None:
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


# The store is private to the engine's account: the database holds the identifier index and
# metadata, the blob files ciphertext. Files 0600, folders 0700 (the key file is 0600 too).
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700


def keep_private(path: Path, mode: int) -> None:
    """Take group and other access off ``path`` (a store file or folder) when it has any.

    For installs made before the store was created private (data/medrelay.db was 0644 and
    data/blobs 0755 under the usual umask): tightened at start, with one warning per path
    saying what it was, so the change is never silent. A path that is missing is left to be
    created (private) later; one that cannot be changed (another owner, a share that ignores
    modes) is a warning, not a failed start.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not st.st_mode & 0o077:
        return
    try:
        os.chmod(path, mode)
    except OSError as e:
        log.warning("store.permissions_open", path=str(path), mode=oct(st.st_mode & 0o777),
                    error=e.strerror or str(e), note="readable by other accounts; make it private to the engine's")
        return
    log.warning("store.permissions_tightened", path=str(path), was=oct(st.st_mode & 0o777), now=oct(mode))


_DIR_SYNC_THREADS = 4  # folder fsyncs in flight at once: one per association writing, about
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _dir_syncs() -> ThreadPoolExecutor:
    """The threads that fsync blob folders beside the writers' file fsyncs (made on first use,
    kept: a thread per write would cost more than the folder's fsync saves)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=_DIR_SYNC_THREADS, thread_name_prefix="blob-dirsync")
    return _pool


def _forget_pool() -> None:
    """A forked child has none of its parent's threads: it makes its own pool on first use."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


class LocalFolder:
    """Blob files in a local (or shared network) folder, 256 fan-out folders made once."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.describe = str(self.root)
        self.root.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)  # folders above it: as the umask says
        keep_private(self.root, PRIVATE_DIR)
        self._make_fanout()

    def path(self, blob_id: str) -> Path:
        return self.root / blob_id[:2] / blob_id

    def _make_fanout(self) -> None:
        """Create the 256 blob folders once, durably, so writing a blob never creates a folder.

        All private (0700; the files in them are made 0600); ones an older install left open
        are tightened. The files are not walked: they have always been created 0600."""
        made = False
        for i in range(256):
            d = self.root / f"{i:02x}"
            if not d.is_dir():
                d.mkdir(mode=PRIVATE_DIR, exist_ok=True)
                made = True
            keep_private(d, PRIVATE_DIR)
        if made:
            _fsync_dir(self.root)

    def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Written under their final name with O_EXCL, no temporary and rename: nothing refers
        to the file until the commit that follows this call, and the name is the content's
        address (``blob_address``: a hash over the nonce and the GCM tag of a fresh data key),
        so a torn file fails the check on read and is never referenced. A call that fails
        (disk full, I/O error) removes the files it created, the partial one included.

        Each file's fsync and its folder's fsync run at the same time (the folder's on a small
        pool thread, ``_dir_syncs``), and both have finished when this returns, so before the
        COMMIT that names the file. No order between the two is needed, because no state a
        crash can leave is new: a folder entry made durable before the bytes is a file at a
        valid address with torn or missing content and no row naming it (the COMMIT has not
        happened), which a journalled filesystem can leave anyway (the create is in a journal
        transaction that any other fsync may commit) and which the rewrite below and
        ``store gc`` deal with.

        An address that exists already (a restore run again, a retry of the same sealed bytes)
        is the case a crash could make unsafe: a write killed after ``os.write`` and before
        its fsync leaves the whole file in the page cache, not on the disk, and a later call
        that saw equal bytes and skipped would let the COMMIT name a file a power cut then
        tears. So equal bytes are not a reason to skip the fsyncs: the existing file and its
        folder are fsynced like a new one (an fsync of a clean file costs about nothing).
        Different bytes are a torn file no row names (a row is committed only after both
        fsyncs): removed and written again. Two calls writing one address at the same moment
        are not covered (one may remove the other's file half way); intake never does that,
        its addresses come from fresh random keys, and a restore is one process at a time."""
        dirs: set[Path] = set()
        made: list[Path] = []
        fds: list[int] = []
        syncs: list[Future[None]] = []
        try:
            try:
                for blob_id, ct in items:
                    path = self.path(blob_id)
                    try:
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
                    except FileExistsError:
                        if path.read_bytes() == ct:
                            fds.append(os.open(path, os.O_RDONLY))  # fsynced below, as if written now
                            dirs.add(path.parent)
                            continue
                        os.unlink(path)  # torn by an earlier crash, never referenced
                        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
                    made.append(path)
                    fds.append(fd)
                    view = memoryview(ct)
                    while view:
                        view = view[os.write(fd, view):]
                    dirs.add(path.parent)
                pool = _dir_syncs()  # every entry exists now: the folders' fsyncs can start
                syncs = [pool.submit(_fsync_dir, d) for d in dirs]
                for fd in fds:
                    os.fsync(fd)
            finally:
                for fd in fds:
                    os.close(fd)
                wait(syncs)  # all waited for, even after a failure: none still runs on return
            for f in syncs:
                f.result()
        except BaseException:
            for path in made:
                path.unlink(missing_ok=True)
            raise

    def open_stream(self) -> StreamFile:
        """A file to write a blob into piece by piece (``StreamFile``)."""
        return _LocalStreamFile(self)

    def read(self, blob_id: str) -> bytes:
        return self.path(blob_id).read_bytes()

    def read_range(self, blob_id: str, start: int, length: int) -> bytes:
        with open(self.path(blob_id), "rb") as f:
            f.seek(start)
            return f.read(length)

    def size(self, blob_id: str) -> int:
        return self.path(blob_id).stat().st_size

    def delete(self, blob_id: str) -> None:
        self.path(blob_id).unlink(missing_ok=True)

    def exists(self, blob_id: str) -> bool:
        return self.path(blob_id).is_file()

    def iterate(self, older_than: float = 0.0) -> Iterator[tuple[str, int]]:
        cutoff = time.time() - older_than
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or len(folder.name) != 2:
                continue
            for f in folder.iterdir():
                # blob files, and streamed ones a crash left unnamed (``path`` finds both)
                if len(f.name) != BLOB_NAME_LEN and not _is_part(f.name):
                    continue
                try:
                    st = f.stat()
                except FileNotFoundError:
                    continue  # removed meanwhile (retention, another gc)
                if st.st_mtime < cutoff:
                    yield f.name, st.st_size

    def is_empty(self) -> bool:
        return not (self.root.exists() and any(p.is_file() for p in self.root.rglob("*")))


@dataclass(frozen=True, slots=True)
class S3Settings:
    """What ``ObjectStore`` needs besides the URL; credentials come from ${ENV} in the YAML."""

    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    allow_http: bool = False


class ObjectStore:
    """Blob objects in an S3-compatible bucket (``s3://bucket/prefix``) through obstore."""

    def __init__(self, url: str, settings: S3Settings | None = None) -> None:
        import obstore  # imported here: a local-folder install never loads it
        from obstore.store import S3Store

        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"object storage URL must be s3://bucket/prefix, not {url!r}")
        self._ob = obstore
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.describe = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        s = settings or S3Settings()
        config: dict[str, Any] = {}
        if s.endpoint:
            config["endpoint"] = s.endpoint
        if s.region:
            config["region"] = s.region
        if s.access_key_id:
            config["access_key_id"] = s.access_key_id
        if s.secret_access_key:
            config["secret_access_key"] = s.secret_access_key
        # Bounded waits: a service that is down must fail the write in seconds (intake then refuses
        # the message and the peer resends), not after obstore's default of minutes of retries.
        client: dict[str, Any] = {"connect_timeout": timedelta(seconds=5), "timeout": timedelta(seconds=300)}
        if s.allow_http:
            client["allow_http"] = True
        retry: dict[str, Any] = {"max_retries": 2, "retry_timeout": timedelta(seconds=10)}
        self.store = S3Store(self.bucket, prefix=self.prefix or None, config=config or None,
                             client_options=client, retry_config=retry)  # type: ignore[arg-type]

    @staticmethod
    def key(blob_id: str) -> str:
        return f"{blob_id[:2]}/{blob_id}"

    def write(self, items: Sequence[tuple[str, bytes]]) -> None:
        """PUT each object and return once every PUT was answered (the service's durability)."""
        made: list[str] = []
        try:
            for blob_id, ct in items:
                made.append(blob_id)
                try:
                    self._ob.put(self.store, self.key(blob_id), memoryview(ct), use_multipart=len(ct) > 64 << 20)
                except Exception as e:
                    raise _io_error("write", e) from e
        except BaseException:
            for blob_id in made:
                try:
                    self.delete(blob_id)
                except Exception as e:  # the service is down: store gc removes it later
                    log.warning("blobs.cleanup_failed", store=self.describe, error=type(e).__name__)
            raise

    def open_stream(self) -> StreamFile:
        """A blob uploaded piece by piece (``StreamFile``): a multipart upload to a ``.part`` key,
        renamed (server-side copy, then delete) to its content address."""
        return _ObjectStreamFile(self)

    def read(self, blob_id: str) -> bytes:
        try:
            return bytes(self._ob.get(self.store, self.key(blob_id)).bytes())
        except Exception as e:
            if _not_found(e):
                raise FileNotFoundError(blob_id) from e
            raise _io_error("read", e) from e

    def read_range(self, blob_id: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:  # one request: S3 answers a range running past the end with the bytes there are
            return bytes(self._ob.get_range(self.store, self.key(blob_id), start=start, end=start + length))
        except Exception as e:
            if _not_found(e):
                raise FileNotFoundError(blob_id) from e
        # a start at or past the end is refused (416): ask for the size and answer as a file would
        size = self.size(blob_id)
        end = min(size, start + length)
        if start >= end:
            return b""
        try:
            return bytes(self._ob.get_range(self.store, self.key(blob_id), start=start, end=end))
        except Exception as e:
            if _not_found(e):
                raise FileNotFoundError(blob_id) from e
            raise _io_error("read", e) from e

    def size(self, blob_id: str) -> int:
        try:
            return int(self._ob.head(self.store, self.key(blob_id))["size"])
        except Exception as e:
            if _not_found(e):
                raise FileNotFoundError(blob_id) from e
            raise _io_error("read", e) from e

    def delete(self, blob_id: str) -> None:
        try:
            self._ob.delete(self.store, self.key(blob_id))
        except Exception as e:
            if not _not_found(e):
                raise _io_error("delete", e) from e

    def exists(self, blob_id: str) -> bool:
        try:
            self.size(blob_id)
        except FileNotFoundError:
            return False
        return True

    def iterate(self, older_than: float = 0.0) -> Iterator[tuple[str, int]]:
        cutoff = time.time() - older_than
        for batch in self._ob.list(self.store):
            for meta in batch:
                name = str(meta["path"]).rsplit("/", 1)[-1]
                if len(name) != BLOB_NAME_LEN and not _is_part(name):  # .part: a streamed one never named
                    continue
                modified = meta.get("last_modified")
                if modified is not None and modified.timestamp() >= cutoff:
                    continue
                yield name, int(meta["size"])

    def is_empty(self) -> bool:
        for batch in self._ob.list(self.store, chunk_size=1):
            if batch:
                return False
        return True


class _ObjectStreamFile:
    """A streamed blob in a bucket: obstore's writer (a multipart upload of ``STREAM_PART`` parts,
    at most ``STREAM_UPLOADS`` in flight: memory about 4 parts) to ``<id[:2]>/<id>.part``; on
    ``commit`` the upload is completed (every part answered: stored durably) and the object
    renamed to its address. S3 has no rename: a server-side copy, then a delete of the ``.part``
    (CopyObject takes objects up to 5 GB). A crash or a failed delete leaves a ``.part`` object,
    which ``store gc`` removes like any unreferenced one; an upload never completed is the
    bucket's lifecycle rule's (AbortIncompleteMultipartUpload)."""

    STREAM_PART = 8 << 20
    STREAM_UPLOADS = 4

    def __init__(self, objects: ObjectStore) -> None:
        self.objects = objects
        self.name = _part_name()
        self.tmp_key = objects.key(self.name)
        try:
            self.writer: Any = objects._ob.open_writer(objects.store, self.tmp_key, buffer_size=self.STREAM_PART,
                                                       max_concurrency=self.STREAM_UPLOADS)
        except Exception as e:
            raise _io_error("write", e) from e
        self.closed = False

    def write(self, data: bytes | memoryview) -> None:
        try:
            self.writer.write(data)
        except Exception as e:
            raise _io_error("write", e) from e

    def commit(self, blob_id: str) -> None:
        try:
            self.writer.close()
            self.closed = True
            self.objects._ob.rename(self.objects.store, self.tmp_key, self.objects.key(blob_id))
        except Exception as e:
            raise _io_error("write", e) from e

    def abort(self) -> None:
        try:
            if not self.closed:
                self.closed = True
                self.writer.close()  # completes what was sent; deleted next
            self.objects.delete(self.name)
        except Exception as e:  # the service is down: store gc removes the .part later
            log.warning("blobs.cleanup_failed", store=self.objects.describe, error=type(e).__name__)


def _io_error(what: str, e: BaseException) -> OSError:
    """The object store's failure as the OSError a disk would raise, so every caller that handles
    a failed file write or read (intake refuses the message, a delivery retries) handles this too.
    Only the exception's type goes into the message: the service's text may name the bucket's URL."""
    return OSError(errno.EIO, f"object store {what} failed ({type(e).__name__})")


def _not_found(e: BaseException) -> bool:
    return isinstance(e, FileNotFoundError) or type(e).__name__ == "NotFoundError"


def open_blob_files(location: str | os.PathLike[str], settings: S3Settings | None = None) -> BlobFiles:
    """``s3://bucket/prefix`` gives an ObjectStore, anything else a LocalFolder."""
    if str(location).startswith("s3://"):
        return ObjectStore(str(location), settings)
    return LocalFolder(location)
