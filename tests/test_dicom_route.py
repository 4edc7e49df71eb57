"""routes/dicom.py: C-STORE SCU forwarding to DCMTK storescp, transfer syntax kept, data set byte-identical."""

from __future__ import annotations

import pytest
from pydicom import dcmread

from tests.dicom_peers import StoreSCP, data_file, dataset_bytes, dicom_yaml, storescu_any
from tests.test_dicom_scp import stored

pytestmark = pytest.mark.dcmtk


def complete(scp: StoreSCP, n: int) -> bool:
    """storescp has written ``n`` files and none of them is still growing."""
    import time

    before = {f: f.stat().st_size for f in scp.files()}
    if len(before) < n:
        return False
    time.sleep(0.5)
    return {f: f.stat().st_size for f in scp.files()} == before


def test_forward_to_storescp_keeps_syntax(engine_factory, tmp_path):
    scp = StoreSCP(tmp_path / "pacs", aet="PACS", extra=("+xa",))
    try:
        routes = f"""
      - name: to-pacs
        when: {{Modality: [CT, MR, NM]}}
        to: {{type: dicom, host: 127.0.0.1, port: {scp.port}, called_ae_title: PACS, ae_title: MEDRELAY}}"""
        e = engine_factory(dicom_yaml(routes=routes))
        port = e.address("dcm")[1]
        names = ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "rtplan.dcm", "693_J2KR.dcm"]
        files = [data_file(n) for n in names]
        assert storescu_any(port, files) == ["Success"] * len(files)
        e.wait_for(lambda: complete(scp, 4), timeout=30)
        got = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in scp.files()}
        sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files
                if dcmread(f, stop_before_pixels=True).Modality in ("CT", "MR", "NM")}
        assert set(got) == set(sent)  # the RTPLAN did not match `when`
        for uid, p in got.items():
            ours = dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID
            theirs = dcmread(sent[uid], stop_before_pixels=True).file_meta.TransferSyntaxUID
            assert ours == theirs
            assert dataset_bytes(p) == stored(e, uid)  # sent as received, not re-encoded
    finally:
        scp.stop()


def test_refusing_peer_is_a_delivery_error(engine_factory, tmp_path):
    from routes.dicom import permanent

    assert permanent(0xA900) and permanent(0xC123) and not permanent(0xA700)
