"""Every line `medrelay run` writes is one JSON event, libraries' included (engine/logging.py):
pydicom logs each failed pixel decoder's traceback at ERROR and pynetdicom an ERROR for every
transfer syntax a peer did not accept, which reached stderr as tracebacks and plain text lines.
Driven by DCMTK getscu accepting Implicit VR Little Endian only, for a JPEG Extended 12-bit instance no
installed decoder reads (a counted failed sub-operation), and for a JPEG Baseline one that is
converted."""

from __future__ import annotations

import json
import time

import pytest
from pydicom import dcmread
from pynetdicom import AE

from tests.dicom_peers import data_file, dicom_yaml, free_port, run

pytestmark = pytest.mark.dcmtk


def test_transcoding_failures_and_conversions_log_json_lines_only(medrelay_proc):
    port = free_port()
    p = medrelay_proc(dicom_yaml(port))
    p.start()
    p.wait_port(port)
    studies = []
    ae = AE(ae_title="TESTSCU")
    files = [data_file("JPEG-lossy.dcm"), data_file("SC_rgb_jpeg_dcmtk.dcm")]
    for f in files:
        ds = dcmread(f)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        studies.append(str(ds.StudyInstanceUID))
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDRELAY")
    assert assoc.is_established
    assert [assoc.send_c_store(f).Status for f in files] == [0x0000, 0x0000]
    assoc.release()
    for study in studies:
        run("getscu", "+xi", "-aet", "GETSCU", "-aec", "MEDRELAY", "-od", str(p.data_dir),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port))
    deadline = time.monotonic() + 30
    text = p.log_path.read_text()
    while text.count('"dicom.get"') < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        text = p.log_path.read_text()
    assert text.count('"dicom.get"') == 2, text[-2000:]
    assert "dicom.transcode_failed" in text  # the JPEG Extended one could not be converted
    bad = [line for line in text.splitlines() if line.strip() and not _is_json(line)]
    assert not bad, "\n".join(bad[:20])


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
