"""The blind index of messages: what is read from each kind, that a search needs no decryption,
that older messages are filled in by reindex, that retention removes the terms, and that
`medrelay messages list` takes the same filters as the API (same query code)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import engine_fakes
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import delete, func, select, update

from engine.envelope import Envelope
from engine.messages import MessageFilter, query_messages
from engine.ops.retention import prune_channel_batch
from engine.store import message_terms as mt
from engine.store import schema
from engine.store.attempts import delivery_attempts

ORM = (b"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||ORM^O01|CTL-ORM-7|P|2.5\r"
       b"PID|1|EXT-9|MRN-1^^^HOSP^MR~NHS-55^^^NHS^NH||DOE^JANE||19800101|F\r"
       b"ORC|NW|PLC-1^HIS|FIL-1^RIS\r"
       b"OBR|1|PLC-1^HIS|FIL-1^RIS|CT^CT HEAD||||||||||||||ACC\\T\\42\r")


def test_hl7_identifiers_every_repetition_and_order_field():
    got = mt.identifiers("hl7v2", ORM, {})
    assert got["patient_id"] == {"MRN-1", "NHS-55", "EXT-9"}
    assert got["control_id"] == {"CTL-ORM-7"}
    assert got["accession"] == {"PLC-1", "FIL-1", "ACC&42"}  # OBR-18 unescaped (\T\ is &)
    assert got["study_uid"] == set()


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm",
                                  "rtplan.dcm"])
def test_dicom_identifiers_agree_with_pydicom(name):
    """The header scan (Little Endian) and the pydicom fallback (big endian) read what pydicom reads."""
    path = get_testdata_file(name)
    ds = dcmread(path)
    got = mt.identifiers("dicom", open(path, "rb").read(), {})
    assert got["patient_id"] == ({str(ds.PatientID)} if ds.get("PatientID") else set())
    assert got["accession"] == ({str(ds.AccessionNumber)} if ds.get("AccessionNumber") else set())
    assert got["study_uid"] == {str(ds.StudyInstanceUID)}


def test_fhir_identifiers():
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "MRN-5"}]}},
        {"resource": {"resourceType": "ServiceRequest", "identifier": [
            {"type": {"coding": [{"code": "ACSN"}]}, "value": "ACC-5"}, {"value": "not-an-accession"}]}},
        {"resource": {"resourceType": "ImagingStudy", "identifier": [
            {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3.4"}]}}]}
    got = mt.identifiers("fhir", json.dumps(bundle).encode(), {})
    assert got["patient_id"] == {"MRN-5"} and got["accession"] == {"ACC-5"} and got["study_uid"] == {"1.2.3.4"}


def test_odd_bytes_index_nothing_but_never_fail():
    key = b"k" * 32
    for kind, payload in (("hl7v2", b"\xff\xfe garbage"), ("dicom", b"DICM" * 10), ("fhir", b"{not json")):
        assert mt.terms_of(key, kind, payload) == {mt.marker_term(key)}


YAML = engine_fakes.collect_yaml(max_attempts=1)


def submit(eng, payload: bytes) -> str:
    env = Envelope(channel="in", kind="hl7v2", payload=payload, headers={"MSH-9.1": "ORM", "MSH-10": "x"})
    out = eng.call(eng.runtime.intake.submit(env))
    assert out.status == "accepted"
    return out.message_id


def test_search_by_blind_terms_reindex_retention_and_cli(engine_factory, store_url):
    engine_fakes.OUTBOX.clear()
    eng = engine_factory(YAML.format(name="terms", url=store_url))
    store = eng.store
    mid = submit(eng, ORM)
    other = submit(eng, ORM.replace(b"MRN-1", b"MRN-2").replace(b"CTL-ORM-7", b"CTL-ORM-8"))
    eng.wait_for(lambda: len(engine_fakes.OUTBOX.get("terms", [])) == 2)

    def ids(**f) -> list[str]:
        return [r["id"] for r in query_messages(store, MessageFilter(**f)).rows]

    assert ids(patient_id="MRN-1") == [mid] and ids(patient_id="nhs-55") == [other, mid]
    assert ids(accession="ACC&42", patient_id="MRN-2") == [other]
    assert ids(control_id="CTL-ORM-8") == [other] and ids(study_uid="1.2") == []

    # a message stored before the index existed: found again once reindexed
    with store.engine.begin() as c:
        c.execute(delete(mt.message_terms).where(mt.message_terms.c.message_id == mid))
    assert ids(patient_id="MRN-1") == []
    with store.engine.connect() as c:
        assert mt.unindexed(c, store.keyring.hmac_key(mt.HMAC_KEY_NAME), 10) == [mid]
    assert mt.reindex(store) == 1 and mt.reindex(store) == 0
    assert ids(patient_id="MRN-1") == [mid]

    # the CLI: the same filters through the same query code
    env = {**os.environ, "MEDRELAY_PLUGINS": "engine_fakes", "PYTHONPATH": os.path.dirname(__file__)}
    r = subprocess.run([sys.executable, "-m", "engine.cli", "messages", "list", "-c", str(eng.config_path),
                        "--patient-id", "MRN-1", "--json"], capture_output=True, text=True, env=env, cwd=eng.data_dir)
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == [mid]
    r = subprocess.run([sys.executable, "-m", "engine.cli", "messages", "list", "-c", str(eng.config_path),
                        "-q", "jane", "--limit", "1"], capture_output=True, text=True, env=env, cwd=eng.data_dir)
    assert r.returncode == 0 and other in r.stdout and "next: --cursor" in r.stderr, r.stderr

    # the blind filters never decrypt: with every payload unreadable they still answer,
    # while content search (which must decrypt) finds nothing
    with store.engine.begin() as c:
        c.execute(update(schema.blobs).values(nonce=os.urandom(12)))
    assert ids(patient_id="MRN-1") == [mid]
    page = query_messages(store, MessageFilter(q="jane"))
    assert page.rows == [] and page.search["scanned"] == 2

    # retention takes the terms and the attempt history with the messages
    with store.engine.begin() as c:
        c.execute(update(schema.deliveries).values(state="done"))
    got, _ = prune_channel_batch(store, "in", 1, True, 100, now=time.time() + 3 * 86400)
    assert got.messages == 2
    with store.engine.connect() as c:
        assert c.execute(select(func.count()).select_from(mt.message_terms)).scalar() == 0
        assert c.execute(select(func.count()).select_from(delivery_attempts)).scalar() == 0


def test_content_search_is_bounded_in_rows(engine_factory):
    eng = engine_factory(YAML.format(name="bound", url="sqlite:///data/m.db"))
    for i in range(30):
        submit(eng, ORM.replace(b"CTL-ORM-7", f"C{i}".encode()))
    from engine.messages import SearchBounds

    page = query_messages(eng.store, MessageFilter(q="no such text"), bounds=SearchBounds(max_rows=10))
    assert page.rows == [] and page.search == {"scanned": 10, "matched": 0, "complete": False, "stopped": "rows"}
    assert page.next_cursor  # the next page goes on where this one stopped
    rest = query_messages(eng.store, MessageFilter(q="no such text"), cursor=page.next_cursor,
                          bounds=SearchBounds(max_rows=100))
    assert rest.search["scanned"] == 20 and rest.search["complete"] is True
    page = query_messages(eng.store, MessageFilter(q="DOE^JANE"), limit=5)
    assert len(page.rows) == 5 and page.search["stopped"] == "limit"


@pytest.mark.parametrize("payload", [
    ORM,
    ORM.replace(b"|^~\\&|", b"|^~\\&#|"),  # v2.7 truncation character in MSH-2
    b"MSH#*$%@#HIS#HOSP#RIS#RAD#20240102##ORM*O01#C\\%7#P#2.5\rPID#1##MRN$1*a*b~X2\r",  # other delimiters
    ("MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102||ADT^A01|CTL-U|P|2.5||||||UNICODE UTF-8\r"
     "PID|1||MRN-ÄÖ^^^HOSP^MR||MÜLLER^JÖRG\r").encode(),
    ("MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102||ADT^A01|CTL-L|P|2.5\rPID|1||MRN-é1||DOE\r").encode("latin-1"),
])
def test_terms_from_the_listeners_header_equal_terms_read_from_the_payload(payload):
    """Intake's terms use MSH-10/MSH-18 from the envelope headers the listener read (the header is not
    read a second time); they must be exactly what reading the payload's own header gives."""
    from engine.hl7.message import read_header

    key = b"k" * 32
    headers = read_header(payload).as_headers()
    assert mt.identifiers("hl7v2", payload, headers) == mt.identifiers("hl7v2", payload, {})
    assert mt.terms_of(key, "hl7v2", payload, headers) == mt.terms_of(key, "hl7v2", payload, {})
    assert len(mt.terms_of(key, "hl7v2", payload, headers)) >= 3  # marker, control id, a patient id
