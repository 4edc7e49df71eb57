"""Real MLLP peers for tests: a raw-socket client and a threaded MLLP receiver.

Deliberately independent of listeners/mllp_framing.py (their own few lines of
framing), so a framing bug in medrelay cannot hide behind the same bug in the peer.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from datetime import datetime

SB, EB, CR = b"\x0b", b"\x1c", b"\r"


def wrap(payload: bytes) -> bytes:
    return SB + payload + EB + CR


def adt(control_id: str = "MSG00001", *, sender: str = "HIS", facility: str = "HOSP", name: str = "DOE^JOHN",
        charset: str = "", version: str = "2.5", trigger: str = "A01", msh15: str = "", msh16: str = "",
        encoding: str = "ascii", extra: str = "") -> bytes:
    """A small, valid ADT^A<trigger> message in ``encoding``."""
    msh = (f"MSH|^~\\&|{sender}|{facility}|RIS|RAD|20240102030405||ADT^{trigger}^ADT_A01|{control_id}|P|"
           f"{version}|||{msh15}|{msh16}||{charset}")
    msh = msh.rstrip("|")
    segs = [msh, f"EVN|{trigger}|20240102030405", f"PID|1||12345^^^HOSP^MR||{name}||19800101|M",
            "PV1|1|I|W^389^1"]
    if extra:
        segs.append(extra)
    return ("\r".join(segs) + "\r").encode(encoding)


def msa(ack: bytes, encoding: str = "latin-1") -> list[str]:
    """MSA fields of an ACK (index 1 = MSA-1)."""
    for seg in ack.decode(encoding).split("\r"):
        if seg.startswith("MSA|"):
            return seg.split("|")
    raise AssertionError(f"no MSA in {ack!r}")


def segment(msg: bytes, name: str, encoding: str = "latin-1") -> list[str] | None:
    for seg in msg.decode(encoding).split("\r"):
        if seg.startswith(name + "|"):
            return seg.split("|")
    return None


class RawClient:
    """A blocking MLLP client on a plain socket, with exact control over the bytes sent."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, payload: bytes) -> None:
        self.sock.sendall(wrap(payload))

    def recv_frame(self, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        while True:
            start = self.buf.find(SB)
            end = self.buf.find(EB + CR, max(start, 0))
            if start >= 0 and end > start:
                frame, self.buf = self.buf[start + 1:end], self.buf[end + 2:]
                return frame
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no MLLP frame received")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed by peer; buffered {self.buf[:200]!r}")
            self.buf += chunk

    def request(self, payload: bytes, timeout: float = 10.0) -> bytes:
        self.send(payload)
        return self.recv_frame(timeout)

    def is_closed(self, timeout: float = 5.0) -> bool:
        """True when the peer closes the connection within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(65536) == b""
        except TimeoutError:
            return False
        except ConnectionError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_ack(msg: bytes, code: str = "AA") -> bytes:
    """An ACK for ``msg`` built by hand (the receiver's own code, not medrelay's)."""
    text = msg.decode("latin-1")
    msh = text.split("\r", 1)[0].split("|")
    ctrl = msh[9] if len(msh) > 9 else ""
    now = datetime.now().strftime("%Y%m%d%H%M%S")
    return (f"MSH|^~\\&|RIS|RAD|{msh[2]}|{msh[3]}|{now}||ACK^A01^ACK|R{ctrl}|P|2.5\r"
            f"MSA|{code}|{ctrl}\r").encode("latin-1")


Responder = Callable[[bytes, int], bytes | None]  # (message, index) -> ACK bytes, or None: no answer


class MLLPReceiver:
    """A downstream MLLP system in a thread: records every frame, answers via ``responder``.

    ``responder(msg, n)`` gets each message and its 0-based arrival index; default AA.
    Returning None sends nothing (a receiver that hangs); raising closes the connection.
    ``close_after`` closes each connection after that many answers (a peer with a short
    idle timeout, or one that restarts).
    """

    def __init__(self, responder: Responder | None = None, host: str = "127.0.0.1", port: int = 0,
                 close_after: int | None = None) -> None:
        self.responder: Responder = responder or (lambda m, n: make_ack(m))
        self.close_after = close_after
        self.received: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                with outer._lock:
                    outer.connections += 1
                sock: socket.socket = self.request
                sock.settimeout(30)
                buf = b""
                answered = 0
                while True:
                    if outer.close_after is not None and answered >= outer.close_after:
                        sock.close()
                        return
                    try:
                        chunk = sock.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    buf += chunk
                    while True:
                        s = buf.find(SB)
                        e = buf.find(EB + CR, max(s, 0))
                        if s < 0 or e < 0:
                            break
                        msg, buf = buf[s + 1:e], buf[e + 2:]
                        with outer._lock:
                            n = len(outer.received)
                            outer.received.append(msg)
                        try:
                            answer = outer.responder(msg, n)
                        except Exception:
                            sock.close()
                            return
                        if answer is not None:
                            try:
                                sock.sendall(wrap(answer))
                            except OSError:
                                return
                            answered += 1

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server((host, port), Handler)
        self.host, self.port = self.server.server_address[:2]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def start(self) -> MLLPReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, n: int, timeout: float = 30.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.02)
        raise AssertionError(f"receiver got {len(self.received)} messages, expected {n}")

    def __enter__(self) -> MLLPReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
