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
