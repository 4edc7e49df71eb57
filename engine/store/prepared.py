"""Core statements compiled once per dialect and run on the connection's DBAPI cursor.

Why: on the DICOM receive path the committer runs a handful of small statements per
instance, and SQLAlchemy's per-execution work (cache key, parameter processing,
result set-up) cost ~70 us each, about as much as SQLite running them. For
statements whose columns need no type processing (strings, numbers, bytes) the
compiled SQL and its parameter order are all we need from SQLAlchemy; the DBAPI
cursor is the caller's own connection, so the statement is part of the caller's
transaction exactly as ``conn.execute`` would make it. JSON columns are named and
serialised here with ``json.dumps``, as SQLAlchemy's JSON type does (on PostgreSQL the
compiled SQL carries the dialect's ``::JSON`` cast). Other processed types stay on
``conn.execute``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.sql import ClauseElement


class Prepared:
    """One statement; ``columns`` fixes the inserted columns of an INSERT (compile's ``column_keys``)."""

    def __init__(self, statement: ClauseElement, columns: Sequence[str] | None = None, *,
                 json_columns: Sequence[str] = ()) -> None:
        self.statement = statement
        self.columns = list(columns) if columns is not None else None
        self.json_columns = frozenset(json_columns)
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None]] = {}
        self._defaults: dict[str, Any] = {}  # values bound in the statement itself (``x == "pending"``)

    def _for(self, conn: Connection) -> tuple[str, tuple[str, ...] | None]:
        name = f"{conn.dialect.name}+{conn.dialect.driver}"  # paramstyle differs per driver
        hit = self._compiled.get(name)
        if hit is None:
            compiled = self.statement.compile(dialect=conn.dialect, column_keys=self.columns)
            order = tuple(compiled.positiontup or ()) if compiled.positional else None
            self._defaults = {k: v for k, v in compiled.params.items() if v is not None}
            hit = self._compiled[name] = (str(compiled), order)
        return hit

    def _args(self, order: tuple[str, ...] | None, params: Mapping[str, Any]) -> Any:
        if self.json_columns:
            params = {k: (json.dumps(v) if k in self.json_columns and v is not None else v)
                      for k, v in params.items()}
        if self._defaults:
            params = {**self._defaults, **params}
        return tuple(params[k] for k in order) if order is not None else params

    def one(self, conn: Connection, params: Mapping[str, Any]) -> tuple[Any, ...] | None:
        """Run a SELECT; its first row."""
        sql, order = self._for(conn)
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute(sql, self._args(order, params))
            row = cur.fetchone()
            return tuple(row) if row is not None else None
        finally:
            cur.close()

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run a SELECT; its rows as dicts of what the driver returns (psycopg: JSON already loaded,
        bytea as bytes; so for PostgreSQL, where no column needs SQLAlchemy's processing)."""
        sql, order = self._for(conn)
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cur.execute(sql, self._args(order, params))
            names = [c[0] for c in cur.description or ()]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
        finally:
            cur.close()

    def run(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> int:
        """Run an INSERT/UPDATE for each parameter set (executemany); the rows it touched."""
        if not rows:
            return 0
        sql, order = self._for(conn)
        cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            if len(rows) == 1:
                cur.execute(sql, self._args(order, rows[0]))
            else:
                cur.executemany(sql, [self._args(order, r) for r in rows])
            return int(cur.rowcount)
        finally:
            cur.close()


def pg_run(conn: Connection, sql: str, params: Mapping[str, Any]) -> None:
    """PostgreSQL: one fixed statement in psycopg's own ``%(name)s`` placeholders, prepared by the
    server, on the caller's connection (its transaction, its pipeline when one is open).

    For the queue's bookkeeping statements, run for every group of outcomes: SQLAlchemy's
    ``text()`` execution (bind processing, result set-up) cost more than the statement.
    """
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(sql, params, prepare=True)
    finally:
        cur.close()
