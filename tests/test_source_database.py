"""`source: {type: database}` (issue 15 item 3) against the real PostgreSQL the tests start.

The source rows live in a table of their own in the PostgreSQL test database
(MEDRELAY_TEST_PG_URL); medrelay's own store is SQLite (one test puts both on PostgreSQL).
The kill -9 test kills `medrelay run` with SIGKILL in the middle of polling, several
times, and then checks that every row became exactly one message.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time

import pytest
from sqlalchemy import create_engine, func, select, text

from engine.hl7.message import field, read_header
from engine.store import schema, sources
from engine.store.fhir import tables as fhir_tables
from tests.conftest import IN_CI, stored_control_ids

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_url():
    url = os.environ.get("MEDRELAY_TEST_PG_URL")
    if not url:
        if IN_CI:
            pytest.fail("MEDRELAY_TEST_PG_URL not set: PostgreSQL is required under CI")
        pytest.skip("PostgreSQL not available (run scripts/test.sh)")
    return url


@pytest.fixture
def source_table(pg_url):
    """A fresh table of lab results in PostgreSQL: (name, engine)."""
    name = f"lab_src_{secrets.token_hex(4)}"
    eng = create_engine(pg_url)
    with eng.begin() as c:
        c.execute(text(f"CREATE TABLE {name} (id SERIAL PRIMARY KEY, mrn TEXT NOT NULL, family TEXT, "
                       "result TEXT, gender TEXT, taken TIMESTAMPTZ DEFAULT now(), sent BOOLEAN DEFAULT false)"))
    yield name, eng
    with eng.begin() as c:
        c.execute(text(f"DROP TABLE IF EXISTS {name}"))
    eng.dispose()


def add_rows(eng, table: str, rows: list[dict]) -> None:
    with eng.begin() as c:
        for r in rows:
            c.execute(text(f"INSERT INTO {table} (mrn, family, result, gender) VALUES (:mrn, :family, :result, "
                           ":gender)"), {"gender": "female", "family": "Doe", "result": "1", **r})


HL7_OUT = """
          output: hl7v2
          hl7:
            message_type: ORU^R01
            sending_application: LIS
            sending_facility: LAB
            fields:
              PID-3.1: "{mrn}"
              PID-5.1: "{family}"
              OBR-7: "{taken}"
              OBX-1: "1"
              OBX-5: "{result}"
"""


def _yaml(table: str, body: str, store: str = "sqlite:///db.sqlite", extra: str = "") -> str:
    return f"""
    store: {{url: "{store}"}}
    channels:
      lis:
        dedupe_window: 0
        source:
          type: database
          url: "${{LIS_DB_URL}}"
          table: {table}
          key: id
          poll_interval: 0.1{extra}
{body}
    """


def _messages(e, channel: str = "lis") -> list:
    m = schema.messages
    with e.store.engine.connect() as c:
        out = []
        for r in c.execute(select(m.c.id, m.c.kind, m.c.headers).where(m.c.channel == channel)
                           .order_by(m.c.received_at)).all():
            out.append((r, e.store.message_payload(c, r.id)))
        return out


def _marks(e) -> dict[str, str]:
    with e.store.engine.connect() as c:
        return sources.marks_of(c, "lis")


def test_cursor_rows_become_hl7_messages_escaped_and_the_cursor_moves_with_them(engine_factory, source_table,
                                                                                pg_url):
    table, eng = source_table
    add_rows(eng, table, [{"mrn": "M1", "family": "O|Brien^Jr", "result": "5.2&more"},
                          {"mrn": "M2", "family": "Ünal", "result": "7"}])
    e = engine_factory(_yaml(table, HL7_OUT), env={"LIS_DB_URL": pg_url})
    e.wait_for(lambda: len(_messages(e)) == 2)
    (r1, p1), (r2, p2) = _messages(e)
    assert r1.kind == "hl7v2" and r1.headers["MSH-9"] == "ORU^R01" and r1.headers["MSH-3"] == "LIS"
    assert field(p1, "PID-3.1") == "M1" and field(p2, "PID-3.1") == "M2"
    assert b"O\\F\\Brien\\S\\Jr" in p1 and b"5.2\\T\\more" in p1  # escaped, not split into fields
    assert field(p1, "PID-5.1") == "O|Brien^Jr" and field(p2, "PID-5.1") == "Ünal"
    assert read_header(p2).charset == "UNICODE UTF-8"
    assert len(field(p1, "OBR-7")) >= 14  # the time as HL7 DTM
    with e.store.engine.connect() as c:
        assert sources.read_cursor(c, "lis") == 2
    add_rows(eng, table, [{"mrn": "M3"}])
    e.wait_for(lambda: len(_messages(e)) == 3)
    with e.store.engine.connect() as c:
        assert sources.read_cursor(c, "lis") == 3
    time.sleep(0.5)
    assert len(_messages(e)) == 3  # polled again and again: nothing read twice


def test_fhir_template_rows_are_created_in_the_fhir_store(engine_factory, source_table, pg_url):
    table, eng = source_table
    add_rows(eng, table, [{"mrn": "F1", "family": "Rowe"}, {"mrn": "F2", "family": "Park", "gender": "male"}])
    body = """
          output: fhir
          fhir: create
          fhir_template:
            resourceType: Patient
            identifier: [{system: "urn:oid:1.2.3", value: "{mrn}"}]
            name: [{family: "{family}", text: "{family}, patient {mrn}"}]
            gender: "{gender}"
"""
    e = engine_factory(_yaml(table, body), env={"LIS_DB_URL": pg_url})
    e.wait_for(lambda: len(_messages(e)) == 2)
    (r1, p1), _ = _messages(e)
    doc = json.loads(p1)
    assert doc["identifier"][0]["value"] == "F1" and doc["name"][0]["text"] == "Rowe, patient F1"
    assert r1.headers["resourceType"] == "Patient"
    with e.store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(fhir_tables.fhir_resources)).scalar() == 2


def test_json_envelope_is_a_valid_fhir_parameters_resource(engine_factory, source_table, pg_url):
    from fhir.resources.R4B.parameters import Parameters

    table, eng = source_table
    add_rows(eng, table, [{"mrn": "J1", "result": None}])
    e = engine_factory(_yaml(table, "          output: json\n"), env={"LIS_DB_URL": pg_url})
    e.wait_for(lambda: len(_messages(e)) == 1)
    ((r, p),) = _messages(e)
    doc = json.loads(p)
    Parameters.model_validate(doc)
    by = {x["name"]: x for x in doc["parameter"]}
    assert by["id"]["valueInteger"] == 1 and by["mrn"]["valueString"] == "J1" and by["sent"]["valueBoolean"] is False
    assert "T" in by["taken"]["valueDateTime"] and "value" not in json.dumps(by["result"])


def test_update_mode_marks_rows_done_in_the_source(engine_factory, source_table, pg_url):
    table, eng = source_table
    add_rows(eng, table, [{"mrn": f"U{i}"} for i in range(5)])
    body = f"""
          mode: update
          where: "sent = false"
          update: "UPDATE {table} SET sent = true WHERE id = :key"
          batch_size: 2
""" + HL7_OUT
    e = engine_factory(_yaml(table, body), env={"LIS_DB_URL": pg_url})
    e.wait_for(lambda: len(_messages(e)) == 5)
    with eng.connect() as c:
        e.wait_for(lambda: c.execute(text(f"SELECT count(*) FROM {table} WHERE sent")).scalar() == 5)
    e.wait_for(lambda: _marks(e) == {})  # cleared after the source's UPDATE has committed, not with it
    time.sleep(0.5)
    assert sorted(field(p, "PID-3.1") for _, p in _messages(e)) == [f"U{i}" for i in range(5)]


def test_update_mode_row_read_again_after_a_crash_is_a_duplicate(engine_factory, source_table, pg_url, tmp_path):
    """The state a kill -9 between the commit and the source's update leaves: the mark is there,
    the row is not updated. Read again, it is answered as a duplicate and only updated."""
    table, eng = source_table
    add_rows(eng, table, [{"mrn": "R1"}])
    body = f"""
          mode: update
          where: "sent = false"
          update: "UPDATE {table} SET sent = true WHERE id = :key"
""" + HL7_OUT
    e = engine_factory(_yaml(table, body), env={"LIS_DB_URL": pg_url})
    e.wait_for(lambda: len(_messages(e)) == 1)
    e.stop()
    mid = _messages(e)[0][0].id
    with eng.begin() as c:  # undo the update: as if the engine died before it
        c.execute(text(f"UPDATE {table} SET sent = false"))
    with e.store.engine.begin() as c:
        sources.mark(c, "lis", 'row:1', mid)
    from tests.conftest import EngineThread

    e2 = EngineThread(_yaml(table, body), e.data_dir, {"LIS_DB_URL": pg_url})
    try:
        with eng.connect() as c:
            e2.wait_for(lambda: c.execute(text(f"SELECT sent FROM {table}")).scalar() is True)
        assert [r.id for r, _ in _messages(e2)] == [mid]
        e2.wait_for(lambda: _marks(e2) == {})  # cleared after the source's UPDATE has committed
    finally:
        e2.stop()


def test_a_refused_row_stops_the_feed_or_is_skipped_and_audited(engine_factory, source_table, pg_url):
    table, eng = source_table
    add_rows(eng, table, [{"mrn": "S1"}, {"mrn": "S2", "gender": "robot"}, {"mrn": "S3"}])
    body = """
          output: fhir
          fhir: create
          fhir_template: {resourceType: Patient, identifier: [{value: "{mrn}"}], gender: "{gender}"}
"""
    e = engine_factory(_yaml(table, body), env={"LIS_DB_URL": pg_url})
    e.wait_for(lambda: len(_messages(e)) == 1)
    time.sleep(0.8)
    assert len(_messages(e)) == 1  # stopped at S2, S3 not passed ahead of it
    with e.store.engine.connect() as c:
        assert sources.read_cursor(c, "lis") == 1
    e2 = engine_factory(_yaml(table, body, extra="\n          on_error: skip"), env={"LIS_DB_URL": pg_url})
    e2.wait_for(lambda: len(_messages(e2)) == 2)
    assert [json.loads(p)["identifier"][0]["value"] for _, p in _messages(e2)] == ["S1", "S3"]
    with e2.store.engine.connect() as c:
        skipped = c.execute(select(schema.audit_events.c.detail)
                            .where(schema.audit_events.c.action == "source.row_skipped")).scalars().all()
        assert sources.read_cursor(c, "lis") == 3
    assert len(skipped) == 1 and skipped[0].startswith("key 2: FHIR 400")


def test_query_source_and_store_on_postgresql_too(engine_factory, source_table, pg_url):
    """Both on PostgreSQL (medrelay's store in the same database): a query instead of a table."""
    table, eng = source_table
    from tests.conftest import _reset_pg

    _reset_pg(pg_url)  # the store's tables are made fresh; the source table goes with them, so again:
    with eng.begin() as c:
        c.execute(text(f"CREATE TABLE {table} (id SERIAL PRIMARY KEY, mrn TEXT NOT NULL, family TEXT, "
                       "result TEXT, gender TEXT, taken TIMESTAMPTZ DEFAULT now(), sent BOOLEAN DEFAULT false)"))
    add_rows(eng, table, [{"mrn": "Q1", "result": "pos"}, {"mrn": "Q2", "result": "neg"},
                          {"mrn": "Q3", "result": "pos"}])
    text_yaml = f"""
    store: {{url: "{pg_url}"}}
    channels:
      lis:
        source:
          type: database
          url: "${{LIS_DB_URL}}"
          query: "SELECT id, mrn FROM {table} WHERE result = 'pos'"
          key: id
          poll_interval: 0.1
          output: json
    """
    e = engine_factory(text_yaml, env={"LIS_DB_URL": pg_url})
    e.wait_for(lambda: len(_messages(e)) == 2)
    got = [{x["name"]: x for x in json.loads(p)["parameter"]}["mrn"]["valueString"] for _, p in _messages(e)]
    assert got == ["Q1", "Q3"]


# -- kill -9 mid-poll ----------------------------------------------------------------
@pytest.mark.slow
def test_kill9_mid_poll_never_reads_a_row_twice_nor_skips_one(medrelay_proc, source_table, pg_url):
    table, eng = source_table
    n = 400
    add_rows(eng, table, [{"mrn": f"K{i:04d}"} for i in range(n)])
    body = """
          batch_size: 25
          output: hl7v2
          hl7:
            message_type: ADT^A08
            fields:
              MSH-10: "ROW{id}"
              PID-3.1: "{mrn}"
"""
    p = medrelay_proc(_yaml(table, body), env={"LIS_DB_URL": pg_url})
    db = p.data_dir / "db.sqlite"
    rng = random.Random(1515)
    for _ in range(4):
        p.start()
        before = len(stored_control_ids(db))
        target = min(before + rng.randint(10, 80), n)
        deadline = time.monotonic() + 60
        while len(stored_control_ids(db)) < target and time.monotonic() < deadline:
            time.sleep(0.005)
        p.kill9()
    p.start()
    deadline = time.monotonic() + 120
    while len(stored_control_ids(db)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # a few more polls: nothing more may come
    assert p.terminate() == 0
    got = stored_control_ids(db)
    assert len(got) == len(set(got)), "a row read twice"
    assert sorted(got) == sorted(f"ROW{i}" for i in range(1, n + 1)), "a row skipped"
