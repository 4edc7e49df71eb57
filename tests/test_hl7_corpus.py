"""conformance/hl7v2-samples: every sample sent by python-hl7's MLLP client to a running engine.

The samples stand for what real senders send (UTF-8 BOM, CR / LF / CRLF segment ends,
MSH-15/16 AL/NE/ER/SU, versions 2.1 to 2.9.1 and ones that are not, MSH-18 charsets,
Z-segments, repetitions, escapes, trailing empty fields, other delimiters); expected.json
says what each must get back. Each ACK is checked with our own few lines of reading (not
medrelay's): MSA-1, MSA-2 = the sample's MSH-10 as sent, MSH-3..6 swapped, MSH-12 in a
real version, the ERR layout of that version; and each accepted sample must reach a
downstream MLLP receiver from its MSH on (a BOM or blank lines before it removed).
"""

from __future__ import annotations

import json
import time

import hl7
import hl7.client
import pytest
from conftest import ROOT, EngineThread
from mllp_peers import MLLPReceiver, adt

SAMPLES = ROOT / "conformance" / "hl7v2-samples"
EXPECTED: dict[str, dict] = json.loads((SAMPLES / "expected.json").read_text())
BOM = b"\xef\xbb\xbf"

YAML = """
store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
keys: {{kek_file: data/keys.json}}
channels:
  corpus:
    source: {{type: mllp, port: 0, idle_timeout: 60}}
    routes:
      - name: downstream
        to: {{type: mllp, host: 127.0.0.1, port: {rx}, timeout: 5}}
        retry: {{max_attempts: 3, initial_delay: 0.05, max_delay: 0.2}}
"""


def from_msh(data: bytes) -> bytes:
    """The sample from its MSH on: our own reading of "a BOM, then blank lines"."""
    if data.startswith(BOM):
        data = data[3:]
    return data.lstrip(b"\r\n \t")


def msh_fields(data: bytes) -> list[str] | None:
    """MSH fields of a sample (index n = MSH-n), or None when it does not start with MSH."""
    body = from_msh(data)
    if not body.startswith(b"MSH"):
        return None
    fs = body[3:4].decode("latin-1")
    first = body.decode("latin-1").replace("\r\n", "\r").replace("\n", "\r").split("\r", 1)[0]
    return ["MSH", fs, *first.split(fs)[1:]]


def ack_for(msg: bytes, n: int) -> bytes:
    """The downstream receiver's AA, in the message's own delimiters."""
    f = msh_fields(msg) or ["MSH", "|", "^~\\&"]
    fs = f[1]
    ctrl = f[10] if len(f) > 10 else ""
    return fs.join(["MSH", f[2], "RX", "RXF", "", "", "20240101000000", "", "ACK", f"R{n}", "P", "2.5"]).encode() + \
        b"\r" + fs.join(["MSA", "AA", ctrl]).encode("latin-1") + b"\r"


@pytest.fixture(scope="module")
def downstream():
    rx = MLLPReceiver(ack_for).start()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def engine(tmp_path_factory, downstream):
    eng = EngineThread(YAML.format(rx=downstream.port), tmp_path_factory.mktemp("corpus"))
    yield eng
    eng.stop()


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("^")[0].split("."))


def send(host: str, port: int, data: bytes, *, expect_answer: bool) -> bytes | None:
    with hl7.client.MLLPClient(host, port) as client:
        client.socket.settimeout(10 if expect_answer else 1.5)
        try:
            raw = client.send_message(data)
            while not raw.endswith(b"\x1c\r"):
                raw += client.socket.recv(65536)
        except TimeoutError:
            raw = None
        if raw is None:  # no answer: the connection must still be in step for the next message
            client.socket.settimeout(10)
            ping = client.send_message(adt("PING-" + str(time.monotonic_ns())))
            assert b"MSA|AA|PING-" in ping
            return None
    assert raw.startswith(b"\x0b") and raw.endswith(b"\x1c\r")
    return raw[1:-2]


def check_batch(engine, downstream, data: bytes, want: dict) -> None:
    """A batch sample (HL7 v2.5 2.10.3): one batch back, BHS-12 (FHS-12) = the request's BHS-11
    (FHS-11), MSH-3..6 swapped, an ACK per message in error; the good messages reach downstream."""
    reply = send(*engine.address("corpus"), data, expect_answer=True)
    assert reply is not None
    lines = [ln.split("|") for ln in data.decode("latin-1").replace("\n", "\r").split("\r") if ln]
    got = [ln.split("|") for ln in reply.decode("latin-1").split("\r") if ln]
    kinds = [g[0] for g in got if g[0] in ("FHS", "BHS", "BTS", "FTS")]
    assert kinds == (["FHS", "BHS", "BTS", "FTS"] if want["file"] else ["BHS", "BTS"]), kinds
    for name in ("FHS", "BHS"):
        sent = next((ln for ln in lines if ln[0] == name), None)
        back = next((g for g in got if g[0] == name), None)
        if sent is not None:
            # split on "|": index n-1 is field n (SEG-1 is the separator itself)
            assert back is not None and (back + [""] * 12)[11] == (sent + [""] * 12)[10]
            assert back[2:6] == ((sent + [""] * 6)[4:6] + (sent + [""] * 6)[2:4])
    msas = [g for g in got if g[0] == "MSA"]
    errs = [g for g in got if g[0] == "ERR"]
    assert [[m[1], m[2]] for m in msas] == [a[:2] for a in want["acks"]]
    assert [int(e[3].split("^")[0]) for e in errs] == [a[2] for a in want["acks"]]
    assert next(g for g in got if g[0] == "BTS")[1] == str(len(want["acks"]))
    deadline = time.monotonic() + 20
    while True:
        ids = [m.decode("latin-1").split("\r")[0].split("|")[9] for m in downstream.received]
        if all(cid in ids for cid in want["stored"]):
            break
        assert time.monotonic() < deadline, f"{want['stored']} never reached the downstream receiver"
        time.sleep(0.02)
    assert not any(a[1] in ids for a in want["acks"])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(engine, downstream, name):
    want = EXPECTED[name]
    data = (SAMPLES / name).read_bytes()
    if "batch" in want:
        return check_batch(engine, downstream, data, want["batch"])
    ack = send(*engine.address("corpus"), data, expect_answer=want["ack"] is not None)
    sent = msh_fields(data) if not name.startswith("utf16") else None
    if want["ack"] is None:
        assert ack is None, ack
    else:
        assert ack is not None, "no ACK"
        assert not ack.startswith(BOM) and ack.startswith(b"MSH")
        fs = ack[3:4].decode()
        msg = hl7.parse(ack.decode("latin-1").replace(fs, "|") if fs != "|" else ack.decode("latin-1"))
        segs = {str(s[0]): s for s in msg}
        a_msh = ack.decode("latin-1").split("\r", 1)[0].split(fs)
        a_msh = ["MSH", fs, *a_msh[1:]]
        msa = ack.decode("latin-1").split("\r")[1].split(fs)
        assert msa[0] == "MSA" and msa[1] == want["ack"], (msa, want)
        assert a_msh[12] == want["ack_version"], a_msh
        if sent is not None and sent[2] == a_msh[2]:  # a readable header: addressed back to the sender
            assert msa[2] == (sent[10] if len(sent) > 10 else "")
            assert a_msh[3:5] == (sent[5:7] + ["", ""])[:2] and a_msh[5:7] == (sent[3:5] + ["", ""])[:2]
            assert a_msh[11] == (sent[11] if len(sent) > 11 and sent[11] else "P")
            assert (a_msh[18] if len(a_msh) > 18 else "") == (sent[18] if len(sent) > 18 else "")
        v = version_tuple(want["ack_version"])
        if want["err"] is None:
            assert "ERR" not in segs
        else:
            err = ack.decode("latin-1").split("\r")[2].split(fs)
            cs, sc = a_msh[2][0], a_msh[2][3]
            if v >= (2, 5):
                assert err[3].split(cs)[0] == str(want["err"]) and err[3].split(cs)[2] == "HL70357"
                assert err[4] == "E"
            elif v >= (2, 2):
                assert err[1].split(cs)[3].split(sc)[0] == str(want["err"])
                assert len(msa) > 3 and msa[3]  # MSA-3 text before v2.5
            else:
                assert err[1] == str(want["err"])
        if want["ack"] in ("AA", "CA"):
            assert len(msa) == 3 or v < (2, 5)
    if want["stored"]:
        expected = from_msh(data)
        deadline = time.monotonic() + 20
        while expected not in downstream.received:
            assert time.monotonic() < deadline, f"{name} never reached the downstream receiver"
            time.sleep(0.02)
    else:
        assert from_msh(data) not in downstream.received


def test_every_sample_is_listed_and_the_class_is_covered():
    files = {p.name for p in SAMPLES.glob("*.hl7")}
    assert files == set(EXPECTED)
    raw = {n: (SAMPLES / n).read_bytes() for n in files}
    assert sum(d.startswith(BOM) for d in raw.values()) >= 8
    versions = {(msh_fields(d) or [""] * 13)[12].split("^")[0].strip() for d in raw.values() if msh_fields(d)
                and len(msh_fields(d)) > 12}
    for v in ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2"):
        assert v in versions, v
    ack_types = {tuple((msh_fields(d) + [""] * 17)[15:17]) for d in raw.values() if msh_fields(d)}
    for m15 in ("AL", "NE", "ER", "SU"):
        assert any(a == m15 for a, _ in ack_types), m15
    assert any(b"\r\n" in d for d in raw.values()) and any(b"\n" in d and b"\r" not in d for d in raw.values())
    assert any(b"\nZ" in d or b"\rZ" in d for d in raw.values())
