"""`medrelay import` of a folder holding a large DICOM file (issue 13 item 3).

The CLI sends the file in pieces read from disk (pynetdicom's chunked C-STORE), and the engine's
Upper Layer streams it to its blob, so neither process holds the instance: the engine (`medrelay
run` in a subprocess) and the CLI are both measured by their VmHWM (peak RSS, /proc). The stored
blob is compared with the file chunk by chunk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from bench.large import data_set_offset, proc_status, write_large_instance
from tests import test_dicom_stream_in as si
from tests.dicom_peers import data_file, free_port

pytestmark = pytest.mark.slow

MiB = 1 << 20
CLI_LIMIT = 200 * MiB


class ImportEngine(si.Engine):
    """`medrelay run` with a DICOM channel that takes the import's calling AE title, and an MLLP
    one (a large DICOM file in a folder imported into it is skipped without being read)."""

    def __init__(self, medrelay_proc, tmp_path: Path) -> None:
        self.data = tmp_path / "data"
        self.port, self.mllp = free_port(), free_port()
        self.url = f"sqlite:///{self.data}/medrelay.db"
        yaml = si._yaml(self.data, self.port, self.url).replace("TESTSCU", "MEDRELAY-IMPORT")
        self.proc = medrelay_proc(yaml + f"""  hl7:
    source: {{type: mllp, port: {self.mllp}}}
""")
        self.proc.start()
        self.proc.wait_port(self.port)
        self.proc.wait_port(self.mllp)
        assert self.proc.proc is not None
        self.pid = self.proc.proc.pid


def run_import(eng: ImportEngine, channel: str, port: int, folder: Path) -> tuple[int, str, int]:
    """(exit code, output, peak RSS in bytes) of `medrelay import`.

    The peak is the CLI's VmHWM, read from /proc every 20 ms until it exits (VmHWM only grows, so
    the last reading is the peak up to 20 ms before the end). Not ``wait4``'s ``ru_maxrss``: Linux
    carries a forked child's pre-exec RSS into it, i.e. this test process's own size."""
    out = folder.parent / f"import-{channel}.out"
    peak = 0
    with open(out, "wb") as f:
        p = subprocess.Popen([sys.executable, "-m", "engine.cli", "import", "-c", str(eng.proc.config_path),
                              "--channel", channel, "--port", str(port), str(folder)],
                             stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 600
            while p.poll() is None:
                assert time.monotonic() < deadline, "medrelay import did not finish"
                try:
                    peak = max(peak, proc_status(p.pid)["VmHWM"])
                except (OSError, KeyError):  # exited between poll and read
                    pass
                time.sleep(0.02)
        finally:
            if p.poll() is None:
                p.kill()
            p.wait()
    return p.returncode, out.read_text(), peak


def test_import_folder_with_a_large_file_is_streamed_with_both_processes_bounded(medrelay_proc, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    big = folder / "big.dcm"
    uids = write_large_instance(big, int(os.environ.get("MEDRELAY_TEST_BIG_MB", "400")) * MiB,
                                patient_id="IMPORT^BIG")
    small = dcmread(data_file("CT_small.dcm"))
    small.SOPInstanceUID = small.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    small.save_as(folder / "small.dcm", enforce_file_format=True)
    (folder / "notes.txt").write_text("not dicom")
    eng = ImportEngine(medrelay_proc, tmp_path)
    code, text, cli_peak = run_import(eng, "dcm", eng.port, folder)
    print(f"import of {big.stat().st_size / MiB:.0f} MiB: CLI peak RSS {cli_peak / MiB:.0f} MiB, engine "
          f"{eng.rss()['VmHWM'] / MiB:.0f} MiB")
    assert code == 1, text  # one file skipped
    assert "2 accepted, 0 rejected, 1 skipped" in text, text
    assert f"skipped: {folder / 'notes.txt'}: not DICOM: a text file" in text
    assert cli_peak < CLI_LIMIT, f"CLI peak RSS {cli_peak / MiB:.0f} MiB"
    assert eng.rss()["VmHWM"] < si.RSS_LIMIT
    store = eng.store()
    _mid, blob_id, meta_end = si._stored(store, uids["SOPInstanceUID"])
    digest, n = si._blob_data_set_digest(store, blob_id, meta_end)
    assert digest == si._file_data_set_digest(big)
    assert n - meta_end == big.stat().st_size - data_set_offset(big)
    assert si._messages(store) == 2
    # the same folder into the HL7 channel: every file skipped, the large one without being read whole
    code, text, cli_peak = run_import(eng, "hl7", eng.mllp, folder)
    assert "0 accepted, 0 rejected, 3 skipped" in text, text
    assert f"skipped: {big}: not HL7 v2: a DICOM file" in text, text
    assert cli_peak < CLI_LIMIT, f"CLI peak RSS {cli_peak / MiB:.0f} MiB"
    assert si._messages(store) == 2
    store.dispose()
