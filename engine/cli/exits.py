"""How the command line ends when the world around it goes away: a closed pipe, an unreachable store.

Kept apart from ``main`` so the entry point's handling is one function each: ``_Main.invoke``
calls ``broken_stdout`` for every command, ``check --connect`` calls ``store_problem``.
"""

from __future__ import annotations

import os
import select
import sys
from typing import Any

# A process killed by SIGPIPE reports 128 + 13; `medrelay … | head` ends with the same status as
# `cat`, `grep` or `git log` would (what `set -o pipefail` scripts expect), and prints nothing.
EXIT_BROKEN_PIPE = 141


def broken_stdout(e: BaseException) -> bool:
    """True when ``e`` is standard output's reader having gone (``| head``), not a peer's socket.

    Python ignores SIGPIPE (the engine's sockets need that), so a closed pipe is a
    BrokenPipeError like any other; only one on stdout is the reader saying it has enough.
    """
    if not isinstance(e, BrokenPipeError):
        return False
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def quiet_exit() -> None:
    """End as a Unix tool on SIGPIPE: no message, exit 141, and no second error at interpreter exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the unflushed rest goes nowhere instead of raising again
    os.close(devnull)
    sys.exit(EXIT_BROKEN_PIPE)


def store_problem(settings: Any) -> str | None:
    """Why the store of ``settings`` cannot be reached (one line), or None: ``check --connect``.

    Opens a connection and runs ``SELECT 1`` only: no migration, no table created, no blob
    folder made; for SQLite, a database file that does not exist yet is fine when its folder
    can hold it (``run`` creates it).
    """
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(settings.store_url())
    if url.get_backend_name() == "sqlite":
        db = url.database or ""
        if db in ("", ":memory:"):
            return None
        path = settings.resolve(db) if not os.path.isabs(db) else db
        if os.path.exists(path):
            return None if os.access(path, os.R_OK | os.W_OK) else f"{path}: not readable and writable"
        folder = os.path.dirname(str(path)) or "."
        while not os.path.exists(folder):
            folder = os.path.dirname(folder) or "."
        return None if os.access(folder, os.W_OK) else f"{path} cannot be created: {folder} is not writable"
    engine = create_engine(url, connect_args={"connect_timeout": 5} if url.get_backend_name() == "postgresql"
                           else {})
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as e:
        orig = getattr(e, "orig", None) or e
        first = str(orig).strip().splitlines()[0][:300] if str(orig).strip() else ""
        return f"{type(orig).__name__}: {first}"
    finally:
        engine.dispose()
    return None
