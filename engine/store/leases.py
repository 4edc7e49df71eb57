"""Named leases: which engine process does a thing that only one process may do at a time.

Several engines on one PostgreSQL database share the queue, but some work must have one
doer at a time: an ordered route's deliveries (one claimer keeps the order), the audit
export, the retention pruner, the store-wide alerts, `store gc`. Each such thing is a row
of ``leases`` (its name, its holder, until when). A holder renews its rows every second or
so (``engine.ops.singleton``); a holder that dies stops renewing and another process takes
the row once ``until`` has passed, so work moves within one lease period (seconds), never
waits for a human.

Why rows with an expiry rather than ``pg_try_advisory_lock`` on a session: a lease that only
ends when PostgreSQL notices the session is gone holds for as long as the server's TCP
keepalive takes (two hours by default) when a host vanishes without closing its socket, and
the holder itself cannot tell when it lost it. With an expiry both sides know: the taker
waits for ``until``, and the holder stops by its own clock (``deadline``) when it could not
renew, before anyone else may take over.

All times on PostgreSQL are the database's clock (``now()``), so hosts with skewed clocks
still agree on who holds what. On SQLite there is one engine per store (the runtime's lock
file), and these functions use the local clock.

Transaction-scoped locks for the duplicate windows are here too (``xact_lock``): they
serialise two transactions that would otherwise both decide "nothing matches, create".
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Collection, Iterator
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Float,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)

from engine.store import schema

leases = Table(
    "leases", schema.metadata,
    Column("name", String(200), primary_key=True),
    Column("holder", String(80), nullable=False, default=""),
    Column("until", Float, nullable=False, default=0.0),  # database clock (epoch seconds)
    Column("since", Float, nullable=False, default=0.0),  # when the current holder took it
)


# What a lease's holder has done that the next holder must know (the alerts already sent, so a
# new holder neither repeats a firing alert nor misses a resolve): a few rows per lease, written
# by the holder while it holds the lease, read by whoever takes it over.
lease_state = Table(
    "lease_state", schema.metadata,
    Column("lease", String(200), primary_key=True),
    Column("key", String(400), primary_key=True),
    Column("state", JSON, nullable=False),
)


class LeaseHeld(RuntimeError):
    """Another process holds the lease (``hold``)."""


def holder_id() -> str:
    """This process's name in lease rows: host, pid and a random part (a pid is reused)."""
    return f"{socket.gethostname()[:48]}:{os.getpid()}:{secrets.token_hex(4)}"


def db_now(conn: Connection) -> Any:
    """The clock leases are judged by: the database's on PostgreSQL, a bound local time on SQLite."""
    if conn.dialect.name == "postgresql":
        return literal_column("(extract(epoch from now())::float8)", Float)
    return bindparam("_now", time.time(), type_=Float)


def tick(conn: Connection, holder: str, names: Collection[str], seconds: float,
         known: set[str] | None = None, *, patient: Collection[str] = (), grace: float = 0.0) -> set[str]:
    """Renew the leases of ``names`` this holder has and take those that are free; return what it holds.

    One UPDATE: a row is ours afterwards if it was ours, or its holder let it run out. Two
    processes racing for a free row serialise on its row lock and the second sees the first's
    fresh ``until``. Rows are created the first time a name is asked for (``known`` remembers
    which exist, so a steady tick is one statement). Names in ``patient`` are taken only once
    they have been free for ``grace`` seconds: a process that has its share of a kind of lease
    leaves the free ones to processes that have less, and takes them only when nobody does.
    """
    names = sorted(set(names))
    if not names:
        return set()
    if known is None or not set(names) <= known:
        _create(conn, [n for n in names if known is None or n not in known])
        if known is not None:
            known.update(names)
    lt = leases
    now = db_now(conn)
    free = lt.c.until < now
    patient = sorted(set(patient) & set(names))
    if patient:
        free = lt.c.until < case((lt.c.name.in_(patient), now - grace), else_=now)
    stmt = (update(lt).where(and_(lt.c.name.in_(names), or_(lt.c.holder == holder, free)))
            .values(holder=holder, until=now + seconds,
                    since=case((lt.c.holder == holder, lt.c.since), else_=now))
            .returning(lt.c.name))
    return set(conn.execute(stmt).scalars())


def _create(conn: Connection, names: list[str]) -> None:
    if not names:
        return
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        ins: Any = pg_insert(leases)
    else:
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        ins = sqlite_insert(leases)
    conn.execute(ins.values([{"name": n, "holder": "", "until": 0.0, "since": 0.0} for n in names])
                 .on_conflict_do_nothing(index_elements=["name"]))


def release(conn: Connection, holder: str, names: Collection[str]) -> int:
    """Give leases up at once (a clean stop): another process takes them at its next tick.

    ``until`` becomes now rather than 0, so the row says since when it is free (``tick``'s
    ``patient`` names wait for that to be ``grace`` seconds ago), and the holder is cleared (else
    its next tick would renew it as its own)."""
    if not names:
        return 0
    lt = leases
    return conn.execute(update(lt).where(and_(lt.c.name.in_(sorted(names)), lt.c.holder == holder))
                        .values(until=db_now(conn), holder="")).rowcount or 0


ENGINE_PREFIX = "engine:"  # every engine process holds one lease named after itself while it runs


def live_engines(conn: Connection) -> int:
    """How many engine processes are running on this store now (their presence leases are live)."""
    lt = leases
    return int(conn.execute(select(func.count()).select_from(lt).where(
        and_(lt.c.name.like(ENGINE_PREFIX + "%"), lt.c.until >= db_now(conn)))).scalar() or 0)


def forget_engines(conn: Connection, older_than: float) -> int:
    """Delete presence leases that ran out ``older_than`` seconds ago (engines killed long ago)."""
    lt = leases
    return conn.execute(delete(lt).where(and_(lt.c.name.like(ENGINE_PREFIX + "%"),
                                              lt.c.until < db_now(conn) - older_than))).rowcount or 0


def holders(conn: Connection) -> dict[str, tuple[str, float]]:
    """name -> (holder, seconds left) for leases currently held (for tests and operators)."""
    lt = leases
    now = db_now(conn)
    rows = conn.execute(select(lt.c.name, lt.c.holder, (lt.c.until - now).label("left"))
                        .where(lt.c.until >= now)).all()
    return {r.name: (r.holder, float(r.left)) for r in rows}


@contextlib.contextmanager
def hold(store: Any, name: str, *, seconds: float = 60.0, holder: str | None = None) -> Iterator[str]:
    """Hold one lease for a blocking job (`store gc`), renewed by a thread; LeaseHeld if taken.

    The job should call nothing that must stay exclusive after the block ends: the lease is
    released on exit. Renewed every third of ``seconds``; if renewal fails the job goes on
    (its steps are idempotent), which is why only such jobs use this.
    """
    me = holder or holder_id()
    with store.engine.begin() as conn:
        if name not in tick(conn, me, [name], seconds):
            current = holders(conn).get(name)
            raise LeaseHeld(f"{name} is held by {current[0] if current else 'another process'}")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(seconds / 3):
            with contextlib.suppress(Exception), store.engine.begin() as c:
                tick(c, me, [name], seconds)

    t = threading.Thread(target=renew, name=f"lease-{name}", daemon=True)
    t.start()
    try:
        yield me
    finally:
        stop.set()
        t.join(5)
        with contextlib.suppress(Exception), store.engine.begin() as conn:
            release(conn, me, [name])


def load_state(conn: Connection, lease: str) -> dict[str, Any]:
    """key -> state the holders of ``lease`` left (``save_state``)."""
    ls = lease_state
    return {r.key: r.state for r in conn.execute(select(ls.c.key, ls.c.state).where(ls.c.lease == lease))}


def save_state(conn: Connection, lease: str, states: dict[str, Any]) -> None:
    """Replace what ``lease``'s holder leaves for the next one (call only while holding it)."""
    ls = lease_state
    conn.execute(delete(ls).where(ls.c.lease == lease))
    if states:
        conn.execute(insert(ls), [{"lease": lease, "key": k, "state": v} for k, v in sorted(states.items())])


def xact_lock(conn: Connection, namespace: str, keys: Collection[str]) -> None:
    """Serialise this transaction with any other taking the same keys, until it ends (PostgreSQL).

    For decisions of the form "nothing matches yet, so create": two engines' transactions
    would each see only committed rows and both create. Holding ``pg_advisory_xact_lock`` of
    the key while deciding makes the second wait for the first's commit; its next statement
    then sees what the first wrote. Keys are taken in sorted order so two transactions with
    overlapping keys cannot deadlock on each other. SQLite: one writer at a time already.
    """
    if not keys or conn.dialect.name != "postgresql":
        return
    ids = sorted({_lock_id(namespace, k) for k in keys})
    conn.execute(text("SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT unnest(CAST(:ids AS bigint[])) AS k "
                      "ORDER BY 1) AS s"), {"ids": ids})


def _lock_id(namespace: str, key: str) -> int:
    """A signed 64-bit advisory lock id for (namespace, key); a collision only serialises two keys."""
    h = hashlib.blake2b(f"{namespace}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big", signed=True)


__all__ = ["ENGINE_PREFIX", "LeaseHeld", "db_now", "forget_engines", "hold", "holder_id", "holders", "lease_state",
           "leases", "live_engines", "load_state", "release", "save_state", "tick", "xact_lock"]
