"""Benches that run Orthanc re-run themselves inside a network namespace of their own.

Orthanc listens on every interface and has no bind option. In a new network namespace
(``unshare -n``) with only loopback up, nothing it opens is reachable from outside, and
the bench's clients reach it, and every other server of the run, over that loopback.
Shared by ``bench/dicom.py`` and ``bench/dicomweb.py`` (run as scripts, so imported as
``netns``).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys

FLAG = "MEDRELAY_BENCH_NETNS"


def inside() -> bool:
    """Whether this process is the re-run inside the namespace."""
    return os.environ.get(FLAG) == "1"


def in_namespace(script: str, hint: str = "") -> None:
    """Re-run this script (``sys.argv``) inside a new network namespace with loopback up and
    exit with its status, unless already there. Needs root and util-linux ``unshare``."""
    if inside():
        return
    if not shutil.which("unshare") or os.geteuid() != 0:
        raise SystemExit(f"{script} needs root and unshare (Orthanc binds every interface){hint}")
    cmd = " ".join(shlex.quote(a) for a in (sys.executable, *sys.argv))
    env = {**os.environ, FLAG: "1"}
    raise SystemExit(subprocess.call(["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {cmd}"], env=env))
