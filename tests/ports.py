"""Ports on 127.0.0.1 for tests and benchmarks: pick a free one, wait until one listens.

One copy for tests/ (conftest, dicom_peers) and bench/ (run as scripts from a checkout,
they import it as ``tests.ports``). It imports nothing but the standard library, so a
benchmark needs no test dependency (pytest) to use it.
"""

from __future__ import annotations

import socket
import subprocess
import time


def free_port() -> int:
    """A port nothing listens on at this instant (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Return once 127.0.0.1:``port`` accepts a connection; fail early if ``proc`` has exited.

    The default deadline is generous: a peer starting on a shared, loaded machine may take
    seconds, and a short one here is a test that fails by chance.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode} before port {port} listened")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listening on 127.0.0.1:{port} after {timeout:g} s")
