"""`medrelay run` as a process: SIGTERM drains and exits 0; SIGHUP reloads, a bad reload is refused."""

import signal
import time

from conftest import free_port
from mllp_peers import MLLPReceiver, RawClient, adt, msa

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: {port}}}
    routes:
      - name: ris
        when: {{"MSH-9.1": {when}}}
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 2, connect_timeout: 1}}
"""


def wait_log(p, event: str, count: int = 1, timeout: float = 30.0) -> None:
    """Until ``event`` is in the process's log ``count`` times: a signal is handled when the
    engine's loop gets to it, which on a loaded machine is not within any fixed sleep."""
    deadline = time.monotonic() + timeout
    while p.log_path.read_text().count(event) < count:
        assert time.monotonic() < deadline, f"{event} x{count} not logged: {p.log_path.read_text()[-3000:]}"
        assert p.proc.poll() is None, p.log_path.read_text()[-3000:]
        time.sleep(0.1)


def test_sigterm_drains_and_sighup_reloads(medrelay_proc):
    rx = MLLPReceiver().start()
    port = free_port()
    p = medrelay_proc(YAML.format(port=port, rx=rx.port, when="ADT"))
    p.start()
    p.wait_port(port)
    wait_log(p, "engine.started")
    with RawClient("127.0.0.1", port) as c:
        for i in range(20):
            assert msa(c.request(adt(f"T{i:03}")))[1] == "AA"
    rx.wait_for(20)

    # A broken config on SIGHUP is refused: the old one keeps serving.
    p.config_path.write_text("channels: {adt: {source: {type: mllp, port: notaport}}}\n")
    p.proc.send_signal(signal.SIGHUP)
    wait_log(p, "config.reload_refused")
    with RawClient("127.0.0.1", port) as c:
        assert msa(c.request(adt("AFTER-BAD")))[1] == "AA"
    rx.wait_for(21)

    # A good one is taken: ADT is no longer routed.
    p.config_path.write_text(YAML.format(port=port, rx=rx.port, when="ORU"))
    p.proc.send_signal(signal.SIGHUP)
    # the new runtime is up (waiting for "config.reloading" and the port could reach the old
    # listener in the instant before it closes, and the old config would route the message)
    wait_log(p, "engine.started", count=2)
    assert "config.reloading" in p.log_path.read_text()
    with RawClient("127.0.0.1", port) as c:
        assert msa(c.request(adt("AFTER-GOOD")))[1] == "AA"
    time.sleep(1.0)
    assert len(rx.received) == 21

    assert p.terminate() == 0
    log = p.log_path.read_text()
    assert "engine.draining" in log and "engine.stopped" in log
    rx.stop()
