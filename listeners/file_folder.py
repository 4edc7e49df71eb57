"""The few folder operations the file source needs, on a local disk (SFTP: listeners/file_sftp.py).

Kept to primitives (list, stat, read, atomic write, rename, unlink, mkdir, sync) so the
claim protocol in listeners/file.py is written once and holds for both. Every call that
blocks runs in a worker thread: a slow disk or NFS mount never stalls the event loop
that serves the other channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import posixpath
import secrets
import stat as stat_mod
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Entry:
    """A regular file in a folder: its name (only ever used to order and to find it again)."""

    name: str
    size: int
    mtime_ns: int


class TooLarge(Exception):
    """The file is larger than the source may hold in memory (``max_file_bytes``)."""


class Folder(Protocol):
    """Paths are POSIX strings: absolute, or relative to the watched folder."""

    peer: str

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def files(self, path: str) -> list[Entry]:
        """Regular files directly in ``path`` (no folders, nothing hidden: names starting with '.')."""

    async def stat(self, path: str) -> Entry | None: ...

    async def read(self, path: str, limit: int) -> bytes:
        """The whole file, or ``TooLarge`` past ``limit`` bytes (never more than that held)."""

    async def write(self, path: str, data: bytes) -> None:
        """Atomically: a temporary name, synced, then renamed over ``path``."""

    async def rename(self, src: str, dst: str) -> None:
        """Atomic within one file system; ``FileNotFoundError`` when ``src`` is gone (another claimer)."""

    async def move(self, src: str, dst: str) -> None:
        """Rename, or copy and delete where ``dst`` is on another file system."""

    async def unlink(self, path: str) -> None: ...

    async def remove_temporaries(self, path: str) -> int:
        """Delete the ``.*.tmp`` files ``write`` leaves in ``path`` when killed mid-write; how many."""

    async def mkdir(self, path: str) -> None: ...

    async def sync(self, path: str) -> None:
        """Make renames in folder ``path`` durable (fsync of the directory; SFTP: the server's)."""

    def join(self, *parts: str) -> str: ...


class LocalFolder:
    """A folder on this machine. ``lock`` keeps a second engine off the same folder."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.peer = "file"
        self._lock: Any = None

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self.unlock()

    def lock(self, path: str) -> None:
        """An exclusive flock on ``path`` for as long as the source runs: two engines claiming
        from one folder would each recover the other's in-flight files at start."""
        f = open(path, "a")  # held until close
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise RuntimeError("the folder is watched by another medrelay engine") from None
        self._lock = f

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def files(self, path: str) -> list[Entry]:
        return await asyncio.to_thread(_scan, path)

    async def stat(self, path: str) -> Entry | None:
        return await asyncio.to_thread(_stat, path)

    async def read(self, path: str, limit: int) -> bytes:
        return await asyncio.to_thread(_read, path, limit)

    async def write(self, path: str, data: bytes) -> None:
        await asyncio.to_thread(_write, path, data)

    async def rename(self, src: str, dst: str) -> None:
        await asyncio.to_thread(os.rename, src, dst)

    async def move(self, src: str, dst: str) -> None:
        await asyncio.to_thread(_move, src, dst)

    async def unlink(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, path)

    async def remove_temporaries(self, path: str) -> int:
        def work() -> int:
            n = 0
            with os.scandir(path) as it:
                for e in it:
                    if e.name.startswith(".") and e.name.endswith(".tmp") and e.is_file(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.path)
                            n += 1
            return n

        return await asyncio.to_thread(work)

    async def mkdir(self, path: str) -> None:
        await asyncio.to_thread(os.makedirs, path, exist_ok=True)

    async def sync(self, path: str) -> None:
        await asyncio.to_thread(_fsync_dir, path)


def _scan(path: str) -> list[Entry]:
    out = []
    with os.scandir(path) as it:
        for e in it:
            if e.name.startswith("."):
                continue
            try:
                st = e.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat_mod.S_ISREG(st.st_mode):
                out.append(Entry(e.name, st.st_size, st.st_mtime_ns))
    return out


def _stat(path: str) -> Entry | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None
    if not stat_mod.S_ISREG(st.st_mode):
        return None
    return Entry(posixpath.basename(path), st.st_size, st.st_mtime_ns)


def _read(path: str, limit: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(path)
    return data


def _write(path: str, data: bytes) -> None:
    d, name = posixpath.split(path)
    tmp = posixpath.join(d, f".{name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _move(src: str, dst: str) -> None:
    try:
        os.rename(src, dst)
        return
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
    # another file system: a complete copy under a temporary name first, so a crash leaves
    # either the source alone or the source and a hidden partial copy (removed next time)
    d, name = posixpath.split(dst)
    tmp = posixpath.join(d, f".{name}.{secrets.token_hex(4)}.part")
    with open(src, "rb") as fi, open(tmp, "xb") as fo:
        while chunk := fi.read(1 << 20):
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    os.rename(tmp, dst)
    _fsync_dir(d)
    os.unlink(src)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
