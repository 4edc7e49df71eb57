"""Operations: /metrics over HTTP, `medrelay check` output and exit codes, components docs."""

import re
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
        # the dead-letter gauge is read from the store and cached for 1 s, so it may lag the counter
        done = ('medrelay_deliveries_dead_lettered_total{channel="in",route="a"} 1.0' in text
                and 'medrelay_dead_letters{channel="in",route="a"} 1.0' in text)
        return text if done else None
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


# -- a busy port, for every kind of listener: named, exit 4 ------------------------------------
BUSY = {
    "mllp": "channels:\n  busy-in:\n    source: {type: mllp, port: PORT}\n",
    "dicom": "channels:\n  busy-in:\n    source: {type: dicom, port: PORT, calling_aets: [CT01]}\n",
    "fhir": "channels:\n  busy-in:\n    source: {type: fhir, port: PORT, auth: {open: true}}\n",
    "metrics": "metrics: {host: 127.0.0.1, port: PORT}\nchannels:\n  other:\n    source: {type: mllp, port: 0}\n",
}


def test_busy_port_names_channel_port_and_host_for_every_listener(tmp_path):
    """It was `OSError: [Errno 98] ...` (MLLP, DICOM), or only uvicorn's own line (FHIR)."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    def attempt(kind):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            d = tmp_path / kind
            d.mkdir()
            cfg = d / "channels.yaml"
            cfg.write_text('store: {url: "sqlite:///data/m.db", blobs: data/blobs}\nkeys: {kek_file: data/k.json}\n'
                           + BUSY[kind].replace("PORT", str(port)))
            r = subprocess.run([sys.executable, "-m", "engine.cli", "run", str(cfg)], capture_output=True, text=True,
                               cwd=d, timeout=120)
        return kind, port, r

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, BUSY))
    for kind, port, r in results:
        what = "metrics" if kind == "metrics" else "channel busy-in"
        assert r.returncode == 4, (kind, r.stderr[-2000:])
        assert f"{what}: port {port} on 127.0.0.1 is already in use" in r.stderr, (kind, r.stderr[-2000:])
        assert "Traceback" not in r.stderr and "Errno" not in r.stderr.split("engine.start_failed")[-1], kind


def test_run_on_a_missing_config_and_with_an_unset_variable(tmp_path):
    r = run_cli("run", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert r.returncode == 4 and "cannot read" in r.stderr and "Traceback" not in r.stderr
    cfg = tmp_path / "api.yaml"
    cfg.write_text('channels:\n  api:\n    source: {type: fhir, port: 0, auth: {bearer_tokens: ["${UNSET_TOK_9}"]}}\n')
    for cmd in ("check", "run"):
        r = run_cli(cmd, str(cfg), cwd=tmp_path)
        assert r.returncode == 4, (cmd, r.stderr)  # was 2: the validator's "empty token" won over the variable
        assert r.stderr.strip() == f"{cfg}:3: channels.api.source.auth.bearer_tokens[0]: environment variable " \
                                   "UNSET_TOK_9 is not set", r.stderr


# -- the exit codes --help documents, each one ---------------------------------------------------
def test_help_documents_the_exit_codes_every_command_uses(tmp_path):
    r = run_cli("--help", cwd=tmp_path)
    assert r.returncode == 0
    table = r.stdout.split("Exit codes (every command):", 1)[1]
    documented = {int(m) for m in re.findall(r"^\s+(\d)\s{2}", table, re.M)}
    assert documented == {0, 1, 2, 3, 4}
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(YAML))
    cases = {
        0: [("check", str(good))],
        1: [("messages", "show", "-c", str(good), "no-such-id"), ("test", str(good))],  # no cases: 1
        2: [("no-such-command",), ("messages", "list", "-c", str(good), "--since", "yesterday"),
            ("check", str(_write(tmp_path, "schema.yaml", YAML.replace("initial_delay: 0.05", "initial_delay: x"))))],
        3: [("check", str(_write(tmp_path, "topo.yaml", YAML + "      - {name: a, to: {type: test_collect, name: b}}\n"
                                 )))],
        4: [("check", str(_write(tmp_path, "env.yaml", YAML.replace("data/blobs", '"${NOT_SET_EXIT4}"')))),
            ("messages", "list", "-c", str(_write(tmp_path, "pg.yaml", 'store: {url: "postgresql+psycopg://u@127'
                                                                       '.0.0.1:1/db"}\nchannels: {}\n')))],
    }
    for code, calls in cases.items():
        for args in calls:
            r = run_cli(*args, cwd=tmp_path)
            assert r.returncode == code, (args, code, r.returncode, r.stdout[-500:], r.stderr[-1500:])
            assert "Traceback" not in r.stderr, args


def _write(d, name, text):
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


def _commands():
    from engine.cli.main import main

    def walk(group, prefix):
        for name, cmd in sorted(group.commands.items()):
            if hasattr(cmd, "commands"):
                yield from walk(cmd, (*prefix, name))
            else:
                yield (*prefix, name)
    return list(walk(main, ()))


def test_every_command_has_help_and_refuses_a_wrong_option_without_a_traceback(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    commands = _commands()
    assert {("run",), ("check",), ("test",), ("replay",), ("import",), ("messages", "list"), ("keys", "rotate"),
            ("store", "gc"), ("components",)} <= set(commands)

    def both(cmd):
        return cmd, run_cli(*cmd, "--help", cwd=tmp_path), run_cli(*cmd, "--no-such-option", cwd=tmp_path)

    with ThreadPoolExecutor(4) as pool:
        for cmd, helped, wrong in pool.map(both, commands):
            assert helped.returncode == 0 and helped.stdout.startswith("Usage: ") and not helped.stderr, cmd
            assert wrong.returncode == 2 and "No such option" in wrong.stderr, (cmd, wrong.stderr)
            assert "Traceback" not in helped.stderr + wrong.stderr, cmd


def test_test_help_names_channel_tests(tmp_path):
    r = run_cli("test", "--help", cwd=tmp_path)
    assert "channel-tests/" in r.stdout and not re.search(r"(?<!channel-)tests/ beside", r.stdout)


# -- replay without ids or filter: every dead letter, after a confirmation -------------------------
def test_replay_without_arguments_replays_every_dead_letter_once_confirmed(engine_factory):
    engine_fakes.SCRIPT["ops"] = ["perm", "perm"]
    eng = engine_factory(YAML)
    submit(eng, b"one")
    submit(eng, b"two")
    eng.wait_for(lambda: 'dead' in str(run_cli("messages", "list", "-c", str(eng.config_path), "--state", "dead",
                                                cwd=eng.data_dir).stdout) or None)
    eng.wait_for(lambda: len(run_cli("messages", "list", "-c", str(eng.config_path), "--state", "dead",
                                     cwd=eng.data_dir).stdout.splitlines()) == 2)
    cfg = str(eng.config_path)
    r = run_cli("replay", "-c", cfg, cwd=eng.data_dir)  # stdin is not a terminal: says what it would do
    assert r.returncode == 2 and "replay 2 dead deliveries of every channel (in/a: 2)?" in r.stderr, r.stderr
    assert "--yes" in r.stderr
    r = run_cli("replay", "-c", cfg, "--yes", "--timeout", "60", cwd=eng.data_dir)
    assert r.returncode == 0 and "requeued 2 deliveries" in r.stdout and "result: done=2" in r.stdout, \
        r.stdout + r.stderr
    r = run_cli("replay", "-c", cfg, cwd=eng.data_dir)
    assert r.returncode == 0 and "nothing to replay: no delivery is dead" in r.stdout, r.stdout + r.stderr
