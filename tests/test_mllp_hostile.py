"""The mllp source against peers that do not behave: slow or silent connections, floods of
connections, and messages built to make validation take forever. Raw sockets against a
running engine; each test also checks that a normal client is served meanwhile."""

import socket
import threading
import time

import pytest
from mllp_peers import RawClient, adt, msa, segment, wrap

from engine.hl7.mllp import FrameParser

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0, {source}}}
  other:
    source: {{type: mllp, port: 0}}
"""


def engine(engine_factory, source: str):
    return engine_factory(YAML.format(source=source))


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (EOF or reset), None if still open after ``seconds``."""
    t0 = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
    except TimeoutError:
        return None
    except ConnectionError:
        return time.monotonic() - t0


def timed_request(host: str, port: int, payload: bytes) -> tuple[list[str], float]:
    with RawClient(host, port) as c:
        t0 = time.monotonic()
        ack = c.request(payload, timeout=30)
        return msa(ack), time.monotonic() - t0


def adt_with_pid3_repetitions(control_id: str, n: int) -> bytes:
    pid3 = "~".join(f"{i}^^^HOSP^MR" for i in range(n))
    return adt(control_id).replace(b"12345^^^HOSP^MR", pid3.encode())


# -- slow and silent connections -------------------------------------------------------------
def test_one_byte_then_nothing_is_closed_after_the_frame_timeout(engine_factory):
    eng = engine(engine_factory, "idle_timeout: 30, frame_timeout: 1")
    host, port = eng.address("adt")
    with socket.create_connection((host, port)) as s:
        s.sendall(b"\x0b")  # a frame starts and never ends
        took = closed_within(s, 10)
    assert took is not None and 0.7 < took < 5, took
    with RawClient(host, port) as c:  # the listener itself is fine
        assert msa(c.request(adt("AFTER1")))[1:3] == ["AA", "AFTER1"]


def test_a_frame_trickled_forever_is_closed_although_bytes_keep_coming(engine_factory):
    eng = engine(engine_factory, "idle_timeout: 30, frame_timeout: 1.5")
    with socket.create_connection(eng.address("adt")) as s:
        s.sendall(b"\x0bMSH|")
        t0 = time.monotonic()
        closed = False
        for _ in range(40):  # one byte every 0.2 s: never idle, never finished
            try:
                s.sendall(b"x")
            except OSError:
                closed = True
                break
            if closed_within(s, 0.2) is not None:
                closed = True
                break
        took = time.monotonic() - t0
    assert closed and took < 5, took


def test_silent_connection_and_blank_keepalives_are_closed_after_the_idle_timeout(engine_factory):
    eng = engine(engine_factory, "idle_timeout: 1, frame_timeout: 30")
    host, port = eng.address("adt")
    with socket.create_connection((host, port)) as silent, socket.create_connection((host, port)) as blanks:
        t0 = time.monotonic()
        for _ in range(30):  # CR/LF between frames is tolerated, but it is not a message
            try:
                blanks.sendall(b"\r\n")
            except OSError:
                break
            if closed_within(blanks, 0.2) is not None:
                break
        took_blanks = time.monotonic() - t0
        took_silent = closed_within(silent, 5)
    assert took_blanks < 4, took_blanks
    assert took_silent is not None


def test_fifty_one_byte_connections_use_no_cpu(engine_factory):
    """No busy loop: a half-open frame costs a timer, not a core (the DICOM peek loop did)."""
    eng = engine(engine_factory, "idle_timeout: 30, frame_timeout: 30")
    host, port = eng.address("adt")
    socks = [socket.create_connection((host, port)) for _ in range(50)]
    try:
        for s in socks:
            s.sendall(b"\x0b")
        time.sleep(0.5)
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(2.0)
        cpu = (time.process_time() - cpu0) / (time.monotonic() - t0)
        ack, took = timed_request(host, port, adt("BUSY1"))
        assert ack[1] == "AA" and took < 1.0
    finally:
        for s in socks:
            s.close()
    assert cpu < 0.25, f"engine used {cpu:.0%} of a core with 50 idle half-frames"


# -- connection cap --------------------------------------------------------------------------
def test_connection_cap_refuses_the_extra_at_once_and_serves_the_others(engine_factory):
    eng = engine(engine_factory, "max_connections: 3, idle_timeout: 30")
    host, port = eng.address("adt")
    hogs = [socket.create_connection((host, port)) for _ in range(2)]
    try:
        with RawClient(host, port) as normal:
            assert msa(normal.request(adt("CAP1")))[1] == "AA"  # the third: still within the cap
            with socket.create_connection((host, port)) as extra:
                took = closed_within(extra, 3)
                assert took is not None and took < 1.0, took
            t0 = time.monotonic()
            assert msa(normal.request(adt("CAP2")))[1:3] == ["AA", "CAP2"]
            assert time.monotonic() - t0 < 1.0
        hogs.pop().close()  # below the cap again: a new connection is served
        deadline = time.monotonic() + 5
        while True:
            try:
                assert timed_request(host, port, adt("CAP3"))[0][1] == "AA"
                break
            except (ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        for h in hogs:
            h.close()


# -- frame size is enforced while reading ------------------------------------------------------
def test_parser_never_buffers_past_the_limit():
    p = FrameParser(64 * 1024)
    p.feed(b"\x0bMSH|^~\\&|A|B|C|D|1||ADT^A01|BIG|P|2.5\r")
    most = 0
    for _ in range(200):  # 12.8 MB of one frame, in socket-sized chunks
        p.feed(b"X" * 65536)
        most = max(most, p.buffered)
    assert most <= 64 * 1024
    events = p.feed(b"\x1c\r")
    assert events and events[0].size > 12_000_000 and b"BIG" in events[0].prefix


def test_oversized_stream_is_refused_and_connection_keeps_working(engine_factory):
    eng = engine(engine_factory, "max_frame_bytes: 65536, idle_timeout: 30, frame_timeout: 30")
    with RawClient(*eng.address("adt")) as c:
        c.send_raw(b"\x0b" + adt("HUGE1").rstrip(b"\r") + b"\rNTE|1||")
        for _ in range(80):  # 5 MB, far past the limit
            c.send_raw(b"Y" * 65536)
        c.send_raw(b"\x1c\r")
        ack = c.recv_frame(timeout=20)
        assert msa(ack)[1:3] == ["AR", "HUGE1"] and segment(ack, "ERR")[3].startswith("207^")
        assert msa(c.request(adt("SMALL1")))[1:3] == ["AA", "SMALL1"]


# -- validation work is bounded ----------------------------------------------------------------
def test_fifty_thousand_repetitions_are_refused_quickly_and_others_are_served(engine_factory):
    eng = engine(engine_factory, "validate: strict")
    host, port = eng.address("adt")
    big = adt_with_pid3_repetitions("REP50K", 50_000)
    result: dict[str, object] = {}

    def heavy():
        result["ack"], result["took"] = timed_request(host, port, big)

    t = threading.Thread(target=heavy)
    t.start()
    others = [timed_request(*eng.address("other"), adt(f"OTHER{i}")) for i in range(5)]
    same = timed_request(host, port, adt("SAME1"))
    t.join(60)
    ack, took = result["ack"], result["took"]
    assert ack[1:3] == ["AR", "REP50K"] and took < 5, (ack, took)
    assert all(a[1] == "AA" and s < 1.0 for a, s in others), others
    assert same[0][1] == "AA" and same[1] < 5, same


def test_validation_over_its_time_budget_is_refused_and_does_not_starve_others(engine_factory):
    limits = "validation: {timeout: 1, max_repetitions: 100000, max_segments: 100000, max_bytes: 10000000}"
    eng = engine(engine_factory, f"validate: strict, {limits}")
    host, port = eng.address("adt")
    slow = adt_with_pid3_repetitions("SLOW1", 6_000)  # several seconds of hl7apy
    result: dict[str, object] = {}

    def heavy():
        with RawClient(host, port) as c:
            t0 = time.monotonic()
            result["ack"] = c.request(slow, timeout=30)
            result["took"] = time.monotonic() - t0
            result["next"] = msa(c.request(adt("SLOW2"), timeout=30))  # a fresh worker takes over

    t = threading.Thread(target=heavy)
    t.start()
    time.sleep(0.3)
    during = [timed_request(*eng.address("other"), adt(f"DUR{i}")) for i in range(5)]
    same = timed_request(host, port, adt("SAME2"))  # the second worker validates it meanwhile
    t.join(60)
    ack = result["ack"]
    assert msa(ack)[1:3] == ["AR", "SLOW1"], ack
    err = segment(ack, "ERR")
    assert err[3].startswith("207^") and "1 s" in err[8]
    assert result["took"] < 5, result["took"]
    assert result["next"][1:3] == ["AA", "SLOW2"]
    assert all(a[1] == "AA" and s < 1.0 for a, s in during), during
    assert same[0][1] == "AA" and same[1] < 1.5, same


@pytest.mark.parametrize("limit,message,field", [
    ("max_repetitions: 50", adt_with_pid3_repetitions("L1", 51), "PID-3"),
    ("max_segments: 10", adt("L2", extra="\r".join(f"NTE|{i}||x" for i in range(10))), None),
    ("max_bytes: 2048", adt("L3", extra="NTE|1||" + "Z" * 4000), None),
])
def test_validation_limits_answer_ar_207_with_the_reason(engine_factory, limit, message, field):
    eng = engine(engine_factory, f"validate: structure, validation: {{{limit}}}")
    with RawClient(*eng.address("adt")) as c:
        ack = c.request(message)
        assert msa(ack)[1] == "AR"
        err = segment(ack, "ERR")
        assert err[3].startswith("207^") and "limit" in err[8]
        if field:
            assert err[2] == field.replace("-", "^1^") and field in err[8]
        assert msa(c.request(adt("LOK")))[1:3] == ["AA", "LOK"]



def test_a_validation_worker_that_dies_is_replaced(engine_factory):
    import os
    import signal

    eng = engine(engine_factory, "validate: structure, validation: {workers: 1}")
    pool = eng.runtime.listener("adt")._validator
    with RawClient(*eng.address("adt")) as c:
        assert msa(c.request(adt("W1")))[1:3] == ["AA", "W1"]
        for w in list(pool._all):
            os.kill(w.proc.pid, signal.SIGKILL)  # a worker this engine started
        time.sleep(0.3)
        assert msa(c.request(adt("W2")))[1:3] == ["AA", "W2"]
        ack = c.request(adt("W3").replace(b"||DOE^JOHN||", b"||||"))  # and it still validates
        assert msa(ack)[1:3] == ["AE", "W3"] and segment(ack, "ERR")[2] == "PID^1^5"
    assert len(pool._all) == 1


def test_a_peer_that_never_reads_its_acks_is_closed(engine_factory):
    from structlog.testing import capture_logs

    eng = engine(engine_factory, "idle_timeout: 30, frame_timeout: 1")
    listener = eng.runtime.listener("adt")
    # MSH-3/4 are echoed in each ACK: 120 kB ACKs fill the kernel's buffers (up to 4 MB) quickly
    big = {"sender": "S" * 60_000, "facility": "F" * 60_000}
    burst = b"".join(wrap(adt(f"NR{i}", **big)) for i in range(150))
    with capture_logs() as logs:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)  # and never recv: ACKs pile up
        s.connect(eng.address("adt"))
        s.settimeout(0.5)
        sent = 0
        deadline = time.monotonic() + 60
        try:
            while sent < len(burst) and time.monotonic() < deadline:
                try:
                    sent += s.send(burst[sent:sent + 65536])
                except TimeoutError:
                    continue
                except OSError:
                    break  # closed by the engine
            assert time.monotonic() < deadline - 40, "the engine never reset the connection"
            eng.wait_for(lambda: not listener._conns, timeout=30)
        finally:
            s.close()
        ack, took = timed_request(*eng.address("adt"), adt("NR-AFTER"))
        assert ack[1:3] == ["AA", "NR-AFTER"] and took < 5
    assert any(e.get("reason") == "ack_not_read" for e in logs if e["event"] == "mllp.disconnected"), \
        [e for e in logs if e["event"] == "mllp.disconnected"]


def test_unfinished_messages_of_all_connections_share_one_bound(engine_factory):
    """Four connections each holding most of a message that never ends: the listener keeps at
    most about ``max_buffered_bytes`` of them (the others are not read from: TCP backpressure),
    a normal ADT on another connection is answered at once, and all is given back once they are
    closed.
    Each connection alone is within max_frame_bytes: without the shared bound 256 of them at
    10 MiB were 2.5 GB."""
    from conftest import wait_until

    eng = engine(engine_factory, "max_frame_bytes: 4194304, max_buffered_bytes: 1048576, "
                                 "frame_timeout: 10, idle_timeout: 60")
    host, port = eng.address("adt")
    budget = eng.runtime.listener("adt")._buffered
    hogs = [socket.create_connection((host, port)) for _ in range(4)]
    try:
        for h in hogs:
            h.settimeout(2)
            try:
                h.sendall(b"\x0b" + adt("HOG") + b"X" * (700 * 1024))  # the kernel holds what is not read
            except TimeoutError:
                pass
        wait_until(lambda: budget.used > 1024 * 1024)  # the bound is reached...
        time.sleep(1.0)  # ...and stays: nothing more is read from the hogs (a negative check)
        assert budget.used < 1024 * 1024 + 4 * 2 * 64 * 1024, budget.used
        ack, took = timed_request(host, port, adt("SMALL1"))
        assert ack[1:3] == ["AA", "SMALL1"] and took < 2.0, (ack, took)
    finally:
        for h in hogs:
            h.close()
    wait_until(lambda: budget.used == 0)  # read on, or closed at frame_timeout (paused: the close is unseen)
