"""The file source on an SFTP folder (issue 15 item 1), against a real OpenSSH sshd on 127.0.0.1.

The test starts `/usr/sbin/sshd -D` with its own config, host key and authorized key
(Debian's openssh-server; scripts/test.sh installs it). medrelay logs in with a key,
checks the server's host key against a known_hosts file, and takes the files through
the same claim protocol as on a local disk (rename into .medrelay-inflight/ on the server).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from engine.store import schema
from listeners.file import INFLIGHT
from tests.conftest import free_port, need_tool
from tests.dicom_peers import data_file
from tests.ports import wait_port
from tests.test_source_file import hl7


class Sshd:
    def __init__(self, root: Path) -> None:
        sshd = need_tool("/usr/sbin/sshd")
        keygen = need_tool("ssh-keygen")
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        self.root = root
        self.host_key = root / "host_ed25519"
        self.client_key = root / "client_ed25519"
        for k in (self.host_key, self.client_key):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
        auth = root / "authorized_keys"
        auth.write_text(self.client_key.with_suffix(".pub").read_text())
        os.chmod(auth, 0o600)
        self.port = free_port()
        cfg = root / "sshd_config"
        cfg.write_text(f"""
ListenAddress 127.0.0.1
Port {self.port}
HostKey {self.host_key}
AuthorizedKeysFile {auth}
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
Subsystem sftp internal-sftp
LogLevel ERROR
""")
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation folder
        self.log = open(root / "sshd.log", "wb")
        self.proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(cfg)], stdout=self.log, stderr=self.log)
        try:  # a deadline that ran out used to fall through silently, to fail later and elsewhere
            wait_port(self.port, 30, self.proc)
        except AssertionError as e:
            raise AssertionError(f"sshd: {e}: " + (root / "sshd.log").read_text()) from None
        self.known_hosts = root / "known_hosts"
        key = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {key[0]} {key[1]}\n")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def sshd(tmp_path):
    s = Sshd(tmp_path / "sshd")
    yield s
    s.stop()


def _yaml(remote: Path, s: Sshd, known_hosts: Path | None = None, extra: str = "") -> str:
    return f"""
    channels:
      sftp-drop:
        dedupe_window: 0
        source:
          type: file
          path: {remote}
          ready: immediate
          poll_interval: 0.1
          pattern: "*.in"{extra}
          sftp: {{host: 127.0.0.1, port: {s.port}, username: {os.environ.get('USER', 'root')},
                  private_key: {s.client_key}, known_hosts: {known_hosts or s.known_hosts}, timeout: 10}}
    """


def _rows(e) -> list:
    m = schema.messages
    with e.store.engine.connect() as c:
        return c.execute(select(m.c.kind, m.c.headers, m.c.peer).where(m.c.channel == "sftp-drop")).all()


def test_sftp_folder_files_taken_through_the_claim_protocol(engine_factory, sshd, tmp_path):
    remote = tmp_path / "remote-drop"
    remote.mkdir()
    (remote / "lab1.in").write_bytes(hl7("SF1") + hl7("SF2"))
    (remote / "scan.in").write_bytes(data_file("MR_small.dcm").read_bytes())
    (remote / "obs.in").write_bytes(json.dumps({"resourceType": "Patient", "gender": "male"}).encode())
    (remote / "skip.txt").write_bytes(hl7("SF3"))  # not the pattern
    e = engine_factory(_yaml(remote, sshd))
    e.wait_for(lambda: len(_rows(e)) == 4, timeout=30)
    e.wait_for(lambda: sorted(p.name for p in (remote / "done").iterdir()) == ["lab1.in", "obs.in", "scan.in"])
    got = _rows(e)
    assert sorted(r.kind for r in got) == ["dicom", "fhir", "hl7v2", "hl7v2"]
    assert {r.peer for r in got} == {f"sftp:127.0.0.1:{sshd.port}"}
    assert (remote / "skip.txt").exists()
    assert [p.name for p in (remote / INFLIGHT).iterdir()] == []  # claims finished on the server


def test_sftp_wrong_host_key_is_refused_and_nothing_is_touched(engine_factory, sshd, tmp_path):
    remote = tmp_path / "remote2"
    remote.mkdir()
    (remote / "a.in").write_bytes(hl7("HK1"))
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    bad = tmp_path / "bad_known_hosts"
    k = other.with_suffix(".pub").read_text().split()
    bad.write_text(f"[127.0.0.1]:{sshd.port} {k[0]} {k[1]}\n")
    e = engine_factory(_yaml(remote, sshd, known_hosts=bad))
    time.sleep(2.0)
    assert (remote / "a.in").exists() and not (remote / INFLIGHT).exists()
    assert not _rows(e)
    assert e.runtime.listener("sftp-drop").serving  # still trying, not crashed


def test_sftp_recovers_a_claim_left_on_the_server(engine_factory, sshd, tmp_path):
    """A claim a killed engine left in the server's .medrelay-inflight/ is committed at start."""
    remote = tmp_path / "remote3"
    (remote / INFLIGHT).mkdir(parents=True)
    cid = "0000000000000001-cccccccccccc"
    (remote / INFLIGHT / f"{cid}.json").write_text(json.dumps({"name": "left.in"}))
    (remote / INFLIGHT / cid).write_bytes(hl7("RC1"))
    e = engine_factory(_yaml(remote, sshd))
    e.wait_for(lambda: [r.headers["MSH-10"] for r in _rows(e)] == ["RC1"])
    e.wait_for(lambda: (remote / "done" / "left.in").exists())
    assert [p.name for p in (remote / INFLIGHT).iterdir()] == []
