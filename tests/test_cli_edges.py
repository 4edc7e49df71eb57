"""The command line at its edges (probe session 6, findings 5, 7 and 10), run as a real process:
a closed stdout ends quietly, a replay of what does not exist is an error, `check --connect`
reaches the store, `store gc` refuses a negative age, `test` takes `-c`, and a replayed
delivery that is done no longer shows the old error."""

import json
import os
import subprocess
import sys
import textwrap

import engine_fakes
from test_engine_ops import YAML, run_cli
from test_engine_pipeline import submit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _closed_stdout(*args, cwd):
    """The command with a stdout whose reader has gone (what `| head -1` leaves it after one line)."""
    r, w = os.pipe()
    os.close(r)
    try:
        env = {**os.environ, "MEDRELAY_PLUGINS": "engine_fakes",
               "PYTHONPATH": os.pathsep.join((ROOT, os.path.dirname(__file__)))}
        return subprocess.run([sys.executable, "-m", "engine.cli", *args], stdout=w, stderr=subprocess.PIPE,
                              text=True, cwd=cwd, env=env)
    finally:
        os.close(w)


def test_a_closed_stdout_ends_quietly_with_141_for_every_kind_of_output(engine_factory):
    engine_fakes.SCRIPT["ops"] = ["ok"]
    eng = engine_factory(YAML)
    submit(eng, b"one")
    cfg = str(eng.config_path)
    for args in (("messages", "list", "-c", cfg), ("messages", "list", "-c", cfg, "--json"), ("components",),
                 ("check", cfg), ("--help",)):
        r = _closed_stdout(*args, cwd=eng.data_dir)
        assert r.returncode == 141, (args, r.returncode, r.stderr)  # before: 1 with "BrokenPipeError"
        assert "BrokenPipe" not in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_replay_of_what_does_not_exist_is_an_error_and_nothing_to_do_is_not(engine_factory, store_url):
    engine_fakes.SCRIPT["ops"] = ["perm"]
    eng = engine_factory(YAML.replace('"sqlite:///data/m.db"', f'"{store_url}"'))  # both settle paths
    mid = submit(eng, b"one").message_id
    cfg = str(eng.config_path)
    eng.wait_for(lambda: '"dead"' in run_cli("messages", "show", "-c", cfg, mid, cwd=eng.data_dir).stdout or None)
    for args, code, said in ((("nosuchid",), 1, "replay: no message nosuchid"),
                             ((mid, "nosuchid2"), 1, "replay: no message nosuchid2"),
                             (("--channel", "nosuch", "-y"), 2, "replay: no channel 'nosuch'"),
                             (("--route", "nosuch", "-y"), 2, "replay: no route 'nosuch' in any channel"),
                             (("--channel", "in", "--route", "nosuch", "-y"), 2, "no route 'nosuch' in channel 'in'")):
        r = run_cli("replay", "-c", cfg, "--no-wait", *args, cwd=eng.data_dir)
        assert r.returncode == code and said in r.stderr, (args, r.returncode, r.stdout, r.stderr)
        assert "requeued" not in r.stdout, args  # before: "requeued 0 deliveries", exit 0
    # names that exist, with nothing in the state asked for: nothing wrong, nothing to do
    r = run_cli("replay", "-c", cfg, "--route", "a", "--state", "pending", "-y", cwd=eng.data_dir)
    assert r.returncode == 0 and "nothing to replay: no pending delivery matches" in r.stdout, r.stdout + r.stderr
    # and the real one: delivered now, and `messages show` no longer says the old error
    shown = json.loads(run_cli("messages", "show", "-c", cfg, mid, cwd=eng.data_dir).stdout)
    assert shown["deliveries"][0]["last_error"] == "scripted permanent failure"
    r = run_cli("replay", "-c", cfg, mid, "--timeout", "60", cwd=eng.data_dir)
    assert r.returncode == 0 and "result: done=1" in r.stdout, r.stdout + r.stderr
    shown = json.loads(run_cli("messages", "show", "-c", cfg, mid, cwd=eng.data_dir).stdout)
    d = shown["deliveries"][0]
    assert d["state"] == "done" and d["last_error"] is None, d  # before: the old error on a done delivery
    assert [t.get("error") for t in d["tries"]][:1] == ["scripted permanent failure"], d["tries"]  # history kept


def test_check_is_offline_unless_connect_and_says_so(tmp_path):
    cfg = tmp_path / "pg.yaml"
    cfg.write_text(textwrap.dedent(YAML).replace('"sqlite:///data/m.db"',
                                                 '"postgresql+psycopg://nobody:x@127.0.0.1:1/nodb"'))
    r = run_cli("check", str(cfg), cwd=tmp_path)
    assert r.returncode == 0, r.stderr  # offline: a lint that runs in CI without the database
    r = run_cli("check", "--connect", str(cfg), cwd=tmp_path)
    assert r.returncode == 4, r.stdout + r.stderr  # before: no such option
    assert r.stderr.startswith(f"{cfg}: store: cannot be reached: OperationalError:"), r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(YAML))
    r = run_cli("check", "--connect", str(good), cwd=tmp_path)
    assert r.returncode == 0 and "ok (" in r.stdout, r.stderr
    assert not (tmp_path / "data").exists()  # checking creates no database and no blob folder
    helped = run_cli("check", "--help", cwd=tmp_path).stdout
    assert "Offline by default" in helped and "--connect" in helped


def test_store_gc_refuses_a_negative_age_and_test_takes_c(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(textwrap.dedent(YAML))
    r = run_cli("store", "gc", "-c", str(good), "--older-than", "-5", cwd=tmp_path)
    assert r.returncode == 2 and "--older-than" in r.stderr, r.stderr  # before: accepted
    for args in (("-c", str(good)), ("--config", str(good)), (str(good),)):
        r = run_cli("test", *args, cwd=tmp_path)
        assert r.returncode == 1 and "no cases in" in r.stderr, (args, r.stderr)  # before: No such option '-c'
    r = run_cli("test", str(good), "-c", str(tmp_path / "other.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "two configs" in r.stderr, r.stderr
