"""`medrelay replay --config NEW.yaml --diff`: stored messages through a new config's routes, nothing sent."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import delivered_files
from mllp_peers import RawClient, adt, msa

V1 = """\
store: {url: "sqlite:///data/m.db", blobs: data/blobs}
keys: {kek_file: data/keys.json}
channels:
  in:
    source: {type: mllp, host: 127.0.0.1, port: 0}
    routes:
      - name: to-ris
        transforms:
          - type: hl7_map
            rules: [{set: {MSH-5: RIS}}]
        to: {type: file, path: out/ris}
      - name: old-only
        when: {PID-8: M}
        to: {type: file, path: out/old}
"""

V2 = V1.replace("MSH-5: RIS", "MSH-5: RIS2").replace("when: {PID-8: M}", "when: {PID-8: F}") + """\
      - name: filtered-now
        transforms: [{type: filter, drop: {MSH-9.1: ADT}}]
        to: {type: file, path: out/new}
"""


def cli(cwd, *args):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_replay_diff_shows_routing_and_output_changes_and_sends_nothing(engine_factory):
    e = engine_factory(V1)
    with RawClient(*e.address("in")) as c:
        assert msa(c.request(adt("R1")))[1] == "AA"
    d = e.data_dir
    e.wait_for(lambda: len(delivered_files(d / "out" / "ris")) == 1 and len(delivered_files(d / "out" / "old")) == 1)
    (d / "v2.yaml").write_text(textwrap.dedent(V2))
    (d / "v1.yaml").write_text(textwrap.dedent(V1))
    before = sorted(p.name for p in (d / "out").rglob("*"))

    r = cli(d, "replay", "--config", "v2.yaml", "--against", "channels.yaml", "--diff", "--channel", "in")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert any(ln.endswith("in/to-ris: output changes (MSH)") for ln in lines), lines
    assert any(ln.endswith("in/old-only: routed -> not routed") for ln in lines), lines
    assert any(ln.endswith("in/filtered-now: no route -> filtered: filter: drop condition met") for ln in lines)
    assert "DOE" not in r.stdout  # no patient data without --phi
    assert lines[-1] == "3 route results would change in 1 messages"

    r = cli(d, "replay", "--config", "v2.yaml", "--against", "channels.yaml", "--diff", "--phi", "--channel", "in")
    assert "    +MSH|^~\\&|HIS|HOSP|RIS2|" in r.stdout and "    -MSH|^~\\&|HIS|HOSP|RIS|" in r.stdout

    r = cli(d, "replay", "--config", "channels.yaml", "--against", "v1.yaml", "--diff", "--channel", "in")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "in/to-ris: unchanged (routed)" in r.stdout and "0 route results would change" in r.stdout

    # the stamped hash tells an unknown old config: the old side is what the store recorded
    r = cli(d, "replay", "--config", "v2.yaml", "--against", "v2.yaml", "--diff", "--channel", "in")
    assert "old output unknown" in r.stdout and "in/old-only: routed -> not routed" in r.stdout

    assert sorted(p.name for p in (d / "out").rglob("*")) == before  # nothing was sent
    from engine.messages import list_messages

    rows = list_messages(e.store, channel="in")
    assert {x["route"]: x["state"] for x in rows[0]["deliveries"]} == {"to-ris": "done", "old-only": "done"}
    from sqlalchemy import select

    from engine.store import schema

    with e.store.engine.connect() as conn:
        acts = conn.execute(select(schema.audit_events.c.action, schema.audit_events.c.detail)).all()
    diffs = [detail for action, detail in acts if action == "message.replay_diff"]
    assert len(diffs) == 4 and "outputs shown with --phi" in diffs[1]
