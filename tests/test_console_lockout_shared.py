"""The console's failed-login limit is counted in the store (issue 10 leftover): every engine on one
database shares the counts, and a restart keeps them (real HTTP logins through the form, httpx).

Before, each process counted in its own memory: failures spread over two engines behind one
balancer gave an attacker twice the tries of one name (and of one address), and a restart gave
them all back. Two engines here are two Runtimes in this process, each with its own Store and
console, on one PostgreSQL database, blob folder and key file, as two hosts would have them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from console_support import PASSWORD, login
from sqlalchemy import delete, func, inspect, select
from test_scaleout import _yaml, pg  # noqa: F401  (pg: the fixture, a fresh PostgreSQL database)

from engine.auth.tables import console_login_failures
from engine.auth.users import add_user
from engine.console.auth import LoginLimiter
from engine.console.config import LoginLimits
from engine.store import schema

PER_USER, PER_ADDRESS = 5, 10


def _config(store_url: str, shared: Path) -> str:
    console = ("console: {host: 127.0.0.1, port: 0, "
               f"login: {{per_user: {PER_USER}, per_address: {PER_ADDRESS}, window: 900}}}}\n")
    return console + _yaml(store_url, shared, f"""
        adt-in:
          source: {{type: mllp, port: 0}}
          routes:
            - {{name: out, to: {{type: file, path: "{shared}/out"}}}}
        """)


def _base(eng) -> str:
    host, port = eng.runtime.console.address
    return f"http://{host}:{port}"


def _try(eng, user: str, password: str = PASSWORD):
    client, r = login(_base(eng), user, password)
    client.close()
    return r


def _wrong(eng, user: str) -> int:
    r = _try(eng, user, "wrong password!!")
    assert r.status_code in (303, 429), r.text[:200]
    return r.status_code


def _refused(r) -> bool:
    return (r.status_code == 429 and int(r.headers["retry-after"]) > 0
            and "medrelay_session" not in r.headers.get("set-cookie", ""))


def _got_in(r) -> bool:
    return r.status_code == 303 and r.headers["location"] == "/" and "medrelay_session" in r.headers["set-cookie"]


def test_failures_spread_over_two_engines_lock_the_user_on_both_and_a_restart_keeps_it(engine_factory, pg):  # noqa: F811
    url, shared = pg
    cfg = _config(url, shared)
    a, b = engine_factory(cfg), engine_factory(cfg)
    for name, role in (("operator", "operator"), ("viewer", "viewer")):
        add_user(a.store, name, role, PASSWORD)
    # 5 failures of one name, alternating engines: 3 at A and 2 at B (each under its own limit before)
    assert [_wrong((a, b)[i % 2], "operator") for i in range(PER_USER)] == [303] * PER_USER
    for eng in (a, b):
        assert _refused(_try(eng, "operator")), "the right password is refused while the name is locked"
    assert _got_in(_try(b, "viewer"))  # per user name: another user from the same address still gets in
    # a restart (every engine stopped, a new one on the same database) forgets nothing
    a.stop()
    b.stop()
    c = engine_factory(cfg)
    assert _refused(_try(c, "operator"))
    assert _got_in(_try(c, "viewer"))


def test_address_failures_spread_over_two_engines_lock_the_address_on_both(engine_factory, pg):  # noqa: F811
    url, shared = pg
    cfg = _config(url, shared)
    a, b = engine_factory(cfg), engine_factory(cfg)
    add_user(a.store, "viewer", "viewer", PASSWORD)
    # one made-up name per try (never the per-user limit), spread over both engines
    assert [_wrong((a, b)[i % 2], f"guess-{i}") for i in range(PER_ADDRESS)] == [303] * PER_ADDRESS
    for eng in (a, b):
        assert _refused(_try(eng, "viewer")), "the address is locked at every engine"
    assert _wrong(a, "guess-x") == 429


def test_one_engine_on_sqlite_keeps_its_lockout_over_a_restart_and_no_name_in_clear(engine_factory, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    cfg = _config(f"sqlite:///{shared}/m.db", shared)
    a = engine_factory(cfg)
    add_user(a.store, "operator", "operator", PASSWORD)
    add_user(a.store, "viewer", "viewer", PASSWORD)
    assert [_wrong(a, "Operator") for _ in range(PER_USER)] == [303] * PER_USER
    assert _refused(_try(a, "operator"))  # one name in any case (the directory's matching)
    with a.store.engine.connect() as conn:
        rows = conn.execute(select(console_login_failures)).mappings().all()
    # 5 failures and the refused attempt (a failure of the address only)
    assert len(rows) == PER_USER + 1 and sum(r["user_key"] is None for r in rows) == 1
    for r in rows:
        for v in (r["user_key"], r["addr_key"]):
            assert v is None or re.fullmatch(r"[0-9a-f]{32}", v), v  # keyed HMACs, not the name or address
    a.stop()
    b = engine_factory(cfg)
    assert _refused(_try(b, "operator"))
    assert _got_in(_try(b, "viewer"))
    # a success clears its own name's count only: the address's failures stand
    lim = b.runtime.console.limiter
    lim.succeeded("operator")
    assert lim.retry_after("operator", "10.9.9.9") is None
    with b.store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(console_login_failures)
                            .where(console_login_failures.c.user_key.is_(None))).scalar_one() == PER_USER + 2


def test_rows_go_once_their_window_has_passed_and_beyond_max_tracked(store):
    lim = LoginLimiter(LoginLimits(window=60, max_tracked=100), store)
    t0 = 1_000_000.0
    for i in range(150):
        lim.failed(f"user-{i}", f"10.0.{i // 100}.{i % 100}", now=t0 + i * 0.1)

    def count() -> int:
        with store.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(console_login_failures)).scalar_one()

    assert count() == 150  # the first failure pruned (nothing yet); the next ones within PRUNE_EVERY do not
    lim._prune(t0 + 15)
    assert count() == 100  # the newest max_tracked
    assert lim.retry_after("user-149", "10.0.1.49", now=t0 + 15) is None  # 1 failure each: not limited
    lim._prune(t0 + 15 + 60)  # every window has passed
    assert count() == 0


def test_the_window_slides_as_before(store):
    """Locked until the oldest of the last ``per_user`` failures leaves the window; then one more try."""
    lim = LoginLimiter(LoginLimits(per_user=3, per_address=100, window=100), store)
    t0 = 2_000_000.0
    for i in range(3):
        lim.failed("alice", f"10.1.0.{i}", now=t0 + i * 10)
    assert lim.admit("alice", "10.1.0.9", now=t0 + 99) == pytest.approx(1.0)  # counted for the address
    assert lim.admit("alice", "10.1.0.9", now=t0 + 100.5) is None
    lim.failed("alice", "10.1.0.9", now=t0 + 100.5)
    assert lim.retry_after("alice", "10.1.0.8", now=t0 + 101) == pytest.approx(9.0)  # t0+10 leaves at t0+110
    assert lim.retry_after("Alice ", "10.1.0.8", now=t0 + 111) is None
    assert lim.retry_after("bob", "10.1.0.9", now=t0 + 101) is None  # 2 failures of the address, of 100


def test_a_version_3_store_gets_the_table_in_one_additive_step(store):
    """The step of schema version 4 creates the table on a store of version 3 (the rest untouched)."""
    from engine.store.db import SCHEMA_VERSION

    assert SCHEMA_VERSION >= 4
    with store.engine.begin() as conn:
        console_login_failures.drop(conn)
        conn.execute(delete(schema.schema_version).where(schema.schema_version.c.version >= 4))
    with store.engine.connect() as conn:
        assert not inspect(conn).has_table("console_login_failures")
    assert store.migrate() == SCHEMA_VERSION
    with store.engine.connect() as conn:
        assert inspect(conn).has_table("console_login_failures")
        assert max(conn.execute(select(schema.schema_version.c.version)).scalars()) == SCHEMA_VERSION
