"""The audit trail: who did what to which message, from where, with what outcome.

Events are rows in the store first (never lost when a syslog receiver is down);
exporters read rows with exported=0 and mark them once sent.

Two ways in. ``record`` writes the row in the caller's transaction (``conn``) or in
one of its own before returning: for events whose row must be durable before the
caller answers (a message received, a user changed). ``record_soon`` is for the
rows of reads (DICOMweb queries and retrievals): the row is queued and a writer
thread commits every queued row in one transaction, so concurrent reads share one
commit (one fsync) instead of paying one each on the request path. A row queued this
way is committed shortly after the response that it records (one commit's time
while the store is up), ``flush`` waits for what is queued, and ``close`` (engine
stop) writes everything before the store is closed: nothing is lost on a clean
shutdown. A crash (kill -9, power) can lose the rows of reads answered in the last
few milliseconds; never a row of a received or changed message, which take
``record``. More than ``max_pending`` rows waiting (the store slow or away) and
``record_soon`` writes the row itself, as ``record`` does: back-pressure, not memory
growth and not loss.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import structlog
from sqlalchemy import Connection, insert
from sqlalchemy import exc as sa_exc

from engine.store import schema

log = structlog.get_logger()
_INSERT = insert(schema.audit_events)
_AWAY = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError, sa_exc.DisconnectionError, OSError)


class Audit:
    def __init__(self, store: Any, *, max_pending: int = 10_000) -> None:
        self.store = store
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._pending: list[dict[str, Any]] = []
        self._writing = 0  # rows taken by the writer, not yet committed
        self._thread: threading.Thread | None = None
        self._closed = False

    @staticmethod
    def _row(action: str, outcome: str, actor: str, peer: str, channel: str | None, message_id: str | None,
             entity: dict[str, Any] | None, detail: str | None) -> dict[str, Any]:
        return {"at": time.time(), "action": action, "outcome": outcome, "actor": actor, "peer": peer,
                "channel": channel, "message_id": message_id, "entity": entity, "detail": detail,
                "exported": 0}

    def record(self, action: str, *, outcome: str = "success", actor: str = "", peer: str = "",
               channel: str | None = None, message_id: str | None = None,
               entity: dict[str, Any] | None = None, detail: str | None = None,
               conn: Connection | None = None) -> None:
        """Write one event; inside ``conn``'s transaction when given, else in its own."""
        row = self._row(action, outcome, actor, peer, channel, message_id, entity, detail)
        if conn is not None:
            conn.execute(_INSERT, [row])
            return
        self._write([row])

    def record_soon(self, action: str, *, outcome: str = "success", actor: str = "", peer: str = "",
                    channel: str | None = None, message_id: str | None = None,
                    entity: dict[str, Any] | None = None, detail: str | None = None) -> None:
        """Queue one event for the next group commit; never blocks on the store (see the module
        docstring for when it is durable). Safe to call on an event loop."""
        row = self._row(action, outcome, actor, peer, channel, message_id, entity, detail)
        with self._cond:
            queued = not self._closed and len(self._pending) < self.max_pending
            if queued:
                self._pending.append(row)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        if not queued:  # closed, or the writer is far behind: write it here
            self._write([row])

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row queued so far is committed (or ``timeout``); True when it is."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._writing:
                left = end - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 30.0) -> None:
        """Commit what is queued and stop the writer; later ``record_soon`` calls write at once."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._cond:  # the writer gave up (store away): one last try from here
            rest, self._pending = self._pending, []
        if rest:
            self._write(rest)

    def _run(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return  # closed and drained
                batch, self._pending = self._pending, []
                self._writing = len(batch)
            ok = self._write_batch(batch)
            with self._cond:
                self._writing = 0
                if not ok:  # put them back in front, try again after a pause
                    self._pending[:0] = batch
                self._cond.notify_all()
                if not ok:
                    if self._closed:
                        return  # close() makes the last attempt and logs it
                    self._cond.wait(backoff)
                    backoff = min(backoff * 2, 2.0)
                else:
                    backoff = 0.05

    def _write_batch(self, rows: list[dict[str, Any]]) -> bool:
        """One transaction for the batch. False (keep them, retry) when the store is away; a
        batch refused for another reason is written row by row so one bad row (logged) does
        not hold back the others."""
        try:
            with self.store.engine.begin() as c:
                c.execute(_INSERT, rows)
            return True
        except _AWAY as e:
            log.warning("audit.write_deferred", rows=len(rows), error=type(e).__name__)
            return False
        except Exception:
            for row in rows:
                self._write([row])
            return True

    def _write(self, rows: list[dict[str, Any]]) -> bool:
        try:
            with self.store.engine.begin() as c:
                c.execute(_INSERT, rows)
            return True
        except Exception:  # an audit failure must be visible but must not take a listener down
            log.exception("audit.write_failed", action=rows[0]["action"], rows=len(rows))
            return False
