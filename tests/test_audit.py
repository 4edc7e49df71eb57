"""The audit trail in the store: receive and send rows written with the data they describe,
and the DICOM PS3.15 A.5 rendering of every kind of event."""

from __future__ import annotations

import base64
import json
from xml.etree import ElementTree as ET

import engine_fakes
import pytest
from sqlalchemy import select

from engine.audit.ps3_15 import classify, render
from engine.config import ConfigError, parse_settings
from engine.envelope import Envelope
from engine.store import schema

YAML = engine_fakes.collect_yaml(max_attempts=2)


def audit_rows(store, action=None):
    a = schema.audit_events
    q = select(a).order_by(a.c.id)
    if action:
        q = q.where(a.c.action == action)
    with store.engine.connect() as c:
        return [dict(r) for r in c.execute(q).mappings()]


def submit(eng, payload: bytes, key=None, headers=None):
    env = Envelope(channel="in", kind="hl7v2", payload=payload, peer="10.1.2.3:40000",
                   headers=headers or {"MSH-3": "LAB", "MSH-9.1": "ORU", "MSH-10": payload.decode()})
    return eng.call(eng.runtime.intake.submit(env, dedupe_key=key))


def test_receive_and_send_are_audited_with_the_message(engine_factory, store_url):
    engine_fakes.OUTBOX.pop("aud1", None)
    eng = engine_factory(YAML.format(url=store_url, name="aud1"))
    ids = [submit(eng, f"m{i}".encode(), key=f"k{i}").message_id for i in range(5)]
    dup = submit(eng, b"m0", key="k0")
    assert dup.status == "duplicate" and dup.message_id == ids[0]
    eng.wait_for(lambda: len(engine_fakes.OUTBOX.get("aud1", [])) == 5)
    eng.wait_for(lambda: len(audit_rows(eng.store, "message.send")) == 5)
    recv = audit_rows(eng.store, "message.receive")
    assert [r["message_id"] for r in recv] == [*ids, ids[0]]
    assert recv[0]["peer"] == "10.1.2.3:40000" and recv[0]["actor"] == "LAB" and recv[0]["channel"] == "in"
    assert recv[0]["entity"]["kind"] == "hl7v2" and recv[0]["entity"]["headers"]["MSH-10"] == "m0"
    assert recv[-1]["detail"] == "duplicate" and all(r["detail"] is None for r in recv[:-1])
    sent = audit_rows(eng.store, "message.send")
    assert sorted(r["message_id"] for r in sent) == sorted(ids)
    assert all(r["entity"]["route"] == "a" and r["entity"]["to"] == "test_collect" for r in sent)
    assert all(r["exported"] == 0 for r in recv + sent)
    assert audit_rows(eng.store, "engine.start")


def test_failed_send_is_not_audited_as_sent(engine_factory, store_url):
    engine_fakes.OUTBOX.pop("aud2", None)
    engine_fakes.SCRIPT["aud2"] = ["perm"]
    eng = engine_factory(YAML.format(url=store_url, name="aud2"))
    mid = submit(eng, b"bad").message_id
    eng.wait_for(lambda: audit_rows(eng.store, "delivery.dead_letter"))
    assert not [r for r in audit_rows(eng.store, "message.send") if r["message_id"] == mid]
    dl = audit_rows(eng.store, "delivery.dead_letter")[0]
    assert dl["outcome"] == "failure" and dl["message_id"] == mid


def test_receive_audit_is_in_the_commit(engine_factory, store_url):
    """A submission whose transaction fails leaves no receive event (the row shares the commit)."""
    eng = engine_factory(YAML.format(url=store_url, name="aud3"))

    def boom(conn, env):
        raise RuntimeError("index failed")

    env = Envelope(channel="in", kind="hl7v2", payload=b"x", headers={})
    out = eng.call(eng.runtime.intake.submit(env, tx_hook=boom))
    assert out.status == "error"
    assert not [r for r in audit_rows(eng.store, "message.receive") if r["message_id"] == env.id]


def test_audit_config_is_validated(tmp_path):
    bad = """
channels: {}
audit: {syslog: {host: audit.example, port: 6514, tls: {ca: ca.pem, nope: 1}}}
"""
    with pytest.raises(ConfigError) as e:
        parse_settings(bad, tmp_path / "c.yaml", env={})
    assert "audit.syslog.tls.nope" in str(e.value)
    ok = parse_settings("channels: {}\naudit: {syslog: {host: a.example}, site_id: HOSP1}\n",
                        tmp_path / "c.yaml", env={})
    assert ok.audit.syslog.port == 6514 and ok.audit.syslog.transport == "tls" and ok.audit.site_id == "HOSP1"


# -- PS3.15 A.5 rendering ---------------------------------------------------------------
def row(action, **kw):
    base = {"id": 1, "at": 1_700_000_000.25, "action": action, "outcome": "success", "actor": "",
            "peer": "", "channel": "ch", "message_id": None, "entity": None, "detail": None}
    return {**base, **kw}


def parse(xml: bytes) -> ET.Element:
    root = ET.fromstring(xml)
    assert root.tag == "AuditMessage"
    tags = [c.tag for c in root]
    # schema order: EventIdentification, ActiveParticipant+, AuditSourceIdentification, ParticipantObject*
    assert tags[0] == "EventIdentification"
    n_ap = tags.count("ActiveParticipant")
    assert n_ap >= 1 and tags[1:1 + n_ap] == ["ActiveParticipant"] * n_ap
    assert tags[1 + n_ap] == "AuditSourceIdentification"
    assert set(tags[2 + n_ap:]) <= {"ParticipantObjectIdentification"}
    ev = root[0]
    assert ev.get("EventDateTime") == "2023-11-14T22:13:20.250Z"
    assert ev.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    assert ev.get("EventActionCode") in ("C", "R", "U", "D", "E")
    eid = ev.find("EventID")
    assert eid is not None and eid.get("codeSystemName") == "DCM" and eid.get("originalText")
    for ap in root.findall("ActiveParticipant"):
        assert ap.get("UserID") and ap.get("UserIsRequestor") in ("true", "false")
        for rc in ap.findall("RoleIDCode"):
            assert rc.get("csd-code") and rc.get("codeSystemName") and rc.get("originalText")
    src = root.find("AuditSourceIdentification")
    assert src.get("AuditSourceID") == "pacs-gw-1"
    for po in root.findall("ParticipantObjectIdentification"):
        kids = [c.tag for c in po]
        assert kids[0] == "ParticipantObjectIDTypeCode" and kids[1] in ("ParticipantObjectName",
                                                                          "ParticipantObjectQuery")
        assert po.get("ParticipantObjectID")
    return root


def event_id(root):
    return root.find("EventIdentification/EventID").get("csd-code")


def test_render_receive_dicom_instances_transferred():
    r = row("message.receive", actor="CT01", peer="10.0.0.7:51000", message_id="abc123",
            entity={"kind": "dicom", "headers": {"CallingAETitle": "CT01", "StudyInstanceUID": "1.2.3",
                                                 "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}})
    root = parse(render(r, source_id="pacs-gw-1", host="gw1"))
    assert event_id(root) == "110104" and root[0].get("EventActionCode") == "C"
    src, dst = root.findall("ActiveParticipant")
    assert src.get("UserID") == "CT01" and src.get("UserIsRequestor") == "true"
    assert src.get("NetworkAccessPointID") == "10.0.0.7" and src.get("NetworkAccessPointTypeCode") == "2"
    assert src.find("RoleIDCode").get("csd-code") == "110153"
    assert dst.find("RoleIDCode").get("csd-code") == "110152" and dst.get("UserIsRequestor") == "false"
    objs = {po.find("ParticipantObjectIDTypeCode").get("csd-code"): po
            for po in root.findall("ParticipantObjectIdentification")}
    assert objs["message-id"].get("ParticipantObjectID") == "abc123"
    assert objs["110180"].get("ParticipantObjectID") == "1.2.3"
    assert objs["110180"].find("ParticipantObjectDescription/SOPClass").get("UID") == "1.2.840.10008.5.1.4.1.1.2"
    details = {d.get("type"): base64.b64decode(d.get("value")).decode()
               for d in objs["message-id"].findall("ParticipantObjectDetail")}
    assert details["header.CallingAETitle"] == "CT01"


@pytest.mark.parametrize("action,kind,code,act", [
    ("message.receive", "hl7v2", "110107", "C"),
    ("message.send", "hl7v2", "110106", "R"),
    ("message.send", "dicom", "110104", "R"),
    ("engine.start", None, "110100", "E"),
    ("keys.rotate", None, "110113", "E"),
    ("config.change", None, "110113", "E"),
    ("security.integrity_failure", None, "110113", "E"),
    ("login.failure", None, "110114", "E"),
    ("dicom.association", None, "110113", "E"),
    ("dicom.find", None, "110112", "E"),
    ("fhir.search", None, "110112", "E"),
    ("dicom.move", None, "110104", "R"),
    ("dicom.get", None, "110104", "R"),
    ("dicom.worklist_find", None, "110112", "E"),
    ("deid.apply", None, "110106", "E"),
    ("fhir.read", None, "110110", "R"),
    ("fhir.create", None, "110110", "C"),
    ("message.export", None, "110106", "R"),
    ("transform.deidentify", None, "110106", "E"),
])
def test_every_action_maps_to_a_dcm_event(action, kind, code, act):
    ev = classify(action, kind)
    assert (ev.event_id.code, ev.action_code) == (code, act)
    entity = {"kind": kind} if kind else {"type": "Patient", "params": "name"}
    root = parse(render(row(action, actor="someone", peer="[::1]:4000", entity=entity, message_id="m1",
                            outcome="failure", detail="why"), source_id="pacs-gw-1", host="gw1"))
    assert root[0].get("EventOutcomeIndicator") == "4"
    assert root[0].find("EventOutcomeDescription").text == "why"


def test_render_query_carries_the_query():
    r = row("fhir.search", actor="bearer:abc", peer="127.0.0.1:5000",
            entity={"type": "Patient", "params": "identifier,_count"})
    root = parse(render(r, source_id="pacs-gw-1"))
    q = root.find("ParticipantObjectIdentification")
    assert q.get("ParticipantObjectTypeCodeRole") == "24"
    assert json.loads(base64.b64decode(q.find("ParticipantObjectQuery").text)) == r["entity"]


def test_render_escapes_hostile_values():
    r = row("login.failure", actor='"><script>', peer="evil", detail="<x>&</x>")
    root = parse(render(r, source_id="pacs-gw-1"))
    assert root.find("ActiveParticipant").get("UserID") == '"><script>'
    assert root[0].find("EventOutcomeDescription").text == "<x>&</x>"
