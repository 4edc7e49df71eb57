"""Shared setup of the large-instance memory tests: the instance is stored by one `medrelay run`
process, which then stops, so the VmHWM a test measures in the next process on the same data is
that of its retrievals alone (not of the C-STORE that brought the data in)."""

from __future__ import annotations

from pathlib import Path

from dicom_peers import storescu


def store_with_a_first_process(proc, port: int, src: Path) -> None:
    """Start ``proc`` (a conftest MedrelayProc), send ``src`` with DCMTK storescu to ``port``, check
    the C-STORE succeeded, then stop the process cleanly (exit status 0)."""
    proc.start()
    try:
        proc.wait_port(port, 60)
        r = storescu(port, [src])
        assert "Success" in r.stdout, r.stdout[-2000:]
    finally:
        assert proc.terminate(60) == 0
