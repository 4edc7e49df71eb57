"""`medrelay map --route NAME FILE`: a dry run of a route with a diff, and what its exit codes mean."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import ROOT

CONFIG = """\
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
tables:
  sex: {values: {M: male, F: female}}
channels:
  lab-in:
    source: {type: mllp, host: 127.0.0.1, port: 0}
    routes:
      - name: to-lis
        when: {MSH-9.1: ORU}
        transforms:
          - type: hl7_map
            rules:
              - set: {MSH-5: LIS}
              - delete: ZPI
              - lookup: {field: PID-8, table: sex}
              - when: {PID-5.1: TEST}
                then: [{drop: test patient}]
              - when: {PID-5.1: BROKEN}
                then: [{error: cannot map}]
        to: {type: file, path: out}
      - name: as-fhir
        transforms: [{type: hl7_to_fhir}]
        to: {type: file, path: out2}
"""

ORU = ("MSH|^~\\&|LAB|F|HIS|H|20240301101500||ORU^R01^ORU_R01|C1|P|2.5.1\r"
       "PID|1||123^^^H^MR||DOE^JANE||19700215|F\rZPI|x\r")


def run(tmp_path, *args, message=ORU):
    (tmp_path / "channels.yaml").write_text(textwrap.dedent(CONFIG))
    (tmp_path / "in.hl7").write_bytes(message.encode())
    return subprocess.run([sys.executable, "-m", "engine.cli", "map", "-c", str(tmp_path / "channels.yaml"),
                           *args, str(tmp_path / "in.hl7")], cwd=ROOT, capture_output=True, text=True)


def test_map_prints_a_diff_and_stores_nothing(tmp_path):
    r = run(tmp_path, "--route", "to-lis")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == "route lab-in/to-lis: when: takes this message"
    assert "-MSH|^~\\&|LAB|F|HIS|H|20240301101500||ORU^R01^ORU_R01|C1|P|2.5.1" in out
    assert "+MSH|^~\\&|LAB|F|LIS|H|20240301101500||ORU^R01^ORU_R01|C1|P|2.5.1" in out
    assert "+PID|1||123^^^H^MR||DOE^JANE||19700215|female" in out
    assert "-ZPI|x" in out
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


def test_map_without_diff_and_to_another_kind(tmp_path):
    r = run(tmp_path, "--route", "lab-in/to-lis", "--no-diff")
    assert r.returncode == 0 and "\nMSH|^~\\&|LAB|F|LIS|H|" in r.stdout and "\n-ZPI" not in r.stdout
    r = run(tmp_path, "--route", "as-fhir", message=ORU.replace("ORU^R01^ORU_R01", "ADT^A01^ADT_A01"))
    assert r.returncode == 0, r.stderr
    assert "(fhir)" in r.stdout and '"resourceType": "Bundle"' in r.stdout


def test_map_exit_codes(tmp_path):
    r = run(tmp_path, "--route", "to-lis", message=ORU.replace("ORU^R01", "ADT^A01"))
    assert r.returncode == 1 and "does not take" in r.stdout
    r = run(tmp_path, "--route", "to-lis", message=ORU.replace("DOE^JANE", "TEST^JANE"))
    assert r.returncode == 1 and "filtered: test patient" in r.stdout
    r = run(tmp_path, "--route", "to-lis", message=ORU.replace("DOE^JANE", "BROKEN^JANE"))
    assert r.returncode == 2 and "cannot map" in r.stderr
    r = run(tmp_path, "--route", "nope")
    assert r.returncode == 2 and "no route 'nope'" in r.stderr
