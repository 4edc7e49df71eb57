"""pynetdicom 3.0's association reactor can take a response meant for a ``send_*()`` call.

An association's reactor thread loops: mark itself paused, wait on ``_reactor_checkpoint``,
mark itself running, then take the next DIMSE message off the queue with
``get_msg(block=False)``. A ``send_*()`` call (C-ECHO, C-STORE, C-FIND, N-EVENT-REPORT...)
clears the checkpoint and waits until the reactor says it is paused. If the reactor has just
passed the checkpoint but not yet marked itself running, the caller reads the stale "paused"
and goes on; the reactor then takes the caller's response off the queue, logs "Received
unexpected C-ECHO service message" and drops it, and the caller waits out the DIMSE timeout
(pynetdicom issue 875). It shows under load: a C-ECHO after a C-STORE on one association, or a
storage commitment N-EVENT-REPORT sent while the reactor runs.

``install()`` makes the reactor's non-blocking take look at the checkpoint after it has marked
itself running: cleared means a ``send_*()`` is in progress and the message is the caller's, so
the reactor takes nothing and goes round to pause. Either order of the two threads is then safe:
the caller clears before it reads the flag, the reactor writes the flag before it reads the
checkpoint. Only the reactor calls ``get_msg(block=False)``; every ``send_*()`` takes its
response with ``block=True``, untouched.
"""

from __future__ import annotations

from typing import Any

from pynetdicom.dimse import DIMSEServiceProvider

_original = DIMSEServiceProvider.get_msg


def _get_msg(self: DIMSEServiceProvider, block: bool = False) -> Any:
    if not block:
        checkpoint = getattr(self.assoc, "_reactor_checkpoint", None)
        if checkpoint is not None and not checkpoint.is_set():
            return None, None
    return _original(self, block)


def install() -> None:
    """Idempotent; called where medrelay imports pynetdicom's associations."""
    DIMSEServiceProvider.get_msg = _get_msg  # type: ignore[method-assign]


install()
