"""DICOM network operations medrelay starts itself as an SCU (pynetdicom), with no I/O of its own.

``qr_scu`` asks a remote archive (C-FIND) and retrieves from it (C-MOVE to a named AE, C-GET on
the same association). It lives in the engine, below the components and the command line, because
both use it: the ``dicom_prefetch`` destination (routes/) and ``medrelay dicom find|move`` (engine/cli).
It imports nothing of the engine but ``security.tls`` (TLS contexts), so it sits at the foundation.
"""

from engine.dimse import pace as _pace
from engine.dimse import reactor as _reactor

_reactor.install()  # pynetdicom's reactor race (see reactor.py), for every association medrelay makes or serves
_pace.install()  # and its idle associations' 1 ms polling slowed down (see pace.py)
