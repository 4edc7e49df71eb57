"""pynetdicom's reactor race (engine/dimse/reactor.py), made to happen every time.

The reactor thread of a pynetdicom association is held right after it passes its checkpoint (the
instant in which a ``send_*()`` call reads its stale "paused" flag and goes on) until the caller's
response has arrived.
Without the fix the reactor then takes the C-ECHO response off the queue and the caller times out
(pynetdicom issue 875: "Received unexpected C-ECHO service message"); with it the caller gets it.
The peer is the engine's DICOM listener; nothing of the protocol is replaced, only the threads'
timing is arranged.
"""

from __future__ import annotations

import queue
import threading
import time

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from engine.dimse import reactor
from tests.dicom_peers import TEST_FILES, data_file, dicom_yaml


class _Interleaving(threading.Event):
    """The reactor's checkpoint, arranging pynetdicom's race: once armed, the reactor thread that
    passes it is held until the caller's response is on the queue; the caller's own take of the
    response waits until the reactor has gone round once more."""

    def __init__(self, msg_queue: queue.Queue) -> None:
        super().__init__()
        self.set()
        self.msg_queue = msg_queue
        self.armed = threading.Event()
        self.passed = threading.Event()
        self.looped = threading.Event()
        take = msg_queue.get

        def caller_take(block: bool = True, timeout: float | None = None) -> object:
            if block and threading.current_thread() is threading.main_thread():
                self.looped.wait(5)
            return take(block, timeout)

        msg_queue.get = caller_take  # type: ignore[method-assign]

    def wait(self, timeout: float | None = None) -> bool:
        if self.passed.is_set():
            self.looped.set()
        ok = super().wait(timeout)
        if self.armed.is_set() and threading.current_thread() is not threading.main_thread():
            self.armed.clear()
            self.passed.set()
            deadline = time.monotonic() + 5
            while self.msg_queue.empty() and time.monotonic() < deadline:
                time.sleep(0.005)  # the caller reads the stale "paused" and sends meanwhile
        return ok


def _echo_in_the_window(port: int) -> tuple[int | None, int | None]:
    ds = dcmread(data_file(TEST_FILES[0]))
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    ae.dimse_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    try:
        store = assoc.send_c_store(ds)
        checkpoint = _Interleaving(assoc.dimse.msg_queue)
        assoc._reactor_checkpoint = checkpoint
        checkpoint.armed.set()
        assert checkpoint.passed.wait(5), "the reactor never went round"
        echo = assoc.send_c_echo()  # the reactor is between its checkpoint and its take
        return getattr(store, "Status", None), getattr(echo, "Status", None)
    finally:
        if assoc.is_established:
            assoc.release()


def test_a_response_is_never_taken_by_the_reactor(engine_factory):
    port = engine_factory(dicom_yaml()).address("dcm")[1]
    reactor.install()
    assert _echo_in_the_window(port) == (0x0000, 0x0000)


def test_without_the_fix_the_race_happens(engine_factory, monkeypatch):
    """The stall above really opens pynetdicom's window: with the original take the C-ECHO
    response is lost (the test would prove nothing if this passed)."""
    from pynetdicom.dimse import DIMSEServiceProvider

    port = engine_factory(dicom_yaml()).address("dcm")[1]
    monkeypatch.setattr(DIMSEServiceProvider, "get_msg", reactor._original)
    assert _echo_in_the_window(port) == (0x0000, None)
