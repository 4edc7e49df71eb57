"""Every destination's sends and receives are bounded (issue 9 item 3), against peers that misbehave.

The peers are real: TCP servers that accept and never read (their receive buffer kept
small, so an 8 MiB message fills the kernel buffers and the sender's write blocks), that
read and never answer, that answer after the timeout; a pynetdicom Storage SCP whose
C-STORE handler hangs; one behind a TCP proxy that stops reading; an HTTP server that never
answers or answers one byte at a time; a FIFO in place of a file. Each time the delivery
fails within its timeout, the connection is closed (never reused: a late ACK must not answer
the next message), the route retries with its backoff, and once the peer behaves the message
is delivered; other routes keep flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from pathlib import Path

import engine_fakes  # noqa: F401  (registers the test_null source)
import pytest
from mllp_peers import MLLPReceiver, adt, make_ack
from sqlalchemy import select as sql_select
from tcp_proxy import TcpProxy

from engine.components import DeliveryError
from engine.envelope import Envelope
from engine.store import schema
from routes.file import FileDestination, FileDestinationConfig
from routes.mllp import MLLPDestinationConfig, MLLPSender

SB, EB, CR = b"\x0b", b"\x1c", b"\r"
BIG = 8 * 1024 * 1024  # larger than every socket buffer in the path once the receiver's is capped
SMALL_RCVBUF = 64 * 1024


def big_adt(control_id: str) -> bytes:
    """An ADT with an 8 MiB OBX: what a receiver that never reads cannot buffer."""
    return adt(control_id, extra="OBX|1|ED|PDF^Report||^AP^PDF^Base64^" + "A" * BIG)


def control_id(msg: bytes) -> str:
    return msg.split(b"\r", 1)[0].split(b"|")[9].decode()


class _Conn:
    def __init__(self, sock: socket.socket, mode: str) -> None:
        self.sock = sock
        self.mode = mode
        self.received: list[str] = []
        self.closed_by_peer = threading.Event()  # the engine closed or reset the connection
        self.late_ack_undelivered = threading.Event()


class Downstream:
    """An MLLP receiver whose behaviour is fixed per connection when it is accepted.

    ``ok``: ACK each message. ``noread``: never read a byte. ``noanswer``: read, never
    answer. ``late``: answer each message ``late`` seconds after it arrived. Its receive
    buffer is capped (no autotuning), so a sender's large write really blocks.
    """

    def __init__(self, mode: str = "ok", late: float = 0.0) -> None:
        self.mode = mode
        self.late = late
        self.conns: list[_Conn] = []
        self._stop = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_RCVBUF)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def delivered(self) -> list[str]:
        """Control ids of the messages this receiver acknowledged in time (mode ok)."""
        return [cid for c in self.conns if c.mode == "ok" for cid in c.received]

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = _Conn(sock, self.mode)
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, c: _Conn) -> None:
        try:
            if c.mode == "noread":
                self._hold(c)
            else:
                self._talk(c)
        finally:
            c.sock.close()

    def _hold(self, c: _Conn) -> None:
        poller = select.poll()
        poller.register(c.sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
        while not self._stop.is_set():
            if poller.poll(100):
                c.closed_by_peer.set()
                return

    def _talk(self, c: _Conn) -> None:
        c.sock.settimeout(0.1)
        buf = bytearray()
        scanned = 0  # the end of a frame is looked for in new bytes only: 8 MiB arrive in ~100 reads
        while not self._stop.is_set():
            try:
                chunk = c.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                c.closed_by_peer.set()
                return
            if not chunk:
                c.closed_by_peer.set()
                return
            buf += chunk
            while (e := buf.find(EB + CR, max(scanned - 1, 0))) >= 0:
                s = buf.find(SB)
                msg = bytes(buf[s + 1:e])
                del buf[:e + 2]
                scanned = 0
                c.received.append(control_id(msg))
                if c.mode == "ok":
                    c.sock.sendall(SB + make_ack(msg) + EB + CR)
                elif c.mode == "late":
                    threading.Thread(target=self._answer_late, args=(c, msg), daemon=True).start()
            scanned = len(buf)

    def _answer_late(self, c: _Conn, msg: bytes) -> None:
        time.sleep(self.late)
        try:
            c.sock.sendall(SB + make_ack(msg) + EB + CR)
        except OSError:
            c.late_ack_undelivered.set()
            return
        if c.closed_by_peer.wait(2):
            c.late_ack_undelivered.set()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()

    def __enter__(self) -> Downstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def hl7(payload: bytes) -> Envelope:
    return Envelope(channel="c", kind="hl7v2", payload=payload)


def sender(port: int, **kw) -> MLLPSender:
    return MLLPSender(MLLPDestinationConfig(type="mllp", host="127.0.0.1", port=port, **kw))


# Upper bounds on a timeout that must fire: its value plus MARGIN (a loaded, shared machine),
# still far below what a missing timeout would take (the peer's hang, or a 60 s default).
MARGIN = 5.0


def within(seconds: float, coro):
    """Run ``coro``; a hang is a test failure, not a hung suite."""
    return asyncio.run(asyncio.wait_for(coro, seconds))


# -- MLLP sender -----------------------------------------------------------------------------

def test_mllp_receiver_that_never_reads():
    """The 8 MiB write blocks; after ``timeout`` the delivery fails, the connection is reset
    (not left with half a message in it) and the next attempt uses a new one."""
    with Downstream("noread") as rx:
        async def go():
            s = sender(rx.port, timeout=3, connect_timeout=1)
            msg = hl7(big_adt("BIG1"))
            t0 = time.monotonic()
            with pytest.raises(DeliveryError, match="did not take"):
                await s.send(msg)
            took = time.monotonic() - t0
            assert not s.connected
            rx.mode = "ok"
            try:
                return took, await s.send(msg)
            finally:
                await s.close()

        took, code = within(60, go())
        assert 2.5 < took < 3 + MARGIN and code == "AA"
        assert rx.conns[0].closed_by_peer.wait(5)
        assert [c.mode for c in rx.conns] == ["noread", "ok"] and rx.delivered == ["BIG1"]


def test_mllp_late_ack_is_not_taken_for_the_next_message():
    with Downstream("late", late=1.5) as rx:
        async def go():
            s = sender(rx.port, timeout=0.5, connect_timeout=1)
            with pytest.raises(DeliveryError, match="no ACK"):
                await s.send(hl7(adt("L1")))
            rx.mode = "ok"
            try:
                return await s.send(hl7(adt("L1"))), await s.send(hl7(adt("L2")))
            finally:
                await s.close()

        assert within(30, go()) == ("AA", "AA")
        first, second = rx.conns
        assert first.received == ["L1"] and second.received == ["L1", "L2"]
        assert first.closed_by_peer.wait(5)  # closed at the timeout: the late ACK had nowhere to go
        assert first.late_ack_undelivered.wait(5)


def test_mllp_tls_handshake_that_never_completes(tmp_path):
    """A receiver that accepts TCP and never answers the ClientHello: bounded by connect_timeout."""
    from tls_certs import make_pki

    from engine.security.tls import TLSConfig

    pki = make_pki(tmp_path)
    with Downstream("noanswer") as rx:
        async def go():
            s = sender(rx.port, timeout=1, connect_timeout=1, tls=TLSConfig(ca=str(pki.ca)))
            t0 = time.monotonic()
            with pytest.raises(DeliveryError, match="timed out"):
                await s.send(hl7(adt("T1")))
            await s.close()
            return time.monotonic() - t0

        assert within(30, go()) < 1 + MARGIN  # connect_timeout 1
        assert rx.conns[0].closed_by_peer.wait(5)


# -- the route: retries, backoff, other routes flowing --------------------------------------

def _yaml(routes: str) -> str:
    return f"""
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  in:
    source: {{type: test_null}}
    routes:{routes}
"""


def submit(eng, env: Envelope) -> None:
    outcome = eng.call(eng.runtime.intake.submit(env, response=b"ok"))
    assert outcome.status == "accepted"


def deliveries(eng, route: str) -> list[tuple[str, int, str | None]]:
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return [tuple(r) for r in c.execute(sql_select(d.c.state, d.c.attempts, d.c.last_error)
                                            .where(d.c.route == route).order_by(d.c.id))]


@pytest.mark.parametrize("mode", ["noread", "noanswer"])
def test_route_retries_a_silent_mllp_peer_while_others_flow(engine_factory, mode):
    with Downstream(mode) as slow, MLLPReceiver() as fast:
        eng = engine_factory(_yaml(f"""
      - name: slow
        to: {{type: mllp, host: 127.0.0.1, port: {slow.port}, timeout: 3, connect_timeout: 1}}
        retry: {{max_attempts: 100, initial_delay: 0.3, max_delay: 1}}
      - name: fast
        to: {{type: mllp, host: 127.0.0.1, port: {fast.port}, timeout: 10}}"""))
        ids = ["R0", *(f"R{i}" for i in range(1, 6))]
        submit(eng, Envelope(channel="in", kind="hl7v2", payload=big_adt("R0")))
        for cid in ids[1:]:
            submit(eng, Envelope(channel="in", kind="hl7v2", payload=adt(cid)))
        fast.wait_for(6, timeout=30)  # the other route is not held up
        eng.wait_for(lambda: any(a >= 2 for _s, a, _e in deliveries(eng, "slow")), timeout=40)
        state, attempts, error = deliveries(eng, "slow")[0]
        assert state == "pending" and error and ("did not take" in error or "no ACK" in error)
        assert slow.delivered == []
        assert slow.conns[0].closed_by_peer.wait(5)  # every timed-out connection is closed
        slow.mode = "ok"
        eng.wait_for(lambda: [s for s, _a, _e in deliveries(eng, "slow")] == ["done"] * 6, timeout=30)
        assert slow.delivered == ids  # in order, each once on the connection that acknowledged it


# -- FHIR ------------------------------------------------------------------------------------

class HttpPeer:
    """An HTTP/1.1 server on a raw socket: ``hang`` (read the request, answer nothing),
    ``drip`` (answer one byte every 0.2 s), or ``ok`` (201)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.conns: list[dict] = []
        self._stop = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            info = {"mode": self.mode, "requests": 0, "closed": threading.Event()}
            self.conns.append(info)
            threading.Thread(target=self._serve, args=(sock, info), daemon=True).start()

    def _serve(self, sock: socket.socket, info: dict) -> None:
        sock.settimeout(0.1)
        buf = b""
        body = b'{"resourceType":"Patient","id":"p1"}'
        answer = (b"HTTP/1.1 201 Created\r\nContent-Type: application/fhir+json\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            while not self._stop.is_set():
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    info["closed"].set()
                    return
                buf += chunk
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if not sep:
                    continue
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                if len(rest) < length:
                    continue
                buf = rest[length:]
                info["requests"] += 1
                if info["mode"] == "ok":
                    sock.sendall(answer)
                elif info["mode"] == "drip":
                    for b in answer:
                        sock.sendall(bytes([b]))
                        time.sleep(0.2)
        except OSError:
            info["closed"].set()
        finally:
            sock.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.mark.parametrize("mode", ["hang", "drip"])
def test_fhir_server_that_does_not_answer(mode):
    """``timeout`` bounds the whole request, also against a server that sends a byte at a time
    (each read is quick, so httpx's own read timeout never fires)."""
    from routes.fhir import FhirDestination, FhirDestinationConfig

    peer = HttpPeer(mode)
    try:
        async def go():
            dest = FhirDestination(FhirDestinationConfig(type="fhir", base_url=f"http://127.0.0.1:{peer.port}",
                                                         timeout=1), _Ctx())
            env = Envelope(channel="c", kind="fhir", payload=b'{"resourceType":"Patient","id":"p1"}')
            t0 = time.monotonic()
            with pytest.raises(DeliveryError, match="within 1s") as e:
                await dest.send(env)
            took = time.monotonic() - t0
            peer.mode = "ok"
            try:
                return took, e.value.permanent, await dest.send(env)
            finally:
                await dest.close()

        took, permanent, answer = within(30, go())
        assert took < 1 + MARGIN and not permanent and answer == "HTTP 201"
        assert peer.conns[0]["closed"].wait(5)  # the half-used connection was closed, not pooled
        assert [c["mode"] for c in peer.conns] == [mode, "ok"]
    finally:
        peer.close()


class _Ctx:
    """What a destination is given, without a store: recording outputs is best effort and is skipped."""

    channel = "c"
    route = "r"
    store = None


# -- file ------------------------------------------------------------------------------------

def test_file_write_that_blocks(tmp_path):
    """A FIFO where the temporary file goes: open() blocks like a hung mount. The delivery fails
    after ``timeout``; the next attempt waits for the stuck write instead of starting a second one."""
    out = tmp_path / "out"
    out.mkdir()
    dest = FileDestination(FileDestinationConfig(type="file", path=str(out), timeout=0.5))
    env = hl7(adt("F1"))
    fifo = out / f".{env.id}.hl7.tmp"
    os.mkfifo(fifo)

    async def go():
        t0 = time.monotonic()
        with pytest.raises(DeliveryError, match="did not finish within 0.5s"):
            await dest.send(env)
        first = time.monotonic() - t0
        with pytest.raises(DeliveryError, match="has not returned yet"):
            await dest.send(env)
        assert dest.calls.busy and threading.active_count() < 50
        # Unblock the stuck write: read the FIFO to its end; the write then fails on fsync.
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        deadline = time.monotonic() + 10
        while dest.calls.busy and time.monotonic() < deadline:
            try:
                os.read(fd, 1 << 20)
            except BlockingIOError:
                pass
            await asyncio.sleep(0.01)
        os.close(fd)
        fifo.unlink(missing_ok=True)
        return first, await dest.send(env)

    first, name = within(30, go())
    assert first < 0.5 + MARGIN and name == f"{env.id}.hl7"
    assert (out / name).read_bytes() == env.payload


# -- the pipeline's deadline: the backstop for any destination -------------------------------

class _Stubborn:
    """A destination that ignores every timeout of its own: only the pipeline can stop it."""

    deadline = 0.5

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0
        self.sent: list[bytes] = []

    async def send(self, envelope):
        self.calls += 1
        if self.calls <= 2:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        self.sent.append(envelope.payload)
        return "ok"

    async def close(self) -> None:
        return None


def test_pipeline_deadline_bounds_any_destination(engine_factory):
    eng = engine_factory(_yaml("""
      - name: stubborn
        to: {type: file, path: unused}
        retry: {max_attempts: 10, initial_delay: 0.1, max_delay: 0.2}"""))
    stub = _Stubborn()
    eng.runtime.routes[("in", "stubborn")].destination = stub
    t0 = time.monotonic()
    submit(eng, Envelope(channel="in", kind="hl7v2", payload=adt("S1")))
    eng.wait_for(lambda: deliveries(eng, "stubborn")[0][0] == "done", timeout=30)
    assert stub.cancelled == 2 and stub.sent == [adt("S1")]
    state, attempts, error = deliveries(eng, "stubborn")[0]
    assert attempts == 2 and error is None  # delivered: the errors before are history, in its tries
    from engine.store import attempts as tries

    d = schema.deliveries
    with eng.store.engine.connect() as c:
        did = c.execute(sql_select(d.c.id).where(d.c.route == "stubborn")).scalar_one()
        history = tries.of_deliveries(c, [did])[did]
    assert sum("deadline" in (t.get("error") or "") for t in history) == 2, history
    assert time.monotonic() - t0 < 10


# -- DICOM -----------------------------------------------------------------------------------

def _dicom_yaml(port: int, extra: str = "", out: Path | None = None) -> str:
    other = f"""
      - name: archive
        to: {{type: file, path: {out}}}""" if out else ""
    return _yaml(f"""
      - name: pacs
        to: {{type: dicom, host: 127.0.0.1, port: {port}, called_ae_title: PACS, connect_timeout: 2,
              acse_timeout: 3, dimse_timeout: 2, network_timeout: 2{extra}}}
        retry: {{max_attempts: 100, initial_delay: 0.3, max_delay: 1}}{other}""")


def _instance(pixels: int = 0) -> tuple[bytes, str]:
    """CT_small as Part-10 bytes, with ``pixels`` bytes of pixel data when given (explicit VR LE)."""
    import io

    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from tests.dicom_peers import data_file

    ds = dcmread(data_file("CT_small.dcm"))
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if pixels:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1024, pixels // 2048, 16, 16, 15
        ds.PixelData = b"\x01\x02" * (pixels // 2)
        ds["PixelData"].VR = "OW"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), str(ds.SOPInstanceUID)


class StoreSCP:
    """pynetdicom Storage SCP; while ``hang`` is set its C-STORE handler does not answer."""

    def __init__(self) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.hang = threading.Event()
        self.stored: list[str] = []
        self.associations = 0
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30

        def on_store(event):
            deadline = time.monotonic() + 20
            while self.hang.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.hang.is_set():
                return 0xA700
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000

        def on_assoc(event):
            self.associations += 1

        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, on_assoc)])
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.hang.clear()
        self.server.shutdown()


def test_dicom_scp_that_never_answers_c_store(engine_factory, tmp_path):
    scp = StoreSCP()
    scp.hang.set()
    try:
        eng = engine_factory(_dicom_yaml(scp.port, out=tmp_path / "archive"))
        data, uid = _instance()
        t0 = time.monotonic()
        submit(eng, Envelope(channel="in", kind="dicom", payload=data))
        eng.wait_for(lambda: deliveries(eng, "archive")[0][0] == "done", timeout=20)  # others flow
        eng.wait_for(lambda: deliveries(eng, "pacs")[0][1] >= 1, timeout=30)
        failed_after = time.monotonic() - t0
        state, _attempts, error = deliveries(eng, "pacs")[0]
        assert state == "pending" and "no C-STORE response within 2s" in error
        assert failed_after < 15
        scp.hang.clear()
        eng.wait_for(lambda: deliveries(eng, "pacs")[0][0] == "done", timeout=30)
        assert uid in scp.stored
        assert scp.associations >= 2  # the association that timed out was not reused
    finally:
        scp.close()


def test_dicom_scp_that_stops_reading(engine_factory):
    """Behind a proxy that stops reading mid-association: the 8 MiB C-STORE write blocks.
    pynetdicom alone would block its DUL thread for ever (and abort() with it); the socket
    write timeout turns that into a failed attempt, and the route retries once the peer reads."""
    scp = StoreSCP()
    proxy = TcpProxy("127.0.0.1", scp.port, rcvbuf=SMALL_RCVBUF)
    try:
        eng = engine_factory(_dicom_yaml(proxy.port))
        small, small_uid = _instance()
        submit(eng, Envelope(channel="in", kind="dicom", payload=small))
        eng.wait_for(lambda: small_uid in scp.stored, timeout=30)  # the association works through the proxy
        proxy.stall()
        data, uid = _instance(pixels=BIG)
        t0 = time.monotonic()
        submit(eng, Envelope(channel="in", kind="dicom", payload=data))
        eng.wait_for(lambda: deliveries(eng, "pacs")[1][1] >= 1, timeout=40)
        assert time.monotonic() - t0 < 25
        assert deliveries(eng, "pacs")[1][0] == "pending"
        proxy.resume()
        eng.wait_for(lambda: deliveries(eng, "pacs")[1][0] == "done", timeout=60)
        assert uid in scp.stored
    finally:
        proxy.close()
        scp.close()


def test_dicom_send_abandoned_by_the_engine_ends_its_thread_and_association():
    """When the worker's deadline cancels a send (dimse_timeout here is far longer), the send's
    socket is shut down: the thread ends at once and the next send opens a new association."""
    from routes.dicom import DicomDestination, DicomDestinationConfig

    scp = StoreSCP()
    scp.hang.set()
    try:
        data, uid = _instance()
        cfg = DicomDestinationConfig(type="dicom", host="127.0.0.1", port=scp.port, called_ae_title="PACS",
                                     dimse_timeout=60, network_timeout=60)
        dest = DicomDestination(cfg, _Ctx())
        env = Envelope(channel="c", kind="dicom", payload=data)

        async def go():
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(dest.send(env), 2)  # what the pipeline's deadline does
            t0 = time.monotonic()
            while dest.calls.busy and time.monotonic() - t0 < 10:
                await asyncio.sleep(0.05)
            ended = time.monotonic() - t0
            scp.hang.clear()
            try:
                return ended, await dest.send(env)
            finally:
                await dest.close()

        ended, status = within(60, go())
        assert ended < MARGIN and status == "0x0000"  # dimse_timeout is 60
        assert scp.associations == 2 and uid in scp.stored
    finally:
        scp.close()
