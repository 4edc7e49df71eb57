"""Enhanced acknowledgment mode end to end: CA on the connection at commit, then the application
ACK (AA, or AE when the routes failed) sent to the original sender's own MLLP receiver."""

import pytest
from mllp_peers import MLLPReceiver, RawClient, adt, make_ack, msa, segment
from sqlalchemy import select

from engine.store import schema

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  adt:
    source: {{type: mllp, port: 0}}
    routes:
      - name: to-ris
        to: {{type: mllp, host: 127.0.0.1, port: {ris}, timeout: 2, connect_timeout: 1}}
        retry: {{max_attempts: 2, initial_delay: 0.05, max_delay: 0.1}}
      - name: app-ack
        when: {{"MSH-16": [AL, ER, SU]}}
        to: {{type: hl7_app_ack, host: 127.0.0.1, port: {his}, after: [to-ris], timeout: 2}}
        retry: {{max_attempts: 50, initial_delay: 0.05, max_delay: 0.2}}
"""


@pytest.fixture
def his():
    # the original sender's own receiver: commit-accepts what it gets (CA)
    r = MLLPReceiver(lambda m, n: make_ack(m, "CA")).start()
    yield r
    r.stop()


def run(engine_factory, his, ris_code: str, msh16: str):
    ris = MLLPReceiver(lambda m, n: make_ack(m, ris_code)).start()
    eng = engine_factory(YAML.format(ris=ris.port, his=his.port))
    with RawClient("127.0.0.1", eng.address("adt")[1]) as c:
        commit = c.request(adt("ENH0001", msh15="AL", msh16=msh16))
    assert msa(commit)[1:3] == ["CA", "ENH0001"]
    return eng, ris


def test_application_ack_aa_after_delivery(engine_factory, his):
    _, ris = run(engine_factory, his, "AA", "AL")
    acks = his.wait_for(1)
    ris.stop()
    ack = acks[0]
    assert msa(ack)[1:3] == ["AA", "ENH0001"]
    msh = segment(ack, "MSH")
    assert msh[2:6] == ["RIS", "RAD", "HIS", "HOSP"]  # MSH-3..6: we answer as the original receiver
    assert msh[8].startswith("ACK") and msh[14:16] == ["AL", "NE"]
    assert len(ris.received) == 1


def test_application_ack_ae_when_the_route_dead_letters(engine_factory, his):
    _, ris = run(engine_factory, his, "AE", "AL")
    acks = his.wait_for(1)
    ris.stop()
    assert msa(acks[0])[1:3] == ["AE", "ENH0001"]
    err = segment(acks[0], "ERR")
    assert err is not None and "207" in "|".join(err)


def test_su_asks_for_no_ack_on_failure(engine_factory, his):
    eng, ris = run(engine_factory, his, "AE", "SU")
    d = schema.deliveries

    def app_ack_row():
        with eng.store.engine.connect() as c:
            return c.execute(select(d.c.state, d.c.detail).where(d.c.route == "app-ack")).first()

    row = eng.wait_for(lambda: (r := app_ack_row()) is not None and r.state == "done" and r)
    ris.stop()
    assert row.detail == "not requested (MSH-16)"
    assert his.received == []
