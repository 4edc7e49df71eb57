"""The file source's folder on an SFTP server (asyncssh), for the claim protocol of listeners/file.py.

asyncssh rather than paramiko: it is asyncio-native, so a slow or stalled server holds
up only this channel's task, never a thread per operation, and every operation here
is bounded by ``timeout``. The server's host key is checked against ``known_hosts``
(there is no option to skip that: an SFTP drop holds PHI).

The claim is a rename on the server (``posix-rename@openssh.com`` where offered, which
is atomic like rename(2); plain SFTP rename otherwise, which refuses to overwrite), so
two engines polling one server folder still cannot both take a file. A folder sync has
no SFTP equivalent: the durability of a rename is the server's (``fsync@openssh.com`` is
used for the claim records where offered).
"""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import secrets
import stat as stat_mod
from pathlib import Path
from typing import Any

import structlog
from pydantic import Field, model_validator

from engine.components import ComponentConfig, secret_field
from listeners.file_folder import Entry, TooLarge

log = structlog.get_logger()


class SftpConfig(ComponentConfig):
    """An SFTP server to watch a folder on (key or password login, host key always checked)."""

    host: str = Field(description="server name or address")
    port: int = Field(22, ge=1, le=65535, description="SSH port")
    username: str = Field(description="login name")
    private_key: str | None = Field(None, description="file of the client's private key (OpenSSH format; "
                                    "relative: to the YAML file)")
    password: str | None = secret_field(default=None, description="password login, e.g. \"${SFTP_PASSWORD}\" "
                                        "(prefer private_key)")
    known_hosts: str = Field(description="known_hosts file holding the server's host key (relative: to the "
                             "YAML file); the connection is refused when the key does not match")
    timeout: float = Field(30.0, gt=0, description="seconds for connecting and for each operation")

    @model_validator(mode="after")
    def _a_login(self) -> SftpConfig:
        if not self.private_key and not self.password:
            raise ValueError("sftp needs private_key or password")
        return self

    def environment_problems(self, settings: Any) -> list[tuple[tuple[str, ...], str]]:
        out: list[tuple[tuple[str, ...], str]] = []
        for attr in ("private_key", "known_hosts"):
            p = getattr(self, attr)
            if p and not settings.resolve(p).is_file():
                out.append((("sftp", attr), f"file not found: {p}"))
        return out


def _missing(e: Exception) -> bool:
    import asyncssh

    return isinstance(e, asyncssh.SFTPNoSuchFile | asyncssh.SFTPNoSuchPath)


class SftpFolder:
    """One SSH connection and SFTP session, opened on first use and again after a failure."""

    def __init__(self, config: SftpConfig, base_dir: Path | None = None) -> None:
        self.config = config
        self.peer = f"sftp:{config.host}:{config.port}"
        self._base = base_dir
        self._conn: Any = None
        self._sftp: Any = None
        self._lock = asyncio.Lock()

    def join(self, *parts: str) -> str:
        return posixpath.join(*parts)

    def _path(self, p: str | None) -> str | None:
        if not p:
            return None
        q = Path(p)
        return str(q if q.is_absolute() or self._base is None else self._base / q)

    async def open(self) -> None:
        import asyncssh

        async with self._lock:
            if self._sftp is not None:
                return
            c = self.config
            key = self._path(c.private_key)
            async with asyncio.timeout(c.timeout):
                conn = await asyncssh.connect(
                    c.host, c.port, username=c.username, password=c.password,
                    client_keys=[key] if key else None, known_hosts=self._path(c.known_hosts),
                    agent_path=None, config=None, connect_timeout=c.timeout, keepalive_interval=c.timeout)
                try:
                    self._sftp = await conn.start_sftp_client()
                except BaseException:
                    conn.close()
                    raise
            self._conn = conn
            log.info("sftp.connected", host=c.host, port=c.port)

    async def close(self) -> None:
        sftp, conn = self._sftp, self._conn
        self._sftp = self._conn = None
        if sftp is not None:
            with contextlib.suppress(Exception):
                sftp.exit()
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)

    async def _op(self, fn: Any) -> Any:
        if self._sftp is None:
            await self.open()
        try:
            async with asyncio.timeout(self.config.timeout):
                return await fn(self._sftp)
        except Exception as e:
            if _missing(e):
                raise FileNotFoundError(str(e)) from None
            import asyncssh

            if not isinstance(e, asyncssh.SFTPError) or isinstance(e, asyncssh.SFTPConnectionLost):
                await self.close()  # a lost or stuck session: a new one next time
            raise

    async def files(self, path: str) -> list[Entry]:
        async def work(s: Any) -> list[Entry]:
            out = []
            for n in await s.readdir(path):
                name = n.filename if isinstance(n.filename, str) else n.filename.decode("utf-8", "replace")
                a = n.attrs
                if name.startswith(".") or a.permissions is None or not stat_mod.S_ISREG(a.permissions):
                    continue
                mtime_ns = a.mtime_ns if a.mtime_ns is not None else int(a.mtime or 0) * 1_000_000_000
                out.append(Entry(name, int(a.size or 0), mtime_ns))
            return out

        return await self._op(work)

    async def stat(self, path: str) -> Entry | None:
        async def work(s: Any) -> Entry | None:
            a = await s.lstat(path)
            if a.permissions is None or not stat_mod.S_ISREG(a.permissions):
                return None
            return Entry(posixpath.basename(path), int(a.size or 0), int(a.mtime or 0) * 1_000_000_000)

        try:
            return await self._op(work)
        except FileNotFoundError:
            return None

    async def read(self, path: str, limit: int) -> bytes:
        async def work(s: Any) -> bytes:
            async with s.open(path, "rb") as f:
                return await f.read(limit + 1)

        data = await self._op(work)
        if len(data) > limit:
            raise TooLarge(path)
        return data

    async def write(self, path: str, data: bytes) -> None:
        d, name = posixpath.split(path)
        tmp = posixpath.join(d, f".{name}.{secrets.token_hex(4)}.tmp")

        async def work(s: Any) -> None:
            async with s.open(tmp, "wb") as f:
                await f.write(data)
                with contextlib.suppress(Exception):  # fsync@openssh.com, where the server has it
                    await f.fsync()
            await self._rename(s, tmp, path)

        await self._op(work)

    @staticmethod
    async def _rename(s: Any, src: str, dst: str) -> None:
        import asyncssh

        try:
            await s.posix_rename(src, dst)
        except asyncssh.SFTPOpUnsupported:
            await s.rename(src, dst)

    async def rename(self, src: str, dst: str) -> None:
        await self._op(lambda s: self._rename(s, src, dst))

    async def move(self, src: str, dst: str) -> None:
        await self.rename(src, dst)

    async def unlink(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            await self._op(lambda s: s.remove(path))

    async def remove_temporaries(self, path: str) -> int:
        async def work(s: Any) -> int:
            n = 0
            for e in await s.readdir(path):
                name = e.filename if isinstance(e.filename, str) else e.filename.decode("utf-8", "replace")
                if name.startswith(".") and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        await s.remove(posixpath.join(path, name))
                        n += 1
            return n

        return await self._op(work)

    async def mkdir(self, path: str) -> None:
        await self._op(lambda s: s.makedirs(path, exist_ok=True))

    async def sync(self, path: str) -> None:
        return None
