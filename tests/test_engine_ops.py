"""Operations: /metrics over HTTP, `medrelay check` output and exit codes, components docs."""

import subprocess
import sys
import textwrap

import engine_fakes
import httpx
from test_engine_pipeline import submit

YAML = """
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
metrics: {host: 127.0.0.1, port: 0}
channels:
  in:
    source: {type: test_null}
    routes:
      - name: a
        to: {type: test_collect, name: ops}
        retry: {max_attempts: 1, initial_delay: 0.05}
"""


def test_metrics_endpoint_counts(engine_factory):
    engine_fakes.SCRIPT["ops"] = ["ok", "perm"]
    eng = engine_factory(YAML)
    submit(eng, b"one")
    submit(eng, b"two")
    port = eng.runtime.metrics.port
    def scrape():
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        return text if 'medrelay_deliveries_dead_lettered_total{channel="in",route="a"} 1.0' in text else None
    text = eng.wait_for(scrape)
    assert 'medrelay_messages_acked_total{channel="in"} 2.0' in text
    assert 'medrelay_deliveries_delivered_total{channel="in",route="a"} 1.0' in text
    assert 'medrelay_dead_letters{channel="in",route="a"} 1.0' in text


def run_cli(*args, cwd, env=None):
    import os
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "MEDRELAY_PLUGINS": "engine_fakes",
                               "PYTHONPATH": os.path.dirname(__file__), **(env or {})})


def test_check_exit_codes_and_messages(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(YAML))
    r = run_cli("check", str(good), cwd=tmp_path)
    assert r.returncode == 0 and "ok (1 channels, 1 routes" in r.stdout, r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent(YAML).replace("initial_delay: 0.05", "initial_delay: soon"))
    r = run_cli("check", str(bad), cwd=tmp_path)
    assert r.returncode == 2
    assert f"{bad}:11: channels.in.routes[0].retry.initial_delay:" in r.stderr
    envbad = tmp_path / "env.yaml"
    envbad.write_text(textwrap.dedent(YAML).replace("blobs: data/blobs", 'blobs: "${NOT_SET_ANYWHERE}"'))
    r = run_cli("check", str(envbad), cwd=tmp_path)
    assert r.returncode == 4 and "NOT_SET_ANYWHERE" in r.stderr


def test_components_lists_every_builtin(tmp_path):
    r = run_cli("components", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in ("mllp", "dicom", "fhir", "file", "store", "hl7_to_fhir", "dicom_to_fhir", "dicom_to_hl7",
                 "hl7_to_worklist", "deidentify"):
        assert f"type: {name}" in r.stdout, name


def test_components_doc_is_generated_from_the_code():
    from conftest import ROOT

    # a fresh process: this one has the test-only components registered
    out = subprocess.run([sys.executable, "-m", "engine.cli", "components", "--markdown"], capture_output=True,
                         text=True, cwd=ROOT)
    committed = (ROOT / "docs" / "components.md").read_text()
    assert committed.strip() == out.stdout.strip(), \
        "docs/components.md is stale: run `medrelay components --markdown > docs/components.md`"


def test_cli_errors_are_one_line_not_tracebacks(tmp_path):
    import socket

    # offline command, store URL needing an unset variable: named with file and line
    cfg = tmp_path / "pg.yaml"
    cfg.write_text('store: {url: "postgresql+psycopg://u:${NO_SUCH_PW}@127.0.0.1:1/db"}\nchannels: {}\n')
    r = run_cli("messages", "list", "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 4 and f"{cfg}:1: store.url: needs NO_SUCH_PW" in r.stderr
    # a store that cannot be reached: one line, exit 4
    r = run_cli("messages", "list", "-c", str(cfg), cwd=tmp_path, env={"NO_SUCH_PW": "x"})
    assert r.returncode == 4 and "cannot open the store: OperationalError" in r.stderr
    assert "Traceback" not in r.stderr
    # `run` on a port already taken: a logged error and exit 4, no traceback
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = tmp_path / "busy.yaml"
        busy.write_text(textwrap.dedent(YAML).replace("port: 0", f"port: {port}"))
        r = run_cli("run", str(busy), cwd=tmp_path)
    assert r.returncode == 4 and "engine.start_failed" in r.stderr and "Traceback" not in r.stderr
