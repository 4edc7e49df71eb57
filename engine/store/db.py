"""Opening the store: SQLite (WAL, synchronous=FULL) or PostgreSQL, plus encrypted blobs.

The durability contract rests on this module: a commit returns only once the rows
and every blob they point at are on stable storage.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import structlog
from sqlalchemy import Connection, Engine, create_engine, event, insert, select, text, update
from sqlalchemy.engine import make_url

from engine.auth import tables as _auth_tables  # noqa: F401  (their tables join the schema)
from engine.security import stream
from engine.security.crypto import IntegrityError, KeyRing, Sealed
from engine.store import dedupe as _dedupe  # noqa: F401  (cross-process duplicate windows)
from engine.store import leases as _leases  # noqa: F401  (named leases: one doer at a time)
from engine.store import outputs as _outputs  # noqa: F401  (message outputs, issue 15)
from engine.store import schema
from engine.store import sources as _sources  # noqa: F401  (polling sources' marks and cursors)
from engine.store.blobfiles import PRIVATE_FILE, BlobFiles, LocalFolder, keep_private, open_blob_files
from engine.store.dicom import tables as _dicom_tables  # noqa: F401
from engine.store.dicom import upgrade as _dicom_upgrade
from engine.store.fhir import tables as _fhir_tables  # noqa: F401
from engine.store.prepared import Prepared

log = structlog.get_logger()

SCHEMA_VERSION = 6
INLINE_MAX = 256 * 1024  # payloads above this go to files beside the database
# Payloads from this size on are sealed in authenticated 1 MiB chunks (engine/security/stream.py):
# no 2 GiB cap of one AES-GCM call, and readable chunk by chunk. Smaller ones stay one-shot (the
# DICOM/HL7 hot path is unchanged); both formats open, told apart by the nonce column.
STREAM_MIN = 16 * 1024 * 1024
STREAM_CHUNK = stream.CHUNK_SIZE
# Work that a feature room above this layer must do inside the migration transaction (under its
# lock), registered when the room is imported: engine.store.fhir.reindex rebuilds the FHIR search
# index when its format or key changed. Called as hook(conn, store).
MIGRATION_HOOKS: list[Any] = []
MIGRATION_LOCK = 0x6D6564726C6179  # PostgreSQL advisory lock key of migrations ("medrlay")


class SchemaTooNew(RuntimeError):
    """The database was migrated by a newer medrelay than this one."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, synchronous: str = "FULL") -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


# libpq settings so that a database that vanishes without closing its sockets (a host or
# network gone, a failover) fails the statements waiting on it in about half a minute, not
# after Linux's ~15 min of retransmissions: a bounded connect, TCP keepalives on idle
# connections and TCP_USER_TIMEOUT on unacknowledged writes. A value in the URL's query
# (``?connect_timeout=3``) wins.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 15, "keepalives_interval": 5,
    "keepalives_count": 3, "tcp_user_timeout": 30000, "application_name": "medrelay",
}


def pg_connect_args(query: Any) -> dict[str, Any]:
    """``PG_CONNECT_ARGS`` minus what the store URL sets itself."""
    return {k: v for k, v in PG_CONNECT_ARGS.items() if k not in (query or {})}


def _pg_async_commit(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("SET synchronous_commit = off")
    cur.close()
    dbapi_conn.commit()


def _private_sqlite_file(db: Path) -> None:
    """Create the SQLite database file 0600 before SQLite does (it would make it 0644 under the
    usual umask), and tighten an older install's files.

    SQLite gives the ``-wal`` and ``-shm`` files it creates later the database file's own mode,
    so a private database file is enough for them; the ones an older engine left behind are
    tightened here too, with the migration lock file. The folder is not: it is the operator's
    (it may hold an outbox that other systems read).
    """
    db.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE))  # an empty file is an empty database
    for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}.migrate.lock"), Path(f"{db}.lock")):
        keep_private(p, PRIVATE_FILE)


def owner_lock_file(db: str) -> IO[bytes]:
    """``<db>.lock``, opened for the engine's single-owner flock (engine.runtime) and for the CLI's
    probe of it (``replay``), created as private as the database whichever of them comes first."""
    return os.fdopen(os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE), "r+b")


class Store:
    """The database engine, the blob folder and the key ring that seals what goes in."""

    def __init__(self, url: str, blob_dir: str | os.PathLike[str] | BlobFiles, keyring: KeyRing,
                 inline_max: int = INLINE_MAX) -> None:
        self.url = make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        if self.is_sqlite and self.url.database and self.url.database != ":memory:":
            _private_sqlite_file(Path(self.url.database))
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=5, max_overflow=10, pool_pre_ping=True,
                          connect_args=pg_connect_args(self.url.query))
        self.engine: Engine = create_engine(self.url, **kwargs)
        # Queue bookkeeping (claims, done, retry counts, lease renewals) does not need its own
        # fsync: losing the last few such commits in a power cut only means a message is sent
        # again, which at-least-once allows. So it writes through a second engine with
        # synchronous=NORMAL (SQLite WAL: durable with the next FULL commit of intake) or, on
        # PostgreSQL, synchronous_commit=off set once per connection (not a SET LOCAL round trip
        # per transaction), and no pre-ping round trip per checkout: a worker whose connection
        # died retries. Intake's commits stay fully synchronous.
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_pragmas)
            self.queue_engine: Engine = create_engine(self.url, **kwargs)
            event.listen(self.queue_engine, "connect",
                         lambda c, r: _sqlite_pragmas(c, r, synchronous="NORMAL"))
        else:
            self.queue_engine = create_engine(self.url, **{**kwargs, "pool_pre_ping": False})
            event.listen(self.queue_engine, "connect", _pg_async_commit)
        # Blob files: a folder (the default; LocalFolder) or an S3 bucket (ObjectStore).
        self.files: BlobFiles = blob_dir if hasattr(blob_dir, "write") else open_blob_files(blob_dir)  # type: ignore[arg-type]
        self.blob_dir: Path | None = self.files.root if isinstance(self.files, LocalFolder) else None
        self.keyring = keyring
        self.inline_max = inline_max
        self.metadata = schema.metadata

    # -- schema --------------------------------------------------------
    def version(self) -> int:
        """The schema version the database records; 0 for one medrelay never migrated (an
        offline command reads it before deciding whether it may migrate, engine.cli.main)."""
        from sqlalchemy import inspect

        with self.engine.connect() as conn:
            if not inspect(conn).has_table(schema.schema_version.name):
                return 0
            return max(conn.execute(select(schema.schema_version.c.version)).scalars().all(), default=0)

    def migrate(self, *, newer_ok: bool = False) -> int:
        """Create missing tables and apply the numbered steps not yet recorded, once.

        Versioned steps go in ``_STEPS``; create_all covers new tables. Alembic was weighed
        and left out: the engine is embedded and every install must migrate itself at start
        without a CLI step. On PostgreSQL several processes may start at once on an empty or
        older database: the whole migration runs under a transaction-scoped advisory lock, so
        one migrates and the others wait and then find nothing to do. Steps are additive, so
        an older engine keeps running beside a newer one during a rolling upgrade; an engine
        older than the schema it finds refuses to start (``SchemaTooNew``). ``newer_ok``: a
        running engine reloading its config after a newer one migrated (the same process, with
        the tables it started with; additive steps leave them as they were) goes on.
        """
        with self._sqlite_migration_lock(), self.engine.begin() as conn:
            if not self.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK})
            schema.metadata.create_all(conn)
            current = conn.execute(select(schema.schema_version.c.version)).scalars().all()
            have = max(current, default=0)
            if have > SCHEMA_VERSION and newer_ok:
                log.warning("store.schema_newer", schema=have, understood=SCHEMA_VERSION,
                            note="a newer medrelay upgraded the store; this engine goes on, a restart needs "
                                 "the newer one")
                return have
            if have > SCHEMA_VERSION:
                raise SchemaTooNew(f"the database schema is version {have}, newer than this medrelay "
                                   f"understands ({SCHEMA_VERSION}): run the newer medrelay, or upgrade this one")
            for version in range(have + 1, SCHEMA_VERSION + 1):
                step = _STEPS.get(version)
                if step is not None:
                    step(conn)
                conn.execute(insert(schema.schema_version).values(version=version, applied_at=time.time()))
            for hook in MIGRATION_HOOKS:
                hook(conn, self)
            _dicom_upgrade.run(conn, self)  # the archive index versions itself (re-keys, fills its terms)
        return SCHEMA_VERSION

    @contextlib.contextmanager
    def _sqlite_migration_lock(self) -> Iterator[None]:
        """SQLite's DDL does not take the write lock up front, so two processes would both create
        tables; an flock beside the database file serialises them (PostgreSQL: the advisory lock)."""
        db = self.url.database if self.is_sqlite else None
        if not db or db == ":memory:":
            yield
            return
        with os.fdopen(os.open(f"{db}.migrate.lock", os.O_RDWR | os.O_CREAT, PRIVATE_FILE), "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def dispose(self) -> None:
        self.engine.dispose()
        if self.queue_engine is not self.engine:
            self.queue_engine.dispose()

    def queue_tx(self) -> Any:
        """A transaction for queue bookkeeping (see ``queue_engine``)."""
        return _QueueTx(self)

    # -- blobs ---------------------------------------------------------
    def blob_path(self, blob_id: str) -> Path:
        """A local blob file's path (tests and tools; the engine goes through ``files``)."""
        if not isinstance(self.files, LocalFolder):
            raise TypeError(f"blobs are in {self.files.describe}, not in a folder")
        return self.files.path(blob_id)

    def seal_blob(self, data: bytes, aad: str) -> tuple[dict[str, Any], str | None, bytes]:
        """Encrypt; returns the blobs row, the blob file it must go to (its id, or None) and the ciphertext."""
        if len(data) >= STREAM_MIN:
            kid, wrapped, dek = self.keyring.new_data_key()
            header = stream.new_header(STREAM_CHUNK)
            ct = stream.seal_bytes(dek, header, aad.encode(), data)
            sealed = Sealed(kid, wrapped, header, ct)  # type: ignore[arg-type]  (a bytearray: no copy)
        else:
            sealed = self.keyring.seal(data, aad)
        blob_id = blob_address(sealed.nonce, sealed.ciphertext)
        in_file = len(sealed.ciphertext) > self.inline_max
        row = {
            "id": blob_id, "aad": aad, "kek_id": sealed.kek_id, "wrapped_key": sealed.wrapped_key,
            "nonce": sealed.nonce, "size": len(data),
            "data": None if in_file else bytes(sealed.ciphertext), "in_file": int(in_file),
        }
        return row, (blob_id if in_file else None), sealed.ciphertext

    def write_blob_files(self, files: Sequence[tuple[str | Path, bytes]]) -> None:
        """Write ciphertext files durably before the row that names them commits.

        A local folder: O_EXCL under the final name, fsync of file and folder; an object
        store: every PUT answered. Either way nothing refers to them until the commit, and
        a call that fails removes what it created (engine/store/blobfiles.py).
        """
        self.files.write([(Path(key).name, ct) for key, ct in files])

    def delete_blob_files(self, blob_ids: Iterable[str]) -> None:
        """Remove blob files no committed row refers to (refused messages, pruned rows).

        Best effort: one that cannot be removed now (an object store down) is logged and
        left to `store gc`, which removes unreferenced files later."""
        for blob_id in blob_ids:
            try:
                self.files.delete(blob_id)
            except Exception as e:
                log.warning("blobs.delete_failed", store=self.files.describe, error=type(e).__name__,
                            note="left for store gc")

    def prepare_blobs(self, items: Iterable[tuple[bytes, str]]) -> list[dict[str, Any]]:
        """Seal and write the file-backed ones now, outside any transaction.

        Intake calls this in the submitting thread, so parallel DICOM associations
        overlap their file fsyncs instead of queueing behind one committer.
        """
        rows, files = [], []
        for data, aad in items:
            row, key, ct = self.seal_blob(data, aad)
            rows.append(row)
            if key is not None:
                files.append((key, ct))
        if files:
            self.write_blob_files(files)
        return rows

    def insert_blob_rows(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        if rows:
            _INSERT_BLOB.run(conn, rows)
            self._fence_rotation(conn, rows)

    def put_blobs(self, conn: Connection, items: Iterable[tuple[bytes, str]]) -> list[str]:
        """Seal and store payloads inside the caller's transaction; returns blob ids."""
        rows = self.prepare_blobs(items)
        self.insert_blob_rows(conn, rows)
        return [r["id"] for r in rows]

    def _fence_rotation(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Re-wrap rows sealed under a KEK that `medrelay keys rotate` retired meanwhile.

        The rotation retires a KEK while holding the blobs table's write lock, and our
        insert above waited for that lock; so after it, one stat of the key file tells
        whether a key we sealed with is gone. Without this a blob sealed just before a
        retirement and committed just after would be unreadable after a restart.
        """
        self.keyring.refresh()
        for row in rows:
            if not self.keyring.in_file(row["kek_id"]):
                kid, wrapped = self.keyring.rewrap(row["kek_id"], row["wrapped_key"])
                conn.execute(update(schema.blobs).where(schema.blobs.c.id == row["id"])
                             .values(kek_id=kid, wrapped_key=wrapped))
                row["kek_id"], row["wrapped_key"] = kid, wrapped

    def put_blob(self, conn: Connection, data: bytes, aad: str) -> str:
        return self.put_blobs(conn, [(data, aad)])[0]

    def get_blob(self, conn: Connection, blob_id: str, aad: str | None = None) -> bytes:
        row = conn.execute(select(schema.blobs).where(schema.blobs.c.id == blob_id)).mappings().first()
        if row is None:
            raise IntegrityError(f"blob {blob_id} missing")
        return open_blob(self.keyring, blob_id, row, row["aad"] if aad is None else aad, self.files)

    def blob_chunks(self, conn: Connection, blob_id: str, aad: str | None = None) -> Iterator[bytes]:
        """The plaintext as authenticated chunks, the ciphertext read by range: memory stays about
        one chunk for a chunk-sealed blob (one piece for a one-shot blob)."""
        row = conn.execute(select(schema.blobs).where(schema.blobs.c.id == blob_id)).mappings().first()
        if row is None:
            raise IntegrityError(f"blob {blob_id} missing")
        return open_blob_chunks(self.keyring, blob_id, row, row["aad"] if aad is None else aad, self.files)

    def message_payload(self, conn: Connection, message_id: str) -> bytes:
        row = conn.execute(select(schema.messages.c.blob_id).where(schema.messages.c.id == message_id)).first()
        if row is None:
            raise KeyError(message_id)
        return self.get_blob(conn, row[0], aad=message_id)


_BLOB_COLUMNS = ("id", "aad", "kek_id", "wrapped_key", "nonce", "size", "data", "in_file")  # seal_blob's row
_INSERT_BLOB = Prepared(insert(schema.blobs), _BLOB_COLUMNS)


def blob_address(nonce: bytes, ciphertext: bytes) -> str:
    """A blob's id and file name: SHA-256 over its nonce and its GCM tag (the last 16 bytes).

    The tag is a MAC of the whole ciphertext under the blob's own fresh data key, so this
    names the content as a hash of all of it would (a torn or swapped file fails the
    check on read, and GCM fails any other change), for 28 bytes of hashing instead of
    the payload: 0.27 ms per 0.5 MB DICOM instance on the receive path. Blobs written
    before this was introduced are named by the SHA-256 of the whole ciphertext; the
    read check accepts either.
    """
    return hashlib.sha256(bytes(nonce) + bytes(ciphertext[-16:])).hexdigest()


def open_blob(keyring: KeyRing, blob_id: str, row: Any, aad: str, files: BlobFiles | Path) -> bytes:
    """Check and decrypt one blob given its row (``id``, ``aad``, ``kek_id``, ...).

    ``files``: where its file is (the store's ``files``), or the file's path itself."""
    if row["aad"] != aad:
        raise IntegrityError(f"blob {blob_id} does not belong to {aad}")
    if not row["in_file"]:
        ct = row["data"]
    else:
        try:
            ct = files.read_bytes() if isinstance(files, Path) else files.read(blob_id)
        except FileNotFoundError:
            raise IntegrityError(f"blob {blob_id}: its file is missing") from None
    if blob_address(row["nonce"], ct) != blob_id and hashlib.sha256(ct).hexdigest() != blob_id:
        raise IntegrityError(f"blob {blob_id}: content does not match its address")
    if stream.is_stream_header(row["nonce"]):
        dek = keyring.unwrap(row["kek_id"], row["wrapped_key"])
        try:
            return stream.open_bytes(dek, row["nonce"], aad.encode(), ct)
        except stream.StreamError as e:
            raise IntegrityError(f"blob {blob_id}: {e}") from None
    return keyring.open(Sealed(row["kek_id"], row["wrapped_key"], row["nonce"], ct), aad)


def is_chunked(row: Any) -> bool:
    """A blob sealed in chunks in a file of its own (``STREAM_MIN`` and up): readable piece by piece."""
    return bool(row["in_file"]) and stream.is_stream_header(row["nonce"])


def open_blob_chunks(keyring: KeyRing, blob_id: str, row: Any, aad: str, files: BlobFiles) -> Iterator[bytes]:
    """``open_blob`` as an iterator of plaintext chunks; a chunk-sealed file is read by range.

    The address check needs only the final tag (the last 16 bytes), so it is done before the
    first chunk; every chunk is authenticated before it is yielded, truncation at the end."""
    if row["aad"] != aad or not row["in_file"] or not stream.is_stream_header(row["nonce"]):
        yield open_blob(keyring, blob_id, row, aad, files)
        return
    try:
        size = files.size(blob_id)
        tail = files.read_range(blob_id, max(0, size - 16), 16)
    except FileNotFoundError:
        raise IntegrityError(f"blob {blob_id}: its file is missing") from None
    if blob_address(row["nonce"], tail) != blob_id:
        raise IntegrityError(f"blob {blob_id}: content does not match its address")
    dek = keyring.unwrap(row["kek_id"], row["wrapped_key"])
    try:
        yield from stream.open_chunks(dek, row["nonce"], aad.encode(),
                                      lambda off, n: files.read_range(blob_id, off, n))
    except stream.StreamError as e:
        raise IntegrityError(f"blob {blob_id}: {e}") from None


class _QueueTx:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._cm: Any = None

    def __enter__(self) -> Connection:
        self._cm = self.store.queue_engine.begin()
        return self._cm.__enter__()  # PostgreSQL: synchronous_commit=off is the connection's setting

    def __exit__(self, *exc: Any) -> Any:
        return self._cm.__exit__(*exc)


def _step2_coalesce_key(conn: Connection) -> None:
    """v2: deliveries.coalesce_key for debounced routes (stores made by v1 lack it)."""
    from sqlalchemy import inspect, text

    cols = {c["name"] for c in inspect(conn).get_columns("deliveries")}
    if "coalesce_key" not in cols:
        conn.execute(text("ALTER TABLE deliveries ADD COLUMN coalesce_key VARCHAR(256)"))
        conn.execute(text("CREATE INDEX IF NOT EXISTS ix_deliveries_coalesce "
                          "ON deliveries (channel, route, coalesce_key, state)"))


def _step3_lease_owner(conn: Connection) -> None:
    """v3: deliveries.lease_owner (several engines: leases renewed and released by their holder)."""
    from sqlalchemy import inspect, text

    cols = {c["name"] for c in inspect(conn).get_columns("deliveries")}
    if "lease_owner" not in cols:
        conn.execute(text("ALTER TABLE deliveries ADD COLUMN lease_owner VARCHAR(80)"))


def _step4_login_failures(conn: Connection) -> None:
    """v4: console_login_failures, the failed-login counts every engine on the database shares
    (a new table: create_all made it already; an engine of v3 or older beside it goes on counting
    in its own memory)."""
    from engine.auth.tables import console_login_failures

    console_login_failures.create(conn, checkfirst=True)


def _step5_instance_dimensions(conn: Connection) -> None:
    """v5: dicom_instances.image_rows / image_columns / number_of_frames (Rows, Columns and
    NumberOfFrames in C-FIND and QIDO-RS answers; instances indexed before stay without them)."""
    from sqlalchemy import inspect, text

    cols = {c["name"] for c in inspect(conn).get_columns("dicom_instances")}
    for name in ("image_rows", "image_columns", "number_of_frames"):
        if name not in cols:
            conn.execute(text(f"ALTER TABLE dicom_instances ADD COLUMN {name} INTEGER"))


def _step6_instance_content(conn: Connection) -> None:
    """v6: dicom_instances.content_date / content_time / image_type / acquisition_number (ContentDate,
    ContentTime, ImageType and AcquisitionNumber in C-FIND and QIDO-RS answers and matching;
    instances indexed before stay without them)."""
    from sqlalchemy import inspect, text

    cols = {c["name"] for c in inspect(conn).get_columns("dicom_instances")}
    for name, sql_type in (("content_date", "VARCHAR(8)"), ("content_time", "VARCHAR(16)"),
                           ("image_type", "TEXT"), ("acquisition_number", "INTEGER")):
        if name not in cols:
            conn.execute(text(f"ALTER TABLE dicom_instances ADD COLUMN {name} {sql_type}"))


_STEPS: dict[int, Any] = {2: _step2_coalesce_key, 3: _step3_lease_owner, 4: _step4_login_failures,
                          5: _step5_instance_dimensions, 6: _step6_instance_content}
