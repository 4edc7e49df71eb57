"""The console and DICOMweb serve through the one HTTP stack (engine/http/): raw sockets.

The FHIR listener's slowloris, idle and cap tests (tests/test_fhir_hostile.py) are the
spec; these prove the same guards now hold for the console and DICOMweb, and that each
answers in its own error shape (console: JSON ``{"error", "detail"}``; DICOMweb: plain
text like its handlers), never the FHIR listener's OperationOutcome.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from conftest import EngineThread
from console_support import start
from http_peers import answered, until_closed

TIMEOUTS = {"header_timeout": 1.0, "idle_timeout": 1.0}
MARGIN = 3.0  # the machine is shared and slow: a timeout must fire, not fire to the millisecond
CAP = 3
TOKEN = "stack-test-token-0123456789"
DICOMWEB = """
channels:
  web:
    source: {type: dicomweb, host: 127.0.0.1, port: 0, base_path: /dicom-web,
             auth: {bearer_tokens: ["${DW_TOKEN}"]}, header_timeout: 1, idle_timeout: 1,
             max_connections: %d}
    routes:
      - {name: archive, to: {type: store}}
"""


def answer(data: bytes, status: int) -> tuple[str, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), data[:300]
    ctype = next(line.split(b":", 1)[1].strip().decode() for line in head.lower().split(b"\r\n")
                 if line.startswith(b"content-type:"))
    assert b"OperationOutcome" not in body
    return ctype, body


def console_error(data: bytes, status: int) -> dict:
    ctype, body = answer(data, status)
    assert ctype.startswith("application/json"), ctype
    doc = json.loads(body)
    assert set(doc) == {"error", "detail"}, doc
    return doc


def dicomweb_error(data: bytes, status: int) -> str:
    ctype, body = answer(data, status)
    assert ctype.startswith("text/plain"), ctype
    return body.decode()


def check_guards(address: tuple[str, int], path: str, read_error, ok_url: str) -> None:
    """Silent and slow-header clients are closed; over the cap gets 503; places come back."""
    with socket.create_connection(address, timeout=15) as sock:  # silent: closed after idle_timeout
        data, took = until_closed(sock)
    assert data == b"" and took <= TIMEOUTS["idle_timeout"] + MARGIN
    with socket.create_connection(address, timeout=15) as sock:  # slowloris head: 408
        data, took = until_closed(sock, dribble=f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Slow: ".encode() + b"a" * 200)
    assert 0.9 <= took <= TIMEOUTS["header_timeout"] + MARGIN
    assert "headers" in str(read_error(data, 408))
    with socket.create_connection(address, timeout=15) as sock:  # a head over the limit: 431
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Big: ".encode() + b"a" * 20_000 + b"\r\n\r\n")
        data, _ = until_closed(sock)
    read_error(data, 431)

    # The server accepts in arrival order, so the extra one is counted after the held ones
    # without any wait. The held ones have header_timeout (1 s) to live: a round in which the
    # machine stalled past it (a held one already answered 408 when the extra was let in) proves
    # nothing about the cap and is played again; a cap that does not hold fails every round.
    for _ in range(5):
        held = [socket.create_connection(address, timeout=15) for _ in range(CAP)]
        try:
            for h in held:  # each mid-head, so they are neither idle nor done before the extra one comes
                h.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode())
            with socket.create_connection(address, timeout=15) as extra:
                extra.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                data, took = until_closed(extra)
            if data.startswith(b"HTTP/1.1 503 ") or not any(answered(h) for h in held):
                break
        finally:
            for h in held:
                h.close()
    assert took < 2 and b"retry-after: 5" in data.lower()
    assert "too many connections" in str(read_error(data, 503))
    deadline = time.monotonic() + 10
    while True:  # places are given back as the server sees the closes
        r = httpx.get(ok_url, timeout=10)
        if r.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code != 503


def test_console_closes_slow_clients_and_refuses_over_the_cap(engine_factory):
    s = start(engine_factory, extra=f", header_timeout: 1, idle_timeout: 1, max_connections: {CAP}")
    try:
        host, port = s.eng.runtime.console.address
        check_guards((host, port), "/api/channels", console_error, s.base + "/api/channels")
    finally:
        s.rx.stop()


@pytest.fixture
def web(tmp_path):
    e = EngineThread(DICOMWEB % CAP, tmp_path, env={"DW_TOKEN": TOKEN})
    yield e
    e.stop()


def test_dicomweb_closes_slow_clients_and_refuses_over_the_cap(web):
    host, port = web.address("web")
    check_guards((host, port), "/dicom-web/studies", dicomweb_error, f"http://{host}:{port}/dicom-web/studies")
