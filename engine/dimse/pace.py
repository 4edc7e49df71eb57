"""pynetdicom's association threads poll every millisecond, idle or not: slowed down while idle.

Each association pynetdicom runs has two threads that loop with ``time.sleep(0.001)``: the
DUL reactor (checks the socket, then its queues) and the association reactor (checks for a
decoded DIMSE message). An association that is open but silent, a Query/Retrieve SCU between
queries or a peer holding its place, costs two thousand wake-ups a second with Python work in
each: sixteen such associations kept one of two cores busy (docs/notes/probe-session-5.md,
finding 3). That is a busy loop a peer starts by saying nothing.

``install()`` swaps the ``time`` module those two pynetdicom modules see for one whose
``sleep`` keeps the 1 ms step while an association has traffic, and once it has been quiet
for ``IDLE_AFTER`` seconds waits up to ``IDLE_POLL`` seconds instead, on something that ends
the wait as soon as there is work:
- the DUL thread on its socket (``select``): a PDU from the peer wakes it at once;
- the association thread on an event the DUL thread sets whenever it received or sent a PDU.
What waits up to ``IDLE_POLL`` is only a primitive another thread hands an idle association
(an N-EVENT-REPORT of storage commitment sent later) and the ARTIM and idle timers' checks,
which keep their meaning at that resolution. Every other ``sleep`` (another thread, another
length) is the real one.

Written here rather than taken from a library: pynetdicom has no event-driven reactor or
setting for this (``_run_loop_delay`` covers only the DUL thread and only its length).
"""

from __future__ import annotations

import select
import threading
import time
import types
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

IDLE_AFTER = 0.2  # seconds without a PDU either way before an association counts as idle
IDLE_POLL = 0.05  # seconds an idle association's threads wait between their checks
# Only the reactors' 1 ms loop step is paced; the 0.1 ms waits of a send_*() for the reactor to
# pause, and every longer sleep, are left as they are.
_STEP = (0.0005, 0.0011)

_real_sleep = time.sleep


class _Pace:
    """One association's last traffic and the event that wakes its reactor."""

    __slots__ = ("last", "wake")

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.wake = threading.Event()

    def active(self) -> None:
        self.last = time.monotonic()
        self.wake.set()


_lock = threading.Lock()


def pace_of(assoc: Any) -> _Pace:
    pace = getattr(assoc, "_medrelay_pace", None)
    if pace is None:
        with _lock:
            pace = getattr(assoc, "_medrelay_pace", None)
            if pace is None:
                pace = _Pace()
                assoc._medrelay_pace = pace
    return pace


def _socket_of(dul: DULServiceProvider) -> Any:
    wrapper = getattr(dul, "socket", None)
    return getattr(wrapper, "socket", None) if wrapper is not None else None


def _idle_wait_dul(dul: DULServiceProvider) -> None:
    sock = _socket_of(dul)
    if sock is None or getattr(sock, "_closed", False):
        _real_sleep(IDLE_POLL)
        return
    pending = getattr(sock, "pending", None)  # TLS: bytes decrypted already are not seen by select
    if pending is not None and pending():
        return
    try:
        select.select([sock], [], [], IDLE_POLL)
    except (OSError, ValueError):  # closed under us: pynetdicom's own check reports it next
        _real_sleep(0.001)


def _sleep(seconds: float) -> None:
    if not _STEP[0] < seconds <= _STEP[1]:
        _real_sleep(seconds)
        return
    thread = threading.current_thread()
    if isinstance(thread, DULServiceProvider):
        assoc = thread.assoc
        if time.monotonic() - pace_of(assoc).last > IDLE_AFTER:
            _idle_wait_dul(thread)
            return
    elif isinstance(thread, Association):
        pace = pace_of(thread)
        if time.monotonic() - pace.last > IDLE_AFTER:
            pace.wake.wait(IDLE_POLL)
            pace.wake.clear()
            return
    _real_sleep(seconds)


_original_transport_event = DULServiceProvider._is_transport_event
_original_recv_primitive = DULServiceProvider._process_recv_primitive


def _is_transport_event(self: DULServiceProvider) -> bool:
    got = _original_transport_event(self)
    if got:
        pace_of(self.assoc).active()
    return got


def _process_recv_primitive(self: DULServiceProvider) -> bool:
    sent = _original_recv_primitive(self)
    if sent:
        pace_of(self.assoc).active()
    return sent


def _time_with(sleep: Any) -> types.ModuleType:
    shim = types.ModuleType("time")
    shim.__dict__.update({k: v for k, v in vars(time).items() if not k.startswith("__")})
    shim.sleep = sleep  # type: ignore[attr-defined]
    return shim


def install() -> None:
    """Idempotent; called where medrelay imports pynetdicom's associations (engine/dimse)."""
    if getattr(_dul.time, "sleep", None) is _sleep:
        return
    shim = _time_with(_sleep)
    _dul.time = shim  # type: ignore[attr-defined]
    _association.time = shim  # type: ignore[attr-defined]
    DULServiceProvider._is_transport_event = _is_transport_event  # type: ignore[method-assign]
    DULServiceProvider._process_recv_primitive = _process_recv_primitive  # type: ignore[method-assign]
