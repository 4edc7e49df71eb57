"""`medrelay check` on the new sources (issue 15 item 5): the issue's YAML shape, folders, queries."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT


def check(tmp_path, text: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cfg = tmp_path / "channels.yaml"
    cfg.write_text(textwrap.dedent(text))
    return subprocess.run([sys.executable, "-m", "engine.cli", "check", str(cfg)], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=120)


def test_the_issue_yaml_shape_validates(tmp_path):
    drop = tmp_path / "srv" / "drop" / "lab"
    drop.mkdir(parents=True)
    r = check(tmp_path, f"""
    channels:
      lab-drop:
        source: {{type: file, path: {drop}, pattern: "*.hl7", after: move, done_path: {drop}/done}}
        routes:
          - {{name: fwd, to: {{type: mllp, host: ris.example, port: 2575}}}}
      orders-http:
        source: {{type: http, host: 127.0.0.1, port: 8081, path: /hl7, auth: {{bearer_tokens: ["${{API_TOKEN}}"]}}}}
        routes:
          - {{name: fwd, to: {{type: mllp, host: ris.example, port: 2575}}}}
    """, {"API_TOKEN": "t0ken-for-the-check"})
    assert r.returncode == 0, r.stderr
    assert "ok (2 channels, 2 routes" in r.stdout


def test_a_missing_folder_and_a_done_path_that_is_a_file_are_environment_problems(tmp_path):
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "donefile").write_text("x")
    r = check(tmp_path, f"""
    channels:
      a:
        source: {{type: file, path: {tmp_path}/nowhere}}
      b:
        source: {{type: file, path: {tmp_path}/here, done_path: donefile}}
    """)
    assert r.returncode == 4
    lines = r.stderr.strip().splitlines()
    assert any("channels.a.source.path: folder not found" in x for x in lines)
    assert any("channels.b.source.done_path: not a folder" in x for x in lines)
    assert all(":" in x.split(" ")[0] for x in lines)  # file:line first


def test_schema_errors_of_the_new_sources(tmp_path):
    r = check(tmp_path, """
    channels:
      a:
        source: {type: file, path: x, pattern: "sub/*.hl7", ready: soon}
      b:
        source: {type: database, url: "sqlite:///x.db", key: id}
      c:
        source: {type: http, port: 0, auth: {open: true}, accept: [pdf]}
    """)
    assert r.returncode == 2
    err = r.stderr
    assert "channels.a.source.pattern" in err and "channels.a.source.ready" in err
    assert "give either table or query" in err
    assert "channels.c.source.accept" in err


def test_the_query_must_parse_on_the_source_database(tmp_path):
    import sqlite3

    db = tmp_path / "lis.db"
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE results (id INTEGER PRIMARY KEY, mrn TEXT)")
    c.commit()
    c.close()
    base = """
    channels:
      lis:
        source: {{type: database, url: "${{LIS_DB_URL}}", {what}, key: id}}
    """
    env = {"LIS_DB_URL": f"sqlite:///{db}"}
    ok = check(tmp_path, base.format(what="table: results"), env)
    assert ok.returncode == 0, ok.stderr
    ok2 = check(tmp_path, base.format(what='query: "SELECT id, mrn FROM results WHERE mrn IS NOT NULL"'), env)
    assert ok2.returncode == 0, ok2.stderr
    bad = check(tmp_path, base.format(what='query: "SELEC id FROM results"'), env)
    assert bad.returncode == 4 and "channels.lis.source.query: the source database refused the query" in bad.stderr
    missing = check(tmp_path, base.format(what="table: nosuch"), env)
    assert missing.returncode == 4 and "channels.lis.source.table" in missing.stderr and "nosuch" in missing.stderr


@pytest.mark.postgres
def test_an_unreachable_source_database_is_reported(tmp_path):
    r = check(tmp_path, """
    channels:
      lis:
        source: {type: database, url: "${LIS_DB_URL}", table: t, key: id, connect_timeout: 2}
    """, {"LIS_DB_URL": "postgresql+psycopg://u:p@127.0.0.1:1/db"})
    assert r.returncode == 4 and "channels.lis.source.url" in r.stderr
    assert "p@" not in r.stderr  # the password never printed
