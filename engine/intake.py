"""Intake: persist, de-duplicate and enqueue, then tell the listener what to answer.

Listeners await ``submit``; a single committer task gathers every submission that
arrives while the previous transaction is being written and commits them together
(group commit). So eight MLLP connections share one fsync instead of paying eight,
and no listener answers success before its message and its deliveries are durable.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from sqlalchemy import Connection, and_, insert, update
from sqlalchemy.exc import IntegrityError

from engine.envelope import Envelope
from engine.match import MISSING, lookup
from engine.store import dedupe, leases, message_terms, schema
from engine.store.prepared import Prepared

log = structlog.get_logger()

Status = Literal["accepted", "duplicate", "rejected", "error"]
TxHook = Callable[[Connection, Envelope], Any]
MAX_BATCH = 512
DURABLE_TIMEOUT = 60.0  # seconds the committer waits for a written-ahead file's fsync

@dataclass(frozen=True)
class Duplicate:
    """What a tx_hook returns when its own index already holds the message (e.g. a DICOM
    SOP Instance UID received before, at any age): answered as a duplicate of
    ``message_id``, nothing stored, nothing routed."""

    message_id: str


@dataclass(frozen=True)
class Refused:
    """What a tx_hook returns when its own index refuses the message (e.g. a DICOM UID filed
    under another study): nothing stored, nothing routed, answered ``rejected`` with
    ``reason`` (the peer's error comment: no PHI) and audited as a failed receive."""

    reason: str


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one submission; listeners map it to AA/AE, 0x0000/0xA700, 201/503."""

    status: Status
    message_id: str
    response: bytes | None = None  # the original answer, for duplicates
    result: Any = None  # what the tx_hook returned
    error: str | None = None
    routes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status in ("accepted", "duplicate")


@dataclass
class _Item:
    envelope: Envelope
    dedupe_key: str | None
    response: bytes | None
    tx_hook: TxHook | None
    future: ConcurrentFuture[Outcome]
    routes: tuple[str, ...] = field(default=())
    blob_row: dict[str, Any] | None = None  # sealed (and its file written) by the submitter
    durable: ConcurrentFuture[None] | None = None  # the file's fsync, awaited before COMMIT


class Ahead:
    """A large payload sealed and written on a writer thread while its submitter goes on.

    ``sealed`` gives the blob row as soon as the payload is encrypted; ``durable`` is
    done once the file and its folder are fsynced. The committer inserts the rows with
    the first and waits for the second only before COMMIT, so the file's fsync overlaps
    the submitter's own checks and the committer's statements, and still precedes the
    commit that makes the row name the file.
    """

    def __init__(self, store: Any, message_id: str, payload: bytes) -> None:
        self.store = store
        self.message_id = message_id
        self.payload = payload
        self.sealed: ConcurrentFuture[dict[str, Any]] = ConcurrentFuture()
        self.durable: ConcurrentFuture[None] = ConcurrentFuture()

    @classmethod
    def presealed(cls, store: Any, message_id: str, row: dict[str, Any]) -> Ahead:
        """A payload already sealed and durable as blob ``row`` (streamed in as it arrived,
        engine/store/blob_writer.py): ``submit_blocking`` commits the message naming it, and
        ``discard_ahead`` removes its file when the message is refused or a duplicate."""
        ahead = cls(store, message_id, b"")
        ahead.sealed.set_result(row)
        ahead.durable.set_result(None)
        return ahead

    def run(self) -> None:
        try:
            row, key, ct = self.store.seal_blob(self.payload, self.message_id)
        except BaseException as e:
            self.sealed.set_exception(e)
            self.durable.set_exception(e)
            return
        self.sealed.set_result(row)
        try:
            if key is not None:
                self.store.write_blob_files([(key, ct)])
        except BaseException as e:
            self.durable.set_exception(e)
        else:
            self.durable.set_result(None)


class Intake:
    """Group-committing intake shared by every listener of one engine process.

    ``router(envelope) -> routes`` picks the routes whose ``when:`` matches; one
    pending delivery row per route is written in the same transaction as the message.
    ``on_commit`` is called (in the loop) with the (channel, route) pairs that got work.
    """

    def __init__(self, store: Any, *, config_hash: str,
                 router: Callable[[Envelope], Sequence[str]],
                 dedupe_window: Callable[[str], float],
                 on_commit: Callable[[set[tuple[str, str]]], None] | None = None,
                 metrics: Any = None,
                 debounce: Callable[[str, str], tuple[str, float] | None] | None = None) -> None:
        self.store = store
        self.debounce = debounce or (lambda channel, route: None)
        self.config_hash = config_hash
        self.router = router
        self.dedupe_window = dedupe_window
        self.on_commit = on_commit
        self.metrics = metrics
        self._queue: queue.SimpleQueue[_Item | None] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._writers: ThreadPoolExecutor | None = None
        self._conn: Connection | None = None  # the committer thread's own
        self._committing = False  # the committer's transaction reached its COMMIT

    # -- lifecycle -----------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="intake-committer", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Commit what is queued, then stop; later submissions are refused."""
        self._closing = True
        if self._queue is not None and self._thread is not None:
            self._queue.put(None)  # after everything queued so far
            await asyncio.to_thread(self._thread.join)
            self._refuse_rest()
        if self._writers is not None:
            self._writers.shutdown(wait=True)

    def _refuse_rest(self) -> None:
        """Items that raced past the closing check after the stop marker: refused, never left waiting."""
        assert self._queue is not None
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item.future.done():
                self._discard_files(item)
                item.future.set_result(Outcome("error", item.envelope.id, error="engine is shutting down"))

    # -- submission ----------------------------------------------------
    async def submit(self, envelope: Envelope, *, dedupe_key: str | None = None,
                     response: bytes | None = None, tx_hook: TxHook | None = None,
                     _blob_row: dict[str, Any] | None = None) -> Outcome:
        if self._queue is None or self._closing:
            return Outcome("error", envelope.id, error="engine is shutting down")
        if _blob_row is None and len(envelope.payload) > self.store.inline_max:
            try:
                _blob_row = await asyncio.to_thread(self._prepare, envelope)
            except OSError as e:
                return Outcome("error", envelope.id, error=f"blob write failed: {e.strerror}")
        cf: ConcurrentFuture[Outcome] = ConcurrentFuture()
        self._queue.put(_Item(envelope, dedupe_key, response, tx_hook, cf, blob_row=_blob_row))
        return await asyncio.wrap_future(cf)

    def _prepare(self, envelope: Envelope) -> dict[str, Any]:
        """Seal a large payload and write its file (fsynced) before it joins a group commit.

        Done by the submitter, so files of parallel associations are written in parallel
        and the committer's transaction holds only row inserts. The file is referenced
        only once the commit succeeds.
        """
        return self.store.prepare_blobs([(envelope.payload, envelope.id)])[0]

    def write_ahead(self, message_id: str, payload: bytes) -> Ahead | None:
        """Start sealing and writing (fsync) a large payload's file on a writer thread.

        A blocking listener (DICOM) calls this as soon as it has the bytes and does its
        own checks meanwhile. Pass the result to ``submit_blocking``, or to
        ``discard_ahead`` when the message is refused after all.
        """
        if len(payload) <= self.store.inline_max or self._closing:
            return None
        if self._writers is None:
            self._writers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="blob-writer")
        ahead = Ahead(self.store, message_id, payload)
        self._writers.submit(ahead.run)
        return ahead

    def discard_ahead(self, ahead: Ahead | None) -> None:
        """The message was refused: its file, never referenced by any row, goes (also when its
        write failed half way: ``write_blob_files`` removes what it wrote, this is the backstop)."""
        if ahead is None:
            return
        try:
            row = ahead.sealed.result()
        except Exception:
            return  # nothing was sealed, so no file was begun
        ahead.durable.exception()  # wait for the writer, whatever became of the write
        if row.get("in_file"):
            self.store.delete_blob_files([row["id"]])

    def _discard_later(self, ahead: Ahead) -> None:
        """Discard once the writer thread is done with the file (it may still create it)."""
        ahead.durable.add_done_callback(lambda _f: self.discard_ahead(ahead))

    def _discard_files(self, item: _Item) -> None:
        """A refused item's written-ahead file goes; one still being written goes when it is done."""
        row = item.blob_row
        if row is None or not row.get("in_file"):
            return
        ids = [row["id"]]
        if item.durable is not None and not item.durable.done():
            item.durable.add_done_callback(lambda _f: self.store.delete_blob_files(ids))
        else:
            self.store.delete_blob_files(ids)

    def submit_blocking(self, envelope: Envelope, *, dedupe_key: str | None = None,
                        response: bytes | None = None, tx_hook: TxHook | None = None,
                        timeout: float = 60.0,
                        ahead: Ahead | None = None) -> Outcome:
        """For listeners that run in their own threads (pynetdicom, the DICOM storage path)."""
        if self._queue is None or self._closing:
            self.discard_ahead(ahead)
            return Outcome("error", envelope.id, error="engine is shutting down")
        blob_row, durable = None, None
        if ahead is not None:
            try:
                blob_row, durable = ahead.sealed.result(timeout), ahead.durable
            except Exception as e:
                self._discard_later(ahead)
                return Outcome("error", envelope.id, error=f"blob sealing failed: {type(e).__name__}")
        elif len(envelope.payload) > self.store.inline_max:
            try:
                blob_row = self._prepare(envelope)
            except OSError as e:
                return Outcome("error", envelope.id, error=f"blob write failed: {e.strerror}")
        cf: ConcurrentFuture[Outcome] = ConcurrentFuture()
        self._queue.put(_Item(envelope, dedupe_key, response, tx_hook, cf, blob_row=blob_row, durable=durable))
        try:
            return cf.result(timeout)
        except Exception as e:  # timeout: the peer must get a failure, not success
            return Outcome("error", envelope.id, error=f"intake did not answer: {type(e).__name__}")

    # -- committer -----------------------------------------------------
    def _run(self) -> None:
        """The committer thread: whatever is queued when it looks is one transaction.

        A thread of its own rather than a task handing each batch to ``to_thread``:
        blocking submitters (DICOM associations) reach it without passing through the
        event loop, which cost ~0.3 ms of GIL time per instance in hops.
        """
        assert self._queue is not None and self._loop is not None
        q, loop = self._queue, self._loop
        try:
            self._serve(q, loop)
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _serve(self, q: queue.SimpleQueue[_Item | None], loop: asyncio.AbstractEventLoop) -> None:
        """Batch what is queued; items whose written-ahead file is not durable yet wait for
        the next batch unless nothing else is ready.

        A batch waits for its files' fsyncs before COMMIT. With one DICOM association that
        overlaps the statements with the fsync; with several, one slow fsync would hold up
        instances that are ready, so those go first and the slow one follows.
        """
        pending: list[_Item] = []
        stopping = False
        while True:
            if not pending:
                if stopping:
                    return
                first = q.get()
                if first is None:
                    return
                pending.append(first)
            while not stopping and len(pending) < MAX_BATCH:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stopping = True
                else:
                    pending.append(nxt)
            ready = [i for i in pending if i.durable is None or i.durable.done()]
            batch = ready if ready else pending[:1]
            taken = {id(i) for i in batch}
            pending = [i for i in pending if id(i) not in taken]
            try:
                self._handle(batch, loop)
            except Exception as e:  # never a dead committer with submitters waiting on it
                log.error("intake.committer_error", size=len(batch), error=type(e).__name__)
                for item in batch:
                    if not item.future.done():
                        item.future.set_result(Outcome("error", item.envelope.id, error=type(e).__name__))

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One transaction on the committer's own connection, kept open between batches
        (a pool checkout, its reset and a fresh ``begin`` per batch were ~15 % of the
        committer's time); a connection that failed is dropped and reopened next time."""
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            conn = self._conn = self.store.engine.connect()
        self._committing = False
        try:
            with conn.begin():
                yield conn
                self._committing = True  # the statements ran; what fails now is the COMMIT itself
        except BaseException:
            if conn.invalidated or conn.closed or _broken(conn):
                self._conn = None
                conn.close()
            raise

    def _handle(self, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        try:
            outcomes = self._commit_batch(batch)
        except Exception as e:
            if _conflict(e):  # e.g. the same SOP instance stored by another engine a moment ago
                log.info("intake.batch_conflict", size=len(batch), error=type(getattr(e, "orig", e)).__name__)
            else:
                log.error("intake.batch_failed", size=len(batch), error=type(e).__name__)
            outcomes = self._commit_singly(batch, uncertain=self._commit_uncertain())
        woken: set[tuple[str, str]] = set()
        for item, outcome in zip(batch, outcomes, strict=True):
            if outcome.status == "accepted":
                woken.update((item.envelope.channel, r) for r in outcome.routes)
            if self.metrics is not None:
                self.metrics.intake(item.envelope.channel, outcome.status)
            if not item.future.done():
                item.future.set_result(outcome)
        if woken and self.on_commit is not None:
            try:
                loop.call_soon_threadsafe(self.on_commit, woken)
            except RuntimeError:  # loop closed under us at shutdown: workers start from the store
                pass

    def _commit_uncertain(self) -> bool:
        """The last transaction failed in its COMMIT on a server database, which may have
        committed it after all (a connection lost during COMMIT); SQLite's is never in doubt."""
        return self._committing and not self.store.is_sqlite

    def _commit_singly(self, batch: list[_Item], *, uncertain: bool = False) -> list[Outcome]:
        """After a failed group commit, find the one bad item and fail only it.

        A refused item's written-ahead file is deleted, unless the group's or its own COMMIT
        may have gone through: then it stays, and ``store gc`` removes it if no row names it.
        """
        out = []
        for item in batch:
            try:
                out.extend(self._commit_batch([item]))
            except Exception as e:
                log.error("intake.commit_failed", channel=item.envelope.channel,
                          message_id=item.envelope.id, error=type(e).__name__, detail=str(e)[:200])
                out.append(Outcome("error", item.envelope.id, error=type(e).__name__))
                if uncertain or self._commit_uncertain():
                    if item.blob_row is not None and item.blob_row.get("in_file"):
                        log.warning("intake.commit_uncertain", channel=item.envelope.channel,
                                    message_id=item.envelope.id, note="blob file kept for store gc")
                else:
                    self._discard_files(item)
        return out

    def _claim_keys(self, conn: Connection, batch: list[_Item], now: float
                    ) -> tuple[dict[tuple[str, str], tuple[str, bytes | None]], dict[tuple[str, str], str]]:
        """Claim the batch's dedupe keys in ``dedupe_keys`` (engine/store/dedupe.py).

        Returns the keys held by earlier messages (-> their id and stored response: these items
        are duplicates) and the keys this batch won (-> the id they were claimed for: the first
        item with the key). The claim is a unique row, so another engine storing the same key at
        the same moment makes this wait for its commit and then lose, never both store it.
        """
        first: dict[tuple[str, str], tuple[str, float]] = {}
        for i in batch:
            if i.dedupe_key:
                key = (i.envelope.channel, i.dedupe_key)
                if key not in first:
                    window = self.dedupe_window(key[0])
                    if window > 0:
                        first[key] = (i.envelope.id, now + window)
        if not first:
            return {}, {}
        won = dedupe.claim(conn, [(ch, k, mid, exp) for (ch, k), (mid, exp) in first.items()], now)
        lost = [k for k in first if k not in won]
        return dedupe.originals(conn, lost), {k: first[k][0] for k in won}

    def _commit_batch(self, batch: list[_Item]) -> list[Outcome]:
        now = time.time()
        outcomes: list[Outcome] = []
        unused: list[str] = []  # files written ahead for what turned out to be duplicates
        with self._transaction() as conn, ExitStack() as tail:
            existing, claimed = self._claim_keys(conn, batch, now)
            msg_rows: list[dict[str, Any]] = []
            dlv_rows: list[dict[str, Any]] = []
            audit_rows: list[dict[str, Any]] = []
            blob_rows: list[dict[str, Any]] = []
            to_seal: list[tuple[int, bytes, str]] = []
            supersede: dict[tuple[str, str, str], str] = {}
            for item in batch:
                env = item.envelope
                key = (env.channel, item.dedupe_key) if item.dedupe_key else None
                if key is not None and key in existing:
                    mid, resp = existing[key]
                    outcomes.append(Outcome("duplicate", mid, response=resp))
                    audit_rows.append(_receive_audit(env, now, mid, "duplicate"))
                    if item.blob_row is not None and item.blob_row.get("in_file"):
                        unused.append(item.blob_row["id"])
                    continue
                result = item.tx_hook(conn, env) if item.tx_hook is not None else None
                if isinstance(result, Duplicate | Refused):
                    if isinstance(result, Refused):
                        outcomes.append(Outcome("rejected", env.id, error=result.reason))
                        audit_rows.append(_receive_audit(env, now, env.id, "refused: " + result.reason, failed=True))
                    else:
                        outcomes.append(Outcome("duplicate", result.message_id))
                        audit_rows.append(_receive_audit(env, now, result.message_id, "duplicate"))
                    if item.blob_row is not None and item.blob_row.get("in_file"):
                        unused.append(item.blob_row["id"])
                    continue
                routes = tuple(self.router(env))
                if item.blob_row is not None:
                    blob_rows.append(item.blob_row)
                else:
                    to_seal.append((len(blob_rows), env.payload, env.id))
                    blob_rows.append({})
                msg_rows.append({
                    "id": env.id, "channel": env.channel, "kind": env.kind,
                    "received_at": env.received_at.timestamp(), "peer": env.peer,
                    "headers": dict(env.headers), "blob_id": "",  # a presealed payload: its blob's size
                    "size": item.blob_row["size"] if item.blob_row else len(env.payload),
                    "config_hash": self.config_hash, "dedupe_key": item.dedupe_key,
                    "response": item.response, "parent_id": env.lineage[-1] if env.lineage else None,
                })
                for r in routes:
                    due, ck = now, None
                    quiet = self.debounce(env.channel, r)
                    if quiet is not None:
                        ck = _header_value(env, quiet[0])
                        if ck is not None:
                            due = now + quiet[1]
                            supersede[(env.channel, r, ck)] = env.id
                    dlv_rows.append({
                        "message_id": env.id, "channel": env.channel, "route": r, "state": "pending",
                        "attempts": 0, "next_attempt_at": due, "lease_until": 0.0, "last_error": None,
                        "detail": None, "updated_at": now, "coalesce_key": ck,
                    })
                if key is not None and key in claimed:
                    existing[key] = (env.id, item.response)
                    if claimed[key] != env.id:  # the item it was claimed for was not stored: this one is
                        dedupe.unclaim(conn, [(key[0], key[1], claimed[key])])
                        dedupe.claim(conn, [(key[0], key[1], env.id, now + self.dedupe_window(key[0]))], now)
                    claimed.pop(key)
                outcomes.append(Outcome("accepted", env.id, response=item.response, result=result,
                                        routes=routes))
                audit_rows.append(_receive_audit(env, now, env.id, None))
            tail.enter_context(_pipeline(conn))  # the inserts below need no answers: sent together
            if msg_rows:
                sealed = self.store.prepare_blobs([(data, aad) for _, data, aad in to_seal])
                for (i, _, _), row in zip(to_seal, sealed, strict=True):
                    blob_rows[i] = row
                self.store.insert_blob_rows(conn, blob_rows)
                for row, blob in zip(msg_rows, blob_rows, strict=True):
                    row["blob_id"] = blob["id"]
                _INSERT_MESSAGES.run(conn, msg_rows)
                message_terms.write(conn, self.store.keyring, [i.envelope for i in batch], {r["id"] for r in msg_rows})
            if claimed:  # keys claimed for items a tx_hook found to be duplicates: free them again
                dedupe.unclaim(conn, [(ch, k, mid) for (ch, k), mid in claimed.items()])
            if supersede:
                _supersede(conn, supersede, dlv_rows, now)
            if dlv_rows:
                _INSERT_DELIVERIES.run(conn, dlv_rows)
            if audit_rows:  # one executemany per group commit: the trail costs no extra fsync
                _INSERT_AUDIT.run(conn, audit_rows)
            tail.close()  # their errors, if any, are raised here: before the COMMIT
            for item in batch:  # files written ahead must be durable before the rows naming them
                if item.durable is not None:
                    item.durable.result(DURABLE_TIMEOUT)
        self.store.delete_blob_files(unused)
        return outcomes


def _conflict(e: BaseException) -> bool:
    """A unique constraint hit (SQLSTATE class 23), through SQLAlchemy or from the driver itself
    (prepared statements run on the DBAPI cursor): another engine committed the same row first."""
    orig = getattr(e, "orig", None) or e
    return isinstance(e, IntegrityError) or str(getattr(orig, "sqlstate", "") or "").startswith("23")


def _broken(conn: Connection) -> bool:
    """The driver connection died under us, unseen by SQLAlchemy (an error raised by psycopg
    itself, as a pipeline's end raises it): drop it rather than reuse it for the next batch."""
    try:
        raw = conn.connection.dbapi_connection
    except Exception:
        return True
    return bool(getattr(raw, "broken", False) or getattr(raw, "closed", False))


def _pipeline(conn: Connection) -> Any:
    """PostgreSQL: psycopg's pipeline mode, so the batch's inserts (blobs, messages, terms,
    deliveries, audit) go to the server without a round trip each; one wait at the end instead
    of six. A statement whose result is read (a lock, a look-up) still waits for it."""
    if conn.dialect.name != "postgresql":
        return nullcontext()
    return conn.connection.dbapi_connection.pipeline()  # type: ignore[union-attr]


def _header_value(env: Envelope, key: str) -> str | None:
    v = lookup(env, key)
    return None if v is MISSING or v is None else (str(v)[:256] or None)


def _supersede(conn: Connection, latest: dict[tuple[str, str, str], str], rows: list[dict[str, Any]],
               now: float) -> None:
    """Debounce: a newer message with the same key replaces the pending delivery of an older one.

    Older pending rows already in the store and older rows of this same batch become
    `superseded`; only the newest stays pending, due when the key has been quiet long enough.
    Several engines: each key's lock (``leases.xact_lock``) is taken first, so an engine whose
    transaction on the same key commits meanwhile is waited for and its row superseded too;
    without it both kept a pending row (two ORUs for one study).
    """
    d = schema.deliveries
    leases.xact_lock(conn, "debounce", [f"{c}\x00{r}\x00{k}" for c, r, k in latest])
    for (channel, route, ck), newest in latest.items():
        conn.execute(update(d).where(and_(d.c.channel == channel, d.c.route == route, d.c.coalesce_key == ck,
                                          d.c.state == "pending"))
                     .values(state="superseded", detail=f"superseded by {newest}", updated_at=now))
    for row in rows:
        ck = row["coalesce_key"]
        if ck is not None and latest.get((row["channel"], row["route"], ck)) != row["message_id"]:
            row["state"], row["detail"] = "superseded", f"superseded by {latest[(row['channel'], row['route'], ck)]}"


_INSERT_MESSAGES = Prepared(insert(schema.messages), (
    "id", "channel", "kind", "received_at", "peer", "headers", "blob_id", "size", "config_hash", "dedupe_key",
    "response", "parent_id"), json_columns=("headers",))
_INSERT_DELIVERIES = Prepared(insert(schema.deliveries), (  # the rows _commit_batch makes (no RETURNING)
    "message_id", "channel", "route", "state", "attempts", "next_attempt_at", "lease_until", "last_error", "detail",
    "updated_at", "coalesce_key"))
_INSERT_AUDIT = Prepared(insert(schema.audit_events), (  # the rows _receive_audit makes
    "at", "action", "outcome", "actor", "peer", "channel", "message_id", "entity", "detail", "exported"),
    json_columns=("entity",))


def _receive_audit(env: Envelope, now: float, message_id: str, detail: str | None, *,
                   failed: bool = False) -> dict[str, Any]:
    """The audit row of one received message (headers are routing fields only, never PHI)."""
    return {"at": now, "action": "message.receive", "outcome": "failure" if failed else "success",
            "actor": str(env.headers.get("CallingAETitle") or env.headers.get("MSH-3") or ""),
            "peer": env.peer, "channel": env.channel, "message_id": message_id,
            "entity": {"kind": env.kind, "headers": dict(env.headers)}, "detail": detail, "exported": 0}
