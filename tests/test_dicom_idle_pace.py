"""Idle associations served by pynetdicom cost (almost) no CPU, and still answer at once.

pynetdicom's two threads per association poll every millisecond; sixteen silent Query/Retrieve
associations kept one of two cores busy (engine/dimse/pace.py). Real peers: pynetdicom SCUs
holding Study Root C-FIND associations open and silent, then querying on them.
"""

from __future__ import annotations

import time

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, Verification

from tests.dicom_peers import dicom_yaml, free_port
from tests.test_dicom_hostile import cpu_seconds

IDLE = 12  # below max_associations (16), so the C-ECHO below gets a place


def _find(assoc) -> list[int]:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    q.PatientID = "NOBODY-IDLE"
    return [status.Status for status, _ in assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind)]


def test_silent_query_associations_cost_little_cpu_and_answer_promptly(medrelay_proc):
    port = free_port()
    p = medrelay_proc(dicom_yaml(port, extra="      idle_timeout: 60\n"))
    p.start()
    p.wait_port(port)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(Verification)
    assocs = []
    try:
        for _ in range(IDLE):
            a = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
            assert a.is_established
            assocs.append(a)
        assert _find(assocs[0]) == [0x0000]  # each works before it goes quiet
        time.sleep(1.0)  # past the engine's idle threshold
        pid = p.proc.pid
        before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(3.0)
        used = (cpu_seconds(pid) - before) / (time.monotonic() - started)
        # pynetdicom's 1 ms polling: ~6 % of a core per silent association (75 % for these 12)
        assert used < 0.15, f"engine used {used:.0%} of a core with {IDLE} silent associations"
        for a in assocs:  # after the silence, every one answers a query, and at once
            t0 = time.monotonic()
            assert _find(a) == [0x0000]
            assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert assocs[-1].send_c_echo().Status == 0x0000
        assert time.monotonic() - t0 < 0.5
    finally:
        for a in assocs:
            a.release()
    assert all(a.is_released for a in assocs)
