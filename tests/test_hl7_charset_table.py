"""MSH-18 values not in HL7 table 0211 get AE 103 on every HL7 source alike (probe 5b finding 10).

A raw MLLP socket, an httpx POST to the http source and ``medrelay import`` against one running
engine. Before, only MSH-18's first repetition was looked at: ``UNICODE UTF-8~KLINGON`` was
accepted with AA and no comment. The charsets and aliases the engine reads stay accepted.
"""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from mllp_peers import RawClient, msa, segment
from sqlalchemy import select

from engine.store import schema

TOKEN = "charset-table-token-5b10"
YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  adt:
    source: {type: mllp, port: 0}
  adt-http:
    source: {type: http, host: 127.0.0.1, port: 0, path: /hl7, auth: {bearer_tokens: ["${API_TOKEN}"]}}
"""


def message(control_id: str, msh18: str, name: str = "DOE^JOHN", encoding: str = "ascii") -> bytes:
    return (
        f"MSH|^~\\&|HIS|HOSP|RIS|RAD|20240102030405||ADT^A01^ADT_A01|{control_id}|P|2.5||||||{msh18}\r"
        f"EVN|A01|20240102030405\rPID|1||12345^^^HOSP^MR||{name}||19800101|M\r"
    ).encode(encoding)


@pytest.fixture
def eng(engine_factory):
    return engine_factory(YAML, env={"API_TOKEN": TOKEN})


def mllp(eng, payload: bytes) -> bytes:
    with RawClient(*eng.address("adt")) as c:
        return c.request(payload)


def http(eng, payload: bytes) -> bytes:
    host, port = eng.address("adt-http")
    r = httpx.post(
        f"http://{host}:{port}/hl7",
        content=payload,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/hl7-v2"},
        timeout=30,
    )
    assert r.status_code in (200, 400, 422), (r.status_code, r.text)
    return r.content


def stored(eng) -> list[str]:
    m = schema.messages
    with eng.store.engine.connect() as c:
        return [h["MSH-10"] for (h,) in c.execute(select(m.c.headers))]


UNKNOWN = [
    ("KLINGON", "MSH^1^18", "'KLINGON' is not a character set of HL7 table 0211"),
    ("UNICODE UTF-8~KLINGON", "MSH^1^18^2", "'KLINGON' is not a character set of HL7 table 0211"),
    ("8859/1~ISO IR87~Klingon-8", "MSH^1^18^3", "'Klingon-8' is not a character set of HL7 table 0211"),
    ("ISO IR87", "MSH^1^18", "send UNICODE UTF-8"),  # in table 0211, but not a charset this engine reads
]


@pytest.mark.parametrize("msh18,where,text", UNKNOWN)
def test_unknown_charset_is_ae_103_on_mllp_and_http_alike(eng, msh18, where, text):
    answers = {}
    for i, (name, send) in enumerate((("mllp", mllp), ("http", http))):
        ack = send(eng, message(f"U{i}", msh18))
        err = segment(ack, "ERR")
        assert msa(ack)[1:3] == ["AE", f"U{i}"], (name, ack)
        assert err is not None and err[2] == where and err[3].startswith("103^Table value not found"), (name, ack)
        assert text in err[8], (name, err)
        answers[name] = err[2:]
    assert answers["mllp"] == answers["http"]
    assert stored(eng) == []


@pytest.mark.parametrize(
    "msh18,encoding,name",
    [
        ("UNICODE UTF-8", "utf-8", "Müller^Jürgen"),
        ("UTF-8", "utf-8", "Łukasz^Żółć"),
        ("unicode utf-8", "utf-8", "Müller^Jürgen"),
        ("8859/1", "latin-1", "Müller^Jürgen"),
        ("ISO IR6", "ascii", "DOE^JOHN"),
        ("ASCII", "ascii", "DOE^JOHN"),
        ("8859/1~ISO IR87", "latin-1", "Müller^Jürgen"),  # an alternate of table 0211 is kept as sent
        ("UNICODE UTF-8~", "utf-8", "Müller^Jürgen"),
        ("", "ascii", "DOE^JOHN"),
    ],
)
def test_the_charsets_and_aliases_read_stay_accepted(eng, msh18, encoding, name):
    for i, send in enumerate((mllp, http)):
        ack = send(eng, message(f"K{i}", msh18, name, encoding))
        assert msa(ack, encoding)[1:3] == ["AA", f"K{i}"], (msh18, ack)
    assert sorted(stored(eng)) == ["K0", "K1"]


def test_medrelay_import_refuses_it_the_same_way(eng, tmp_path):
    good = tmp_path / "good.hl7"
    good.write_bytes(message("I1", "UNICODE UTF-8"))
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(message("I2", "UNICODE UTF-8~KLINGON"))
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "import", "-c", str(eng.config_path), "--channel", "adt",
         "--port", str(eng.address("adt")[1]), str(good), str(bad)],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip
    out = r.stdout
    assert r.returncode == 1 and "Traceback" not in out + r.stderr, out + r.stderr
    assert "1 accepted, 1 rejected, 0 skipped" in out, out
    rejected = [ln for ln in out.splitlines() if ln.startswith("rejected:")]
    assert len(rejected) == 1 and f"{bad}: AE" in rejected[0] and "103" in rejected[0], out
    assert stored(eng) == ["I1"]
