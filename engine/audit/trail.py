"""The audit trail: who did what to which message, from where, with what outcome.

Events are rows in the store first (never lost when a syslog receiver is down);
exporters read rows with exported=0 and mark them once sent.
"""

from __future__ import annotations

import time
from typing import Any

import structlog
from sqlalchemy import Connection, insert

from engine.store import schema

log = structlog.get_logger()


class Audit:
    def __init__(self, store: Any) -> None:
        self.store = store

    def record(self, action: str, *, outcome: str = "success", actor: str = "", peer: str = "",
               channel: str | None = None, message_id: str | None = None,
               entity: dict[str, Any] | None = None, detail: str | None = None,
               conn: Connection | None = None) -> None:
        """Write one event; inside ``conn``'s transaction when given, else in its own."""
        row = {"at": time.time(), "action": action, "outcome": outcome, "actor": actor, "peer": peer,
               "channel": channel, "message_id": message_id, "entity": entity, "detail": detail,
               "exported": 0}
        if conn is not None:
            conn.execute(insert(schema.audit_events), [row])
            return
        try:
            with self.store.engine.begin() as c:
                c.execute(insert(schema.audit_events), [row])
        except Exception:  # an audit failure must be visible but must not take a listener down
            log.exception("audit.write_failed", action=action)
