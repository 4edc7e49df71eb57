"""FHIR Binary and DocumentReference (issue 13 item 3): large attachments as blobs, streamed.

Real peers only: httpx against a `medrelay run` subprocess (so its peak RSS can be read from
/proc), the in-process FHIR listener of tests/fhir_support.py for search, and the raw-socket
MLLP client of tests/mllp_peers.py for the ORU -> FHIR route. fhir.resources (R4B) validates
what the server returns.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path

import httpx
import pytest
from fhir.resources.R4B.binary import Binary
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.documentreference import DocumentReference
from fhir.resources.R4B.operationoutcome import OperationOutcome
from fhir_support import TOKEN, FhirServer
from mllp_peers import RawClient, msa
from ports import free_port

MIB = 1024 * 1024
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def pdf_bytes(size: int, seed: bytes = b"x") -> bytes:
    """A PDF-looking payload of ``size`` bytes; content from SHA-256 so no two chunks are alike."""
    head = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(32768))  # 1 MiB
    body = (block * (size // len(block) + 1))[: size - len(head) - 6]
    return head + body + b"\n%%EOF"


def vm_hwm(pid: int) -> int:
    """Peak resident set of a process, bytes (VmHWM in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _yaml(url: str, port: int, **source: object) -> str:
    extra = "".join(f", {k}: {v}" for k, v in source.items())
    return f"""
store: {{url: "{url}", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  api:
    source: {{type: fhir, host: 127.0.0.1, port: {port}, auth: {{bearer_tokens: ["${{FHIR_TOKEN}}"]}}{extra}}}
    routes: []
"""


def _outcome(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text[:500]
    oo = OperationOutcome.model_validate(resp.json())
    assert oo.issue[0].code == code


def test_binary_50mib_round_trip_streamed_with_bounded_memory(medrelay_proc, store_url):
    """POST 50 MiB raw -> GET raw byte-identical with its Content-Type, and as fhir+json with base64
    data; the engine's peak RSS grows far less than the copies a whole-body path would make; the
    bytes are a blob of their own (the resource JSON is small); bodies over the limit are 413."""
    url = "sqlite:///data/medrelay.db" if store_url.startswith("sqlite") else store_url
    port = free_port()
    proc = medrelay_proc(_yaml(url, port, max_binary_bytes=60 * MIB), env={"FHIR_TOKEN": TOKEN})
    proc.start()
    proc.wait_port(port)
    base = f"http://127.0.0.1:{port}/fhir"
    pdf = pdf_bytes(50 * MIB)
    with httpx.Client(base_url=base, headers=AUTH, timeout=120) as c:
        warm = c.post("/Binary", content=b"%PDF-1.0 small", headers={"Content-Type": "application/pdf"})
        assert warm.status_code == 201, warm.text
        c.get(warm.headers["location"].split("/fhir")[1].split("/_history")[0], headers={"Accept": "*/*"})
        baseline = vm_hwm(proc.proc.pid)

        r = c.post("/Binary", content=pdf, headers={"Content-Type": "application/pdf"})
        assert r.status_code == 201, r.text[:500]
        created = Binary.model_validate(r.json())
        assert created.contentType == "application/pdf" and created.data is None
        bid = created.id
        assert r.headers["location"].endswith(f"/Binary/{bid}/_history/1")

        digest, n = hashlib.sha256(), 0
        with c.stream("GET", f"/Binary/{bid}", headers={"Accept": "application/pdf"}) as resp:
            assert resp.status_code == 200
            assert resp.headers["content-type"] == "application/pdf"
            assert resp.headers["content-length"] == str(len(pdf))
            assert resp.headers["etag"] == 'W/"1"'
            for piece in resp.iter_bytes():
                digest.update(piece)
                n += len(piece)
        assert n == len(pdf) and digest.digest() == hashlib.sha256(pdf).digest()

        r = c.get(f"/Binary/{bid}", headers={"Accept": "application/fhir+json"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("application/fhir+json")
        doc = r.json()
        assert doc["id"] == bid and doc["meta"]["versionId"] == "1"
        assert base64.b64decode(doc["data"]) == pdf
        Binary.model_validate({k: v for k, v in doc.items() if k != "data"} | {"data": doc["data"][:4000]})
        del doc, r

        _outcome(c.get(f"/Binary/{bid}", headers={"Accept": "image/png"}), 406, "not-supported")
        # byte ranges across chunk boundaries (1 MiB chunks), the last bytes, past the end
        for rng, want in ((f"bytes={MIB - 5}-{3 * MIB + 4}", pdf[MIB - 5:3 * MIB + 5]), ("bytes=-10", pdf[-10:]),
                          (f"bytes={len(pdf) - 3}-", pdf[-3:])):
            r = c.get(f"/Binary/{bid}", headers={"Range": rng})
            assert r.status_code == 206 and r.content == want, rng
            assert r.headers["content-range"].endswith(f"/{len(pdf)}")
        r = c.get(f"/Binary/{bid}", headers={"Range": f"bytes={len(pdf)}-"})
        assert r.status_code == 416 and r.headers["content-range"] == f"bytes */{len(pdf)}"
        growth = vm_hwm(proc.proc.pid) - baseline

        # too large: declared (refused before reading) and chunked (refused once past the limit)
        big = 61 * MIB
        _outcome(c.post("/Binary", content=b"\0" * big, headers={"Content-Type": "application/pdf"}),
                 413, "too-long")

        def chunks():
            for _ in range(61):
                yield b"\0" * MIB

        _outcome(c.post("/Binary", content=chunks(), headers={"Content-Type": "application/pdf"}), 413, "too-long")
        assert c.get(f"/Binary/{bid}", headers={"Accept": "*/*"}).status_code == 200  # still serving


    print(f"VmHWM growth {growth / MIB:.0f} MiB")
    # measured 15-18 MiB since the bytes go to a BlobStream as they arrive (59 MiB while the ciphertext
    # was held whole for BlobFiles.write, ~105 MiB before pieces were sealed as they came)
    assert growth < 45 * MIB, f"VmHWM grew {growth / MIB:.0f} MiB"

    from sqlalchemy import create_engine, text
    eng = create_engine(url if not url.startswith("sqlite:///data") else f"sqlite:///{proc.data_dir}/data/medrelay.db")
    with eng.connect() as conn:
        rows = conn.execute(text("SELECT b.size, b.in_file FROM fhir_binary_data d JOIN blobs b ON b.id = d.blob_id "
                                 "WHERE d.id = :id"), {"id": bid}).all()
        assert rows == [(len(pdf), 1)]
        body = conn.execute(text("SELECT b.size FROM fhir_versions v JOIN blobs b ON b.id = v.blob_id "
                                 "WHERE v.id = :id"), {"id": bid}).scalar_one()
        assert body < 1024  # the resource JSON holds no data
    eng.dispose()


@pytest.fixture
def server(tmp_path):
    s = FhirServer(tmp_path / "fhir").start()
    yield s
    s.stop()


def test_binary_crud_negotiation_and_json_data(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        r = c.post("/Binary", json={"resourceType": "Binary", "contentType": "text/plain",
                                    "data": base64.b64encode(b"hello").decode()},
                   headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        bid = r.json()["id"]
        assert "data" not in r.json()
        r = c.get(f"/Binary/{bid}")  # no Accept: the content itself
        assert r.status_code == 200 and r.content == b"hello" and r.headers["content-type"] == "text/plain"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert c.get(f"/Binary/{bid}", headers={"Accept": "text/*"}).content == b"hello"

        # the same bytes again: no new version; other bytes: version 2, version 1 still readable
        r = c.put(f"/Binary/{bid}", content=b"hello", headers={"Content-Type": "text/plain"})
        assert r.status_code == 200 and r.headers["etag"] == 'W/"1"'
        r = c.put(f"/Binary/{bid}", content=b"hello again", headers={"Content-Type": "text/plain"})
        assert r.status_code == 200 and r.headers["etag"] == 'W/"2"'
        assert c.get(f"/Binary/{bid}/_history/1").content == b"hello"
        j = c.get(f"/Binary/{bid}/_history/2", params={"_format": "json"}).json()
        assert base64.b64decode(j["data"]) == b"hello again"
        Binary.model_validate(j)

        r = c.put("/Binary/client-id-1", content=b"\x00\x01", headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201
        # HEAD is a read (Starlette routes it with GET): it once fell through to DELETE
        r = c.head("/Binary/client-id-1")
        assert r.status_code == 200 and r.headers["content-length"] == "2" and r.content == b""
        assert c.head("/Binary", params={"_id": "client-id-1"}).status_code == 200
        assert c.get("/Binary/client-id-1").content == b"\x00\x01"
        pid = c.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Head"}]}).json()["id"]
        assert c.head(f"/Patient/{pid}").status_code == 200
        assert c.get(f"/Patient/{pid}").status_code == 200
        _outcome(c.post("/Binary", json={"resourceType": "Binary", "contentType": "x/y", "data": "!!"},
                        headers={"Content-Type": "application/fhir+json"}), 400, "invalid")
        assert c.delete(f"/Binary/{bid}").status_code == 204
        _outcome(c.get(f"/Binary/{bid}"), 410, "deleted")

        caps = c.get("/metadata").json()
        types = {r["type"]: r for r in caps["rest"][0]["resource"]}
        assert "Binary" in types and "DocumentReference" in types
        assert {"patient", "subject", "type", "date", "status", "identifier"} <= \
            {p["name"] for p in types["DocumentReference"]["searchParam"]}


def test_hostile_range_headers_are_answered_not_500(server):
    """Range values ``str.isdigit`` takes but ``int`` refuses ("²" as Latin-1 0xB2, 5 000 digits
    past Python's int limit) were a 500 (ValueError): now the whole content (a malformed range
    is ignored, RFC 9110 14.2) or 416 / a clamped 206 for huge positions."""
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        r = c.post("/Binary", content=b"0123456789", headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        bid = r.json()["id"]
        for rng in (b"bytes=\xb2-", b"bytes=0-\xb2", b"bytes=-\xb2", b"bytes=\xd9\xa1-"):
            r = c.get(f"/Binary/{bid}", headers={"Range": rng})
            assert r.status_code == 200 and r.content == b"0123456789", (rng, r.status_code, r.text[:200])
        big = "9" * 5000
        r = c.get(f"/Binary/{bid}", headers={"Range": f"bytes=2-{big}"})
        assert r.status_code == 206 and r.content == b"23456789"
        r = c.get(f"/Binary/{bid}", headers={"Range": f"bytes=-{big}"})
        assert r.status_code == 206 and r.content == b"0123456789"
        r = c.get(f"/Binary/{bid}", headers={"Range": f"bytes={big}-"})
        assert r.status_code == 416 and r.headers["content-range"] == "bytes */10"


def test_binary_whose_content_type_a_header_cannot_carry_is_served_as_octet_stream(server):
    """contentType is a FHIR code (any non-space characters): "text/plain\u4e00" from a JSON
    create was stored, and every raw read of it was a 500 (the header could not be encoded)."""
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        r = c.post("/Binary", json={"resourceType": "Binary", "contentType": "text/plain\u00e9\u4e00",
                                    "data": base64.b64encode(b"hi").decode()},
                   headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 201, r.text
        bid = r.json()["id"]
        r = c.get(f"/Binary/{bid}")
        assert r.status_code == 200 and r.content == b"hi", r.text[:300]
        assert r.headers["content-type"] == "application/octet-stream"
        assert c.get(f"/Binary/{bid}", params={"_format": "json"}).json()["contentType"] == "text/plain\u00e9\u4e00"


def test_transaction_with_inline_binary_and_a_document_reference_pointing_at_it(server):
    """A transaction Bundle (FHIR JSON) with a Binary carrying base64 data and a DocumentReference whose
    attachment.url is the Binary's fullUrl: the bytes are stored apart, the url becomes Binary/{id}."""
    pdf = pdf_bytes(300_000, b"tx")
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:9a4f0b38-4c44-4a7d-9d7e-3d3b0f9b0c01",
         "resource": {"resourceType": "Binary", "contentType": "application/pdf",
                      "data": base64.b64encode(pdf).decode()},
         "request": {"method": "POST", "url": "Binary"}},
        {"resource": {"resourceType": "DocumentReference", "status": "current",
                      "content": [{"attachment": {"contentType": "application/pdf",
                                                  "url": "urn:uuid:9a4f0b38-4c44-4a7d-9d7e-3d3b0f9b0c01"}}]},
         "request": {"method": "POST", "url": "DocumentReference"}}]}
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        r = c.post("", json=bundle)
        assert r.status_code == 200, r.text[:500]
        loc = [e["response"]["location"] for e in r.json()["entry"]]
        bid = loc[0].split("/")[1]
        doc = c.get("/" + loc[1].split("/_history")[0]).json()
        assert doc["content"][0]["attachment"]["url"] == f"Binary/{bid}"
        assert c.get(f"/Binary/{bid}", headers={"Accept": "application/pdf"}).content == pdf
    with server.store.engine.connect() as conn:
        from sqlalchemy import text
        size = conn.execute(text("SELECT b.size FROM fhir_versions v JOIN blobs b ON b.id = v.blob_id "
                                 "WHERE v.type = 'Binary' AND v.id = :id"), {"id": bid}).scalar_one()
        assert size < 1024
        reads = conn.execute(text("SELECT entity FROM audit_events WHERE action = 'fhir.read'")).scalars().all()
        assert any(f"Binary/{bid}" in str(e) for e in reads), "the Binary read is audited"


def test_document_reference_with_large_inline_data_is_stored_as_a_binary(tmp_path):
    """A DocumentReference (and a DiagnosticReport.presentedForm) with 5 MiB of inline attachment data: the
    bytes go into a Binary of their own
    (the attachment keeps contentType and gets url and size), streamed back; sending it again changes
    nothing (same Binary id, no new version)."""
    s = FhirServer(tmp_path / "inline", max_body_bytes=16 * MIB).start()
    pdf = pdf_bytes(5 * MIB, b"inline")
    doc = {"resourceType": "DocumentReference", "id": "doc-inline-1", "status": "current",  # an update names its id
           "content": [{"attachment": {"contentType": "application/pdf", "title": "scan",
                                       "data": base64.b64encode(pdf).decode()}},
                       {"attachment": {"contentType": "text/plain", "data": base64.b64encode(b"small").decode()}}]}
    try:
        with httpx.Client(base_url=s.base_url, headers=AUTH, timeout=60) as c:
            r = c.put("/DocumentReference/doc-inline-1", json=doc)
            assert r.status_code == 201, r.text[:300]
            stored = c.get("/DocumentReference/doc-inline-1").json()
            DocumentReference.model_validate(stored)
            att = stored["content"][0]["attachment"]
            assert "data" not in att and att["size"] == len(pdf) and att["title"] == "scan"
            assert att["url"].startswith("Binary/")
            assert stored["content"][1]["attachment"]["data"] == base64.b64encode(b"small").decode()  # small: kept
            r = c.get(f"/{att['url']}", headers={"Accept": "application/pdf"})
            assert r.content == pdf and r.headers["content-type"] == "application/pdf"
            again = c.put("/DocumentReference/doc-inline-1", json=doc)
            assert again.status_code == 200 and again.headers["etag"] == 'W/"1"'
            assert again.json()["content"][0]["attachment"]["url"] == att["url"]
            _outcome(c.post("/DocumentReference", json={**doc, "content": [
                {"attachment": {"contentType": "application/pdf", "data": "not base64!"}}]}), 400, "invalid")
            # the same for DiagnosticReport.presentedForm
            report = {"resourceType": "DiagnosticReport", "status": "final", "code": {"text": "report"},
                      "presentedForm": [{"contentType": "application/pdf", "data": base64.b64encode(pdf).decode()}]}
            r = c.post("/DiagnosticReport", json=report)
            assert r.status_code == 201, r.text[:300]
            form = c.get(f"/DiagnosticReport/{r.json()['id']}").json()["presentedForm"][0]
            assert "data" not in form and form["url"].startswith("Binary/") and form["size"] == len(pdf)
            assert c.get(f"/{form['url']}").content == pdf
    finally:
        s.stop()


def test_document_reference_search_by_patient_type_date_status_identifier(server):
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        pid = c.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Doc"}]}).json()["id"]
        other = c.post("/Patient", json={"resourceType": "Patient", "name": [{"family": "Other"}]}).json()["id"]
        bid = c.post("/Binary", content=b"%PDF-1.4 x", headers={"Content-Type": "application/pdf"}).json()["id"]

        def doc(patient: str, code: str, date: str, status: str, ident: str) -> dict:
            return {"resourceType": "DocumentReference", "status": status,
                    "identifier": [{"system": "urn:test:docs", "value": ident}],
                    "type": {"coding": [{"system": "http://loinc.org", "code": code}]},
                    "subject": {"reference": f"Patient/{patient}"}, "date": date,
                    "content": [{"attachment": {"contentType": "application/pdf", "url": f"Binary/{bid}"}}]}

        for d in (doc(pid, "11502-2", "2024-01-02T10:00:00Z", "current", "D1"),
                  doc(pid, "18842-5", "2024-03-02T10:00:00Z", "superseded", "D2"),
                  doc(other, "11502-2", "2024-01-05T10:00:00Z", "current", "D3")):
            assert c.post("/DocumentReference", json=d).status_code == 201

        def ids(**params: str) -> list[str]:
            r = c.get("/DocumentReference", params=params)
            assert r.status_code == 200, r.text
            bundle = Bundle.model_validate(r.json())
            for e in bundle.entry or []:
                DocumentReference.model_validate(e.resource.model_dump(mode="json", by_alias=True))
            return sorted(e["resource"]["identifier"][0]["value"] for e in r.json().get("entry", []))

        assert ids(patient=pid) == ["D1", "D2"]
        assert ids(subject=f"Patient/{other}") == ["D3"]
        assert ids(type="http://loinc.org|11502-2") == ["D1", "D3"]
        assert ids(patient=pid, date="ge2024-02-01") == ["D2"]
        assert ids(status="current") == ["D1", "D3"]
        assert ids(identifier="urn:test:docs|D2") == ["D2"]
        r = c.get("/DocumentReference", params={"patient": pid, "type": "11502-2"}).json()
        url = r["entry"][0]["resource"]["content"][0]["attachment"]["url"]
        assert c.get(f"/{url}", headers={"Accept": "application/pdf"}).content == b"%PDF-1.4 x"


def _oru(control: str, pdf: bytes) -> bytes:
    segs = [f"MSH|^~\\&|LAB|HOSP|MEDRELAY|RAD|20240102030405||ORU^R01^ORU_R01|{control}|P|2.5",
            "PID|1||PDF123^^^HOSP^MR||DOE^JANE||19800101|F",
            "OBR|1|PL77|FL77^LAB|11502-2^Laboratory report^LN|||20240102030000|||||||||||||||20240102040000|||F",
            "OBX|1|ED|11502-2^Laboratory report^LN||^application^pdf^Base64^" + base64.b64encode(pdf).decode()
            + "||||||F|||20240102035000"]
    return ("\r".join(segs) + "\r").encode()


def test_oru_with_20mib_pdf_over_mllp_reaches_the_fhir_server_as_binary(engine_factory, tmp_path):
    """MLLP (frame limit raised) -> hl7_to_fhir -> fhir route -> our own FHIR listener (16 MiB JSON limit):
    the Binary goes first as raw bytes, the Bundle follows with the DocumentReference pointing at it.
    The same delivery with the Binary inline in the Bundle (the behaviour before) is refused with 413."""
    fhir_port = free_port()
    engine = engine_factory(f"""
store: {{url: "sqlite:///{tmp_path}/lab.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  lab:
    source: {{type: mllp, host: 127.0.0.1, port: 0, max_frame_bytes: 41943040}}
    routes:
      - name: to-fhir
        transforms: [{{type: hl7_to_fhir}}]
        to: {{type: fhir, base_url: "http://127.0.0.1:{fhir_port}/fhir", auth: {{token: "${{FHIR_TOKEN}}"}},
              timeout: 120}}
        retry: {{max_attempts: 2, initial_delay: 0.1}}
      - name: inline
        transforms: [{{type: hl7_to_fhir}}]
        to: {{type: fhir, base_url: "http://127.0.0.1:{fhir_port}/fhir", auth: {{token: "${{FHIR_TOKEN}}"}},
              binaries: inline, timeout: 120}}
        retry: {{max_attempts: 1, initial_delay: 0.1}}
  api:
    source: {{type: fhir, host: 127.0.0.1, port: {fhir_port}, auth: {{bearer_tokens: ["${{FHIR_TOKEN}}"]}}}}
    routes: []
""", env={"FHIR_TOKEN": TOKEN})
    pdf = pdf_bytes(20 * MIB, b"oru")
    host, port = engine.address("lab")
    client = RawClient(host, port, timeout=120)
    client.send(_oru("PDF0001", pdf))
    ack = client.recv_frame(timeout=120)
    assert msa(ack)[1] == "AA", ack[:300]
    client.sock.close()

    base = f"http://127.0.0.1:{fhir_port}/fhir"
    with httpx.Client(base_url=base, headers=AUTH, timeout=60) as c:
        def found():
            r = c.get("/DocumentReference", params={"identifier": "urn:medrelay:id:LAB|FL77-1"})
            return r.json().get("entry") if r.status_code == 200 else None

        entries = engine.wait_for(found, timeout=120, interval=0.5)
        assert entries, "the DocumentReference arrived"
        docref = DocumentReference.model_validate(entries[0]["resource"])
        att = docref.content[0].attachment
        assert att.contentType == "application/pdf" and att.size == len(pdf)
        assert att.url.startswith("Binary/")
        raw_hash = entries[0]["resource"]["content"][0]["attachment"]["hash"]
        assert base64.b64decode(raw_hash) == hashlib.sha1(pdf).digest()
        assert docref.subject.reference.startswith("Patient/")
        r = c.get(f"/{att.url}", headers={"Accept": "application/pdf"})
        assert r.status_code == 200 and r.content == pdf
        pid = docref.subject.reference.split("/")[1]
        assert [e["resource"]["id"] for e in c.get("/DocumentReference", params={"patient": pid}).json()["entry"]] \
            == [docref.id]
        report = c.get("/DiagnosticReport", params={"patient": pid}).json()["entry"][0]["resource"]
        assert report["presentedForm"][0]["url"] == att.url and "data" not in report["presentedForm"][0]

    def inline_failed():
        with engine.store.engine.connect() as conn:
            from sqlalchemy import text
            return conn.execute(text("SELECT state, last_error FROM deliveries WHERE route = 'inline'")).first()

    row = engine.wait_for(lambda: (r := inline_failed()) and r[0] == "dead" and r, timeout=120)
    assert "413" in str(row[1]), row


def test_fhir_route_refuses_a_request_over_max_request_bytes_without_sending(server):
    """A route whose max_request_bytes is below the Binary fails permanently and sends nothing."""
    import asyncio

    from engine.components import DeliveryError
    from engine.envelope import Envelope
    from routes.fhir import FhirDestinationConfig, build

    cfg = FhirDestinationConfig.model_validate({"type": "fhir", "base_url": server.base_url,
                                                "auth": {"token": TOKEN}, "max_request_bytes": 1000})
    dest = build(cfg, server.ctx)
    env = Envelope(channel="x", kind="fhir", payload=json.dumps(
        {"resourceType": "Binary", "id": "toolarge1", "contentType": "application/pdf",
         "data": base64.b64encode(os.urandom(2000)).decode()}).encode(), headers={})
    with pytest.raises(DeliveryError) as e:
        asyncio.run(dest.send(env))
    assert e.value.permanent and "max_request_bytes" in str(e.value)
    asyncio.run(dest.close())
    r = httpx.get(f"{server.base_url}/Binary/toolarge1", headers=AUTH)
    assert r.status_code == 404
    time.sleep(0)


def test_fhir_route_posts_a_binary_without_id_first_and_renames_its_full_url(server):
    """binaries: separate with a POSTed Binary: sent raw first, its Location replaces the fullUrl in the
    DocumentReference that follows in the transaction; the server never sees the base64."""
    import asyncio

    from engine.envelope import Envelope
    from routes.fhir import FhirDestinationConfig, build

    cfg = FhirDestinationConfig.model_validate({"type": "fhir", "base_url": server.base_url,
                                                "auth": {"token": TOKEN}, "max_request_bytes": 4 * MIB})
    dest = build(cfg, server.ctx)
    pdf = pdf_bytes(3 * MIB, b"route")  # 4 MiB as base64: only sendable raw within max_request_bytes
    urn = "urn:uuid:1c8e3f0a-5b7d-4e2a-9f61-0d2c4b6a8e10"
    bundle = {"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": urn, "resource": {"resourceType": "Binary", "contentType": "application/pdf",
                                      "data": base64.b64encode(pdf).decode()},
         "request": {"method": "POST", "url": "Binary"}},
        {"resource": {"resourceType": "DocumentReference", "status": "current",
                      "identifier": [{"system": "urn:test:route", "value": "R1"}],
                      "content": [{"attachment": {"contentType": "application/pdf", "url": urn}}]},
         "request": {"method": "PUT", "url": "DocumentReference?identifier=urn:test:route|R1"}}]}
    env = Envelope(channel="x", kind="fhir", payload=json.dumps(bundle).encode(), headers={})

    async def go() -> str | None:
        try:
            return await dest.send(env)
        finally:
            await dest.close()

    assert asyncio.run(go()) == "HTTP 200"
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        doc = c.get("/DocumentReference", params={"identifier": "urn:test:route|R1"}).json()["entry"][0]["resource"]
        url = doc["content"][0]["attachment"]["url"]
        assert url.startswith("Binary/") and url != urn
        assert c.get(f"/{url}", headers={"Accept": "application/pdf"}).content == pdf


def test_raw_binary_taken_by_our_listener_is_forwarded_streamed_to_a_second_engine(engine_factory, tmp_path):
    """A raw Binary POSTed to engine A's FHIR listener (whose message holds the resource without its bytes)
    is PUT to engine B with the same id, the bytes streamed from A's FHIR store; A's `store` route leaves
    A's Binary alone (no second version without data)."""
    target = engine_factory(f"""
store: {{url: "sqlite:///{tmp_path}/b.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  api:
    source: {{type: fhir, host: 127.0.0.1, port: 0, auth: {{bearer_tokens: ["${{FHIR_TOKEN}}"]}}}}
    routes: []
""", env={"FHIR_TOKEN": TOKEN})
    bhost, bport = target.address("api")
    source = engine_factory(f"""
store: {{url: "sqlite:///{tmp_path}/a.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  api:
    source: {{type: fhir, host: 127.0.0.1, port: 0, auth: {{bearer_tokens: ["${{FHIR_TOKEN}}"]}}}}
    routes:
      - {{name: archive, to: {{type: store}}}}
      - name: forward
        to: {{type: fhir, base_url: "http://{bhost}:{bport}/fhir", auth: {{token: "${{FHIR_TOKEN}}"}}, timeout: 120}}
""", env={"FHIR_TOKEN": TOKEN})
    ahost, aport = source.address("api")
    pdf = pdf_bytes(20 * MIB, b"fwd")
    with httpx.Client(base_url=f"http://{ahost}:{aport}/fhir", headers=AUTH, timeout=120) as a, \
            httpx.Client(base_url=f"http://{bhost}:{bport}/fhir", headers=AUTH, timeout=120) as b:
        r = a.post("/Binary", content=pdf, headers={"Content-Type": "application/pdf"})
        assert r.status_code == 201, r.text[:300]
        bid = r.json()["id"]

        def arrived():
            resp = b.get(f"/Binary/{bid}", headers={"Accept": "application/pdf"})
            return resp if resp.status_code == 200 else None

        got = source.wait_for(arrived, timeout=120, interval=0.5)
        assert got is not None and got.content == pdf and got.headers["content-type"] == "application/pdf"

        def settled():
            with source.store.engine.connect() as conn:
                from sqlalchemy import text
                return conn.execute(text("SELECT count(*) FROM deliveries WHERE state = 'done'")).scalar_one() == 2

        assert source.wait_for(settled, timeout=60)
        mine = a.get(f"/Binary/{bid}", headers={"Accept": "application/pdf"})
        assert mine.headers["etag"] == 'W/"1"' and mine.content == pdf


def test_raw_reads_of_active_content_are_sandboxed(server):
    """An uploaded HTML/SVG/XML/JS document read raw ran its script same-origin with the API
    (nosniff alone does not stop a document served as its own active type): every raw read now
    carries ``Content-Security-Policy: sandbox`` (full, ranged and HEAD reads alike), except PDF,
    which a browser's PDF viewer (a plugin, off under sandbox) would not show."""
    active = {"text/html": b"<script>alert(1)</script>", "image/svg+xml": b"<svg onload='alert(1)'/>",
              "application/xhtml+xml": b"<html/>", "text/xml": b"<?xml-stylesheet href='x'?><a/>",
              "application/javascript": b"alert(1)", "text/html; charset=utf-8": b"<b>x</b>",
              "text/plain": b"plain", "application/octet-stream": b"\x00"}
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=30) as c:
        for ctype, content in active.items():
            r = c.post("/Binary", content=content, headers={"Content-Type": ctype})
            assert r.status_code == 201, r.text
            bid = r.json()["id"]
            for resp in (c.get(f"/Binary/{bid}"), c.get(f"/Binary/{bid}", headers={"Range": "bytes=0-0"}),
                         c.head(f"/Binary/{bid}")):
                assert resp.status_code in (200, 206), (ctype, resp.status_code)
                assert resp.headers["content-security-policy"] == "sandbox", (ctype, resp.headers)
                assert resp.headers["x-content-type-options"] == "nosniff"
        r = c.post("/Binary", content=pdf_bytes(2000), headers={"Content-Type": "application/pdf"})
        r = c.get(f"/Binary/{r.json()['id']}")
        assert r.status_code == 200 and r.headers["x-content-type-options"] == "nosniff"
        assert "content-security-policy" not in r.headers
