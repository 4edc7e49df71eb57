"""`medrelay import` loads folders into a running engine through each channel's own protocol.

Every file ends accepted, rejected or skipped; every rejected or skipped one is named
with the reason, one summary line counts them, and no case prints a traceback.
"""

import os
import shutil
import subprocess
import sys

from conftest import free_port
from dicom_peers import data_file
from mllp_peers import adt
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from engine.store import schema

TOKEN = "import-test-token-31c9"
YAML = """
store: {url: "sqlite:///data/medrelay.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  hl7:
    source: {type: mllp, port: 0}
  dcm:
    source: {type: dicom, port: 0, ae_title: MEDRELAY, calling_aets: [MEDRELAY-IMPORT]}
  api:
    source: {type: fhir, port: 0, auth: {bearer_tokens: ["${IMPORT_TOKEN}"]}}
"""


def counts(eng):
    m = schema.messages
    with eng.store.engine.connect() as c:
        return dict(c.execute(select(m.c.channel, func.count()).group_by(m.c.channel)).all())


def medrelay_import(eng, channel, *paths, args=(), env=None, port=None):
    return subprocess.run([sys.executable, "-m", "engine.cli", "import", "-c", str(eng.config_path), "--channel",
                           channel, "--port", str(port or eng.address(channel)[1]), *args, *map(str, paths)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MEDRELAY_API_TOKEN": TOKEN, **(env or {})})


def ct_files(folder, n):
    folder.mkdir()
    base = dcmread(data_file("CT_small.dcm"))
    for i in range(n):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        base.save_as(folder / f"{i}.dcm", enforce_file_format=True)
    return folder


def test_import_hl7_dicom_fhir(engine_factory, tmp_path):
    eng = engine_factory(YAML, env={"IMPORT_TOKEN": TOKEN})
    hl7 = tmp_path / "hl7"
    hl7.mkdir()
    # one file with two messages as text lines, one MLLP-framed file, one duplicate
    (hl7 / "a.hl7").write_bytes((adt("IMP1") + adt("IMP2")).replace(b"\r", b"\n"))
    (hl7 / "b.mllp").write_bytes(b"\x0b" + adt("IMP3") + b"\x1c\r")
    (hl7 / "c.hl7").write_bytes(adt("IMP1"))
    r = medrelay_import(eng, "hl7", hl7)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 accepted, 0 rejected, 0 skipped (4 items in 3 files)" in r.stdout
    dcm = ct_files(tmp_path / "dcm", 3)
    (dcm / "notes.txt").write_text("not dicom")
    r = medrelay_import(eng, "dcm", dcm)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "3 accepted, 0 rejected, 1 skipped" in r.stdout
    assert f"skipped: {dcm / 'notes.txt'}: not DICOM: a text file" in r.stdout
    fhir = tmp_path / "fhir"
    fhir.mkdir()
    (fhir / "p.json").write_text('{"resourceType": "Patient", "name": [{"family": "Import"}]}')
    r = medrelay_import(eng, "api", fhir)
    assert r.returncode == 0 and "1 accepted, 0 rejected, 0 skipped" in r.stdout, r.stdout + r.stderr
    assert counts(eng) == {"hl7": 3, "dcm": 3, "api": 1}  # the re-sent IMP1 was recognised


def test_every_skipped_or_rejected_file_is_named_with_its_reason(engine_factory, tmp_path):
    eng = engine_factory(YAML, env={"IMPORT_TOKEN": TOKEN})
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "good.hl7").write_bytes(adt("MIX1"))
    (d / "readme.txt").write_text("hello, not a message\n")
    shutil.copy(data_file("CT_small.dcm"), d / "image.dcm")
    (d / "patient.json").write_text('{"resourceType": "Patient"}')
    (d / "empty.hl7").write_bytes(b"")
    # MSH-9 empty: the engine refuses it (ERR 101), and the report says which message of which file
    (d / "two.hl7").write_bytes(adt("MIX2") + adt("MIX3").replace(b"ADT^A01", b""))
    r = medrelay_import(eng, "hl7", d)
    out = r.stdout
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, out + r.stderr
    assert f"skipped: {d / 'readme.txt'}: not HL7 v2: a text file (no MSH segment)" in out
    assert f"skipped: {d / 'image.dcm'}: not HL7 v2: a DICOM file (no MSH segment)" in out
    assert f"skipped: {d / 'patient.json'}: not HL7 v2: a FHIR JSON Patient (no MSH segment)" in out
    assert f"skipped: {d / 'empty.hl7'}: not HL7 v2: an empty file (no MSH segment)" in out
    rejected = [ln for ln in out.splitlines() if ln.startswith("rejected:")]
    assert len(rejected) == 1 and f"{d / 'two.hl7'} message 2 (MSH-10 MIX3): A" in rejected[0], out
    assert " 101 (Required field missing)" in rejected[0]
    assert "2 accepted, 1 rejected, 4 skipped (7 items in 6 files)" in out
    assert "0 of 0" not in out


def test_hl7_file_with_a_byte_order_mark_goes_in_like_live_traffic(engine_factory, tmp_path):
    """Windows senders write EF BB BF before MSH; the file is split and sent with it, and the
    listener's shared decoding takes it (issue 9 item 9), so the import accepts it too."""
    eng = engine_factory(YAML, env={"IMPORT_TOKEN": TOKEN})
    f = tmp_path / "bom.hl7"
    f.write_bytes(b"\xef\xbb\xbf" + adt("BOM1").replace(b"\r", b"\r\n") + b"\xef\xbb\xbf" + adt("BOM2"))
    r = medrelay_import(eng, "hl7", f)
    assert "2 accepted, 0 rejected, 0 skipped" in r.stdout, r.stdout + r.stderr
    assert counts(eng) == {"hl7": 2}
    # what the shared reader does not take goes to the engine and comes back refused, never vanishes
    wide = tmp_path / "utf16.hl7"
    wide.write_bytes(adt("W1").decode().encode("utf-16"))
    junk = tmp_path / "junk.hl7"
    junk.write_bytes(b"exported by tool X\n" + adt("J1"))
    r = medrelay_import(eng, "hl7", wide, junk)
    assert r.returncode == 1 and "1 accepted, 2 rejected, 0 skipped (3 items in 2 files)" in r.stdout, r.stdout
    assert f"rejected: {wide}: AR" in r.stdout and f"rejected: {junk} message 1: AR 100" in r.stdout


def test_dicom_calling_aet_not_allowed_is_a_clear_refusal(engine_factory, tmp_path):
    """The example's DICOM channel did not list the import's default AE: a traceback before."""
    yaml = YAML.replace("calling_aets: [MEDRELAY-IMPORT]", "calling_aets: [CT01, MR01]")
    eng = engine_factory(yaml, env={"IMPORT_TOKEN": TOKEN})
    dcm = ct_files(tmp_path / "dcm", 1)
    r = medrelay_import(eng, "dcm", dcm)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "channel dcm: the channel accepts calling AE titles CT01, MR01; MEDRELAY-IMPORT is not one" in r.stderr
    assert "--calling-aet" in r.stderr and "calling_aets" in r.stderr
    r = medrelay_import(eng, "dcm", dcm, args=("--calling-aet", "CT01"))
    assert r.returncode == 0 and "1 accepted, 0 rejected, 0 skipped" in r.stdout, r.stdout + r.stderr
    # a title the config allows but the running engine refuses (its config changed): one line, exit 4
    eng2 = engine_factory(YAML.replace("calling_aets: [MEDRELAY-IMPORT]", "calling_aets: [OTHER]"),
                          env={"IMPORT_TOKEN": TOKEN})
    r = medrelay_import(eng, "dcm", dcm, args=("--calling-aet", "CT01"), port=eng2.address("dcm")[1])
    assert r.returncode == 4 and "Traceback" not in r.stderr, r.stderr
    assert "rejected the association (calling AE CT01, called AE MEDRELAY)" in r.stderr


def test_engine_not_running_is_one_line_and_exit_4(engine_factory, tmp_path):
    eng = engine_factory(YAML, env={"IMPORT_TOKEN": TOKEN})
    f = tmp_path / "a.hl7"
    f.write_bytes(adt("DOWN1"))
    dead = free_port()
    for channel, path in (("hl7", f), ("dcm", ct_files(tmp_path / "dcm", 1)), ("api", tmp_path / "p.json")):
        if channel == "api":
            path.write_text('{"resourceType": "Patient"}')
        r = medrelay_import(eng, channel, path, port=dead)
        assert r.returncode == 4 and "Traceback" not in r.stderr, (channel, r.stderr)
        assert "cannot reach the engine at" in r.stderr and str(dead) in r.stderr, r.stderr


def test_import_usage_errors(engine_factory, tmp_path):
    eng = engine_factory(YAML, env={"IMPORT_TOKEN": TOKEN})
    f = tmp_path / "a.hl7"
    f.write_bytes(adt("U1"))
    r = medrelay_import(eng, "nosuch", f, port=1)
    assert r.returncode == 2 and "no channel 'nosuch'" in r.stderr and "hl7, dcm, api" in r.stderr
    r = subprocess.run([sys.executable, "-m", "engine.cli", "import", "-c", str(eng.config_path), "--channel",
                        "hl7", str(tmp_path / "missing.hl7")], capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_fhir_import_uses_the_channels_own_token_file(medrelay_proc, tmp_path):
    """With the token in ${generated:...} (the example), `medrelay run` made it, and no variable
    is needed to import; a wrong token is one line, exit 4."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MEDRELAY_API_TOKEN"}
    proc = medrelay_proc(f"""
        store: {{url: "sqlite:///data/medrelay.db", blobs: data/blobs}}
        keys: {{kek_file: data/keys.json}}
        channels:
          api:
            source: {{type: fhir, port: {port}, auth: {{bearer_tokens: ["${{generated:data/api-token}}"]}}}}
        """, env=env)
    proc.env = env
    proc.start()
    proc.wait_port(port)
    token = proc.data_dir / "data" / "api-token"
    assert oct(token.stat().st_mode & 0o777) == "0o600" and len(token.read_text().strip()) >= 32
    f = tmp_path / "p.json"
    f.write_text('{"resourceType": "Patient", "name": [{"family": "Tokenless"}]}')
    r = proc.cli("import", "-c", str(proc.config_path), "--channel", "api", str(f))
    assert r.returncode == 0 and "1 accepted" in r.stdout, r.stdout + r.stderr
    proc.env = {**env, "MEDRELAY_API_TOKEN": "wrong"}
    r = proc.cli("import", "-c", str(proc.config_path), "--channel", "api", str(f))
    assert r.returncode == 4 and "answered 401" in r.stderr and "Traceback" not in r.stderr, r.stderr
