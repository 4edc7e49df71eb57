"""Ports on 127.0.0.1 for tests and benchmarks: pick a free one, wait until one listens.

One copy for tests/ (conftest, dicom_peers) and bench/ (run as scripts from a checkout,
they import it as ``tests.ports``). It imports nothing but the standard library, so a
benchmark needs no test dependency (pytest) to use it.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from pathlib import Path

_PICK = random.SystemRandom()  # not the seeded module generator: parallel runs must not agree


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A port nothing listens on at this instant, for a peer that binds it soon after.

    Taken below the kernel's ephemeral range: a port from bind(0) sits in that range, where
    any outgoing connection on the machine (other tests, other helpers' runs) may be given
    it as its local port before our peer binds it, and the peer then fails with "address in
    use". Below the range only another explicit choice can collide, and the bind test here
    catches one that is already taken.
    """
    low = _ephemeral_low()
    if low > 12000:
        for _ in range(100):
            port = _PICK.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
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
