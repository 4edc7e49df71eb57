"""A raw-socket HTTP peer for the slowloris / idle / cap tests (FHIR, DICOMweb, console)."""

from __future__ import annotations

import socket
import ssl
import time


def until_closed(sock: socket.socket, *, dribble: bytes = b"", every: float = 0.2, limit: float = 20.0
                 ) -> tuple[bytes, float]:
    """Read until the server closes (sending ``dribble`` a byte at a time meanwhile); the bytes
    received and the seconds it took. Bounded by ``limit``."""
    start, data, pending = time.monotonic(), b"", bytearray(dribble)
    sock.settimeout(every)
    while time.monotonic() - start < limit:
        if pending:
            try:
                sock.sendall(bytes(pending[:1]))
                del pending[:1]
            except OSError:
                pending.clear()
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ssl.SSLWantReadError:
            continue
        except OSError:  # reset
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic() - start


def answered(sock: socket.socket) -> bool:
    """The server has already written to (or closed) ``sock``: a timeout (or a cap) answered it."""
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(15)
