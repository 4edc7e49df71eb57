"""kill -9 at random moments: every message that got an AA must reach the downstream.

A sender records each AA it receives while `medrelay run` is SIGKILLed and restarted
several times; like a real HL7 sender it resends a message until it is acknowledged.
At the end, every acknowledged MSH-10 must have been delivered to the receiver (more
than once is allowed: at-least-once delivery).
"""

import random
import threading
import time

import pytest
from conftest import free_port
from mllp_peers import MLLPReceiver, RawClient, adt, msa

from engine.queue import LEASE_SECONDS

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
log: {{level: warning}}
channels:
  adt:
    source: {{type: mllp, port: {port}}}
    routes:
      - name: ris
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 5, connect_timeout: 1}}
        retry: {{max_attempts: 50, initial_delay: 0.05, max_delay: 0.5}}
"""

TOTAL = 400


class Sender(threading.Thread):
    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acked: list[str] = []
        self.stop_at = time.monotonic() + 120
        self.reconnects = 0

    def run(self) -> None:
        client = None
        i = 0
        while i < TOTAL and time.monotonic() < self.stop_at:
            cid = f"K{i:05d}"
            try:
                if client is None:
                    client = RawClient("127.0.0.1", self.port, timeout=5)
                ack = client.request(adt(cid), timeout=10)
                if msa(ack)[1:3] == ["AA", cid]:
                    self.acked.append(cid)
                    i += 1
            except OSError:  # engine killed: reconnect and resend the same message
                if client is not None:
                    client.close()
                client = None
                self.reconnects += 1
                time.sleep(0.05)
        if client is not None:
            client.close()


@pytest.mark.slow
@pytest.mark.timeout(LEASE_SECONDS + 240)
def test_kill9_loses_no_acknowledged_message(medrelay_proc):
    rng = random.Random()
    port = free_port()
    with MLLPReceiver() as rx:
        proc = medrelay_proc(YAML.format(port=port, rx=rx.port))
        proc.start()
        proc.wait_port(port)
        sender = Sender(port)
        sender.start()
        kills = 0
        for _ in range(4):
            # kill at a random point of the stream (not of the clock: a fast engine would finish
            # all messages before a timed kill), mid-batch as often as not
            target = len(sender.acked) + rng.randint(10, 60)
            deadline = time.monotonic() + 60
            while len(sender.acked) < target and sender.is_alive() and time.monotonic() < deadline:
                time.sleep(rng.uniform(0.0, 0.01))
            if not sender.is_alive():
                break
            proc.kill9()
            kills += 1
            proc.start()
            proc.wait_port(port)
        sender.join(150)
        assert not sender.is_alive(), "sender did not finish"
        assert kills == 4
        assert len(sender.acked) == TOTAL
        acked = set(sender.acked)
        # Deliveries leased by the killed process are claimed again only when the lease ends
        # (engine.queue.LEASE_SECONDS): at-least-once, but late after a crash.
        deadline = time.monotonic() + LEASE_SECONDS + 45
        while time.monotonic() < deadline:
            got = {msa_id(m) for m in list(rx.received)}
            if acked <= got:
                break
            time.sleep(0.2)
        got = {msa_id(m) for m in list(rx.received)}
        missing = sorted(acked - got)
        assert not missing, f"{len(missing)} acknowledged messages never delivered: {missing[:10]}"
        # every delivered message was one we sent, delivered byte-exact
        assert all(m == adt(msa_id(m)) for m in rx.received)
        assert proc.terminate(30) == 0


def msa_id(msg: bytes) -> str:
    return msg.split(b"\r", 1)[0].split(b"|")[9].decode()
