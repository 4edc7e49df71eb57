"""kill -9 during a storescu run: every instance answered 0x0000 is there after restart."""

from __future__ import annotations

import random
import re
import subprocess

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from engine.security.crypto import KeyRing
from engine.store.db import Store
from engine.store.dicom import index as idx
from tests.dicom_peers import ENV, data_file, free_port, tool

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def test_kill9_loses_no_acknowledged_instance(medrelay_proc, tmp_path):
    storescu = tool("storescu")
    data = tmp_path / "data"
    port = free_port()
    yaml = f"""
store: {{url: "sqlite:///{data}/medrelay.db", blobs: "{data}/blobs"}}
keys: {{kek_file: "{data}/keys.json"}}
channels:
  dcm:
    source: {{type: dicom, port: {port}, ae_title: MEDRELAY, calling_aets: [TESTSCU]}}
"""
    src = tmp_path / "src"
    src.mkdir()
    base = dcmread(data_file("CT_small.dcm"))
    files = []
    for i in range(150):
        base.SOPInstanceUID = generate_uid()
        base.file_meta.MediaStorageSOPInstanceUID = base.SOPInstanceUID
        f = src / f"ct{i:03}.dcm"
        base.save_as(f, enforce_file_format=True)
        files.append((f, str(base.SOPInstanceUID)))
    proc = medrelay_proc(yaml)
    proc.start()
    proc.wait_port(port)
    scu = subprocess.Popen([storescu, "-v", "-R", "-aet", "TESTSCU", "-aec", "MEDRELAY", "127.0.0.1", str(port),
                            *[str(f) for f, _ in files]], env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    lines, successes = [], 0
    kill_at = random.randint(5, 100)  # a random moment of the run
    assert scu.stdout is not None
    for line in scu.stdout:
        lines.append(line)
        if "Received Store Response (Success)" in line:
            successes += 1
            if successes == kill_at:
                proc.kill9()
                break
    rest, _ = scu.communicate(timeout=60)
    lines += rest.splitlines(keepends=True)
    acked, current = [], None
    for line in lines:
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
    assert len(acked) >= kill_at
    # restart: the store opens (WAL recovery) and the listener serves again
    proc2 = medrelay_proc(yaml)
    proc2.start()
    proc2.wait_port(port)
    assert proc2.terminate() == 0
    uid_of = {str(f): uid for f, uid in files}
    store = Store(f"sqlite:///{data}/medrelay.db", data / "blobs", KeyRing(data / "keys.json"))
    with store.engine.connect() as conn:
        for path in acked:
            row = idx.existing_instance(conn, uid_of[path])
            assert row is not None, path
            ref = idx.InstanceRef(uid_of[path], row["sop_class_uid"], row["transfer_syntax"], row["message_id"],
                                  None)
            ts, body = idx.split_part10(idx.load_instance(conn, store, ref))
            assert len(body) == row["size"]
    store.dispose()
