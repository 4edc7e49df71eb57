"""`medrelay check` and `medrelay replay` via subprocess (probe session 7b findings 2 and 9).

2: a raw HL7 v2 route to `to: {type: store}` passed check (exit 0) and dead-lettered every
   message at run time ("no store handler for 'hl7v2'") after ACKing it: now exit 3 naming it.
9: `replay --yes` with no engine running waited the whole --timeout (exit 1) and redrew its
   progress bar hundreds of times on a non-terminal stderr: now exit 4 at once, and says the
   requeued deliveries stay queued.
"""

import textwrap
import time

import engine_fakes
from test_engine_ops import YAML, run_cli
from test_engine_pipeline import submit

HL7_TO_STORE = """\
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  adt:
    source: {type: mllp, port: 0}
    routes:
      - {name: raw, when: {"PID-5.1": "SECRETFAMILY"}, to: {type: store}}
      - {name: fhir, transforms: [{type: hl7_to_fhir}], to: {type: store}}
      - {name: forced, to: {type: store, as: fhir}}
      - name: worklist
        transforms: [{type: hl7_to_worklist}]
        to: {type: store}
"""


def test_check_refuses_a_store_that_cannot_file_the_routes_kind(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(HL7_TO_STORE)
    r = run_cli("check", str(cfg), cwd=tmp_path)
    assert r.returncode == 3, r.stdout + r.stderr
    lines = [x for x in r.stderr.splitlines() if "store has no handler" in x]
    assert lines == [f"{cfg}:7: channels.adt.routes[0].to: the store has no handler for hl7v2 messages (it files "
                     "dicom, fhir messages): add a transform that produces one (e.g. hl7_to_fhir, hl7_to_worklist) "
                     "before it, or as:"], r.stderr
    # after a transform producing FHIR, with as:, after hl7_to_worklist (store_as: worklist): fine
    cfg.write_text(HL7_TO_STORE.replace('      - {name: raw, when: {"PID-5.1": "SECRETFAMILY"}, to: {type: store}}\n',
                                        ""))
    r = run_cli("check", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and "ok (1 channels, 3 routes" in r.stdout, r.stdout + r.stderr


def test_the_example_config_still_passes_check(tmp_path):
    import pathlib
    example = pathlib.Path(__file__).resolve().parent.parent / "channels.yaml"
    r = run_cli("check", str(example), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_replay_with_no_engine_running_exits_4_at_once(engine_factory):
    engine_fakes.SCRIPT["ops"] = ["perm", "perm"]
    eng = engine_factory(textwrap.dedent(YAML))
    submit(eng, b"one")
    submit(eng, b"two")
    cfg = str(eng.config_path)
    eng.wait_for(lambda: len(run_cli("messages", "list", "-c", cfg, "--state", "dead",
                                     cwd=eng.data_dir).stdout.splitlines()) == 2 or None)
    eng.stop()
    t0 = time.monotonic()
    r = run_cli("replay", "-c", cfg, "--yes", "--timeout", "60", cwd=eng.data_dir)
    took = time.monotonic() - t0
    assert r.returncode == 4, r.stdout + r.stderr
    assert took < 20, took
    assert "requeued 2 deliveries" in r.stdout
    assert "no engine is running" in r.stderr and "stay queued" in r.stderr, r.stderr
    assert r.stderr.count("\r") <= 5, r.stderr  # no progress bar redraws
    # --no-wait: the same warning, exit 0 (nothing was waited for)
    r = run_cli("replay", "-c", cfg, "--yes", "--no-wait", "--state", "pending", cwd=eng.data_dir)
    assert r.returncode == 0 and "no engine is running" in r.stderr, r.stdout + r.stderr
