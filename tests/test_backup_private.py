"""Backup and restore around the edges (probe session 6, findings 8 and 9), through the real CLI:
a backup is private (0700/0600, DEST and manifest included); --verify writes nothing into the
backup it checks; a damaged manifest exits 1 as documented; a failed restore leaves nothing it
created; a malformed key file is one clear line and exit 4 for every command that reads it."""

import json
import os
import stat

from test_engine_ops import run_cli
from test_engine_pipeline import submit

YAML = """
store: {url: "sqlite:///data/m.db", blobs: data/blobs, inline_max_bytes: 0}
keys: {kek_file: data/keys.json}
channels:
  in:
    source: {type: test_null}
    routes: []
"""


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def _backup(engine_factory, tmp_path):
    eng = engine_factory(YAML)
    submit(eng, b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|1|P|2.5\rPID|1||X1\r")
    eng.stop()
    dest = tmp_path / "bk"
    r = run_cli("backup", "-c", str(eng.config_path), str(dest), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    return eng, dest


def test_a_backup_is_private_and_verify_writes_nothing_into_it(engine_factory, tmp_path):
    eng, dest = _backup(engine_factory, tmp_path)
    for root, _dirs, files in os.walk(dest):
        assert _mode(root) == 0o700, root  # before: DEST 0755
        for f in files:
            assert _mode(os.path.join(root, f)) == 0o600, f  # before: manifest.json 0644
    assert any(f for _, _, fs in os.walk(dest / "blobs") for f in fs)
    before = sorted(os.listdir(dest))
    r = run_cli("backup", "--verify", str(dest), cwd=tmp_path)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
    assert sorted(os.listdir(dest)) == before  # before: medrelay.db-wal and -shm left in the backup
    os.chmod(dest, 0o500)  # read-only media
    try:
        r = run_cli("backup", "--verify", str(dest), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    finally:
        os.chmod(dest, 0o700)


def test_a_damaged_manifest_exits_1_and_another_format_4(engine_factory, tmp_path):
    eng, dest = _backup(engine_factory, tmp_path)
    good = (dest / "manifest.json").read_text()
    for text, code in (("{}", 1), ("[]", 1), ("not json", 1), ('{"format": 1}', 1),
                       (json.dumps({**json.loads(good), "format": 99}), 4)):
        (dest / "manifest.json").write_text(text)
        r = run_cli("backup", "--verify", str(dest), cwd=tmp_path)
        assert r.returncode == code, (text, r.returncode, r.stderr)  # before: {} exited 4
        assert "Traceback" not in r.stderr and "KeyError" not in r.stderr, r.stderr
    (dest / "manifest.json").unlink()
    r = run_cli("backup", "--verify", str(dest), cwd=tmp_path)
    assert r.returncode == 1 and "no manifest.json" in r.stderr, r.stderr


def test_a_failed_restore_leaves_nothing_it_created(engine_factory, tmp_path):
    eng, dest = _backup(engine_factory, tmp_path)
    with open(dest / "medrelay.db", "ab") as f:
        f.write(b"x")  # damaged: the recorded hash no longer matches
    target = tmp_path / "target"
    (target / "data").mkdir(parents=True)
    (target / "data" / "keys.json").write_bytes((eng.data_dir / "data" / "keys.json").read_bytes())
    (target / "data" / "other.txt").write_text("the operator's")
    cfg = target / "channels.yaml"
    cfg.write_text(YAML)
    r = run_cli("restore", "-c", str(cfg), str(dest), cwd=tmp_path)
    assert r.returncode == 4 and "nothing restored" in r.stderr, r.stderr
    # before: an empty data/m.db and data/blobs with 256 empty sub-folders were left behind
    assert sorted(os.listdir(target / "data")) == ["keys.json", "other.txt"]


def test_a_malformed_key_file_is_one_clear_line_for_every_command(engine_factory, tmp_path):
    eng, dest = _backup(engine_factory, tmp_path)
    bad = tmp_path / "fake-kek.json"
    for text, why in (('{"keks": {}}', "no keks"), ('{"keks": {"k1": "AAAA"}}', "no active key"),
                      ("[1]", "not a JSON object"), ("{", "not JSON"),
                      ('{"keks": {"k1": "AAAA"}, "active": "k2"}', "active key 'k2' missing")):
        bad.write_text(text)
        os.chmod(bad, 0o600)
        r = run_cli("backup", "--verify", "--kek-file", str(bad), str(dest), cwd=tmp_path)
        assert r.returncode == 4, (text, r.returncode, r.stderr)  # before: KeyError: 'active', exit 1
        assert r.stderr.strip() == f"medrelay: {bad}: not a medrelay key file ({why})", r.stderr
    keys = eng.data_dir / "data" / "keys.json"
    keys.write_text('{"keks": {}}')
    for args in (("messages", "list"), ("keys", "list"), ("store", "gc", "--dry-run")):
        r = run_cli(*args, "-c", str(eng.config_path), cwd=tmp_path)
        assert r.returncode == 4, (args, r.stderr)
        assert f"{keys}: not a medrelay key file (no keks)" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr, args
