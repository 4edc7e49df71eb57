"""What polling sources remember in medrelay's own store, inside intake's transactions.

A source that takes work from somewhere else (a folder, an SFTP server, a database
table) must never lose an item nor take one twice across a kill -9. It cannot get that
from the other side (a folder has no transactions; a source database's commit is not
ours), so it keeps its bookkeeping here and writes it in the same transaction as the
messages it submits (an intake ``tx_hook``):

- ``source_marks``: one row per item committed, keyed by something the source can
  name again after a restart (a file claim id and the message's place in the file, a
  source row's key). Resubmitting a marked item is answered as a duplicate of the
  message it became, at any age (intake's dedupe window is a time limit; this is not).
  The source deletes its marks once the item is finished on the other side (file
  moved, source row updated), so the table holds only the in-flight ones.
- ``source_cursors``: the last key a database source committed. It moves with the
  messages, so after a crash the next poll starts exactly after the last committed row.

Keys are made by the sources from claim ids and row keys, never from file names or
payload content (PHI stays out of clear columns).
"""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import Column, Connection, Float, String, Table, and_, delete, insert, select, update

from engine.store.schema import metadata

source_marks = Table(
    "source_marks",
    metadata,
    Column("channel", String(128), primary_key=True),
    Column("key", String(256), primary_key=True),
    Column("message_id", String(32), nullable=False),
    Column("at", Float, nullable=False),
)

source_cursors = Table(
    "source_cursors",
    metadata,
    Column("channel", String(128), primary_key=True),
    Column("name", String(128), primary_key=True),
    Column("value", String(1024), nullable=False),  # JSON: the key as the source database gave it
    Column("updated_at", Float, nullable=False),
)


class CursorMoved(RuntimeError):
    """The cursor is not where this submission expected it: an earlier row of the same poll
    was not committed, so this one must not be either (it would skip that row)."""


def marked(conn: Connection, channel: str, key: str) -> str | None:
    """The message id an item became, if it was committed before."""
    m = source_marks
    return conn.execute(select(m.c.message_id).where(and_(m.c.channel == channel, m.c.key == key))).scalar()


def mark(conn: Connection, channel: str, key: str, message_id: str) -> None:
    conn.execute(insert(source_marks).values(channel=channel, key=key, message_id=message_id, at=time.time()))


def unmark(conn: Connection, channel: str, keys: list[str]) -> int:
    """Forget finished items (the source's own side is done with them)."""
    m = source_marks
    n = 0
    for i in range(0, len(keys), 500):
        n += conn.execute(delete(m).where(and_(m.c.channel == channel, m.c.key.in_(keys[i:i + 500])))).rowcount
    return n


def unmark_prefix(conn: Connection, channel: str, prefix: str) -> int:
    m = source_marks
    like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    return conn.execute(delete(m).where(and_(m.c.channel == channel, m.c.key.like(like, escape="\\")))).rowcount


def marks_of(conn: Connection, channel: str, prefix: str = "") -> dict[str, str]:
    """key -> message id of a channel's marks (with a key prefix), for recovery and tests."""
    m = source_marks
    q = select(m.c.key, m.c.message_id).where(m.c.channel == channel)
    if prefix:
        like = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        q = q.where(m.c.key.like(like, escape="\\"))
    return {k: v for k, v in conn.execute(q)}


def prune_marks(conn: Connection, channel: str, older_than: float) -> int:
    m = source_marks
    return conn.execute(delete(m).where(and_(m.c.channel == channel, m.c.at < older_than))).rowcount


def read_cursor(conn: Connection, channel: str, name: str = "key") -> Any:
    """The last committed key (None: nothing committed yet)."""
    c = source_cursors
    raw = conn.execute(select(c.c.value).where(and_(c.c.channel == channel, c.c.name == name))).scalar()
    return None if raw is None else json.loads(raw)


def advance_cursor(conn: Connection, channel: str, expected: Any, new: Any, name: str = "key") -> None:
    """Compare-and-set: move the cursor from ``expected`` to ``new`` or raise ``CursorMoved``.

    Rows of one poll are submitted in key order; each one's hook expects the key of the
    row before it. If a row fails to commit, every later one of that poll fails here too,
    so the cursor never passes a row that is not stored.
    """
    c = source_cursors
    old, value = json.dumps(expected), json.dumps(new)
    now = time.time()
    where = and_(c.c.channel == channel, c.c.name == name)
    if expected is None:
        have = conn.execute(select(c.c.value).where(where)).scalar()
        if have is not None:
            raise CursorMoved("the cursor was set by another poll")
        conn.execute(insert(c).values(channel=channel, name=name, value=value, updated_at=now))
        return
    n = conn.execute(update(c).where(and_(where, c.c.value == old)).values(value=value, updated_at=now)).rowcount
    if n != 1:
        raise CursorMoved("the cursor is not at the previous row of this poll")
