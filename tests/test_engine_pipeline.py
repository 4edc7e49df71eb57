"""Intake (group commit, dedupe, tx hooks) and route workers (retry, dead letter, replay, order)."""

import asyncio
import os
import subprocess
import sys
import time

import engine_fakes
import pytest
from sqlalchemy import func, select

from engine import queue
from engine.envelope import Envelope
from engine.store import schema

YAML = engine_fakes.collect_yaml(max_attempts=3, route_extra="""
        when: {{"MSH-9.1": ADT}}
        transforms: [{{type: test_upper, drop_if: "DROPME", explode_if: "EXPLODE", quarantine_if: "BURNED"}}]""")


@pytest.fixture(autouse=True)
def _clean_fakes():
    engine_fakes.OUTBOX.clear()
    engine_fakes.SCRIPT.clear()


def submit(eng, payload: bytes, mtype="ADT", key=None, tx_hook=None):
    env = Envelope(channel="in", kind="hl7v2", payload=payload, headers={"MSH-9.1": mtype})
    return eng.call(eng.runtime.intake.submit(env, dedupe_key=key, response=b"ACK-" + payload[:5],
                                              tx_hook=tx_hook))


def states(eng):
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        return dict(c.execute(select(d.c.state, func.count()).group_by(d.c.state)).all())


def test_route_and_transform_and_when(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t1", url=store_url))
    engine_fakes.OUTBOX.clear()
    assert submit(eng, b"hello").status == "accepted"
    o = submit(eng, b"not routed", mtype="ORU")
    assert o.status == "accepted" and o.routes == ()
    eng.wait_for(lambda: engine_fakes.OUTBOX.get("t1") == [b"HELLO"])
    eng.wait_for(lambda: states(eng) == {"done": 1})


def test_duplicate_answers_original(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t2", url=store_url))
    engine_fakes.OUTBOX.clear()
    first = submit(eng, b"one", key="A|B|1")
    second = submit(eng, b"one again", key="A|B|1")
    assert first.status == "accepted" and second.status == "duplicate"
    assert second.message_id == first.message_id and second.response == b"ACK-one"
    eng.wait_for(lambda: engine_fakes.OUTBOX.get("t2") == [b"ONE"])
    with eng.store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(schema.messages)).scalar() == 1


def test_group_commit_many_concurrent(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t3", url=store_url))

    async def many():
        envs = [Envelope(channel="in", kind="hl7v2", payload=b"m%d" % i, headers={"MSH-9.1": "ADT"})
                for i in range(300)]
        return await asyncio.gather(*(eng.runtime.intake.submit(e, dedupe_key=f"k{i}")
                                      for i, e in enumerate(envs)))

    outs = eng.call(many())
    assert all(o.status == "accepted" for o in outs)
    eng.wait_for(lambda: len(engine_fakes.OUTBOX.get("t3", [])) == 300, timeout=30)
    assert engine_fakes.OUTBOX["t3"] == [b"M%d" % i for i in range(300)]  # order kept


def test_failing_tx_hook_fails_only_its_message(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t4", url=store_url))

    def bad(conn, env):
        raise RuntimeError("index write failed")

    async def both():
        e1 = Envelope(channel="in", kind="hl7v2", payload=b"good", headers={"MSH-9.1": "ADT"})
        e2 = Envelope(channel="in", kind="hl7v2", payload=b"bad", headers={"MSH-9.1": "ADT"})
        return await asyncio.gather(eng.runtime.intake.submit(e1, tx_hook=lambda c, e: 42),
                                    eng.runtime.intake.submit(e2, tx_hook=bad))

    good, badout = eng.call(both())
    assert good.status == "accepted" and good.result == 42
    assert badout.status == "error"
    with eng.store.engine.connect() as c:
        ids = c.execute(select(schema.messages.c.id)).scalars().all()
    assert ids == [good.message_id]


def test_retry_then_success_and_dead_letter_then_replay(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t5", url=store_url))
    engine_fakes.OUTBOX.clear()
    engine_fakes.SCRIPT["t5"] = ["fail", "ok"]
    submit(eng, b"retry me")
    eng.wait_for(lambda: engine_fakes.OUTBOX.get("t5") == [b"RETRY ME"])
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        assert c.execute(select(d.c.attempts)).scalar() == 1
    engine_fakes.SCRIPT["t5"] = ["fail", "fail", "fail"]
    o = submit(eng, b"doomed")
    eng.wait_for(lambda: states(eng).get("dead") == 1)
    with eng.store.engine.connect() as c:
        row = c.execute(select(d).where(d.c.message_id == o.message_id)).mappings().one()
    assert row["attempts"] == 3 and "scripted failure" in row["last_error"]
    assert queue.requeue(eng.store, message_ids=[o.message_id]) != []
    eng.wait_for(lambda: b"DOOMED" in engine_fakes.OUTBOX["t5"])
    eng.wait_for(lambda: states(eng) == {"done": 2})


def test_ordered_route_blocks_behind_retry(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t6", url=store_url))
    engine_fakes.OUTBOX.clear()
    engine_fakes.SCRIPT["t6"] = ["fail", "ok", "ok"]
    submit(eng, b"first")
    submit(eng, b"second")
    eng.wait_for(lambda: len(engine_fakes.OUTBOX.get("t6", [])) == 2)
    assert engine_fakes.OUTBOX["t6"] == [b"FIRST", b"SECOND"]


def test_drop_and_transform_error(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t7", url=store_url))
    submit(eng, b"DROPME please")
    o = submit(eng, b"EXPLODE")
    submit(eng, b"BURNED in text")
    eng.wait_for(lambda: states(eng) == {"filtered": 1, "dead": 1, "quarantined": 1})
    d = schema.deliveries
    with eng.store.engine.connect() as c:
        err = c.execute(select(d.c.last_error).where(d.c.message_id == o.message_id)).scalar()
    assert "transform failed: ValueError" in err


def test_payload_encrypted_at_rest(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t8", url=store_url))
    submit(eng, b"PID|||123456^^^HOSP||DOE^JOHN")
    eng.wait_for(lambda: states(eng) == {"done": 1})
    eng.stop()
    for p in eng.data_dir.rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            assert b"DOE^JOHN" not in data and b"123456" not in data, p


def test_cli_messages_list_and_check(engine_factory, store_url):
    eng = engine_factory(YAML.format(name="t9", url=store_url))
    submit(eng, b"x")
    eng.wait_for(lambda: states(eng) == {"done": 1})
    cfg = str(eng.config_path)
    out = subprocess.run([sys.executable, "-m", "engine.cli", "messages", "list", "-c", cfg, "--json"],
                         capture_output=True, text=True, cwd=eng.data_dir,
                         env={**os.environ, "MEDRELAY_PLUGINS": "engine_fakes",
                              "PYTHONPATH": os.path.dirname(__file__)})
    assert out.returncode == 0, out.stderr
    assert '"route": "a", "state": "done"' in out.stdout


DEBOUNCE_YAML = """
store: {{url: "{url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  in:
    source: {{type: test_null}}
    routes:
      - name: per-study
        debounce: {{key: StudyInstanceUID, seconds: 2.0}}
        to: {{type: test_collect, name: deb}}
"""


def test_debounce_delivers_last_message_per_key_after_quiet(engine_factory, store_url):
    eng = engine_factory(DEBOUNCE_YAML.format(url=store_url))

    def send(payload: bytes, study: str):
        env = Envelope(channel="in", kind="dicom", payload=payload, headers={"StudyInstanceUID": study})
        return eng.call(eng.runtime.intake.submit(env))

    # The quiet period (2 s) is long next to the 0.1 s between instances, so a loaded machine
    # (a submit that stalls) cannot let it run out between two instances of the study.
    for i in range(5):  # one study arriving instance by instance
        last_a = time.monotonic()  # A4 is committed after this: its delivery is due 2 s after at the earliest
        send(b"A%d" % i, "1.2.3")
        time.sleep(0.1)
    send(b"B0", "1.2.4")
    while time.monotonic() - last_a < 1.5:  # still inside the quiet period: nothing delivered
        assert engine_fakes.OUTBOX.get("deb", []) == []
        time.sleep(0.05)
    eng.wait_for(lambda: sorted(engine_fakes.OUTBOX.get("deb", [])) == [b"A4", b"B0"], timeout=30)
    eng.wait_for(lambda: states(eng) == {"done": 2, "superseded": 4})
    time.sleep(0.8)
    assert sorted(engine_fakes.OUTBOX["deb"]) == [b"A4", b"B0"]  # nothing else comes later
