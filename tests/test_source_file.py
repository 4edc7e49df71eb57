"""`source: {type: file}` (issue 15 item 1): folders of HL7 v2, DICOM Part 10 and FHIR JSON files.

Real engine, real folder, real intake; DICOM files from pydicom's test data; the claim
protocol proved at every crash point (the states a kill -9 leaves, rebuilt exactly) and
by killing `medrelay run` with SIGKILL while it works through a folder.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from engine.store import schema, sources
from engine.store.dicom import tables as dicom_tables
from engine.store.fhir import tables as fhir_tables
from listeners.file import INFLIGHT
from tests.conftest import stored_control_ids
from tests.dicom_peers import data_file


def hl7(cid: str, *, version: str = "2.5", mtype: str = "ADT^A01") -> bytes:
    return (f"MSH|^~\\&|LAB|HOSP|RIS|HOSP|20260101120000||{mtype}|{cid}|P|{version}\r"
            f"PID|1||MRN{cid}^^^HOSP^MR||Doe^Jane||19800101|F\r").encode()


def batch(cids: list[str]) -> bytes:
    body = b"".join(hl7(c) for c in cids)
    return (b"FHS|^~\\&|LAB|HOSP\rBHS|^~\\&|LAB|HOSP|||||||B1\r" + body
            + f"BTS|{len(cids)}\rFTS|1\r".encode())


def yaml(extra: str = "", *, path: str = "drop", dedupe: int = 0, ready: str = "immediate") -> str:
    return f"""
    channels:
      drop:
        dedupe_window: {dedupe}
        source: {{type: file, path: {path}, ready: {ready}, poll_interval: 0.1{extra}}}
    """


def rows(engine, channel: str = "drop") -> list:
    m = schema.messages
    with engine.store.engine.connect() as c:
        return c.execute(select(m.c.id, m.c.kind, m.c.headers, m.c.peer).where(m.c.channel == channel)
                         .order_by(m.c.received_at)).all()


@pytest.fixture
def folder_engine(engine_factory, tmp_path):
    """make(extra) -> (engine, drop folder): the folder is an absolute path under tmp_path."""
    n = [0]

    def make(extra: str = "", dedupe: int = 0, ready: str = "immediate"):
        n[0] += 1
        d = tmp_path / f"drop{n[0]}"
        d.mkdir()
        return engine_factory(yaml(extra, path=str(d), dedupe=dedupe, ready=ready)), d

    return make


def wait_empty(engine, d: Path, timeout: float = 30.0) -> None:
    def empty():
        left = [p for p in d.iterdir() if p.is_file()]
        inflight = [p for p in (d / INFLIGHT).iterdir() if p.name != ".lock"] if (d / INFLIGHT).exists() else []
        return not left and not inflight

    engine.wait_for(empty, timeout=timeout)


# -- what it takes, by content -----------------------------------------------------
def test_hl7_single_batch_dicom_fhir_by_content_then_moved(folder_engine):
    e, d = folder_engine()
    ct = data_file("CT_small.dcm").read_bytes()
    # names say nothing about content: a DICOM file called .hl7, HL7 called .txt
    (d / "a.hl7").write_bytes(ct)
    (d / "b.txt").write_bytes(hl7("S1"))
    (d / "c.dat").write_bytes(batch(["B1", "B2", "B3"]))
    patient = {"resourceType": "Patient", "name": [{"family": "Doe"}], "gender": "female"}
    (d / "d.json.in").write_bytes(json.dumps(patient).encode())
    wait_empty(e, d)
    got = rows(e)
    kinds = sorted(r.kind for r in got)
    assert kinds == ["dicom", "fhir", "hl7v2", "hl7v2", "hl7v2", "hl7v2"]
    assert sorted(r.headers.get("MSH-10") for r in got if r.kind == "hl7v2") == ["B1", "B2", "B3", "S1"]
    assert {r.headers.get("batch") for r in got if r.headers.get("MSH-10", "").startswith("B")} == {"B1"}
    assert sorted(p.name for p in (d / "done").iterdir()) == ["a.hl7", "b.txt", "c.dat", "d.json.in"]
    assert not (d / "error").exists() or not list((d / "error").iterdir())
    with e.store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(dicom_tables.instances)).scalar() == 1
        assert c.execute(select(func.count()).select_from(fhir_tables.fhir_resources)).scalar() == 1
        assert c.execute(select(func.count()).select_from(sources.source_marks)).scalar() == 0  # finished
    # names never reach the store: not in peers, headers or audit rows
    for r in got:
        assert r.peer == "file"
        assert not any(n in json.dumps(dict(r.headers)) for n in ("a.hl7", "b.txt", "c.dat", "d.json"))


def test_refused_files_go_to_error_with_a_report_and_good_ones_are_unaffected(folder_engine):
    e, d = folder_engine(", accept_versions: ['2.5']")
    (d / "bad-version.hl7").write_bytes(hl7("V1", version="2.3"))
    (d / "mixed.hl7").write_bytes(hl7("M1") + hl7("M2", version="2.4") + hl7("M3"))
    (d / "junk.bin").write_bytes(bytes(range(256)) * 4)
    (d / "bad.json").write_bytes(b'{"resourceType": "Patient", "gender": "robot"}')
    (d / "good.hl7").write_bytes(hl7("G1"))
    wait_empty(e, d)
    err = d / "error"
    names = sorted(p.name for p in err.iterdir())
    assert names == sorted(["bad-version.hl7", "bad-version.hl7.error.txt", "mixed.hl7", "mixed.hl7.error.txt",
                            "junk.bin", "junk.bin.error.txt", "bad.json", "bad.json.error.txt"])
    report = (err / "mixed.hl7.error.txt").read_text()
    assert "message 2 (MSH-10 M2): AR 203" in report and "message 1" not in report
    assert "not HL7 v2, DICOM Part 10 or FHIR JSON" in (err / "junk.bin.error.txt").read_text()
    assert "FHIR 400" in (err / "bad.json.error.txt").read_text()
    assert [p.name for p in (d / "done").iterdir()] == ["good.hl7"]
    # the good messages of the mixed file were committed; the refused one was not
    assert sorted(r.headers["MSH-10"] for r in rows(e)) == ["G1", "M1", "M3"]
    assert (err / "bad-version.hl7").read_bytes() == hl7("V1", version="2.3")  # moved untouched


def test_a_file_still_being_written_is_not_taken_until_its_size_is_stable(folder_engine):
    # stable_seconds 3 against a byte every 0.2 s: a writer stalled by a loaded machine (it shares
    # the GIL with the engine's thread) must not make the file look stable
    e, d = folder_engine(", stable_seconds: 3.0", ready="stable")
    f = d / "growing.hl7"
    msg = hl7("W1")
    with open(f, "wb") as out:
        out.write(msg[:20])
        out.flush()
        t_end = time.monotonic() + 2.5
        i = 20
        while time.monotonic() < t_end:  # a byte every 0.2 s: never stable for 3 s
            if i < len(msg) - 1:
                out.write(msg[i:i + 1])
                out.flush()
                i += 1
            time.sleep(0.2)
            assert f.exists(), "taken while still growing"
        out.write(msg[i:])
    wait_empty(e, d)
    assert [r.headers["MSH-10"] for r in rows(e)] == ["W1"]  # whole, not a truncated message


def test_marker_mode_waits_for_the_marker_and_removes_it(folder_engine):
    e, d = folder_engine(", pattern: '*.hl7'", ready="marker")
    (d / "x.hl7").write_bytes(hl7("K1"))
    (d / "y.txt").write_bytes(hl7("K2"))  # not the pattern: never taken
    time.sleep(1.0)
    assert (d / "x.hl7").exists() and not rows(e)
    (d / "x.hl7.done").write_bytes(b"")
    e.wait_for(lambda: rows(e))
    e.wait_for(lambda: not (d / "x.hl7").exists() and not (d / "x.hl7.done").exists())
    assert [r.headers["MSH-10"] for r in rows(e)] == ["K1"]
    assert (d / "y.txt").exists()


def test_after_delete_and_name_clash_in_done(folder_engine):
    e, d = folder_engine()
    (d / "done").mkdir(exist_ok=True)
    (d / "done" / "same.hl7").write_bytes(b"already here")
    (d / "same.hl7").write_bytes(hl7("N1"))
    wait_empty(e, d)
    done = sorted(p.name for p in (d / "done").iterdir())
    assert len(done) == 2 and "same.hl7" in done
    other = next(p for p in done if p != "same.hl7")
    assert other.startswith("same.") and other.endswith(".hl7")  # the claim id before the extension
    assert (d / "done" / "same.hl7").read_bytes() == b"already here"
    e2, d2 = folder_engine(", after: delete")
    (d2 / "gone.hl7").write_bytes(hl7("D1"))
    wait_empty(e2, d2)
    assert not (d2 / "done").exists() or not list((d2 / "done").iterdir())
    assert [r.headers["MSH-10"] for r in rows(e2)] == ["D1"]


def test_oversized_file_goes_to_error_unread(folder_engine):
    e, d = folder_engine(", max_file_bytes: 2048")
    (d / "big.hl7").write_bytes(hl7("L1") + b"NTE|1||" + b"x" * 4096 + b"\r")
    wait_empty(e, d)
    assert "larger than max_file_bytes" in (d / "error" / "big.hl7.error.txt").read_text()
    assert not rows(e)


# -- the claim protocol at each crash point ----------------------------------------
def _crash_state(d: Path, name: str, data: bytes, claim: str) -> None:
    """What a claim leaves in flight: the record, then the file renamed into the folder."""
    inf = d / INFLIGHT
    inf.mkdir(exist_ok=True)
    (inf / f"{claim}.json").write_text(json.dumps({"name": name, "claimed_at": time.time(), "size": len(data)}))
    (inf / claim).write_bytes(data)


def test_every_crash_point_recovers_without_loss_or_duplicate(engine_factory, tmp_path):
    """Run 1 commits a file's messages and is stopped before the move (the state kill -9 leaves
    after the commit); run 2 must answer them as duplicates of what they became (marks, with
    intake's own dedupe switched off) and finish the file; a claim record whose file was
    already moved is removed; a claimed, uncommitted file is committed."""
    d = tmp_path / "crash"
    d.mkdir()
    cfg = yaml(path=str(d))
    e1 = engine_factory(cfg)
    lst = e1.runtime.listener("drop")
    e1.call(lst.stop())  # no polling: this test drives the protocol step by step
    (d / "one.hl7").write_bytes(hl7("X1") + hl7("X2"))
    (entry,) = e1.call(lst.folder.files(str(d)))
    claim = e1.call(lst._claim(entry))
    verdict = e1.call(lst._commit(claim))  # committed; the engine "dies" before _finish
    assert verdict.state == "done"
    first = {r.headers["MSH-10"]: r.id for r in rows(e1)}
    assert sorted(first) == ["X1", "X2"]
    with e1.store.engine.connect() as c:
        assert sources.marks_of(c, "drop", claim.id + ":") == {f"{claim.id}:0": first["X1"],
                                                                f"{claim.id}:1": first["X2"]}
    e1.stop()
    # two more crash points: claimed but not committed; moved but record left
    _crash_state(d, "two.hl7", hl7("Y1"), "0000000000000001-aaaaaaaaaaaa")
    (d / INFLIGHT / "0000000000000002-bbbbbbbbbbbb.json").write_text('{"name": "moved.hl7"}')
    assert (d / INFLIGHT / claim.id).exists() and not (d / "one.hl7").exists()
    from tests.conftest import EngineThread

    e3 = EngineThread(cfg, e1.data_dir)
    try:
        wait_empty(e3, d)
        got = sorted((r.headers["MSH-10"], r.id) for r in rows(e3))
        assert [m for m, _ in got] == ["X1", "X2", "Y1"]  # X1, X2 once: the recovery was a duplicate
        assert dict(got)["X1"] == first["X1"]
        assert sorted(p.name for p in (d / "done").iterdir()) == ["one.hl7", "two.hl7"]
        assert not [p for p in (d / INFLIGHT).iterdir() if p.name != ".lock"]
        with e3.store.engine.connect() as c:
            assert c.execute(select(func.count()).select_from(sources.source_marks)).scalar() == 0
            dup = c.execute(select(func.count()).select_from(schema.audit_events).where(
                schema.audit_events.c.detail == "duplicate")).scalar()
        assert dup == 2
    finally:
        e3.stop()


def test_a_second_engine_on_the_same_folder_is_refused(engine_factory, tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    engine_factory(yaml(path=str(d)))
    with pytest.raises(Exception, match="another medrelay engine"):
        engine_factory(yaml(path=str(d)))


# -- kill -9 ------------------------------------------------------------------------
@pytest.mark.slow
def test_kill9_at_random_moments_loses_no_file_and_takes_none_twice(medrelay_proc, tmp_path):
    """60 files of 5 messages; `medrelay run` killed with SIGKILL four times while it works
    through them, then left to finish: every message stored exactly once (intake's own
    dedupe off: only the claim protocol protects), every file in done/, none left anywhere."""
    d = tmp_path / "killdrop"
    d.mkdir()
    n_files, per = 60, 5
    for i in range(n_files):
        (d / f"f{i:03d}.hl7").write_bytes(b"".join(hl7(f"K{i:03d}-{j}") for j in range(per)))
    p = medrelay_proc(f"""
    store: {{url: "sqlite:///db.sqlite"}}
    channels:
      drop:
        dedupe_window: 0
        source: {{type: file, path: {d}, ready: immediate, poll_interval: 0.05}}
    """)
    db = p.data_dir / "db.sqlite"
    rng = random.Random(15)
    total = n_files * per
    for _ in range(4):
        p.start()
        before = len(stored_control_ids(db))
        deadline = time.monotonic() + 60
        target = before + rng.randint(3, 40)
        while len(stored_control_ids(db)) < min(target, total) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(rng.random() * 0.05)
        p.kill9()
    p.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        left = [x for x in d.iterdir() if x.is_file()]
        inflight = [x for x in (d / INFLIGHT).iterdir() if x.name != ".lock"]
        if not left and not inflight and len(stored_control_ids(db)) >= total:
            break
        time.sleep(0.2)
    assert p.terminate() == 0
    got = stored_control_ids(db)
    dupes = {m for m in got if got.count(m) > 1}
    assert not dupes, f"taken twice: {sorted(dupes)[:10]}"
    assert sorted(got) == sorted(f"K{i:03d}-{j}" for i in range(n_files) for j in range(per))
    assert len(list((d / "done").iterdir())) == n_files
    assert not [x for x in (d / INFLIGHT).iterdir() if x.name != ".lock"]
