"""``max_connections_per_client`` on the DICOM and MLLP listeners (engine/security/client_slots.py):
one client address holding its share of connections is refused at once, other addresses (or
other clients a trusted balancer's PROXY header announces) are still served. Raw sockets and
pynetdicom against a running engine; 127.0.0.2 is a second client address on loopback."""

from __future__ import annotations

import socket

from mllp_peers import RawClient, adt, msa
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from test_dicom_hostile import associate_rq, recv_pdu
from test_mllp_hostile import closed_within

from tests.dicom_peers import dicom_yaml


def _from(address: str, port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(address, 0))
    return s


def _echo_from(address: str, port: int) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY", bind_address=(address, 0))
    if not assoc.is_established:
        return False
    try:
        return assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()


def test_dicom_one_client_over_its_share_gets_rj_others_are_served(engine_factory):
    eng = engine_factory(dicom_yaml(extra="      max_connections_per_client: 3\n"))
    port = eng.address("dcm")[1]
    hogs = [_from("127.0.0.1", port) for _ in range(3)]
    try:
        for h in hogs:
            h.sendall(b"\x01")  # an A-ASSOCIATE-RQ begun, never finished: held until ARTIM
        slots = eng.runtime.listener("dcm").server.client_slots
        eng.wait_for(lambda: slots.count.get("127.0.0.1") == 3)  # each thread has taken its place
        with _from("127.0.0.1", port) as extra:
            extra.sendall(associate_rq(Verification))
            kind, body = recv_pdu(extra)
            assert kind == 0x03 and body[1:4] == bytes((0x02, 0x03, 0x02)), (kind, body)  # transient, limit
            assert recv_pdu(extra)[0] == -1
        assert _echo_from("127.0.0.2", port)  # another address: its own share
    finally:
        hogs.pop().close()
    eng.wait_for(lambda: _echo_from("127.0.0.1", port))  # a place given back is taken again
    for h in hogs:
        h.close()


def test_dicom_clients_behind_a_trusted_balancer_are_counted_apart(engine_factory):
    extra = ("      max_connections_per_client: 2\n"
             "      proxy_protocol: {trusted: [\"127.0.0.1\"], timeout: 5}\n")
    eng = engine_factory(dicom_yaml(extra=extra))
    port = eng.address("dcm")[1]

    def via_balancer(client: str) -> socket.socket:
        s = _from("127.0.0.1", port)
        s.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 104\r\n".encode())
        return s

    hogs = [via_balancer("10.0.0.1") for _ in range(2)]
    try:
        for h in hogs:
            h.sendall(b"\x01")
        slots = eng.runtime.listener("dcm").server.client_slots
        eng.wait_for(lambda: slots.count.get("10.0.0.1") == 2)  # both read by their threads
        with via_balancer("10.0.0.1") as third:
            third.sendall(associate_rq(Verification))
            assert recv_pdu(third)[0] == 0x03
        with via_balancer("10.0.0.2") as other:
            other.sendall(associate_rq(Verification))
            assert recv_pdu(other)[0] == 0x02  # A-ASSOCIATE-AC: another client, its own share
    finally:
        for h in hogs:
            h.close()


def _adt_answer(sock: socket.socket, control_id: str) -> list[str]:
    """An ADT framed on ``sock`` (already connected, maybe after a PROXY header): the MSA of its ACK."""
    sock.sendall(b"\x0b" + adt(control_id) + b"\x1c\r")
    data = b""
    while not data.endswith(b"\x1c\r"):
        chunk = sock.recv(4096)
        assert chunk, "closed without an ACK"
        data += chunk
    return msa(data[1:-2])


MLLP_YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0, idle_timeout: 60, {extra}}}
"""


def test_mllp_one_client_over_its_share_is_closed_others_are_served(engine_factory):
    eng = engine_factory(MLLP_YAML.format(extra="max_connections_per_client: 2"))
    host, port = eng.address("adt")
    hogs = [_from("127.0.0.1", port) for _ in range(2)]
    slots = eng.runtime.listener("adt")._clients
    eng.wait_for(lambda: slots.count.get("127.0.0.1") == 2)
    try:
        with _from("127.0.0.1", port) as extra:
            took = closed_within(extra, 5)
            assert took is not None and took < 3, took  # closed at once, not after idle_timeout
        with socket.create_connection((host, port), timeout=10, source_address=("127.0.0.2", 0)) as s:
            assert _adt_answer(s, "CAP-OTHER")[1:3] == ["AA", "CAP-OTHER"]
    finally:
        hogs.pop().close()

    def served() -> bool:
        try:
            with RawClient(host, port) as c:
                return msa(c.request(adt("CAP-AGAIN"), timeout=5))[1] == "AA"
        except OSError:
            return False

    eng.wait_for(served)  # the place the closed hog gave back is taken again
    for h in hogs:
        h.close()


def test_mllp_clients_behind_a_trusted_balancer_are_counted_apart(engine_factory):
    extra = 'max_connections_per_client: 1, proxy_protocol: {trusted: ["127.0.0.1"], timeout: 5}'
    eng = engine_factory(MLLP_YAML.format(extra=extra))
    host, port = eng.address("adt")
    slots = eng.runtime.listener("adt")._clients

    def via_balancer(client: str) -> socket.socket:
        s = _from("127.0.0.1", port)
        s.sendall(f"PROXY TCP4 {client} 127.0.0.1 40000 2575\r\n".encode())
        return s

    with via_balancer("10.0.0.1"):
        eng.wait_for(lambda: slots.count.get("10.0.0.1") == 1)
        with via_balancer("10.0.0.1") as second:
            assert closed_within(second, 5) is not None
        with via_balancer("10.0.0.2") as other:
            assert _adt_answer(other, "CAP-PROXY")[1:3] == ["AA", "CAP-PROXY"]


def test_one_client_one_spelling():
    """An IPv4-mapped IPv6 address (a PROXY v2 header's TCP6 bytes read as ``::ffff:a00:1``, a
    dual-stack socket's ``::ffff:10.0.0.1``) is the IPv4 client it maps, not a second one."""
    from engine.security.client_slots import client_host

    assert {client_host((a, 1)) for a in ("10.0.0.1", "::ffff:10.0.0.1", "::ffff:a00:1")} == {"10.0.0.1"}
    assert client_host(("2001:DB8:0::1", 1)) == "2001:db8::1"
    assert client_host(None) == "?"
