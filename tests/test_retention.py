"""Retention: expired messages go with their deliveries, payload blobs (rows and files) and
unarchived index rows, in audited batches; nothing unfinished and nothing archived is pruned."""

import time

import engine_fakes
import pytest
from dicom_peers import dicom_yaml, findscu, storescu_any, tool, unique_files
from sqlalchemy import func, select, update
from test_engine_pipeline import states

from engine.envelope import Envelope
from engine.ops.retention import ChannelRetention, RetentionConfig, prune_once
from engine.store import schema
from engine.store.dicom.tables import instances

YAML = """
store: {url: "sqlite:///data/m.db", blobs: data/blobs, inline_max_bytes: 1024}
keys: {kek_file: data/keys.json}
channels:
  in:
    source: {type: test_null}
    retention: {days: 7}
    routes:
      - name: a
        to: {type: test_collect, name: ret}
        retry: {max_attempts: 2, initial_delay: 3600}
"""


def _count(store, table, *where):
    with store.engine.connect() as c:
        return c.execute(select(func.count()).select_from(table).where(*where)).scalar()


def _age(store, days):
    with store.engine.begin() as c:
        c.execute(update(schema.messages).values(received_at=time.time() - days * 86400))


def test_expired_final_messages_are_pruned_unfinished_and_dead_kept(engine_factory):
    engine_fakes.SCRIPT["ret"] = ["ok", "ok", "perm", "fail"]
    eng = engine_factory(YAML)
    big = b"x" * 5000  # above inline_max: its blob is a file
    for i, payload in enumerate([b"small-done", big, b"dead", b"pending"]):
        env = Envelope(channel="in", kind="hl7v2", payload=payload + b"%d" % i, headers={"MSH-9.1": "ADT"})
        assert eng.call(eng.runtime.intake.submit(env)).ok
    eng.wait_for(lambda: states(eng).get("done") == 2 and states(eng).get("dead") == 1)
    s = eng.store
    files_before = [p for p in s.blob_dir.rglob("*") if p.is_file()]
    assert files_before
    cfg = RetentionConfig(batch=1, pause=0)  # one per transaction: the batching loop runs
    assert prune_once(s, {"in": ChannelRetention(days=7)}, cfg).messages == 0  # nothing old enough
    _age(s, 8)
    got = prune_once(s, {"in": ChannelRetention(days=7)}, cfg)
    assert (got.messages, got.deliveries) == (2, 2)
    assert _count(s, schema.messages) == 2  # the dead letter and the pending one
    assert states(eng) == {"dead": 1, "pending": 1}
    assert _count(s, schema.blobs) == 2
    assert not [p for p in files_before if p.exists()]  # the large payload's file is gone
    with s.engine.connect() as c:
        audits = c.execute(select(schema.audit_events.c.detail).where(
            schema.audit_events.c.action == "store.prune")).scalars().all()
    assert len(audits) == 2 and all("messages 1" in a for a in audits)
    got = prune_once(s, {"in": ChannelRetention(days=7, keep_dead=False)}, cfg)
    assert got.messages == 1 and states(eng) == {"pending": 1}


@pytest.mark.dcmtk
def test_archived_instances_outlive_the_message_log(engine_factory, tmp_path):
    tool("findscu")
    routes = "[{name: archive, to: {type: store}}]"
    eng = engine_factory(dicom_yaml(extra="    retention: {days: 1}", routes=routes).replace("  dcm:", "  arch:") +
                         dicom_yaml(extra="    retention: {days: 1}", channel="seen").split("channels:\n")[1])
    arch, seen = eng.address("arch")[1], eng.address("seen")[1]
    a_files = unique_files(tmp_path / "a", ("CT_small.dcm",))
    s_files = unique_files(tmp_path / "s", ("MR_small.dcm",))
    assert storescu_any(arch, a_files) == ["Success"]
    assert storescu_any(seen, s_files) == ["Success"]
    eng.wait_for(lambda: _count(eng.store, instances, instances.c.archived == 1) == 1)
    _age(eng.store, 2)
    got = prune_once(eng.store, {"arch": ChannelRetention(days=1), "seen": ChannelRetention(days=1)},
                     RetentionConfig())
    assert (got.messages, got.instances) == (1, 1)  # the unarchived one, with its index row
    assert _count(eng.store, instances) == 1
    _, found = findscu(arch, "IMAGE", {"StudyInstanceUID": "*", "SOPInstanceUID": ""}, model="-S",
                       out_dir=tmp_path / "find")
    assert len(found) == 1


def test_final_worklist_items_are_pruned_with_their_sealed_attributes(sqlite_store):
    from sqlalchemy import insert

    from engine.ops.retention import prune_worklist
    from engine.store.dicom.tables import worklist_items

    s, old = sqlite_store, time.time() - 40 * 86400
    with s.engine.begin() as c:
        for key, status in (("done", "COMPLETED"), ("gone", "CANCELLED"), ("todo", "SCHEDULED")):
            blob = s.put_blob(c, b"{}" * 200_000, f"worklist:{key}")
            c.execute(insert(worklist_items).values(item_key=key, status=status, blob_id=blob,
                                                    created_at=old, updated_at=old))
    assert prune_worklist(s, 60)[0] == 0
    n, files = prune_worklist(s, 30)
    assert n == 2 and len(files) == 2
    with s.engine.connect() as c:
        assert c.execute(select(worklist_items.c.item_key)).scalars().all() == ["todo"]
    assert _count(s, schema.blobs) == 1
