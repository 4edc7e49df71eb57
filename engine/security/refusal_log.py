"""One throttle for the log lines a peer can multiply at will: refused connections, connections
opened and closed, associations refused or ended before anything was served, timeouts.

Each of these costs a peer one connect, and an info or warning line per connection made the
log (and its disk, and the CPU that formats it) grow as fast as a peer can open sockets: 2000
MLLP connects and closes a second were 4000 lines a second. The listeners had three throttles
of their own (DICOM one line per 5 s per listener, HTTP one per client per 10 s, MLLP one per
second); this is the one they share now. The audit trail is not throttled: an ATNA row is
required for every event it records, a log line is not.

For each key (the event, its reason and the client address, as the caller chooses):

- the first line is logged at once, as it always was;
- the others within ``every`` seconds of it are counted, not logged;
- when the window is over, the next line of the key is logged with ``suppressed`` = how many
  were not; a key that does not come back has its count logged as a summary line (the last
  line kept back, with ``suppressed`` and ``summary=True``) with the next line of any key, or
  at ``flush`` (a listener's stop).

Memory is bounded: at most ``most`` keys are open at once. A flood from more client addresses
than that (IPv6 gives a peer as many as it likes) is counted per event under one key more
(its lines say ``overflow=True``), so the lines per window stay at most about twice ``most``
plus two per event name, however many addresses a flood comes from. Thread-safe: the DICOM
listener logs from its connection threads, the others from their event loop.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger()


@dataclass
class _Window:
    """One key's open window: since when, and the last line kept back (for its summary)."""

    start: float
    event: str = ""
    level: str = "info"
    fields: dict[str, Any] | None = None
    suppressed: int = 0

    def keep_back(self, event: str, level: str, fields: dict[str, Any]) -> None:
        self.event, self.level, self.fields = event, level, fields
        self.suppressed += 1


Line = tuple[str, str, dict[str, Any]]


class RefusalLog:
    """At most one line per key every ``every`` seconds, with the count of those not logged;
    at most ``most`` keys remembered (see the module docstring)."""

    def __init__(self, every: float = 10.0, most: int = 128) -> None:
        self.every = every
        self.most = most
        self._open: OrderedDict[Hashable, _Window] = OrderedDict()  # by start: the oldest first
        self._overflow: dict[str, _Window] = {}  # by event: lines of keys beyond ``most``
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Keys remembered now (bounded by ``most`` plus the overflow keys)."""
        return len(self._open) + len(self._overflow)

    def line(self, key: Hashable, event: str, level: str = "warning", **fields: Any) -> None:
        """Log ``event`` at ``level`` with ``fields`` now, or count it under ``key``."""
        now = time.monotonic()
        due: list[Line] = []
        with self._lock:
            window = self._open.get(key)
            if window is not None and now - window.start >= self.every:
                del self._open[key]
                due.append((event, level, {**fields, "suppressed": window.suppressed}))
                self._open[key] = _Window(now)
                window = None
            elif window is not None:
                window.keep_back(event, level, fields)
            elif len(self._open) >= self.most and not self._expire(now, due, room=True):
                if (spill := self._overflow.get(event)) is not None:
                    spill.keep_back(event, level, fields)
                else:  # the first line of keys beyond ``most`` is logged too
                    due.append((event, level, {**fields, "suppressed": 0, "overflow": True}))
                    self._overflow[event] = _Window(now)
            else:
                due.append((event, level, {**fields, "suppressed": 0}))
                self._open[key] = _Window(now)
            self._expire(now, due)
        _emit(due)

    def flush(self) -> None:
        """Log the count of every key still holding lines back (a listener stopping)."""
        due: list[Line] = []
        with self._lock:
            self._expire(float("inf"), due)
        _emit(due)

    def _expire(self, now: float, due: list[Line], *, room: bool = False) -> bool:
        """Close the windows that are over (their summaries into ``due``); with ``room``, only
        until one place is free. True when there is room for a new key."""
        while self._open and (len(self._open) >= self.most or not room):
            key, window = next(iter(self._open.items()))
            if now - window.start < self.every:
                break
            del self._open[key]
            _summary(window, due)
        for event, window in list(self._overflow.items()):
            if now - window.start >= self.every:
                del self._overflow[event]
                _summary(window, due, overflow=True)
        return len(self._open) < self.most


def _summary(window: _Window, due: list[Line], *, overflow: bool = False) -> None:
    if window.suppressed and window.fields is not None:
        extra = {"overflow": True} if overflow else {}
        due.append(
            (window.event, window.level, {**window.fields, "suppressed": window.suppressed, "summary": True, **extra})
        )


def _emit(due: list[Line]) -> None:
    """Outside the lock: a slow log sink must not hold up the other threads' counting."""
    for event, level, fields in due:
        getattr(log, level)(event, **fields)
