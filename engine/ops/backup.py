"""Backup and restore: a consistent snapshot of the store and its blob files, still encrypted.

A backup is a folder:

    manifest.json        format, when, backend, schema version, key ids needed, and the
                         SHA-256 of the database snapshot and of every blob file
    medrelay.db          SQLite: a copy made with SQLite's online backup API
    medrelay.pgdump      PostgreSQL: pg_dump (custom format) of an exported snapshot
    blobs/xx/<id>        every blob file the snapshot refers to, byte for byte (from the blob
                         folder or the S3 bucket of ``store.blobs``; restore writes them back there)

Consistency: the database is snapshotted first (SQLite's backup API copies one consistent
state while the engine keeps writing; on PostgreSQL a REPEATABLE READ transaction exports its
snapshot, pg_dump dumps exactly that snapshot, and the list of blob files is read in the same
transaction). Blob files are immutable once committed (content-addressed, written once), so
copying the files the snapshot names afterwards gives the same state; a file committed later
is simply not in the backup.

The backup is made as private as the store (every file 0600, every folder 0700, DEST and
``manifest.json`` included): the snapshot holds the identifier index and metadata, and the
manifest says which key ids a thief would need. ``verify`` opens the SQLite snapshot read-only
and immutable, so a check never writes ``-wal``/``-shm`` into the medium it checks (and works
on read-only media). A ``restore`` that fails leaves the target as it found it, so a retry finds
it empty: the blob files go first and are removed again on a failure, the database last, whole
(SQLite's file copied into place; PostgreSQL's dump restored as one transaction), and the CLI
removes the files and folders it had created (``undo_created``).

The key file is not in the backup, on purpose: the data is encrypted under it, so a backup
that carried its own key would be as sensitive as the plaintext. Keep the key file backed up
separately (another medium, another custodian); without it a backup cannot be read. The
manifest lists the key ids a restore needs, so ``verify`` can say whether a key file fits.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import make_url

from engine.store import schema
from engine.store.blobfiles import PRIVATE_DIR, PRIVATE_FILE

FORMAT = 1
CHUNK = 1 << 20


class BackupError(RuntimeError):
    """A backup or restore that cannot be done, said for an operator."""


class DamagedBackup(BackupError):
    """The backup itself is broken (its manifest unreadable or incomplete): ``--verify`` exits 1."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _pg_cli_url(url: Any) -> str:
    """A libpq URL for pg_dump/pg_restore (no SQLAlchemy driver suffix)."""
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _literal_pattern(name: str) -> str:
    """A schema name as a pg_dump ``--schema`` pattern that matches only itself (quoted: no
    wildcards, case kept)."""
    return '"' + name.replace('"', '""') + '"'


def _restore_list(dump: Path, store: Any, schema_name: str | None) -> Path | None:
    """pg_restore's table of contents without the schema's own CREATE and COMMENT when the target
    schema exists already (``public``, or one the DBA made for the store): pg_dump --schema writes
    them, and in one transaction with --exit-on-error "schema already exists" would fail it all.
    None (restore everything) for backups made without --schema, or when the schema is missing."""
    if schema_name is None:
        return None
    with store.engine.connect() as conn:
        exists = conn.execute(text("SELECT count(*) FROM pg_namespace WHERE nspname = :n"),
                              {"n": schema_name}).scalar_one()
    if not exists:
        return None
    r = subprocess.run(["pg_restore", "--list", str(dump)], capture_output=True, text=True)
    if r.returncode != 0:
        raise BackupError(f"pg_restore cannot read {dump.name}: {r.stderr.strip()[:200]}")
    own = (f" SCHEMA - {schema_name} ", f" COMMENT - SCHEMA {schema_name} ")
    kept = [line for line in r.stdout.splitlines() if not any(o in line + " " for o in own)]
    fd, path = tempfile.mkstemp(prefix="medrelay-restore-", suffix=".list")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(kept) + "\n")
    return Path(path)


def _pg_env(url: Any) -> dict[str, str]:
    env = dict(os.environ)
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    return env


def _empty_dest(dest: Path) -> None:
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: a backup goes into a new or empty folder")
    dest.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(dest, PRIVATE_DIR)  # also an empty folder the operator made: the backup is private


def _file_blob_ids(conn: Any) -> Iterator[str]:
    b = schema.blobs
    yield from conn.execute(select(b.c.id).where(b.c.in_file == 1).order_by(b.c.id)).scalars()


@dataclass
class Summary:
    blobs: int
    bytes: int
    path: Path


def backup(store: Any, dest: Path, *, progress: Callable[[int], Any] | None = None) -> Summary:
    """Write a backup of ``store`` into the new or empty folder ``dest``."""
    from engine.store.db import SCHEMA_VERSION

    dest = Path(dest)
    _empty_dest(dest)
    url = store.url
    manifest: dict[str, Any] = {"format": FORMAT, "created_at": time.time(), "schema_version": SCHEMA_VERSION}
    if store.is_sqlite:
        db_file = dest / "medrelay.db"
        os.close(os.open(db_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))  # as private as the store
        src = sqlite3.connect(str(url.database))
        try:
            out = sqlite3.connect(str(db_file))
            with out:
                src.backup(out)
            out.close()
        finally:
            src.close()
        snap = sqlite3.connect(str(db_file))
        try:
            ids = [r[0] for r in snap.execute("SELECT id FROM blobs WHERE in_file = 1 ORDER BY id")]
            keks = sorted({r[0] for r in snap.execute("SELECT DISTINCT kek_id FROM blobs")})
        finally:
            snap.close()
        manifest["backend"] = "sqlite"
    else:
        db_file = dest / "medrelay.pgdump"
        with store.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                snapshot = conn.execute(text("SELECT pg_export_snapshot()")).scalar_one()
                store_schema = conn.execute(text("SELECT current_schema()")).scalar_one()
                ids = list(_file_blob_ids(conn))
                keks = sorted(set(conn.execute(select(schema.blobs.c.kek_id).distinct()).scalars()))
                # the store's schema only: a database may hold other schemas (another store behind
                # a search_path, another application's tables) that are not this backup's to carry
                r = subprocess.run(["pg_dump", "--format=custom", f"--snapshot={snapshot}", "--no-owner",
                                    f"--schema={_literal_pattern(store_schema)}",
                                    f"--file={db_file}", _pg_cli_url(url)],
                                   env=_pg_env(url), capture_output=True, text=True)
                if r.returncode != 0:
                    raise BackupError(f"pg_dump failed: {r.stderr.strip()[:300]}")
        os.chmod(db_file, PRIVATE_FILE)
        manifest["backend"] = "postgresql"
        manifest["schema"] = store_schema
    manifest["database"] = {"file": db_file.name, "sha256": _sha256(db_file)}
    manifest["kek_ids"] = keks
    blobs: dict[str, str] = {}
    total = 0
    local = store.blob_dir is not None  # a folder: copied file to file; an object store: read, written here
    for blob_id in ids:
        target = dest / "blobs" / blob_id[:2] / blob_id
        for d in (target.parent.parent, target.parent):
            d.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        try:
            source = open(store.blob_path(blob_id), "rb") if local else io.BytesIO(store.files.read(blob_id))
        except FileNotFoundError:
            raise BackupError(f"blob file {blob_id} is referenced by the store but missing from "
                              f"{store.files.describe}: the store itself is damaged") from None
        with source, os.fdopen(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE), "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
        blobs[blob_id] = _sha256(target)
        total += target.stat().st_size
        if progress is not None:
            progress(1)
    manifest["blobs"] = blobs
    tmp = dest / "manifest.json.tmp"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE), "w") as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, dest / "manifest.json")  # written last: a backup without a manifest is incomplete
    return Summary(len(blobs), total, dest)


def _manifest(src: Path) -> dict[str, Any]:
    """The manifest, checked for shape: a broken one is ``DamagedBackup``; only a real other
    format number (a newer medrelay's backup) is ``BackupError`` (cannot be done here)."""
    try:
        m = json.loads((Path(src) / "manifest.json").read_text())
    except FileNotFoundError:
        raise DamagedBackup(f"{src}: no manifest.json: not a medrelay backup, or an incomplete one") from None
    except ValueError as e:
        raise DamagedBackup(f"{src}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(m, dict):
        raise DamagedBackup(f"{src}: manifest.json is not a JSON object")
    fmt = m.get("format")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise DamagedBackup(f"{src}: manifest.json has no backup format: damaged")
    if fmt != FORMAT:
        raise BackupError(f"{src}: backup format {fmt!r}, this medrelay reads format {FORMAT}")
    db = m.get("database")
    if (m.get("backend") not in ("sqlite", "postgresql") or not isinstance(db, dict)
            or not isinstance(db.get("file"), str) or db["file"] != Path(db["file"]).name or not db["file"]
            or not isinstance(db.get("sha256"), str) or not isinstance(m.get("blobs"), dict)
            or not isinstance(m.get("kek_ids", []), list)):
        raise DamagedBackup(f"{src}: manifest.json lacks backend, database or blobs: damaged")
    return m


def verify(src: Path, *, keyring: Any = None, progress: Callable[[int], Any] | None = None) -> list[str]:
    """Problems found in the backup at ``src`` (empty: it is whole). Without restoring anything.

    Checks the manifest, the database snapshot's hash (and SQLite's integrity check), that
    every blob the snapshot refers to is present with the hash recorded; with a key ring,
    also that it holds every key id the backup needs.
    """
    src = Path(src)
    m = _manifest(src)
    problems: list[str] = []
    db_file = src / m["database"]["file"]
    if not db_file.is_file():
        return [f"database snapshot {db_file.name} is missing"]
    if _sha256(db_file) != m["database"]["sha256"]:
        problems.append(f"database snapshot {db_file.name} does not match its recorded SHA-256")
    referenced: set[str] | None = None
    if m["backend"] == "sqlite":
        # read-only and immutable: no -wal/-shm written next to the snapshot, read-only media work
        conn = sqlite3.connect(f"{db_file.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            ok = conn.execute("PRAGMA integrity_check").fetchone()[0]
            if ok != "ok":
                problems.append(f"SQLite integrity check: {ok}")
            referenced = {r[0] for r in conn.execute("SELECT id FROM blobs WHERE in_file = 1")}
        finally:
            conn.close()
    else:
        r = subprocess.run(["pg_restore", "--list", str(db_file)], capture_output=True, text=True)
        if r.returncode != 0:
            problems.append(f"pg_restore cannot read {db_file.name}: {r.stderr.strip()[:200]}")
    listed = m["blobs"]
    if referenced is not None:
        for blob_id in sorted(referenced - set(listed)):
            problems.append(f"blob {blob_id} is referenced by the snapshot but not in the backup")
    for blob_id, digest in listed.items():
        f = src / "blobs" / blob_id[:2] / blob_id
        if not f.is_file():
            problems.append(f"blob {blob_id} is missing")
        elif _sha256(f) != digest:
            problems.append(f"blob {blob_id} does not match its recorded SHA-256")
        if progress is not None:
            progress(1)
    if keyring is not None:
        missing = [k for k in m.get("kek_ids", []) if not keyring.in_file(k)]
        if missing:
            problems.append("the key file lacks key ids this backup needs: " + ", ".join(missing))
    return problems


@contextlib.contextmanager
def undo_created(paths: list[Path]) -> Iterator[None]:
    """When the block fails, remove what it created at ``paths``, and only that.

    For each path: the highest of it and its missing parent folders, if none existed before, is
    removed whole; a folder that existed keeps its old entries and loses the new ones (a blob
    folder that had to be empty loses the 256 sub-folders a store made in it).
    """
    before: list[tuple[Path, set[str] | None]] = []
    for p in paths:
        p = Path(p).absolute()
        top = p
        while not top.parent.exists() and top.parent != top:
            top = top.parent
        before.append((top, set(os.listdir(top)) if top.is_dir() else None) if top.exists() else (top, None))
    existed = {top: top.exists() for top, _ in before}
    try:
        yield
    except BaseException:
        for top, entries in before:
            if not existed[top]:
                _remove(top)
            elif entries is not None and top.is_dir():
                for name in set(os.listdir(top)) - entries:
                    _remove(top / name)
        raise


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def restore(src: Path, store: Any, *, progress: Callable[[int], Any] | None = None) -> Summary:
    """Restore the backup at ``src`` into ``store``, whose database and blob folder must be empty."""
    src = Path(src)
    m = _manifest(src)
    problems = verify(src)
    if problems:
        raise BackupError("the backup is damaged, nothing restored: " + "; ".join(problems[:5]))
    url = store.url
    backend = "sqlite" if store.is_sqlite else "postgresql"
    if backend != m["backend"]:
        raise BackupError(f"the backup is of a {m['backend']} store; the target store is {backend}")
    if not store.files.is_empty():
        raise BackupError(f"{store.files.describe} holds blob files: restore goes into an empty location")
    if store.is_sqlite:
        target = Path(str(url.database))
        if target.exists() and target.stat().st_size > 0:
            raise BackupError(f"{target} exists: restore goes into an empty location")
    else:
        with store.engine.connect() as conn:
            target_schema = conn.execute(text("SELECT current_schema()")).scalar_one()
            n = conn.execute(text("SELECT count(*) FROM information_schema.tables "
                                  "WHERE table_schema = current_schema()")).scalar_one()
        wanted = m.get("schema")  # None: a backup made before backups named their schema
        if wanted is not None and target_schema is not None and wanted != target_schema:
            raise BackupError(f"the backup holds the store schema {wanted!r} and the target store's schema is "
                              f"{target_schema!r}: PostgreSQL cannot restore a schema under another name, so "
                              f"restore into a store whose search_path names {wanted!r}; nothing restored")
        if n:
            raise BackupError("the target PostgreSQL database has tables: restore goes into an empty one")
    # The blob files first, the database last and whole: a failure at any point leaves the target
    # as it was (the files written are removed; PostgreSQL loads in one transaction), so a retry
    # finds it empty. Before, pg_restore ran statement by statement: a dump that failed half way
    # left the tables it had made, and every retry was refused as "the database has tables".
    written: list[str] = []
    try:
        total = _write_blobs(src, m, store, written, progress)
    except BaseException as e:
        removed = _unwrite(store, written)
        if isinstance(e, (OSError, BackupError)):
            raise BackupError(f"writing the blob files failed ({_why(e)}), nothing restored: the database was "
                              f"not touched, {removed}") from None
        raise
    try:
        _load_database(src, m, store)
    except BaseException as e:
        removed = _unwrite(store, written)
        if isinstance(e, BackupError):
            raise BackupError(f"{e}, nothing restored: {removed}") from None
        if isinstance(e, OSError):
            raise BackupError(f"copying the database failed ({_why(e)}), nothing restored: {removed}") from None
        raise
    return Summary(len(m["blobs"]), total, src)


def _why(e: BaseException) -> str:
    return (e.strerror or type(e).__name__) if isinstance(e, OSError) else str(e)


def _write_blobs(src: Path, m: dict[str, Any], store: Any, written: list[str],
                 progress: Callable[[int], Any] | None) -> int:
    """Every blob file of the backup into the store's empty blob location, each checked against
    the hash ``verify`` checked (the medium may change under a long restore); the bytes written."""
    total = 0
    for blob_id, digest in m["blobs"].items():
        data = (src / "blobs" / blob_id[:2] / blob_id).read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise BackupError(f"blob {blob_id} no longer matches its recorded SHA-256")
        written.append(blob_id)  # before the write: a failed write may leave a part of it
        store.files.write([(blob_id, data)])  # a folder (0600, fsynced) or an object store, as intake writes
        total += len(data)
        if progress is not None:
            progress(1)
    return total


def _unwrite(store: Any, written: list[str]) -> str:
    """Remove the blob files a failed restore wrote; what the error says about them."""
    left = []
    for blob_id in written:
        try:
            store.files.delete(blob_id)
        except Exception:
            left.append(blob_id)
    if left:
        return (f"{len(written) - len(left)} blob files written were removed, {len(left)} could not be "
                f"(remove them from {store.files.describe} before a retry: {', '.join(left[:3])})")
    return f"the {len(written)} blob files written were removed" if written else "no blob file was written"


def _load_database(src: Path, m: dict[str, Any], store: Any) -> None:
    """The database snapshot into the empty target: SQLite's file copied into place (removed again
    by the CLI's ``undo_created`` when this fails), PostgreSQL's dump restored as one transaction
    (``--single-transaction``: a failure rolls back every table and row it had made)."""
    url = store.url
    dump = src / m["database"]["file"]
    store.dispose()
    if store.is_sqlite:
        target = Path(str(url.database))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dump, target)
        return
    listing = _restore_list(dump, store, m.get("schema"))
    r = subprocess.run(["pg_restore", "--no-owner", "--single-transaction", "--exit-on-error",
                        *([f"--use-list={listing}"] if listing is not None else []),
                        f"--dbname={_pg_cli_url(make_url(url))}", str(dump)],
                       env=_pg_env(url), capture_output=True, text=True)
    if listing is not None:
        listing.unlink(missing_ok=True)
    if r.returncode != 0:
        raise BackupError("pg_restore failed, so its one transaction was rolled back and the target database "
                          f"is as it was ({r.stderr.strip()[:300]})")
