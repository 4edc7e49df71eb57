"""The example channels.yaml is valid and its route cases (channel-tests/) pass via `medrelay test`."""

import os
import subprocess
import sys

from conftest import ROOT


def test_example_config_checks_and_cases_pass(tmp_path):
    env = {**os.environ, "MEDRELAY_API_TOKEN": "t" * 24}
    r = subprocess.run([sys.executable, "-m", "engine.cli", "check", "channels.yaml"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "engine.cli", "test", "channels.yaml"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS adt-a01-to-fhir" in r.stdout and "0 failed" in r.stdout


def test_medrelay_test_fails_on_a_wrong_expectation(tmp_path):
    import shutil

    shutil.copy(ROOT / "channels.yaml", tmp_path / "channels.yaml")
    shutil.copytree(ROOT / "channel-tests", tmp_path / "channel-tests")
    exp = tmp_path / "channel-tests" / "adt-a01-to-fhir" / "expected.json"
    exp.write_text(exp.read_text().replace('"JANE"', '"JOHN"'))
    env = {**os.environ, "MEDRELAY_API_TOKEN": "t" * 24}
    r = subprocess.run([sys.executable, "-m", "engine.cli", "test", "channels.yaml"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "FAIL adt-a01-to-fhir" in r.stdout


def test_readme_channels_example_is_valid(tmp_path):
    """The YAML shown in the README passes `medrelay check` (given the CA file it names)."""
    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("## channels.yaml", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    (tmp_path / "channels.yaml").write_text(snippet)
    (tmp_path / "ca.pem").write_text("")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "check", "channels.yaml"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_case_that_cannot_run_says_why_in_one_line(tmp_path):
    import shutil

    shutil.copy(ROOT / "channels.yaml", tmp_path / "channels.yaml")
    for name, case in (("wrong-channel", "channel: adt\nroute: to-fhir\ninput: in.hl7\n"),
                       ("wrong-route", "channel: adt-in\nroute: to-fihr\ninput: in.hl7\n"),
                       ("no-input", "channel: adt-in\nroute: to-fhir\ninput: missing.hl7\n")):
        (tmp_path / "channel-tests" / name).mkdir(parents=True)
        (tmp_path / "channel-tests" / name / "case.yaml").write_text(case)
    r = subprocess.run([sys.executable, "-m", "engine.cli", "test", "channels.yaml"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "0 passed, 3 failed" in r.stdout, r.stdout + r.stderr
    assert "channel 'adt' is not in channels.yaml (channels: api, adt-in, modality-in)" in r.stdout
    assert "channel adt-in has no route 'to-fihr' (routes: to-fhir, worklist)" in r.stdout
    assert "input file missing.hl7: No such file or directory" in r.stdout
    assert "KeyError" not in r.stdout and "StopIteration" not in r.stdout
    assert "keys.created" not in r.stdout + r.stderr  # the scratch store's key file is nobody's business


def test_no_cases_is_a_failure_that_names_the_folder(tmp_path):
    import shutil

    shutil.copy(ROOT / "channels.yaml", tmp_path / "channels.yaml")
    r = subprocess.run([sys.executable, "-m", "engine.cli", "test", "channels.yaml"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"no cases in {tmp_path / 'channel-tests'}" in r.stderr, r.stderr


def test_the_example_adt_case_makes_the_encounter_channels_yaml_promises():
    """The case's ADT had its visit number in PV1-18, so the expected output had no Encounter."""
    import json

    exp = json.loads((ROOT / "channel-tests" / "adt-a01-to-fhir" / "expected.json").read_text())
    types = [e["resource"]["resourceType"] for e in exp["entry"]]
    assert types == ["Patient", "Encounter"]
    assert (ROOT / "channel-tests" / "adt-a01-to-fhir" / "input.hl7").read_bytes().split(b"PV1|")[1].split(
        b"|")[18].startswith(b"V0001")  # PV1-19
