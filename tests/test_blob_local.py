"""LocalFolder.write: the folder's fsync beside the file's, both done before write returns; an
address that exists already is fsynced again, not trusted; failures remove what was made."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.store import blobfiles
from engine.store.blobfiles import LocalFolder

NAME_A = "ab" + "0" * 62
NAME_B = "cd" + "1" * 62


class Syncs:
    """Records every fsync (which inode, which thread, when it started and ended); the file's
    fsync is held for ``hold`` seconds so an overlap with the folder's can be seen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: float = 0.0) -> None:
        self.calls: list[dict] = []
        self.hold = hold
        real = os.fsync
        lock = threading.Lock()

        def fsync(fd: int) -> None:
            st = os.fstat(fd)
            rec = {"ino": st.st_ino, "dir": stat.S_ISDIR(st.st_mode), "thread": threading.current_thread().name,
                   "start": time.monotonic()}
            if not rec["dir"] and self.hold:
                time.sleep(self.hold)
            real(fd)
            rec["end"] = time.monotonic()
            with lock:
                self.calls.append(rec)

        monkeypatch.setattr(blobfiles.os, "fsync", fsync)

    def of(self, path: Path) -> list[dict]:
        return [c for c in self.calls if c["ino"] == path.stat().st_ino]


def test_folder_fsync_runs_beside_the_file_fsync_and_both_end_before_return(tmp_path, monkeypatch):
    folder = LocalFolder(tmp_path / "blobs")
    syncs = Syncs(monkeypatch, hold=0.3)
    folder.write([(NAME_A, b"a" * 5000), (NAME_B, b"b" * 7000)])
    returned = time.monotonic()
    files = [folder.path(NAME_A), folder.path(NAME_B)]
    for f in files:
        (file_sync,) = syncs.of(f)
        (dir_sync,) = syncs.of(f.parent)
        assert dir_sync["thread"].startswith("blob-dirsync") and file_sync["thread"] == threading.current_thread().name
        # the folder's fsync started before the (held) file fsync of this call ended: at the same time
        assert dir_sync["start"] < file_sync["end"]
        assert dir_sync["end"] <= returned and file_sync["end"] <= returned
    assert [f.read_bytes() for f in files] == [b"a" * 5000, b"b" * 7000]


def test_an_existing_equal_file_is_fsynced_again_not_trusted(tmp_path, monkeypatch):
    """A writer killed -9 after its write() and before its fsync leaves the whole file in the page
    cache only; a later write of the same address must make it durable before returning (it used
    to see equal bytes and return at once: the COMMIT could then name a file a power cut tears)."""
    folder = LocalFolder(tmp_path / "blobs")
    path = folder.path(NAME_A)
    data = os.urandom(4096)
    writer = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)\n"
        "os.write(fd, sys.stdin.buffer.read())\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"), str(path)], stdin=subprocess.PIPE)
    writer.communicate(data, timeout=60)
    assert writer.returncode == -9 and path.read_bytes() == data
    syncs = Syncs(monkeypatch)
    folder.write([(NAME_A, data)])
    assert len(syncs.of(path)) == 1 and len(syncs.of(path.parent)) == 1
    assert path.read_bytes() == data


def test_an_existing_torn_file_is_replaced(tmp_path):
    folder = LocalFolder(tmp_path / "blobs")
    path = folder.path(NAME_A)
    path.write_bytes(b"torn")
    folder.write([(NAME_A, b"whole" * 1000)])
    assert path.read_bytes() == b"whole" * 1000


def test_a_failed_folder_fsync_fails_the_write_and_removes_its_files(tmp_path, monkeypatch):
    folder = LocalFolder(tmp_path / "blobs")
    real = blobfiles._fsync_dir

    def broken(d: Path) -> None:
        if d == folder.path(NAME_B).parent:
            raise OSError(errno.EIO, "I/O error")
        real(d)

    monkeypatch.setattr(blobfiles, "_fsync_dir", broken)
    with pytest.raises(OSError) as e:
        folder.write([(NAME_A, b"a" * 100), (NAME_B, b"b" * 100)])
    assert e.value.errno == errno.EIO
    assert not folder.exists(NAME_A) and not folder.exists(NAME_B)


def test_a_failed_file_fsync_waits_for_the_folder_fsyncs_and_removes_its_files(tmp_path, monkeypatch):
    folder = LocalFolder(tmp_path / "blobs")
    running: list[int] = []
    real = blobfiles._fsync_dir

    def slow(d: Path) -> None:
        running.append(1)
        time.sleep(0.2)
        real(d)
        running.pop()

    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # a file's fsync fails, a folder's works
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(blobfiles, "_fsync_dir", slow)
    monkeypatch.setattr(blobfiles.os, "fsync", fsync)
    with pytest.raises(OSError):
        folder.write([(NAME_A, b"a" * 100)])
    assert running == [] and not folder.exists(NAME_A)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork")
def test_a_forked_child_writes_with_its_own_folder_fsync_threads(tmp_path):
    folder = LocalFolder(tmp_path / "blobs")
    folder.write([(NAME_A, b"parent")])  # the parent's pool exists now
    pid = os.fork()
    if pid == 0:  # the child: its parent's threads are gone; a write must not wait for them
        try:
            folder.write([(NAME_B, b"child")])
            os._exit(0)
        except BaseException:
            os._exit(1)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the child's write hung on its parent's folder fsync threads")
    assert os.waitstatus_to_exitcode(status) == 0 and folder.read(NAME_B) == b"child"
